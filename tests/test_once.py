"""--once and --once-token on a real Consul: the marker PREFIX/.done, when it is written, and who runs COMMAND.

Each test counts the runs of COMMAND by the lines it appends to a file, and reads the marker from Consul itself.
"""

import base64
import datetime
import json
import re
import signal
import socket
import time
import uuid

import psutil
import pytest
from lib.acl import destroy_session, hold_key
from lib.consul_agent import wait_until
from lib.locker import assert_no_session, lock_key, locker_env, sessions_named

RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", re.IGNORECASE)


def done_key(name):
    return f"consul-locker/{name}/.done"


def marker(consul, key):
    """The marker's JSON value, or None when there is no marker."""
    entry = consul.kv(key)
    return None if entry is None else json.loads(base64.b64decode(entry["Value"] or b""))


def rfc3339(text):
    """Seconds since the epoch of an RFC 3339 timestamp (strict: date, 'T', time, zone)."""
    m = RFC3339.match(text)
    assert m, f"not RFC 3339: {text!r}"
    zone = m[3].upper()
    offset = 0 if zone == "Z" else (1 if zone[0] == "+" else -1) * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    tz = datetime.timezone(datetime.timedelta(seconds=offset))
    return datetime.datetime.strptime(m[1], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=tz).timestamp() + float(m[2] or 0)


def count(path):
    return len(path.read_text().splitlines()) if path.exists() else 0


def appender(path):
    """COMMAND that records one run: the hold it ran under and consul-locker's pid (its parent)."""
    return ["sh", "-c", f'echo "$CONSUL_LOCK_INDEX $CONSUL_LOCK_SESSION $PPID" >> {path}']


def info_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip()]


def test_once_runs_then_records_the_marker_and_later_runs_skip(locker, consul, name, tmp_path):
    runs = tmp_path / "runs"
    t0 = time.time()
    r = locker.run("--once", name, *appender(runs))
    t1 = time.time()
    assert r.returncode == 0, r.stderr
    assert "already done" not in r.stderr
    index, session, pid = runs.read_text().split()
    done = marker(consul, done_key(name))
    assert done is not None, "no marker after a successful --once run"
    assert done["host"] == socket.gethostname()
    assert str(done["pid"]) == pid
    assert done["session"] == session
    assert isinstance(done["index"], int) and done["index"] == int(index)  # the fencing token of the hold
    assert done["token"] is None
    assert t0 - 2 <= rfc3339(done["finished"]) <= t1 + 2

    again = locker.run("--once", name, *appender(runs))
    assert again.returncode == 0, again.stderr
    assert count(runs) == 1, "COMMAND ran again although the marker exists"
    lines = info_lines(again.stderr)
    assert len(lines) == 1 and "already done" in lines[0], again.stderr
    assert marker(consul, done_key(name)) == done  # a skipped run does not rewrite the marker
    assert_no_session(consul, name)


def test_quiet_silences_already_done(locker, consul, name, tmp_path):
    runs = tmp_path / "runs"
    assert locker.run("--once", name, *appender(runs)).returncode == 0
    r = locker.run("-q", "--once", name, *appender(runs))
    assert r.returncode == 0 and count(runs) == 1
    assert r.stderr == ""


@pytest.mark.parametrize(
    "args, fail, code",
    [([], "exit 3", 3), ([], "kill -TERM $$", 143), (["-e", "3"], "exit 3", 0)],
    ids=["exit-3", "killed", "exit-3-made-0-by-e"],
)
def test_a_failed_run_writes_no_marker_and_the_next_run_runs(locker, consul, name, tmp_path, args, fail, code):
    runs = tmp_path / "runs"
    r = locker.run(*args, "--once", name, "sh", "-c", f"echo x >> {runs}; {fail}")
    assert r.returncode == code, r.stderr
    assert marker(consul, done_key(name)) is None
    assert locker.run("--once", name, *appender(runs)).returncode == 0
    assert count(runs) == 2
    assert marker(consul, done_key(name)) is not None


@pytest.mark.timeout(60)
def test_concurrent_once_runs_run_the_command_exactly_once(locker, consul, name, tmp_path):
    # All three wait on a lock we hold, then race for it when we let go: the contention is certain, not luck.
    runs = tmp_path / "runs"
    sid = hold_key(consul, lock_key(name))
    procs = [locker.popen("--once", name, *appender(runs)) for _ in range(3)]
    try:
        wait_until(lambda: len(sessions_named(consul, name)) == 3, 30, message="three waiting sessions")
    finally:
        destroy_session(consul, sid)
    results = [p.communicate(timeout=40) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in results]
    assert count(runs) == 1
    assert sum("already done" in err for _, err in results) == 2
    assert_no_session(consul, name)


def test_marker_is_checked_after_acquiring_not_before(locker, consul, name, tmp_path):
    runs = tmp_path / "runs"
    assert locker.run("--once", name, *appender(runs)).returncode == 0
    sid = hold_key(consul, lock_key(name))
    try:
        r = locker.run("--once", "--timeout", "500ms", name, *appender(runs))
    finally:
        destroy_session(consul, sid)
    assert r.returncode == 1, r.stderr  # not obtained: the conflict code, not "already done"
    assert "already done" not in r.stderr and count(runs) == 1


def test_once_token_runs_again_when_it_differs_and_records_the_new_token(locker, consul, name, tmp_path):
    runs = tmp_path / "runs"
    for token, expected_runs in [("v1", 1), ("v1", 1), ("v2", 2), ("v2", 2), ("v1", 3)]:
        r = locker.run("--once-token", token, name, *appender(runs))
        assert r.returncode == 0, r.stderr
        assert count(runs) == expected_runs, (token, r.stderr)
        assert marker(consul, done_key(name))["token"] == token


