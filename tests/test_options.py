"""Issue 11's options on a real Consul: the waiting line, -q/--quiet, -e/--success-exit-code, --max-runtime."""

import re
import signal
import socket
import subprocess
import time
import uuid

import psutil
import pytest
from lib.acl import destroy_session, hold_key, make_token, start_acl_agent
from lib.consul_agent import free_port, wait_until
from lib.locker import assert_no_session, lock_key, locker_env, one_line, sessions_named, stop


def waiting_lines(stderr):
    return [line for line in stderr.splitlines() if "waiting for" in line]


def start_holder(locker, tmp_path, *args):
    """A consul-locker whose child holds the lock until SIGTERM. Returns the process once the child runs."""
    started = tmp_path / f"started-{uuid.uuid4().hex}"
    p = locker.popen(*args, "sh", "-c", f"touch {started}; exec sleep 60")
    wait_until(started.exists, 15, message="holder's child started")
    return p


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- the waiting line --------------------------------------------------------------------------------------


def test_waiting_line_names_the_holders_host_and_pid(locker, consul, name, tmp_path):
    holder = start_holder(locker, tmp_path, name)
    log = tmp_path / "waiter.stderr"
    with open(log, "w") as err:
        waiter = locker.popen(name, "sh", "-c", "exit 4", stderr=err)
    try:
        line = wait_until(lambda: waiting_lines(log.read_text()), 15, message="the waiting line")[0]
    finally:
        stop(holder)
    assert waiter.wait(15) == 4  # the line never makes the run fail
    assert line.startswith(f"consul-locker: waiting for {lock_key(name)}, held by "), line
    assert socket.gethostname() in line and re.search(rf"\b{holder.pid}\b", line), line
    assert len(waiting_lines(log.read_text())) == 1


@pytest.mark.parametrize("quiet", [False, True], ids=["default", "quiet"])
def test_waiting_line_only_when_held_at_the_start_and_never_with_quiet(locker, consul, name, quiet):
    q = ["-q"] if quiet else []
    free = locker.run(*q, name, "true")
    assert free.returncode == 0 and not waiting_lines(free.stderr), free.stderr
    if quiet:
        assert free.stderr == ""
    sid = hold_key(consul, lock_key(name), "other holder")
    try:
        r = locker.run(*q, "--timeout", "1s", name, "true")
    finally:
        destroy_session(consul, sid)
    assert r.returncode == 1, r.stderr
    lines = waiting_lines(r.stderr)
    if quiet:
        assert lines == [], r.stderr
    else:
        assert len(lines) == 1 and lines[0].startswith(f"consul-locker: waiting for {lock_key(name)}, held by ")
        assert sid in lines[0] or "other holder" in lines[0], lines[0]


@pytest.mark.timeout(60)
def test_waiting_line_when_consul_lock_holds_the_key(locker, consul, consul_bin, name):
    peer = subprocess.Popen(
        [consul_bin, "lock", f"-http-addr={consul.addr}", f"consul-locker/{name}", "sleep 60"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        sid = wait_until(lambda: (consul.kv(lock_key(name)) or {}).get("Session"), 15, message="consul lock holds")
        r = locker.run("--timeout", "1s", name, "true")
    finally:
        peer.terminate()
        peer.wait(15)
    assert r.returncode == 1, r.stderr
    lines = waiting_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"consul-locker: waiting for {lock_key(name)}, held by "), r.stderr
    # `consul lock` names its session "Consul lock for '<command>' at '<prefix>'": no host or pid to show.
    assert sid in lines[0] or "Consul lock for" in lines[0], lines[0]


@pytest.mark.timeout(60)
def test_waiting_line_when_every_semaphore_slot_is_held(locker, consul, name, tmp_path):
    one = start_holder(locker, tmp_path, "--limit", "2", name)
    try:
        free_slot = locker.run("--limit", "2", name, "true")
        assert free_slot.returncode == 0 and not waiting_lines(free_slot.stderr), free_slot.stderr
        two = start_holder(locker, tmp_path, "--limit", "2", name)
        try:
            r = locker.run("--limit", "2", "--timeout", "1s", name, "true")
        finally:
            stop(two)
    finally:
        stop(one)
    assert r.returncode == 1, r.stderr
    lines = waiting_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"consul-locker: waiting for consul-locker/{name}"), r.stderr
    assert re.search(rf"\b({one.pid}|{two.pid})\b", lines[0]), lines[0]


# -- ACL: a token that may not read the holder's session ------------------------------------------------


@pytest.fixture(scope="module")
def acl_agent(tmp_path_factory):
    agent = start_acl_agent("acl-options", str(tmp_path_factory.mktemp("acl-options")))
    yield agent
    agent.cleanup()


