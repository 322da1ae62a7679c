"""Signals, as seen by real processes: consul-locker started normally (not PID 1, so a child subreaper).

Covers: forwarding of every kind of signal to the child (and to its group with -g), job control, the stop
signals that end the wait for the lock, SIGTERM at any moment of start-up, SIGKILL of the shim (PDEATHSIG), the
child's clean signal state, the main child's status under a storm of orphan SIGCHLDs, and ENOEXEC scripts.
The PID-1 behaviours (unshare --pid) are in test_pid1.py. The child is lib/probe.py (modes `signals`, `burst`).
"""

import os
import signal
import time

import psutil
import pytest
from lib.consul_agent import wait_until
from lib.locker import assert_no_session, sessions_named
from lib.probe import probe
from lib.procs import child_of, finish, is_gone, log_lines, signal_state, start, wait_file

FORWARDED = ["SIGUSR1", "SIGUSR2", "SIGHUP", "SIGWINCH", "SIGQUIT", "SIGINT"]
STOPPING = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT]


# -- forwarding ----------------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("signame", FORWARDED)
def test_signal_sent_to_the_shim_reaches_the_child(consul, name, tmp_path, signame):
    log, ready = tmp_path / "log", tmp_path / "ready"
    p = start(consul, name, *probe("signals", log, ready, ",".join(FORWARDED), "--label", "child"))
    wait_file(ready, p=p)
    os.kill(p.pid, getattr(signal, signame))
    wait_until(lambda: log_lines(log), 10, message=f"the child to note {signame}")
    assert log_lines(log) == [f"child {signame}"]
    os.kill(p.pid, signal.SIGTERM)
    rc, err = finish(p)
    assert rc == 128 + signal.SIGTERM, err


@pytest.mark.timeout(30)
def test_process_group_option_forwards_to_the_childs_whole_group(consul, name, tmp_path):
    log, ready, grand_ready = tmp_path / "log", tmp_path / "ready", tmp_path / "grand-ready"
    p = start(
        consul, "-g", name, *probe("signals", log, ready, "SIGUSR1", "--label", "child", "--grandchild", grand_ready)
    )
    wait_file(ready, p=p)
    wait_file(grand_ready, p=p)
    os.kill(p.pid, signal.SIGUSR1)
    wait_until(lambda: len(log_lines(log)) == 2, 10, message="child and grandchild to note SIGUSR1")
    assert sorted(log_lines(log)) == ["child SIGUSR1", "grandchild SIGUSR1"]
    child = psutil.Process(p.pid).children()[0]
    assert os.getpgid(child.pid) == child.pid != os.getpgid(p.pid)
    os.kill(p.pid, signal.SIGTERM)
    rc, err = finish(p)
    assert rc == 128 + signal.SIGTERM, err


@pytest.mark.timeout(30)
def test_sigtstp_stops_the_child_but_never_the_shim(consul, name):
    # A process group of its own whose leader's parent (pytest) is in another group of the same session: not an
    # orphaned group, in which the kernel would discard SIGTSTP's stop (as when pytest itself runs detached).
    p = start(consul, name, "sleep", "300", process_group=0)
    child = child_of(p.pid, "sleep")
    shim = psutil.Process(p.pid)
    os.kill(p.pid, signal.SIGTSTP)
    wait_until(lambda: child.status() == psutil.STATUS_STOPPED, 10, message="the child to stop")
    assert shim.status() != psutil.STATUS_STOPPED
    os.kill(p.pid, signal.SIGCONT)
    wait_until(lambda: child.status() != psutil.STATUS_STOPPED, 10, message="the child to continue")
    os.kill(p.pid, signal.SIGTERM)
    rc, err = finish(p)
    assert rc == 128 + signal.SIGTERM, err


# -- stop signals while waiting for the lock -----------------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("sig", STOPPING, ids=lambda s: s.name)
def test_stop_signal_during_the_lock_wait_exits_128_plus_n_within_1s(consul, name, hold_lock, tmp_path, sig):
    hold_lock(name)
    started = tmp_path / "started"
    p = start(consul, name, "touch", started)
    wait_until(lambda: sessions_named(consul, name), 20, message="consul-locker's session (it is waiting)")
    sent = time.monotonic()
    os.kill(p.pid, sig)
    rc, err = finish(p)
    elapsed = time.monotonic() - sent
    assert rc == 128 + sig, err
    assert elapsed < 1.0, f"took {elapsed:.2f}s to exit"
    assert not sessions_named(consul, name), "the session must be destroyed before exit"
    assert not started.exists()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_sigterm_at_any_moment_of_start_up_never_hangs_nor_orphans(consul, name):
    runs, outcomes = 30, {}
    for i in range(runs):
        delay = 0.3 * i / (runs - 1)  # the variable under test: when, after the exec, the signal lands
        marker = f"{300 + i / 1000:.3f}"  # tells this run's child apart from any other `sleep`
        p = start(consul, "--lock-delay", "0s", name, "sleep", marker)
        time.sleep(delay)
        os.kill(p.pid, signal.SIGTERM)
        rc, err = finish(p, timeout=15)
        # -15: killed in the interpreter's start-up window (default disposition, nothing exists yet); 143: the
        # wait was ended, or the child got the SIGTERM.
        assert rc in (-signal.SIGTERM, 128 + signal.SIGTERM), f"delay {delay * 1000:.0f} ms: rc {rc}\n{err}"
        outcomes[rc] = outcomes.get(rc, 0) + 1
        left = [q for q in psutil.process_iter(["cmdline"]) if q.info["cmdline"] == ["sleep", marker]]
        assert all(is_gone(q) for q in left), f"delay {delay * 1000:.0f} ms: the child was left running"
    print(f"outcomes over {runs} runs: {outcomes}")


