"""--pid-namespace (issue 9, item 9): the child's tree in a PID namespace of its own whose init dies with
consul-locker, so a SIGKILLed consul-locker (the OOM killer) leaves no process of the tree behind, even one that
daemonized itself (double fork, setsid) and ignores SIGTERM. Without the option, on a bare host (cron,
cloud-init), such a grandchild outlives a SIGKILLed consul-locker: the control test below shows it, so the
namespace test is known to test something.

Where the namespace cannot be made (not root, and no user namespaces): one line, exit 71, COMMAND not run, no
session. The test makes such a place without touching the host: a user namespace of our own in which uid 65534 is
mapped and the user-namespace limit is 0; consul-locker runs there as uid 65534 (setpriv).

On the code before the fixes (SHIM_SRC=/work/snap-old): the --pid-namespace tests FAILED (exit 2: no such option);
the control test passed (the grandchild survived).
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from lib.consul_agent import wait_until
from lib.locker import LOCKER, assert_no_session, locker_env, sessions_named
from lib.probe import probe

NAMESPACE_FAILED = 71


def with_marker(marker):
    """Host PIDs of live (not zombie) processes whose command line contains MARKER."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() not in f.read():
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        found.append(int(entry))
    return found


def start_daemonizing_child(consul, name, tmp_path, *options):
    """The child starts a daemon (fork, setsid, fork) that ignores SIGTERM and runs until killed, then waits forever.
    The daemon's command line carries MARKER (TAG-daemon), so the test finds it from the host whatever its PID
    inside."""
    tag = f"pidns-{os.getpid()}-{time.monotonic_ns()}"
    marker, ready = f"{tag}-daemon", tmp_path / "ready"
    p = subprocess.Popen(
        LOCKER + [*options, name, *probe("daemonize", tag, ready)],
        env=locker_env(consul),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def up():
        if p.poll() is not None:
            raise AssertionError(f"consul-locker exited {p.returncode}:\n{p.stderr.read()}")
        return ready.exists() and with_marker(marker)

    (daemon,) = wait_until(up, 20, message="the daemonized grandchild")
    return p, marker, daemon


def end(marker, consul, name):
    for pid in with_marker(marker):
        os.kill(pid, signal.SIGKILL)
    for s in sessions_named(consul, name):  # nobody released it: do not leave it to the TTL
        consul.api("PUT", f"/v1/session/destroy/{s['ID']}")


@pytest.mark.timeout(40)
def test_with_pid_namespace_a_sigkilled_shim_takes_a_daemonized_grandchild_with_it(consul, name, tmp_path):
    p, marker, daemon = start_daemonizing_child(consul, name, tmp_path, "--pid-namespace")
    try:
        p.kill()
        p.wait()
        t0 = time.monotonic()
        wait_until(lambda: not with_marker(marker), 2, 0.01, message="the grandchild to die with consul-locker")
        print(f"\nconsul-locker SIGKILLed -> its daemonized grandchild gone after {time.monotonic() - t0:.3f} s")
    finally:
        end(marker, consul, name)


@pytest.mark.timeout(40)
def test_without_pid_namespace_a_daemonized_grandchild_outlives_a_sigkilled_shim(consul, name, tmp_path):
    p, marker, daemon = start_daemonizing_child(consul, name, tmp_path)
    try:
        p.kill()
        p.wait()
        time.sleep(1.0)  # an observation window: nothing should happen in it
        assert with_marker(marker) == [daemon], "the grandchild died: the test above would prove nothing"
    finally:
        end(marker, consul, name)


@pytest.mark.timeout(40)
def test_with_pid_namespace_the_child_runs_and_its_code_and_signals_pass(consul, locker, name, tmp_path):
    r = locker.run("--pid-namespace", name, "sh", "-c", 'echo "$CONSUL_LOCK_HELD $$"; exit 5')
    assert r.returncode == 5, r.stderr
    held, pid = r.stdout.split()
    assert held == "true"
    assert int(pid) < 10, f"the child is PID {pid}: not in a namespace of its own"  # its init is 1 there
    p = locker.popen("--pid-namespace", name, "sleep", "300")
    wait_until(lambda: sessions_named(consul, name) and _descendants(p.pid, "sleep"), 20, message="the child")
    os.kill(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=20)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert_no_session(consul, name)


def _descendants(pid, name):
    import psutil

    try:
        return [c for c in psutil.Process(pid).children(recursive=True) if c.name() == name]
    except psutil.Error:
        return []


# Run ARGV as uid 65534 in a user namespace of our own where no further user namespace may be made: neither a
# PID namespace (no CAP_SYS_ADMIN) nor a user namespace to get one is possible there. The host's limit is untouched.
NO_USERNS = r"""
import ctypes, os, sys
CLONE_NEWUSER = 0x10000000
libc = ctypes.CDLL(None, use_errno=True)
go_r, go_w = os.pipe()
up_r, up_w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(go_w)
    os.close(up_r)
    if libc.unshare(CLONE_NEWUSER) != 0:
        os.write(2, f"unshare(CLONE_NEWUSER): {os.strerror(ctypes.get_errno())}\n".encode())
        os._exit(90)
    os.write(up_w, b"u")
    os.read(go_r, 1)  # the parent has written our uid and gid maps
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")
    os.execvp("setpriv", ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", *sys.argv[1:]])
os.close(go_r)
os.close(up_w)
os.read(up_r, 1)
for kind in ("uid_map", "gid_map"):
    with open(f"/proc/{pid}/{kind}", "w") as f:
        f.write("0 0 1\n65534 65534 1\n")
os.write(go_w, b"g")
_, status = os.waitpid(pid, 0)
code = os.waitstatus_to_exitcode(status)
sys.exit(128 - code if code < 0 else code)
"""


@pytest.mark.timeout(40)
def test_where_no_pid_namespace_can_be_made_it_is_one_line_exit_71_and_nothing_runs(consul, name):
    shared = tempfile.mkdtemp(prefix="pidns-")  # writable by uid 65534 (pytest's tmp_path is not)
    try:
        os.chmod(shared, 0o777)
        _refused_without_namespaces(consul, name, os.path.join(shared, "ran"))
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _refused_without_namespaces(consul, name, marker):
    check = subprocess.run(
        [sys.executable, "-c", NO_USERNS, "sh", "-c", "unshare --user true || unshare --pid --fork true || echo none"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert check.stdout.strip() == "none", f"the test's sandbox still allows a namespace: {check}"
    r = subprocess.run(
        [sys.executable, "-c", NO_USERNS, *LOCKER, "--pid-namespace", name, "touch", marker],
        env=locker_env(consul),
        capture_output=True,
        text=True,
        timeout=30,
    )
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == NAMESPACE_FAILED, r.stderr
    assert len(lines) == 1 and lines[0].startswith("consul-locker: ") and "Traceback" not in r.stderr, r.stderr
    assert not os.path.exists(marker), "COMMAND ran"
    assert not sessions_named(consul, name), "a session was left behind"
