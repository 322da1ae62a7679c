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

The Kubernetes examples are played as podman can play them on one host (docs/containers.md): `render()` makes
that variant of a manifest, with a stand-in for the application's programs. Also a command for trying it by hand:

    .venv/bin/python tests/lib/podman.py kube examples/kubernetes/singleton-deployment.yaml NAME \
        --consul-addr http://127.0.0.1:8500 --events DIR > NAME.yaml
"""

import argparse
import copy
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile

if __name__ == "__main__":  # run as a script: make `lib` importable as it is under pytest
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import yaml  # noqa: E402

from lib.consul_agent import ROOT  # noqa: E402

INSTALL = os.path.join(ROOT, "scripts", "install-podman.sh")
ENGINE_FLAGS = ["--runtime", "runc", "--cgroup-manager=cgroupfs"]
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
CONTAINERS_CONF = os.path.join(ROOT, ".cache", "podman", "containers.conf")  # written by install-podman.sh
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
        self.env = dict(os.environ, CONTAINERS_CONF=CONTAINERS_CONF)
        self._count = 0
        self._pending, self._removing = [], set()

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

    def cleanup(self, background=False):
        """Remove every container, pod and volume of this run, whatever state it is in.

        background=True: pods, which podman 4.3 takes seconds each to remove, go while the next test runs;
        close() waits for them and removes what is left."""
        pattern = f"name=^{self.prefix}-"
        pods = [p for p in self("pod", "ps", "-q", "--no-trunc", "--filter", pattern, check=False).stdout.split()
                if p not in self._removing]  # fmt: skip
        if pods and background:
            self._removing.update(pods)
            self._pending.append(self.popen("pod", "rm", "-f", "-t", "0", *pods, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))  # fmt: skip
        elif pods:
            self("pod", "rm", "-f", "-t", "0", *pods, check=False, timeout=120)
        listing = self("ps", "-a", "--no-trunc", "--format", "{{.ID}} {{.Pod}}", "--filter", pattern, check=False)
        alone = [line.split()[0] for line in listing.stdout.splitlines() if len(line.split()) == 1]
        if alone:
            self("rm", "-f", "-t", "0", *alone, check=False, timeout=120)
        vols = self("volume", "ls", "-q", "--filter", pattern, check=False).stdout.split()
        if vols:
            self("volume", "rm", "-f", *vols, check=False)

    def close(self):
        for p in self._pending:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
        self._removing.clear()
        self.cleanup()


def can_install():
    """Whether an engine can be had here: podman is installed, or we are root and can install it."""
    return bool(shutil.which("podman")) or os.geteuid() == 0


def engine():
    """A ready engine with its base image, installing podman and making the base image when they are missing."""
    r = subprocess.run(["bash", INSTALL], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"scripts/install-podman.sh failed:\n{r.stderr}")
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


# --- Kubernetes manifests, as podman plays them on one host --------------------------------------------------------

# The application's programs in the manifests (/app/bin/...) are this stand-in: it logs to /stand-in/events what it
# is and when (with the lock's variables); a job (an init container) works for a second and ends, a service runs
# until SIGTERM.
STAND_IN = """\
#!/bin/sh
log() {
    echo "$(date +%s.%N) $1 $(cat /proc/sys/kernel/hostname) $(basename "$0") held=${CONSUL_LOCK_HELD:-no}" \\
        "key=${CONSUL_LOCK_KEY:-} index=${CONSUL_LOCK_INDEX:-}" >>/stand-in/events
}
log START
if [ "$STAND_IN_MODE" = job ]; then
    sleep 1
    log END
    exit 0
fi
trap 'log TERM; exit 0' TERM
while :; do sleep 60 & wait $!; done
"""
# Kubernetes fields that podman 4.3 cannot play, or that mean nothing on one host.
POD_FIELDS_DROPPED = ("affinity", "topologySpreadConstraints", "nodeSelector", "tolerations", "priorityClassName",
                      "serviceAccountName", "automountServiceAccountToken")  # fmt: skip
CONTAINER_FIELDS_DROPPED = ("ports", "livenessProbe", "readinessProbe", "startupProbe")
# A local dev agent has no ACL and no TLS: a production agent's settings would only make the run fail.
ENV_DROPPED = re.compile(r"CONSUL_(HTTP_TOKEN|HTTP_TOKEN_FILE|HTTP_SSL.*|CACERT|CAPATH|CLIENT_CERT|CLIENT_KEY|"
                         r"TLS_SERVER_NAME|HTTP_AUTH)$")  # fmt: skip


def workload(path):
    """The one Deployment, Job or Pod of a manifest file; other kinds (a PodDisruptionBudget) mean nothing to
    podman."""
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d and d.get("kind") in ("Deployment", "Job", "Pod")]
    if len(docs) != 1:
        raise ValueError(f"{path}: expected one Deployment, Job or Pod, found {len(docs)}")
    return docs[0]


def pod_spec(doc):
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def containers(doc):
    """[(mode, container)]: init containers and a Job's containers are jobs, the others services."""
    spec = pod_spec(doc)
    main = "job" if doc["kind"] == "Job" else "service"
    return [("job", c) for c in spec.get("initContainers") or []] + [(main, c) for c in spec["containers"]]


