"""--status on a real Consul: a read-only report of a lock or semaphore, its holders, its fencing index and the
--once marker; exit 0 held, 1 free, 2 usage, 69 unreachable, 76 another layout, 77 ACL denied; never a session.
"""

import base64
import json
import re
import socket
import subprocess
import urllib.request
import uuid

import pytest
from lib.acl import destroy_session, hold_key, make_token, start_acl_agent
from lib.consul_agent import free_port, wait_until
from lib.locker import lock_key, locker_env, one_line, sessions_named, stop


def session_table_index(agent):
    """The Raft index of Consul's session table: any session created or destroyed since moves it."""
    with urllib.request.urlopen(agent.addr + "/v1/session/list", timeout=10) as resp:
        return int(resp.headers["X-Consul-Index"])


def status(locker, *args, env=None):
    """Run --status --json; return (exit code, parsed object)."""
    r = locker.run("--status", "--json", *args, env=env, timeout=30)
    assert "Traceback" not in r.stderr
    try:
        return r.returncode, json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"not one JSON object (exit {r.returncode}): {r.stdout!r} {r.stderr!r}") from None


def start_holder(locker, tmp_path, *args):
    """A consul-locker holding the lock until SIGTERM; returns (process, its session, its CONSUL_LOCK_INDEX)."""
    info = tmp_path / f"hold-{uuid.uuid4().hex}"
    script = f'echo "$CONSUL_LOCK_SESSION $CONSUL_LOCK_INDEX" > {info}.tmp; mv {info}.tmp {info}; exec sleep 60'
    p = locker.popen(*args, "sh", "-c", script)
    wait_until(info.exists, 15, message="holder's child started")
    sid, index = info.read_text().split()
    return p, sid, int(index)


def test_status_of_a_free_lock_exits_1_and_creates_no_session(locker, consul, name):
    before = session_table_index(consul)
    code, st = status(locker, name)
    assert code == 1
    assert st["key"] == lock_key(name)
    assert st["held"] is False and st["limit"] == 1 and st["index"] is None
    assert st["holders"] == [] and st["done"] is None
    r = locker.run("--status", name)
    assert r.returncode == 1, r.stderr
    assert lock_key(name) in r.stdout and "free" in r.stdout.lower()
    assert session_table_index(consul) == before, "--status created (or destroyed) a session"


def test_status_of_a_held_lock_names_the_holder_and_the_fencing_index(locker, consul, name, tmp_path):
    holder, sid, index = start_holder(locker, tmp_path, name)
    try:
        before = session_table_index(consul)
        code, st = status(locker, name)
        assert code == 0
        assert st["key"] == lock_key(name) and st["held"] is True and st["limit"] == 1
        assert st["index"] == index  # the holder's CONSUL_LOCK_INDEX
        assert [h["session"] for h in st["holders"]] == [sid]
        h = st["holders"][0]
        assert h["node"] == consul.name
        assert socket.gethostname() in h["name"] and re.search(rf"\b{holder.pid}\b", h["name"]), h
        assert st["done"] is None
        r = locker.run("--status", name)
        assert r.returncode == 0, r.stderr
        assert lock_key(name) in r.stdout and "held" in r.stdout.lower() and sid in r.stdout
        assert session_table_index(consul) == before, "--status created (or destroyed) a session"
    finally:
        stop(holder)


def test_status_reports_the_once_marker(locker, consul, name):
    prefix = f"jobs/{name}"
    assert locker.run("--once-token", "v7", "--prefix", prefix, name, "true").returncode == 0
    code, st = status(locker, "--prefix", prefix, name)
    assert code == 1  # the lock is free again; the marker stays
    assert st["key"] == f"{prefix}/.lock" and st["held"] is False and st["index"] is None
    stored = json.loads(base64.b64decode(consul.kv(f"{prefix}/.done")["Value"]))
    assert st["done"] == stored and st["done"]["token"] == "v7"