@pytest.mark.timeout(90)
def test_sigterm_while_the_session_is_being_created_leaves_no_session(consul, name):
    # The stop may land while the session-create request is in flight: the session Consul creates must still be
    # destroyed before we exit, not left to its TTL. Where that request falls depends on the machine, so the
    # delays sweep the whole stretch between interpreter start-up and the first blocking query.
    runs = 30
    for i in range(runs):
        delay = 0.01 + 0.09 * i / (runs - 1)
        p = start(consul, "--lock-delay", "0s", name, "sleep", "300")
        time.sleep(delay)
        os.kill(p.pid, signal.SIGTERM)
        rc, err = finish(p, timeout=15)
        left = sessions_named(consul, name)
        for s in left:  # so the next run starts clean
            consul.api("PUT", f"/v1/session/destroy/{s['ID']}")
        assert not left, f"delay {delay * 1000:.0f} ms (rc {rc}): session left behind\n{err}"


# -- the shim's own death ------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_sigkill_of_the_shim_kills_the_child(consul, name):
    p = start(consul, name, "sleep", "300")
    child = child_of(p.pid, "sleep")
    p.kill()
    p.wait()
    wait_until(lambda: is_gone(child), 5, message="the child to die with the shim")
    for s in sessions_named(consul, name):  # nobody released it: do not leave it to the TTL
        consul.api("PUT", f"/v1/session/destroy/{s['ID']}")


# -- the child's start -----------------------------------------------------------------------------------------
def _hostile_signal_state():
    """In the shim's parent, between fork and exec: inherited ignored and blocked signals to be undone."""
    for s in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGPIPE, signal.SIGUSR1, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2, signal.SIGALRM, signal.SIGWINCH, signal.SIGRTMIN})


@pytest.mark.timeout(30)
def test_child_starts_with_default_dispositions_and_an_empty_mask(consul, name):
    p = start(consul, name, "sleep", "300", preexec_fn=_hostile_signal_state)
    child = child_of(p.pid, "sleep")
    assert signal_state(child.pid) == {"SigBlk": 0, "SigIgn": 0, "SigCgt": 0}
    os.kill(p.pid, signal.SIGTERM)  # ignored by our parent, still handled (and forwarded) by the shim
    rc, err = finish(p)
    assert rc == 128 + signal.SIGTERM, err


@pytest.mark.timeout(30)
def test_script_without_shebang_runs_through_bin_sh(locker, name, tmp_path):
    script = tmp_path / "no-shebang"
    script.write_text('echo "ran with: $*"\nexit 5\n')
    script.chmod(0o755)
    r = locker.run(name, script, "a", "b c")
    assert r.returncode == 5, r.stderr
    assert r.stdout == "ran with: a b c\n"


# -- reaping ---------------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_child_exit_status_survives_a_burst_of_orphan_sigchlds(consul, name):
    # 400 orphans re-parented to us; the last of them die around the main child's own exit.
    p = start(consul, "--kill-timeout", "30s", name, *probe("burst", 200, 42))
    rc, err = finish(p, timeout=50)
    assert rc == 42, err
    assert_no_session(consul, name)


# -- a broken stderr -----------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_broken_stderr_neither_cuts_supervision_short_nor_leaves_the_session(consul, name, tmp_path):
    # With -v the shim writes to stderr all along; once the reader is gone (`2>&1 | head`, a restarted log
    # collector) every write fails with EPIPE. The child must still be supervised to its end, its tree cleaned,
    # its exit code returned and the session destroyed.
    ready, marker = tmp_path / "ready", f"{300 + time.time() % 1:.6f}"
    # The child keeps SIGPIPE's default action: the SIGPIPEs our own failed writes raise must not reach it.
    script = 'setsid sleep "$2" & trap "exit 7" USR1; touch "$1"; sleep 300 & wait'
    p = start(consul, "-v", name, "sh", "-c", script, "child", ready, marker)
    wait_file(ready)
    p.stderr.close()  # the reader goes away: the shim's next log line (forwarding USR1) meets EPIPE
    os.kill(p.pid, signal.SIGUSR1)
    p.wait(20)
    left = [q for q in psutil.process_iter(["cmdline"]) if q.info["cmdline"] == ["sleep", marker]]
    assert all(is_gone(q) for q in left), "the setsid'd grandchild was left running"
    assert not sessions_named(consul, name), "the session must be destroyed before exit"
    assert p.returncode == 7