def test_marker_is_cleared_with_consul_kv_delete_and_lives_under_the_prefix(locker, consul, name, tmp_path):
    runs = tmp_path / "runs"
    prefix = f"apps/{name}/migrate"
    for _ in range(2):
        assert locker.run("--once", "--prefix", prefix, name, *appender(runs)).returncode == 0
    assert count(runs) == 1
    assert marker(consul, f"{prefix}/.done") is not None
    assert consul.kv(done_key(name)) is None
    consul.api("DELETE", f"/v1/kv/{prefix}/.done")  # what `consul kv delete PREFIX/.done` sends
    assert locker.run("--once", "--prefix", prefix, name, *appender(runs)).returncode == 0
    assert count(runs) == 2


@pytest.mark.parametrize("how", ["CONSUL_HTTP_TOKEN", "--token"])
def test_marker_never_records_the_acl_token(locker, consul, name, how):
    # A dev agent without ACLs ignores the token, so the run works; the marker must still not carry it.
    secret = str(uuid.uuid4())
    if how == "--token":
        r = locker.run("--token", secret, "--once-token", "v1", name, "true")
    else:
        r = locker.run("--once-token", "v1", name, "true", env=locker_env(consul, CONSUL_HTTP_TOKEN=secret))
    assert r.returncode == 0, r.stderr
    raw = base64.b64decode(consul.kv(done_key(name))["Value"]).decode()
    assert secret not in raw
    assert json.loads(raw)["token"] == "v1"


@pytest.mark.parametrize("args", [["--once", "--limit", "2"], ["--once-token", "v1", "--limit", "3"]])
def test_once_with_a_semaphore_is_a_usage_error(locker, consul, name, tmp_path, args):
    ran = tmp_path / "ran"
    r = locker.run(*args, name, "touch", str(ran))
    assert r.returncode == 2, r.stderr
    assert len(info_lines(r.stderr)) == 1 and "Traceback" not in r.stderr
    assert not ran.exists()
    assert not sessions_named(consul, name)
    assert locker.run("--once", "--limit", "1", name, "touch", str(ran)).returncode == 0


@pytest.mark.timeout(60)
def test_lock_lost_before_the_marker_is_written_exits_75_and_writes_none(locker, consul, name, tmp_path):
    sid_file, runs = tmp_path / "sid", tmp_path / "runs"
    # The child answers the loss's SIGTERM with exit 0: a raw 0 that must not count, since the lock is gone.
    script = (
        f'trap "exit 0" TERM; echo "$CONSUL_LOCK_SESSION" > {sid_file}.tmp; mv {sid_file}.tmp {sid_file}; '
        "while :; do sleep 0.05; done"
    )
    p = locker.popen("--once", "--lock-delay", "2s", "--kill-timeout", "500ms", name, "sh", "-c", script)
    wait_until(sid_file.exists, 15, message="child started")
    destroy_session(consul, sid_file.read_text().strip())
    _, err = p.communicate(timeout=20)
    assert p.returncode == 75, err
    assert marker(consul, done_key(name)) is None
    # A later run runs again (after the lock-delay the destroyed session left on the key).
    r = locker.run("--once", name, *appender(runs), timeout=30)
    assert r.returncode == 0, r.stderr
    assert count(runs) == 1 and marker(consul, done_key(name)) is not None


def test_marker_is_written_by_a_transaction_that_checks_the_session(locker, consul, name):
    # The loss in the window between the child's exit and the marker write cannot be timed from outside; the
    # request itself shows the guard: one transaction with check-session on the lock key and the marker's set.
    r = locker.run("-v", "--once", name, "true")
    assert r.returncode == 0, r.stderr
    txns = [line for line in r.stderr.splitlines() if "/v1/txn" in line and "check-session" in line]
    assert any(lock_key(name) in line and done_key(name) in line for line in txns), r.stderr


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.timeout(60)
def test_marker_is_written_only_after_the_whole_tree_is_gone(locker, consul, name, tmp_path):
    gpid = tmp_path / "gpid"
    # The grandchild ignores SIGTERM (an ignored signal stays ignored across exec): it lives until the SIGKILL at
    # --kill-timeout, after the child has exited 0.
    script = f'trap "" TERM; sleep 30 & echo $! > {gpid}.tmp; mv {gpid}.tmp {gpid}; exit 0'
    p = locker.popen("--once", "--kill-timeout", "1500ms", name, "sh", "-c", script)
    seen_alive, deadline = False, time.monotonic() + 30
    while p.poll() is None and time.monotonic() < deadline:
        done = consul.kv(done_key(name))  # read first: a marker seen before a live grandchild is a violation
        grandchild = int(gpid.read_text()) if gpid.exists() else None
        if grandchild is not None and alive(grandchild):
            seen_alive = True
            assert done is None, "marker written while a process of the tree was alive"
        time.sleep(0.02)
    _, err = p.communicate(timeout=20)
    assert p.returncode == 0, err
    assert seen_alive, "the grandchild was never seen alive: the test proved nothing"
    assert not alive(int(gpid.read_text()))
    assert marker(consul, done_key(name)) is not None


def test_sigterm_during_a_once_run_writes_no_marker(locker, consul, name, tmp_path):
    started = tmp_path / "started"
    p = locker.popen("--once", name, "sh", "-c", f"touch {started}; exec sleep 30")
    wait_until(started.exists, 15, message="child started")
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=20)
    assert p.returncode == 143
    assert marker(consul, done_key(name)) is None
