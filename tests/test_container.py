"""The container stories in a real engine: podman builds the Dockerfile and runs consul-locker as PID 1, and plays
the Kubernetes examples.

No Docker engine and no registry here: tests/lib/podman.py gets podman, runc and a Python base image made from
Debian's packages (scripts/install-podman.sh), and builds the top-level Dockerfile with
`--build-arg PYTHON_IMAGE=<that base>`. The image holds the shim of the build context: the repository root, or
$CONSUL_LOCKER_BUILD_CONTEXT. Containers reach the test's Consul agent on loopback through `--network=host`.

The Kubernetes manifests are played as podman can play them (docs/containers.md, "The Kubernetes examples under
podman"): each replica a pod of its own from the same manifest, the agent's address as a literal, host networking,
and a stand-in for the application's programs at the paths the manifests name, which logs what it does and when.
"""

import base64
import hashlib
import json
import os
import re
import shutil
import time

import pytest
from lib import podman as lib_podman
from lib.consul_agent import ROOT, consul_binary, wait_until
from lib.locker import assert_no_session, lock_key, sessions_named
from lib.podman import containers, lock_prefix, locked_command, once_token, pod_spec, workload

pytestmark = pytest.mark.slow

LOCK_LOST = 75  # contract: the lock was lost while the child ran
USER = "10001"  # the Dockerfile's USER
KUBE = os.path.join(ROOT, "examples", "kubernetes")
MIGRATE, MIGRATE_JOB, SINGLETON = "migrate-initcontainer.yaml", "migrate-job.yaml", "singleton-deployment.yaml"
MONGODB = os.path.join(ROOT, "examples", "mongodb")
# A child that says it is ready, then idles until a signal; sleeping in the background keeps the shell's traps live.
IDLE = "echo ready; while :; do sleep 60 & wait $!; done"


@pytest.fixture(scope="module")
def podman():
    if not lib_podman.can_install():
        pytest.skip("podman is not installed, and installing it (scripts/install-podman.sh) needs root")
    engine = lib_podman.engine()
    yield engine
    engine.close()


@pytest.fixture(autouse=True)
def _no_leftovers(request):
    """Every container and pod of a test is removed after it, passed or failed (pods in the background: the
    module's end waits for them)."""
    yield
    if "podman" in request.fixturenames:
        request.getfixturevalue("podman").cleanup(background=True)


@pytest.fixture(scope="module")
def image(podman):
    """The top-level Dockerfile, built on the Debian-made Python base."""
    context = lib_podman.build_context()
    tag = "localhost/consul-locker:test"
    if context != ROOT:
        tag += "-" + hashlib.sha256(context.encode()).hexdigest()[:10]
    return podman.build(context, tag, build_args={"PYTHON_IMAGE": podman.base_image})


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """Host directory mounted read-only at /probe: the orphan maker."""
    d = tmp_path_factory.mktemp("probes")
    (d / "orphans.py").write_text(ORPHANS)
    os.chmod(d, 0o755)
    return str(d)


@pytest.fixture
def shared(tmp_path):
    """A host directory the container's non-root user can write (mounted at /shared)."""
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o777)
    return str(d)


def agent_env(consul):
    return ["-e", f"CONSUL_HTTP_ADDR={consul.addr}"]


def holder(consul, name):
    """The session holding NAME's lock, or None."""
    entry = consul.kv(lock_key(name))
    return entry and entry.get("Session")


def read_lines(path):
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


# --- the image and consul-locker as PID 1 ----------------------------------------------------------------------


@pytest.mark.timeout(60, func_only=True)
def test_image_is_non_root_with_consul_locker_as_entrypoint_and_holds_the_context_shim(podman, image):
    user, entrypoint = podman("image", "inspect", "--format", "{{.Config.User}}|{{json .Config.Entrypoint}}",
                              image).stdout.strip().split("|")  # fmt: skip
    assert user == f"{USER}:{USER}" and entrypoint == '["consul-locker"]', (user, entrypoint)
    listing = (
        "import hashlib, os, shim; d = os.path.dirname(shim.__file__)\n"
        "for n in sorted(os.listdir(d)):\n"
        "    if n.endswith('.py'): print(n, hashlib.sha256(open(os.path.join(d, n), 'rb').read()).hexdigest())\n"
    )
    r = podman.run(image, "-c", listing, options=["--entrypoint", "python"], check=True)
    src = os.path.join(lib_podman.build_context(), "shim")
    expected = [
        f"{n} {hashlib.sha256(open(os.path.join(src, n), 'rb').read()).hexdigest()}"
        for n in sorted(os.listdir(src))
        if n.endswith(".py")
    ]
    assert r.stdout.splitlines() == expected, "the image's shim differs from the build context's"