def locked_command(container):
    """(consul-locker's argv up to NAME, COMMAND argv) of a container run under consul-locker, else (None, argv)."""
    argv = list(container.get("command") or []) + list(container.get("args") or [])
    if argv and os.path.basename(argv[0]) == "consul-locker":
        if "--" not in argv:
            raise ValueError(f"write `consul-locker OPTIONS NAME -- COMMAND` in manifests: {argv}")
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return None, argv


def once_token(locker_argv):
    """--once-token's value, True for --once, None without either."""
    for i, arg in enumerate(locker_argv):
        if arg == "--once-token":
            return locker_argv[i + 1]
        if arg.startswith("--once-token="):
            return arg.split("=", 1)[1]
    return True if "--once" in locker_argv else None


def lock_prefix(locker_argv):
    """The KV prefix a consul-locker command line uses: --prefix, else consul-locker/NAME."""
    for i, arg in enumerate(locker_argv):
        if arg == "--prefix":
            return locker_argv[i + 1]
        if arg.startswith("--prefix="):
            return arg.split("=", 1)[1]
    return "consul-locker/" + locker_argv[-1]


def program_paths(doc):
    paths = {locked_command(c)[1][0] for _, c in containers(doc)}
    return sorted(p if p.startswith("/") else "/usr/local/bin/" + p for p in paths)


def render(doc, name, image, consul_addr, events_dir):
    """One replica of the manifest's workload as podman 4.3 plays it on one host (docs/containers.md)."""
    doc = copy.deepcopy(doc)
    modes = [mode for mode, _ in containers(doc)]
    doc["metadata"]["name"] = name
    if doc["kind"] == "Deployment":
        doc["spec"]["replicas"] = 1  # each replica is a pod of its own, played from the same manifest
        # podman 4.3 restarts an init container that exited 0 when the pod restarts always: the job would loop
        pod_spec(doc)["restartPolicy"] = "OnFailure"
    elif doc["kind"] == "Job":  # podman plays no Job: its pod, as the Job controller would make it
        template = doc["spec"]["template"]
        labels = (template.get("metadata") or {}).get("labels") or {}
        doc = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": labels},
            "spec": template["spec"],
        }
    spec = pod_spec(doc)
    # host networking: the agent listens on loopback, and status.hostIP means that loopback address here
    spec["hostNetwork"] = True
    for field in POD_FIELDS_DROPPED:
        spec.pop(field, None)
    volumes = [v for v in spec.get("volumes") or [] if "emptyDir" in v]
    kept = {v["name"] for v in volumes}
    spec["volumes"] = volumes + [{"name": "stand-in", "hostPath": {"path": events_dir, "type": "Directory"}}]
    for mode, (_, c) in zip(modes, containers(doc)):
        c["image"] = image
        c["imagePullPolicy"] = "Never"
        for field in CONTAINER_FIELDS_DROPPED:
            c.pop(field, None)
        env = []
        for e in c.get("env") or []:
            ref = (e.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath", "")
            if e["name"] == "CONSUL_HTTP_ADDR" or ENV_DROPPED.match(e["name"]):
                continue
            if "valueFrom" in e and not ref.startswith("metadata."):
                e = {"name": e["name"], "value": "127.0.0.1"}  # podman's fieldRef knows only metadata fields
            env.append(e)
        c["env"] = env + [{"name": "CONSUL_HTTP_ADDR", "value": consul_addr}, {"name": "STAND_IN_MODE", "value": mode}]
        mounts = [m for m in c.get("volumeMounts") or [] if m["name"] in kept]
        c["volumeMounts"] = mounts + [{"name": "stand-in", "mountPath": "/stand-in"}]
    return yaml.safe_dump(doc, sort_keys=False)


def build_stand_in(podman, base, manifests, tag="localhost/consul-locker-stand-in:latest"):
    """BASE (the project's image) plus the stand-in program at every path the manifests run."""
    paths = sorted({p for m in manifests for p in program_paths(workload(m))})
    links = " && ".join(f"mkdir -p {os.path.dirname(p)} && ln -sf /usr/local/bin/stand-in {p}" for p in paths)
    user = podman("image", "inspect", "--format", "{{.Config.User}}", base).stdout.strip()
    with tempfile.TemporaryDirectory() as context:
        write_context(context, {
            "stand-in": STAND_IN,
            "Containerfile": f"FROM {base}\nUSER 0:0\nCOPY stand-in /usr/local/bin/stand-in\nRUN {links}\n"
                             f"USER {user or '0:0'}\n",
        })  # fmt: skip
        return podman.build(context, tag)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="tests/lib/podman.py",
        description="Print the podman variant of a Kubernetes example (one replica), after building the stand-in "
        "image for its programs; play it with `CONTAINERS_CONF=.cache/podman/containers.conf podman kube play FILE`.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kube")
    k.add_argument("manifest")
    k.add_argument("name", help="the replica's name (the Deployment's); its pod is NAME-pod-0")
    k.add_argument("--consul-addr", default="http://127.0.0.1:8500")
    k.add_argument("--events", required=True, help="host directory where the stand-in logs what it does")
    k.add_argument("--from", dest="base", default="localhost/consul-locker:latest", help="the project's image")
    args = p.parse_args(argv)
    events = os.path.abspath(args.events)
    os.makedirs(events, exist_ok=True)
    os.chmod(events, 0o777)  # the image's non-root user writes there
    image = build_stand_in(engine(), args.base, [args.manifest])
    sys.stdout.write(render(workload(args.manifest), args.name, image, args.consul_addr, events))


if __name__ == "__main__":
    main()