def test_waiting_line_names_the_session_id_when_the_token_may_not_read_the_session(acl_agent, locker, name, tmp_path):
    # The holder's session belongs to another node; the waiter's token has session rules for its own node only.
    sid = hold_key(acl_agent, lock_key(name), f"consul-locker {name} on otherhost pid 4242", node="elsewhere")
    rules = (
        f'key_prefix "consul-locker/{name}/" {{ policy = "write" }}\nsession "{acl_agent.name}" {{ policy = "write" }}'
    )
    env = locker_env(acl_agent, CONSUL_HTTP_TOKEN=make_token(acl_agent, rules))
    log = tmp_path / "waiter.stderr"
    with open(log, "w") as err:
        waiter = locker.popen(name, "sh", "-c", "exit 4", env=env, stderr=err)
    try:
        line = wait_until(lambda: waiting_lines(log.read_text()), 15, message="the waiting line")[0]
    finally:
        destroy_session(acl_agent, sid)
    assert waiter.wait(15) == 4, log.read_text()
    assert line.startswith(f"consul-locker: waiting for {lock_key(name)}, held by "), line
    assert sid in line, line


def test_success_exit_code_does_not_remap_an_acl_denial(acl_agent, locker, name):
    r = locker.run("-e", "77", name, "true", env=locker_env(acl_agent))
    assert r.returncode == 77, r.stderr


# -- -q / --quiet ------------------------------------------------------------------------------------------


def test_quiet_keeps_warnings_and_errors(locker, consul, name):
    r = locker.run("--quiet", name, "true")
    assert r.returncode == 0 and r.stderr == ""
    r = locker.run("-q", name, "no-such-command-xyz")
    assert r.returncode == 127 and "no-such-command-xyz" in one_line(r.stderr)
    r = locker.run("-q", name)  # COMMAND missing
    assert r.returncode == 2
    one_line(r.stderr)
    r = locker.run("-q", "--lock-delay", "5s", "--kill-timeout", "10s", name, "true")
    assert r.returncode == 0 and "warning" in r.stderr


# -- -e / --success-exit-code -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, script, code",
    [
        (["-e", "3"], "exit 3", 0),
        (["-e", "3"], "exit 4", 4),
        (["--success-exit-code", "3", "-e", "4"], "exit 4", 0),
        (["-e", "255"], "exit 255", 0),
        (["-e", "137"], "kill -KILL $$", 0),
        (["-e", "143"], "kill -USR1 $$", 128 + signal.SIGUSR1),
    ],
)
def test_success_exit_code_maps_only_the_listed_child_statuses(locker, consul, name, args, script, code):
    r = locker.run(*args, name, "sh", "-c", script)
    assert r.returncode == code, r.stderr
    assert_no_session(consul, name)


def test_success_exit_code_143_makes_a_forwarded_sigterm_a_success(locker, consul, name, tmp_path):
    started = tmp_path / "started"
    p = locker.popen("-e", "143", name, "sh", "-c", f"touch {started}; exec sleep 60")
    wait_until(started.exists, 15, message="child started")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=20)
    assert p.returncode == 0, err
    assert_no_session(consul, name)


@pytest.mark.parametrize("value", ["256", "-1", "x", ""])
def test_success_exit_code_out_of_range_is_a_usage_error(locker, consul, name, tmp_path, value):
    assert locker.run("-e", "255", name, "sh", "-c", "exit 255").returncode == 0
    ran = tmp_path / "ran"
    r = locker.run("-e", value, name, "touch", str(ran))
    assert r.returncode == 2, r.stderr
    one_line(r.stderr)
    assert not ran.exists()


@pytest.mark.parametrize("code", [127, 126, 2, 69])
def test_success_exit_code_never_remaps_consul_lockers_own_codes(locker, consul, name, tmp_path, code):
    # The child's own status N becomes 0; consul-locker's own N, the same number, stays N.
    assert locker.run("-e", code, name, "sh", "-c", f"exit {code}").returncode == 0
    env, args = None, [name, "true"]
    if code == 127:
        args = [name, "no-such-command-xyz"]
    elif code == 126:
        (tmp_path / "script").write_text("#!/bin/sh\nexit 0\n")
        args = [name, str(tmp_path / "script")]
    elif code == 2:
        args = [name]  # COMMAND missing
    else:
        env = locker_env(consul, CONSUL_HTTP_ADDR=f"http://127.0.0.1:{free_port()}")
        args = ["--timeout", "1s", name, "true"]
    r = locker.run("-e", code, *args, env=env, timeout=30)
    assert r.returncode == code, r.stderr


def test_success_exit_code_does_not_hide_a_conflict(locker, consul, name):
    assert locker.run("-e", "1", name, "false").returncode == 0
    sid = hold_key(consul, lock_key(name))
    try:
        assert locker.run("-e", "1", "--no-wait", name, "true").returncode == 1
        assert locker.run("-e", "9", "--conflict-exit-code", "9", "--timeout", "200ms", name, "true").returncode == 9
    finally:
        destroy_session(consul, sid)