@pytest.mark.timeout(60, func_only=True)
def test_exit_code_passes_through_from_a_child_of_pid_1_running_as_non_root(podman, image, consul, name):
    child = ('echo "ppid=$PPID uid=$(id -u) held=$CONSUL_LOCK_HELD key=$CONSUL_LOCK_KEY"; '
             'tr "\\0" " " </proc/1/cmdline; echo; exit 7')  # fmt: skip
    r = podman.run(image, name, "--", "sh", "-c", child, options=agent_env(consul))
    assert r.returncode == 7, r.stdout + r.stderr
    assert f"ppid=1 uid={USER} held=true key={lock_key(name)}" in r.stdout, r.stdout + r.stderr
    assert "/opt/consul-locker/bin/consul-locker" in r.stdout.splitlines()[1], r.stdout  # PID 1
    assert_no_session(consul, name)


@pytest.mark.timeout(60, func_only=True)
def test_image_without_arguments_prints_usage(podman, image):
    r = podman.run(image)
    assert r.returncode == 0 and "usage: consul-locker" in r.stdout, r.stdout + r.stderr


@pytest.mark.timeout(90, func_only=True)
def test_podman_stop_runs_the_childs_term_handler_and_its_code_is_the_containers(podman, image, consul, name):
    child = f'trap "echo got TERM; exit 42" TERM; {IDLE}'
    c = podman.start(image, "--kill-timeout", "20s", name, "--", "sh", "-c", child, options=agent_env(consul))
    wait_until(lambda: holder(consul, name) and "ready" in podman.logs(c), 30, message="the child under the lock")
    t0 = time.monotonic()
    podman("stop", "-t", "60", c, timeout=90)
    took = time.monotonic() - t0
    assert podman.state(c) == ("exited", 42), podman.logs(c)
    assert "got TERM" in podman.logs(c)
    assert took < 15, f"podman stop took {took:.1f}s: not the TERM path"  # far below the stop timeout's KILL
    assert not holder(consul, name)
    assert_no_session(consul, name)


@pytest.mark.timeout(90, func_only=True)
def test_podman_kill_hup_is_forwarded_to_the_child(podman, image, consul, name):
    child = f'trap "echo got HUP; exit 3" HUP; {IDLE}'
    c = podman.start(image, name, "--", "sh", "-c", child, options=agent_env(consul))
    wait_until(lambda: "ready" in podman.logs(c), 30, message="the child under the lock")
    podman("kill", "-s", "HUP", c)
    assert podman.wait(c, timeout=30) == 3, podman.logs(c)
    assert "got HUP" in podman.logs(c)
    assert_no_session(consul, name)


ORPHANS = '''\
"""Leave N orphans to PID 1; wait until each is reaped; print what is left, zombies included; exit 1 if any."""
import os
import sys
import time


def zombies():
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    found.append(int(pid))
        except OSError:
            pass
    return found


orphans = []
for _ in range(int(sys.argv[1])):
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        orphan = os.fork()
        if orphan == 0:
            while os.getppid() != 1:  # exit only once adopted by PID 1, so PID 1 must reap it
                time.sleep(0.005)
            os._exit(0)
        os.write(w, str(orphan).encode())
        os._exit(0)
    os.close(w)
    orphans.append(int(os.read(r, 32)))
    os.close(r)
    os.waitpid(middle, 0)
deadline = time.monotonic() + 10
while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in orphans):
    time.sleep(0.01)
left = [p for p in orphans if os.path.exists(f"/proc/{p}")]
print(f"orphans={len(orphans)} left={left} zombies={zombies()}", flush=True)
sys.exit(1 if left or zombies() else 0)
'''


@pytest.mark.timeout(60, func_only=True)
def test_orphans_are_reaped_no_zombie_inside(podman, image, consul, name, probes):
    r = podman.run(image, name, "--", "python", "/probe/orphans.py", "5",
                   options=[*agent_env(consul), "-v", f"{probes}:/probe:ro"])  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "orphans=5 left=[] zombies=[]" in r.stdout, r.stdout + r.stderr
    assert_no_session(consul, name)


def intervals(path):
    """[(start, end, who)] from S/E lines; every S has its E."""
    starts, spans = {}, []
    for line in read_lines(path):
        what, ns, who = line.split()
        if what == "S":
            starts[who] = int(ns)
        else:
            spans.append((starts.pop(who), int(ns), who))
    assert not starts, f"started but never ended: {starts}"
    return sorted(spans)


