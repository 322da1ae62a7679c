"""consul-locker as PID 1 of a PID namespace (`unshare --pid --fork --mount-proc`, as in a container) and as a
child subreaper (started normally): reaping, SIGTERM to PID 1, the kill-timeout, cleaning the whole tree.

Under `unshare --fork`, unshare itself waits for PID 1 and passes its exit status on; signals go to PID 1 (the
shim, found as unshare's child), never to unshare. The network namespace is shared, so the shim reaches the
test's Consul agent on loopback.
"""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from lib.consul_agent import wait_until
from lib.locker import assert_no_session, lock_key, locker_env
from lib.probe import PROBE, probe
from lib.procs import finish, signal_state, start, wait_file

UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc"]


def _unshare_refused():
    try:
        r = subprocess.run(UNSHARE + ["true"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return r.stderr.decode().strip() or f"exit {r.returncode}" if r.returncode else None


REFUSED = _unshare_refused()
needs_pid_namespace = pytest.mark.skipif(REFUSED is not None, reason=f"unshare --pid refused: {REFUSED}")
MODES = [pytest.param("pid1", marks=needs_pid_namespace), "subreaper"]


def launch(consul, mode, *args):
    """Start consul-locker ARGS as PID 1 of a new PID namespace ("pid1") or normally ("subreaper").

    Returns (Popen, shim): `shim` is the psutil.Process of consul-locker itself (unshare's child for "pid1"),
    and Popen ends with its exit status either way."""
    if mode == "subreaper":
        p = start(consul, *args)
        return p, psutil.Process(p.pid)
    p = start(consul, *args, prefix=UNSHARE)

    def pid1():
        if p.poll() is not None:
            raise AssertionError(f"unshare exited with {p.returncode}:\n{p.stderr.read()}")
        children = psutil.Process(p.pid).children()
        return children[0] if children else None

    shim = wait_until(pid1, 20, message="unshare's child (PID 1 of the namespace)")
    with open(f"/proc/{shim.pid}/status") as f:
        nspid = next(line for line in f if line.startswith("NSpid:")).split()
    assert nspid[-1] == "1", f"not PID 1 in its namespace: {nspid}"
    return p, shim


def pid_in_namespace(mode, shim):
    """The shim's PID as its own descendants see it."""
    return 1 if mode == "pid1" else shim.pid


def cmdline(proc):
    """The argv of a psutil.Process; None for a zombie; [] once it is gone."""
    try:
        return proc.cmdline()
    except psutil.ZombieProcess:
        return None
    except psutil.NoSuchProcess:
        return []


def session_of(consul, name):
    entry = consul.kv(lock_key(name))
    return entry.get("Session") if entry else None


# -- reaping ---------------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_double_forked_orphans_are_reaped_while_the_child_runs(consul, name, tmp_path, mode):
    ppids, go, count = tmp_path / "ppids", tmp_path / "go", 50
    # Each orphan: its parent exits at once, so it is re-parented to the nearest reaper; after a moment it notes
    # the PID of its parent then, exits, and must be reaped by that parent.
    p, shim = launch(consul, mode, name, *probe("orphans", ppids, go, count))
    try:

        def all_reaped():
            if not ppids.exists() or len(ppids.read_text().split()) < count:
                return False
            children = shim.children()  # zombies included: an unreaped orphan is still listed
            # Only the main child, still running.
            return len(children) == 1 and children[0].cmdline()[1:3] == [PROBE, "orphans"]

        wait_until(all_reaped, 30, message=f"{count} orphans to exit and be reaped")
        assert ppids.read_text().split() == [str(pid_in_namespace(mode, shim))] * count
        assert not go.exists(), "the main child was still running"
    finally:
        go.touch()
    rc, err = finish(p)
    assert rc == 0, err


# -- SIGTERM to PID 1 ----------------------------------------------------------------------------------------
@needs_pid_namespace
@pytest.mark.timeout(30)
def test_sigterm_to_pid1_is_forwarded_and_the_childs_chosen_code_returned(consul, name, tmp_path):
    ready = tmp_path / "ready"
    script = 'trap "exit 42" TERM; touch "$1"; sleep 300 & wait'
    p, shim = launch(consul, "pid1", name, "sh", "-c", script, "trapper", ready)
    wait_file(ready, p=p)
    shim.send_signal(signal.SIGTERM)
    rc, err = finish(p)
    assert rc == 42, err
    assert_no_session(consul, name)


@needs_pid_namespace
@pytest.mark.timeout(30)
def test_child_ignoring_sigterm_is_killed_after_kill_timeout(consul, name, tmp_path):
    ready = tmp_path / "ready"
    script = 'trap "" TERM; touch "$1"; sleep 300'  # sleep inherits the ignored SIGTERM
    p, shim = launch(consul, "pid1", "--kill-timeout", "1s", name, "sh", "-c", script, "deaf", ready)
    wait_file(ready, p=p)
    sent = time.monotonic()
    shim.send_signal(signal.SIGTERM)
    rc, err = finish(p)
    elapsed = time.monotonic() - sent
    assert rc == 128 + signal.SIGKILL, err
    assert 0.9 <= elapsed < 10, f"SIGKILL {elapsed:.2f}s after SIGTERM, --kill-timeout 1s"
    assert_no_session(consul, name)


@needs_pid_namespace
@pytest.mark.timeout(60)
def test_sigterm_to_pid1_as_soon_as_signals_are_blocked_is_not_lost(consul, name):
    # Before entry.main blocks signals, PID 1 has no handler and the kernel discards a SIGTERM (the start-up
    # window, README "Running as PID 1"). From the sigprocmask on, it must be held and acted upon.
    # So signal it at the first moment it is seen past that point: signals blocked by entry.main (USR1 among
    # them: unshare's child blocks INT and TERM itself for a moment before its exec), or handlers installed.
    ours = 1 << (signal.SIGUSR1 - 1) | 1 << (signal.SIGTERM - 1)

    def past_the_window(pid):
        state = signal_state(pid)
        return state["SigBlk"] & ours == ours or state["SigCgt"] & ours == ours

    for _ in range(5):
        p, shim = launch(consul, "pid1", "--lock-delay", "0s", name, "sleep", "300")
        wait_until(lambda pid=shim.pid: past_the_window(pid), 20, 0.001, "entry.main to block signals")
        shim.send_signal(signal.SIGTERM)
        rc, err = finish(p, timeout=15)
        assert rc == 128 + signal.SIGTERM, err


# -- the tree is gone before the lock is released ------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_setsid_leftovers_are_terminated_and_the_lock_held_until_they_are_gone(consul, name, tmp_path, mode):
    # The child leaves, each in a session of its own, a `sleep 300` and a descendant that needs time to exit:
    # SIGTERM makes it note that, then linger until told.
    termed, release, started = tmp_path / "termed", tmp_path / "release", tmp_path / "started"
    child = probe("tree", termed, release, started, "--code", 5)
    p, shim = launch(consul, mode, "--kill-timeout", "60s", name, *child)
    try:
        wait_file(termed, p=p)  # the main child has exited and its leftovers got SIGTERM

        def sleeper_gone():  # reaped, not just dead: a zombie's cmdline cannot be read, and counts as there
            return all(cmdline(q) not in (["sleep", "300"], None) for q in shim.children(recursive=True))

        wait_until(sleeper_gone, 10, message="the setsid'd `sleep 300` to be terminated")
        lingering = [q for q in shim.children() if q.cmdline()[1:3] == [PROBE, "leftover"]]
        assert lingering and os.getsid(lingering[0].pid) != os.getsid(shim.pid)
        assert p.poll() is None, "consul-locker exited before its tree was gone"
        assert session_of(consul, name), "the lock was released while a descendant still ran"
    finally:
        release.touch()
    rc, err = finish(p)
    assert rc == 5, err  # still the main child's code
    assert not session_of(consul, name)
    assert_no_session(consul, name)


@pytest.mark.timeout(30)
def test_stopped_leftover_is_continued_so_it_can_handle_sigterm(consul, name, tmp_path):
    termed, stopped = tmp_path / "termed", tmp_path / "stopped"
    leftover = 'trap ": > \\"$1\\"; exit 0" TERM; touch "$2"; kill -STOP $$; while :; do sleep 1; done'
    child = f'sh -c \'{leftover}\' leftover "$1" "$2" & while [ ! -e "$2" ]; do sleep 0.02; done'
    p = start(consul, "--kill-timeout", "60s", name, "sh", "-c", child, "child", termed, stopped)
    rc, err = finish(p, timeout=20)  # well before the 60 s SIGKILL
    assert rc == 0, err
    assert termed.exists(), "the stopped leftover never ran its SIGTERM handler"


# -- a PID namespace without its own /proc -------------------------------------------------------------------
@needs_pid_namespace
@pytest.mark.timeout(30)
def test_foreign_proc_is_detected_so_the_hosts_processes_are_never_walked(consul, name):
    # `unshare --pid --fork` without --mount-proc: /proc is the host's, where PID 1 is the host's init and its
    # descendants are every process of the machine. The shim must notice and not treat them as its own.
    check = "from shim.supervisor import proc_is_ours; print(proc_is_ours())"
    r = subprocess.run(
        ["unshare", "--pid", "--fork", sys.executable, "-c", check],
        capture_output=True,
        text=True,
        env=locker_env(consul),
        timeout=20,
    )
    assert r.stdout.strip() == "False", r.stderr
    # Still PID 1 of its namespace: kill(-1) reaches exactly the tree, so a leftover is ended all the same.
    p = start(consul, name, "sh", "-c", "sleep 321 & exit 0", prefix=["unshare", "--pid", "--fork"])
    rc, err = finish(p)
    assert rc == 0, err
    assert "Traceback" not in err
    assert not [q for q in psutil.process_iter(["cmdline"]) if q.info["cmdline"] == ["sleep", "321"]]