def test_success_exit_code_does_not_remap_a_signal_that_ended_the_wait(locker, consul, name, tmp_path):
    ran = tmp_path / "ran"
    sid = hold_key(consul, lock_key(name))
    try:
        p = locker.popen("-e", "143", name, "touch", str(ran))
        wait_until(lambda: sessions_named(consul, name), 15, message="the waiter's session")
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=10)
    finally:
        destroy_session(consul, sid)
    assert p.returncode == 143 and not ran.exists()


@pytest.mark.timeout(60)
def test_success_exit_code_does_not_remap_a_lost_lock(locker, consul, name, tmp_path):
    sid_file = tmp_path / "sid"
    script = f'echo "$CONSUL_LOCK_SESSION" > {sid_file}.tmp; mv {sid_file}.tmp {sid_file}; exec sleep 60'
    p = locker.popen("-e", "75", "-e", "143", "--kill-timeout", "1s", name, "sh", "-c", script)
    wait_until(sid_file.exists, 15, message="child started")
    destroy_session(consul, sid_file.read_text().strip())
    _, err = p.communicate(timeout=20)
    assert p.returncode == 75, err


def test_success_exit_code_does_not_remap_a_key_conflict(locker, consul, name):
    assert locker.run("-e", "76", name, "sh", "-c", "exit 76").returncode == 0  # also makes the key a lock's
    r = locker.run("-e", "76", "--limit", "2", name, "true")
    assert r.returncode == 76, r.stderr


@pytest.mark.timeout(60)
def test_success_exit_code_does_not_remap_the_max_runtime_code(locker, consul, name):
    r = locker.run("-e", "124", "-e", "143", "--max-runtime", "1s", name, "sleep", "60", timeout=30)
    assert r.returncode == 124, r.stderr


# -- --max-runtime -----------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_max_runtime_stops_a_command_that_honours_sigterm_and_exits_124(locker, consul, name, tmp_path):
    got = tmp_path / "got-term"
    script = f'trap "echo term > {got}; exit 5" TERM; sleep 60 & wait'
    start = time.monotonic()
    r = locker.run("--max-runtime", "1s", name, "sh", "-c", script, timeout=30)
    elapsed = time.monotonic() - start
    assert r.returncode == 124, r.stderr  # as timeout(1): not the child's 5
    assert got.exists()
    assert 1.0 <= elapsed < 6.0, elapsed  # SIGTERM at 1s, not the 10s kill grace
    assert_no_session(consul, name)


@pytest.mark.timeout(60)
def test_max_runtime_kills_a_tree_ignoring_sigterm_and_the_next_waiter_proceeds(locker, consul, name, tmp_path):
    gpid = tmp_path / "gpid"
    # An ignored SIGTERM stays ignored across exec: the child and its grandchild both live until SIGKILL.
    script = f'trap "" TERM; sleep 60 & echo $! > {gpid}.tmp; mv {gpid}.tmp {gpid}; sleep 60'
    holder = locker.popen("--max-runtime", "1s", "--kill-timeout", "1s", name, "sh", "-c", script)
    wait_until(gpid.exists, 15, message="grandchild started")
    seen = time.monotonic()
    grandchild = int(gpid.read_text())
    waiter = locker.popen(name, "sh", "-c", f"kill -0 {grandchild} 2>/dev/null && echo grandchild-alive; echo ran")
    _, err = holder.communicate(timeout=30)
    elapsed = time.monotonic() - seen
    assert holder.returncode == 124, err
    assert 1.5 <= elapsed < 8.0, elapsed  # TERM at 1s, ignored; KILL 1s later
    assert not alive(grandchild)
    out, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 0, err
    assert out.split() == ["ran"]  # it ran, and only after the old tree was gone
    assert_no_session(consul, name)


def test_max_runtime_leaves_a_command_that_ends_first_alone(locker, name):
    assert locker.run("--max-runtime", "30s", name, "sh", "-c", "exit 7").returncode == 7
    assert locker.run("--max-runtime", "1m30s", name, "true").returncode == 0
    assert locker.run("--max-runtime", "8760h", name, "sh", "-c", "exit 3").returncode == 3


@pytest.mark.parametrize("value", ["8761h", "1000000h", "abc", "-1s"])
def test_max_runtime_beyond_a_year_or_malformed_is_a_usage_error(locker, consul, name, tmp_path, value):
    assert locker.run("--max-runtime", "8760h", name, "true").returncode == 0
    ran = tmp_path / "ran"
    r = locker.run("--max-runtime", value, name, "touch", str(ran))
    assert r.returncode == 2, r.stderr
    one_line(r.stderr)
    assert not ran.exists() and not sessions_named(consul, name)