@pytest.mark.timeout(90, func_only=True)
def test_two_containers_on_one_lock_take_turns(podman, image, consul, name, shared):
    child = 'echo "S $(date +%s%N) $1" >>/shared/cs; sleep 1; echo "E $(date +%s%N) $1" >>/shared/cs'
    opts = [*agent_env(consul), "-v", f"{shared}:/shared"]
    a = podman.start(image, name, "--", "sh", "-c", child, "sh", "a", options=opts)
    b = podman.start(image, name, "--", "sh", "-c", child, "sh", "b", options=opts)
    assert podman.wait(a) == 0 and podman.wait(b) == 0, podman.logs(a) + podman.logs(b)
    spans = intervals(os.path.join(shared, "cs"))
    assert [w for _, _, w in spans] in (["a", "b"], ["b", "a"]), spans
    assert spans[0][1] <= spans[1][0], f"the critical sections overlap: {spans}"
    assert_no_session(consul, name)


@pytest.mark.timeout(90, func_only=True)
def test_lost_lock_ends_the_container_with_the_lock_lost_code(podman, image, consul, name):
    c = podman.start(image, "--kill-timeout", "5s", name, "--", "sh", "-c", IDLE, options=agent_env(consul))
    sid = wait_until(lambda: holder(consul, name), 30, message="the lock held")
    wait_until(lambda: "ready" in podman.logs(c), 10, message="the child under the lock")
    consul.api("PUT", f"/v1/session/destroy/{sid}")
    assert podman.wait(c, timeout=30) == LOCK_LOST, podman.logs(c)
    assert_no_session(consul, name)


@pytest.mark.timeout(120, func_only=True)
def test_sigkilled_container_session_expires_and_a_waiting_container_takes_over(podman, image, consul, name, shared):
    ttl, lock_delay = 10, 2
    opts = [*agent_env(consul), "-v", f"{shared}:/shared"]
    timing = ["--ttl", f"{ttl}s", "--lock-delay", f"{lock_delay}s", "--kill-timeout", "1s"]
    a = podman.start(image, *timing, name, "--", "sh", "-c", f"echo A >>/shared/events; {IDLE}", options=opts)
    held_by_a = wait_until(lambda: holder(consul, name), 30, message="the first container holding the lock")
    b = podman.start(image, *timing, name, "--", "sh", "-c", 'echo "B $(date +%s%N)" >>/shared/events', options=opts)
    wait_until(lambda: len(sessions_named(consul, name)) == 2, 30, message="the second container waiting")
    events = os.path.join(shared, "events")
    assert read_lines(events) == ["A"]
    killed = time.time()
    podman("kill", "-s", "KILL", a)
    assert podman.wait(a) == 137
    # nobody released anything: the lock waits for Consul to expire the session (up to 2 x TTL), then lock-delay
    wait_until(lambda: held_by_a not in [s["ID"] for s in consul.sessions()], 2 * ttl + 5, 0.05,
               message="the killed container's session to expire")  # fmt: skip
    expired = time.time()
    line = wait_until(lambda: [x for x in read_lines(events) if x.startswith("B ")], lock_delay + 10)[0]
    started = int(line.split()[1]) / 1e9
    assert started - killed <= 2 * ttl + lock_delay + 3, f"took over {started - killed:.1f}s after the kill"
    assert started - expired >= lock_delay - 0.5, "took over before the lock-delay after the session expired"
    assert podman.wait(b) == 0, podman.logs(b)
    assert_no_session(consul, name)


# --- the MongoDB example's image -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def consul_image(podman, tmp_path_factory):
    """A local stand-in for the hashicorp/consul image: the consul binary at /bin/consul (no registry here)."""
    context = tmp_path_factory.mktemp("consul-image")
    shutil.copy2(consul_binary(), context / "consul")
    (context / "Containerfile").write_text("FROM scratch\nCOPY consul /bin/consul\n")
    return podman.build(str(context), "localhost/consul-locker-test-consul:latest")


