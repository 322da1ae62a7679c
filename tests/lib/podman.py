"""A real container engine for the container tests: podman with runc, a Python base image made from Debian packages.

No Docker engine and no image registry are reachable on these machines. scripts/install-podman.sh installs podman,
runc and mmdebstrap when they are missing and makes the base image (cached under .cache/podman and in podman's own
storage), so a fresh CI machine needs nothing installed by hand.

Engine settings (the same as docs/containers.md): runc with plain cgroupfs, because crun refuses the hybrid cgroup
layout of these kernels; file and process limits at 1024, because the engine's defaults are above what the
sandbox lets a container raise them to. `podman kube play` takes no --ulimit, so the limits also go into a
CONTAINERS_CONF file that every podman command here is given.

Everything a test creates is named PREFIX-..., PREFIX unique to the pytest run, so that `cleanup()` finds all of
it (containers, pods, volumes) even after a failure.
"""

import os
import secrets
import shutil
import subprocess
import tempfile

import pytest

from lib.consul_agent import ROOT

INSTALL = os.path.join(ROOT, "scripts", "install-podman.sh")
ENGINE_FLAGS = ["--runtime", "runc", "--cgroup-manager=cgroupfs"]
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
"""
# Image build context of the project's image: the repository root, or another tree (e.g. a clean export of a
# known-good commit while the working tree is mid-change).
CONTEXT_VAR = "CONSUL_LOCKER_BUILD_CONTEXT"


def build_context():
    return os.path.abspath(os.environ.get(CONTEXT_VAR) or ROOT)


class Podman:
    """podman with this machine's engine settings; names everything it creates PREFIX-..."""

    def __init__(self, base_image):
        self.base_image = base_image
        self.prefix = "cltest-" + secrets.token_hex(3)
        self._dir = tempfile.mkdtemp(prefix="consul-locker-podman-")
        self.conf = os.path.join(self._dir, "containers.conf")
        with open(self.conf, "w") as f:
            f.write(CONTAINERS_CONF)
        self.env = dict(os.environ, CONTAINERS_CONF=self.conf)
        self._count = 0

    def name(self, role):
        """A name for a container or pod of this run: PREFIX-ROLE-N."""
        self._count += 1
        return f"{self.prefix}-{role}-{self._count}"

    def __call__(self, *args, timeout=60, check=True, input=None):
        """Run `podman ARGS`; returns CompletedProcess with text stdout and stderr."""
        cmd = ["podman", *ENGINE_FLAGS, *[str(a) for a in args]]
        r = subprocess.run(cmd, env=self.env, input=input, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def popen(self, *args, **kw):
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        return subprocess.Popen(["podman", *ENGINE_FLAGS, *[str(a) for a in args]], env=self.env, **kw)

    def build(self, context, tag, dockerfile=None, build_args=None, timeout=600):
        """`podman build` with the host's CA bundle (pip reaches PyPI through it) and the host's network.

        Layers are cached in podman's storage: an unchanged context builds again in about a second."""
        args = ["build", "--layers", "--network=host", *ULIMITS, "-v", "/etc/ssl/certs:/etc/ssl/certs:ro", "-t", tag]
        if dockerfile:
            args += ["-f", dockerfile]
        for key, value in (build_args or {}).items():
            args += ["--build-arg", f"{key}={value}"]
        self(*args, context, timeout=timeout)
        return tag

    def run(self, image, *args, options=(), timeout=60, check=False):
        """`podman run --rm` in the foreground, on the host's network (the Consul agent listens on loopback)."""
        name = self.name("run")
        return self("run", "--rm", "--name", name, "--network=host", *ULIMITS, *options, image, *args,
                    timeout=timeout, check=check)  # fmt: skip

    def start(self, image, *args, options=(), role="ctr"):
        """`podman run -d` (kept after exit, for its exit code and logs); returns the container's name."""
        name = self.name(role)
        self("run", "-d", "--name", name, "--network=host", *ULIMITS, *options, image, *args)
        return name

    def state(self, container):
        """(status, exit code) of a container, e.g. ("running", 0) or ("exited", 42)."""
        out = self("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", container).stdout.split()
        return out[0], int(out[1])

    def wait(self, container, timeout=60):
        """The container's exit code, once it has exited."""
        return int(self("wait", container, timeout=timeout).stdout.strip().splitlines()[-1])

    def logs(self, container):
        r = self("logs", container, check=False)
        return r.stdout + r.stderr

    def cleanup(self):
        """Remove every container, pod and volume of this run, whatever state it is in."""
        for kind, remove in (("pod", ["pod", "rm", "-f", "-t", "0"]), ("container", ["rm", "-f", "-t", "0"])):
            listing = ["pod", "ps", "-q"] if kind == "pod" else ["ps", "-a", "-q"]
            ids = self(*listing, "--filter", f"name=^{self.prefix}-", check=False).stdout.split()
            if ids:
                self(*remove, *ids, check=False, timeout=120)
        vols = self("volume", "ls", "-q", "--filter", f"name=^{self.prefix}-", check=False).stdout.split()
        if vols:
            self("volume", "rm", "-f", *vols, check=False)

    def close(self):
        self.cleanup()
        shutil.rmtree(self._dir, ignore_errors=True)


def engine():
    """A ready engine with its base image, installing podman and making the base image when they are missing.

    Skips only where no engine can be had: podman missing and no root to install it."""
    if not shutil.which("podman") and os.geteuid() != 0:
        pytest.skip("podman is not installed and installing it needs root (scripts/install-podman.sh)")
    r = subprocess.run(["bash", INSTALL], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"scripts/install-podman.sh failed:\n{r.stderr}"
    return Podman(r.stdout.strip().splitlines()[-1])


def write_context(directory, files):
    """A build context from {relative path: text}; scripts (text starting with #!) are made executable."""
    for rel, text in files.items():
        path = os.path.join(directory, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o755 if text.startswith("#!") else 0o644)
    return directory