def test_status_of_a_semaphore_lists_every_holder(locker, consul, name, tmp_path):
    one, sid1, _ = start_holder(locker, tmp_path, "--limit", "2", name)
    two, sid2, _ = start_holder(locker, tmp_path, "--limit", "2", name)
    try:
        code, st = status(locker, "--limit", "2", name)
        assert code == 0
        assert st["held"] is True and st["limit"] == 2 and st["index"] is None
        assert sorted(h["session"] for h in st["holders"]) == sorted([sid1, sid2])
        assert {h["node"] for h in st["holders"]} == {consul.name}
        for args in (["--limit", "3"], []):  # another limit, or a lock where a semaphore is
            r = locker.run("--status", *args, name)
            assert r.returncode == 76, (args, r.stderr)
            one_line(r.stderr)
    finally:
        stop(one, two)
    code, st = status(locker, "--limit", "2", name)
    assert code == 1 and st["held"] is False and st["holders"] == []


def test_status_with_a_semaphore_limit_on_a_lock_exits_76(locker, consul, name):
    assert locker.run(name, "true").returncode == 0  # the key now has a lock's flags
    assert locker.run("--status", name).returncode == 1
    r = locker.run("--status", "--limit", "2", name)
    assert r.returncode == 76, r.stderr
    one_line(r.stderr)


@pytest.mark.timeout(60)
def test_status_of_a_lock_held_by_consul_lock(locker, consul, consul_bin, name):
    peer = subprocess.Popen(
        [consul_bin, "lock", f"-http-addr={consul.addr}", "-name=nightly job", f"consul-locker/{name}", "sleep 60"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        entry = wait_until(lambda: (consul.kv(lock_key(name)) or {}).get("Session") and consul.kv(lock_key(name)), 15)
        code, st = status(locker, name)
        assert code == 0 and st["held"] is True
        assert [(h["session"], h["name"]) for h in st["holders"]] == [(entry["Session"], "nightly job")]
        assert st["index"] == entry["ModifyIndex"]  # the write that granted the hold
    finally:
        peer.terminate()
        peer.wait(15)


@pytest.mark.parametrize(
    "args", [["--status"], ["--status", "--json"], ["--status", "{name}", "true"], ["--status", "a//b"]]
)
def test_status_usage_errors_exit_2(locker, consul, name, args):
    assert locker.run("--status", name).returncode == 1  # the option exists and works
    r = locker.run(*[a.format(name=name) for a in args])
    assert r.returncode == 2, r.stderr
    one_line(r.stderr)
    assert not sessions_named(consul, name)


@pytest.mark.timeout(60)
def test_status_with_consul_unreachable_exits_69(locker, consul, name):
    env = locker_env(consul, CONSUL_HTTP_ADDR=f"http://127.0.0.1:{free_port()}")
    r = locker.run("--status", name, env=env, timeout=45)
    assert r.returncode == 69, r.stderr
    one_line(r.stderr)


# -- ACL ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def acl_agent(tmp_path_factory):
    agent = start_acl_agent("acl-status", str(tmp_path_factory.mktemp("acl-status")))
    yield agent
    agent.cleanup()


def test_status_without_read_permission_exits_77(acl_agent, locker, name):
    r = locker.run("--status", name, env=locker_env(acl_agent), timeout=30)
    assert r.returncode == 77, r.stderr
    one_line(r.stderr)
    token = make_token(acl_agent, 'key_prefix "other/" { policy = "read" }')
    r = locker.run("--status", name, env=locker_env(acl_agent, CONSUL_HTTP_TOKEN=token), timeout=30)
    assert r.returncode == 77, r.stderr
    assert token not in r.stderr


def test_status_needs_only_key_read_even_when_the_holders_session_is_unreadable(acl_agent, locker, name):
    # A read-only token: no session write (--status makes none) and no session read on the holder's node.
    env = locker_env(
        acl_agent, CONSUL_HTTP_TOKEN=make_token(acl_agent, 'key_prefix "consul-locker/" { policy = "read" }')
    )
    code, st = status(locker, name, env=env)
    assert code == 1 and st["held"] is False
    sid = hold_key(acl_agent, lock_key(name), "consul-locker elsewhere", node="elsewhere")
    try:
        code, st = status(locker, name, env=env)
        assert code == 0 and st["held"] is True
        assert [h["session"] for h in st["holders"]] == [sid]
    finally:
        destroy_session(acl_agent, sid)