@pytest.mark.timeout(60, func_only=True)
def test_mongodb_example_image_builds_from_the_project_image_and_its_entry_point_runs(
    podman, image, consul_image, consul, name, tmp_path
):
    example = podman.build(MONGODB, "localhost/consul-locker-mongodb-example:test", timeout=600,
                           build_args={"CONSUL_LOCKER_IMAGE": image, "CONSUL_IMAGE": consul_image})  # fmt: skip
    entrypoint = podman("image", "inspect", "--format", "{{.Config.User}} {{json .Config.Entrypoint}}", example)
    assert entrypoint.stdout.split() == [f"{USER}:{USER}", '["consul-locker"]']
    r = podman.run(example, "version", options=["--entrypoint", "consul"])
    assert r.returncode == 0 and "Consul v" in r.stdout, r.stdout + r.stderr
    # the compose file's command, as far as it can go without MongoDB: the bootstrap starts under the lock
    r = podman.run(example, name, "python", "/example/bootstrap.py", "--help", options=agent_env(consul))
    assert r.returncode == 0 and "usage: bootstrap.py" in r.stdout, r.stdout + r.stderr
    assert_no_session(consul, name)
    # the health-check mode through the real driver: no mongod in the container's own network namespace
    conf = tmp_path / "mongod.conf"
    shutil.copy2(os.path.join(MONGODB, "mongod.conf"), conf)
    os.chmod(conf, 0o644)
    r = podman("run", "--rm", "--name", podman.name("check"), "--network=none", *lib_podman.ULIMITS,
               "-v", f"{conf}:/etc/mongo/mongod.conf:ro", "--entrypoint", "python", example,
               "/example/bootstrap.py", "check", "--config", "/etc/mongo/mongod.conf", "--connect-timeout", "0.5",
               check=False)  # fmt: skip
    assert r.returncode == 2 and "CRITICAL" in r.stdout, r.stdout + r.stderr  # Consul's script check: critical


# --- Kubernetes manifests, played by podman -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_image(podman, image):
    """The project's image plus the stand-in for the manifests' programs."""
    manifests = [os.path.join(KUBE, m) for m in (MIGRATE, MIGRATE_JOB, SINGLETON)]
    return lib_podman.build_stand_in(podman, image, manifests, tag="localhost/consul-locker-stand-in:test")


class Pods:
    """Replicas of one manifest's workload, played as pods of their own; their stand-in programs' events."""

    def __init__(self, podman, consul, manifest, app_image, log_dir, tmp_path):
        self.podman, self.consul, self.log_dir, self.tmp = podman, consul, log_dir, tmp_path
        self.doc = workload(os.path.join(KUBE, manifest))
        self.app_image = app_image
        self.grace = pod_spec(self.doc).get("terminationGracePeriodSeconds", 30)

    def render(self):
        name = self.podman.name(self.doc["metadata"]["name"])
        path = self.tmp / f"{name}.yaml"
        path.write_text(lib_podman.render(self.doc, name, self.app_image, self.consul.addr, self.log_dir))
        return path

    def play(self, path, timeout=120):
        out = self.podman("kube", "play", path, timeout=timeout).stdout
        return self.pod_name(out)

    def pod_name(self, play_output):
        pod_id = play_output.split("Pod:")[1].split()[0]
        return self.podman("pod", "inspect", "--format", "{{.Name}}", pod_id).stdout.strip()

    def events(self):
        """[(time, what, host, program, {held, key, index})] in time order."""
        out = []
        for line in read_lines(os.path.join(self.log_dir, "events")):
            ts, what, host, prog, *fields = line.split()
            out.append((float(ts), what, host, prog, dict(f.split("=", 1) for f in fields)))
        return sorted(out)

    def diagnose(self):
        pods = self.podman("pod", "ps", "--filter", f"name=^{self.podman.prefix}-", check=False).stdout
        ctrs = self.podman("ps", "-a", "--filter", f"name=^{self.podman.prefix}-", check=False).stdout
        logs = "".join(f"--- {n}\n{self.podman.logs(n)}" for n in re.findall(rf"({self.podman.prefix}-\S+)", ctrs))
        return f"events:\n{os.linesep.join(map(str, self.events()))}\npods:\n{pods}\ncontainers:\n{ctrs}\n{logs}"


@pytest.mark.timeout(180, func_only=True)
def test_kube_migration_initcontainer_runs_under_the_lock_before_the_app(podman, consul, app_image, shared, tmp_path):
    pods = Pods(podman, consul, MIGRATE, app_image, shared, tmp_path)
    (_, init), *_ = [(m, c) for m, c in containers(pods.doc) if m == "job"]
    # two replicas start together; `kube play` returns once the pod's init containers have finished
    files = [pods.render(), pods.render()]
    plays = [podman.popen("kube", "play", f) for f in files]
    outs = [p.communicate(timeout=150) for p in plays]
    assert all(p.returncode == 0 for p in plays), f"{outs}\n{pods.diagnose()}"
    names = [pods.pod_name(out) for out, _ in outs]

    def serving():
        return [e for e in pods.events() if e[1] == "START" and e[4]["held"] != "true"]

    wait_until(lambda: len(serving()) >= 2, 30, message=f"both apps serving\n{pods.diagnose()}")
    events = pods.events()
    jobs = [e for e in events if e[4]["held"] == "true"]
    services = [e for e in events if e[4]["held"] != "true"]
    check_migrations(consul, locked_command(init)[0], jobs, pods)
    # the apps started only after the migration, each after its own pod's init container
    first_end = next(e[0] for e in jobs if e[1] == "END")
    assert {e[2] for e in services if e[1] == "START"} == set(names), f"{names}\n{pods.diagnose()}"
    for t, _, host, _, _ in (e for e in services if e[1] == "START"):
        own = [e[0] for e in jobs if e[2] == host and e[1] == "END"]
        assert t >= max(own + [first_end]), f"{host} served before its migration ended\n{pods.diagnose()}"


def check_migrations(consul, locker_argv, jobs, pods):
    """Migrations ran under the lock, one at a time, each with a newer fencing token; with --once(-token), once."""
    prefix = lock_prefix(locker_argv)
    assert jobs, f"no migration ran\n{pods.diagnose()}"
    assert all(e[4]["key"] == f"{prefix}/.lock" for e in jobs), jobs
    assert [e[1] for e in jobs] == ["START", "END"] * (len(jobs) // 2), f"migrations overlap:\n{pods.diagnose()}"
    indexes = [int(e[4]["index"]) for e in jobs if e[1] == "START" and e[4]["index"]]
    assert indexes == sorted(set(indexes)), indexes
    token = once_token(locker_argv)
    if token is not None:
        assert len(jobs) == 2, f"--once: one migration for all pods\n{pods.diagnose()}"
        entry = consul.kv(f"{prefix}/.done")
        assert entry, "no --once marker"
        if token is not True:
            assert json.loads(base64.b64decode(entry["Value"]))["token"] == token
    assert_no_session(consul, prefix)


@pytest.mark.timeout(120, func_only=True)
def test_kube_migration_job_runs_under_the_lock_and_a_rerun_of_the_job_too(podman, consul, app_image, shared, tmp_path):
    """The Job variant, as the pods its controller makes: a first try and a retry (or a re-applied Job) at once."""
    pods = Pods(podman, consul, MIGRATE_JOB, app_image, shared, tmp_path)
    ((_, job),) = containers(pods.doc)
    # the first migration of this version must not be skipped because an earlier test wrote a marker
    consul.api("DELETE", f"/v1/kv/{lock_prefix(locked_command(job)[0])}/.done")
    plays = [podman.popen("kube", "play", pods.render()) for _ in range(2)]
    outs = [p.communicate(timeout=90) for p in plays]
    assert all(p.returncode == 0 for p in plays), f"{outs}\n{pods.diagnose()}"
    for out, _ in outs:
        pod = pods.pod_name(out)
        assert podman.wait(f"{pod}-{job['name']}", timeout=90) == 0, pods.diagnose()
    check_migrations(consul, locked_command(job)[0], pods.events(), pods)


@pytest.mark.timeout(180, func_only=True)
def test_kube_singleton_standby_waits_and_takes_over_when_the_active_pod_is_removed(
    podman, consul, app_image, shared, tmp_path
):
    pods = Pods(podman, consul, SINGLETON, app_image, shared, tmp_path)
    ((_, scheduler),) = containers(pods.doc)
    prefix = lock_prefix(locked_command(scheduler)[0])

    def started():
        return [e for e in pods.events() if e[1] == "START"]

    active = pods.play(pods.render())
    wait_until(lambda: started(), 60, message=f"the active scheduler\n{pods.diagnose()}")
    standby = pods.play(pods.render())
    wait_until(lambda: len(sessions_named(consul, prefix)) == 2, 60, message=f"the standby waiting\n{pods.diagnose()}")
    assert [e[2] for e in started()] == [active], pods.diagnose()
    assert started()[0][4]["held"] == "true" and started()[0][4]["key"] == f"{prefix}/.lock"
    # what the kubelet does on a pod's deletion: SIGTERM, terminationGracePeriodSeconds, then SIGKILL
    removed = time.time()
    podman("pod", "rm", "-f", "-t", pods.grace, active, timeout=pods.grace + 60)
    took_over = wait_until(lambda: [e for e in started() if e[2] == standby], 30,
                           message=f"the standby taking over\n{pods.diagnose()}")[0][0]  # fmt: skip
    terms = [e[0] for e in pods.events() if e[1] == "TERM" and e[2] == active]
    assert terms and terms[0] <= took_over, f"no SIGTERM to the active one before the takeover\n{pods.diagnose()}"
    # released, not expired: the standby did not wait for a TTL or the lock-delay
    assert took_over - removed < 8, f"took over {took_over - removed:.1f}s after the removal"
    assert len(sessions_named(consul, prefix)) == 1
