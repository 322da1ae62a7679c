"""Lock safety under faults, against real Consul agents: the lock lost while the child runs, a frozen agent, a
network cut (tests/lib/faultproxy.py), a SIGKILLed holder. Every figure asserted here is printed too (pytest -s)."""

import signal
import time

import pytest
from lib.consul_agent import Agent, wait_until
from lib.faultproxy import Child, FaultProxy, Watched
from lib.locker import LOCKER, assert_no_session, lock_key, locker_env

LOCK_LOST = 75
TTL = 10.0  # Consul's smallest session TTL
# Consul expires a session no earlier than TTL after the last renewal it received (in practice 2 x TTL: it
# doubles the TTL as a grace period), and then refuses the key to everyone for lock-delay.
CONSUL_TTL_MULTIPLIER = 2
# kill-timeout < lock-delay: the old child is gone before a new holder can start after a lost session.
TIMING = ["--ttl", "10s", "--lock-delay", "3s", "--kill-timeout", "1s"]
RENEW = "-> PUT /v1/session/renew/"
CREATE = "-> PUT /v1/session/create"


def shim(agent, name, child, *extra, env=None, verbose=False):
    args = [*TIMING, *extra, name, *child.argv]
    if verbose:
        args.insert(0, "-v")
    return Watched(LOCKER + args, env or locker_env(agent))


def hold(agent, name, child, *extra, env=None, verbose=False):
    """Start a shim and wait until its child runs under the lock; return the Watched shim."""
    p = shim(agent, name, child, *extra, env=env, verbose=verbose)
    try:
        child.wait("start", 15)
    except AssertionError:
        p.kill()
        raise AssertionError(f"the child never started; shim stderr:\n{p.stderr()}") from None
    return p


def assert_lost(p, child, since, within=1.0):
    """The child got SIGTERM within `within` s of `since`, and the shim exited with the lock-lost code."""
    _, t_term, _, _ = child.wait("term", within + 5)
    code = p.wait(15)
    print(f"\nfault -> SIGTERM to the child: {t_term - since:.3f} s")
    assert code == LOCK_LOST, p.stderr()
    assert t_term - since <= within, f"SIGTERM came {t_term - since:.2f} s after the fault"
    assert "lock lost" in p.stderr()
    assert child.event("end") is None


@pytest.mark.timeout(40)
def test_session_destroyed_while_child_runs_terminates_it_with_lock_lost_code(consul, name, tmp_path):
    child = Child(tmp_path)
    p = hold(consul, name, child)
    session = consul.kv(lock_key(name))["Session"]
    t0 = time.monotonic()
    consul.api("PUT", f"/v1/session/destroy/{session}")
    assert_lost(p, child, t0)
    assert_no_session(consul, name)


@pytest.mark.timeout(40)
def test_lock_key_deleted_while_child_runs_terminates_it_with_lock_lost_code(consul, name, tmp_path):
    child = Child(tmp_path)
    p = hold(consul, name, child)
    t0 = time.monotonic()
    consul.api("DELETE", f"/v1/kv/{lock_key(name)}")
    assert_lost(p, child, t0)
    assert_no_session(consul, name)


@pytest.mark.timeout(40)
def test_lock_key_taken_by_another_session_terminates_child_and_leaves_the_key_to_it(consul, name, tmp_path):
    child = Child(tmp_path)
    p = hold(consul, name, child)
    key = lock_key(name)
    entry = consul.kv(key)
    other = consul.api("PUT", "/v1/session/create", {"Name": "intruder", "TTL": "60s"})["ID"]
    try:
        # Delete and take over in one transaction: the shim never sees the key free, only held by another.
        ops = [
            {"KV": {"Verb": "delete", "Key": key}},
            {"KV": {"Verb": "lock", "Key": key, "Value": "", "Flags": entry["Flags"], "Session": other}},
        ]
        t0 = time.monotonic()
        consul.api("PUT", "/v1/txn", ops)
        assert_lost(p, child, t0)
        # The shim released only what it held: the other session still holds the key.
        assert consul.kv(key)["Session"] == other
        assert_no_session(consul, name)
    finally:
        consul.api("PUT", f"/v1/session/destroy/{other}")


@pytest.mark.timeout(40)
def test_lost_lock_child_ignoring_sigterm_is_killed_with_its_tree_after_kill_timeout(consul, locker, name, tmp_path):
    script = f'trap "" TERM; sleep 1000 & echo $! > {tmp_path}/gc; wait'
    p = locker.popen("--kill-timeout", "1s", "--lock-delay", "3s", name, "sh", "-c", script)
    gc = wait_until(lambda: (tmp_path / "gc").exists() and (tmp_path / "gc").read_text().strip(), 15)
    session = wait_until(lambda: (consul.kv(lock_key(name)) or {}).get("Session"), 5)
    t0 = time.monotonic()
    consul.api("PUT", f"/v1/session/destroy/{session}")
    _, err = p.communicate(timeout=15)
    elapsed = time.monotonic() - t0
    print(f"\nsession destroyed -> shim exited: {elapsed:.2f} s (kill-timeout 1 s)")
    assert p.returncode == LOCK_LOST, err
    assert 1.0 <= elapsed <= 1.0 + 3.0
    assert not _alive(int(gc)), "the grandchild (SIGTERM ignored) outlived the shim"


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_frozen_agent_child_terminated_before_the_agent_is_continued(name, tmp_path):
    agent = Agent("frozen", log_dir=str(tmp_path)).start()
    try:
        child = Child(tmp_path / "child")
        p = hold(agent, name, child, verbose=True)
        key = lock_key(name)
        session = agent.kv(key)["Session"]
        agent.pause()
        t_frozen = time.monotonic()
        try:
            _, t_term, _, _ = child.wait("term", TTL + 5)
        finally:
            agent.resume()
        # Still frozen when the child got SIGTERM (we resume only after): Consul had not expired the session.
        last_sent = max(t for t, line in p.lines if t <= t_frozen and (RENEW in line or CREATE in line))
        print(
            f"\nfrozen {t_frozen - last_sent:.2f} s after the last confirmation; "
            f"SIGTERM {t_term - last_sent:.2f} s after it"
        )
        assert t_term - last_sent <= TTL + 1.0
        assert p.wait(30) == LOCK_LOST, p.stderr()
        assert "could not confirm the session" in p.stderr()
        assert agent.kv(key) is None or agent.kv(key).get("Session") != session
        assert not [s for s in agent.sessions() if s["ID"] == session]
    finally:
        agent.cleanup()


@pytest.fixture
def proxy(consul):
    fp = FaultProxy(("127.0.0.1", consul.http_port)).start()
    yield fp
    fp.close()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_partition_shorter_than_ttl_does_not_disturb_the_child(consul, proxy, name, tmp_path):
    child = Child(tmp_path, code=7)
    p = hold(consul, name, child, env=locker_env(consul, CONSUL_HTTP_ADDR=proxy.addr), verbose=True)
    t_created = p.wait_line(CREATE, 1)[0]  # the session's first confirmation; renewals follow every TTL/2
    # Cut from 4 s to 7.5 s after it: the first renewal (due at 5 s) meets the cut; the fence (10 s) is never
    # reached. Open connections are reset too, as by a restarted router.
    wait_until(lambda: time.monotonic() >= t_created + 4, 10)
    proxy.cut()
    proxy.drop()
    t_cut = time.monotonic()
    p.wait_line(RENEW, TTL, after=t_cut)
    wait_until(lambda: time.monotonic() >= t_created + 7.5, 10)
    proxy.heal()
    # Past the moment the shim would have fenced had the held-back renewal failed, the child still runs.
    wait_until(lambda: time.monotonic() >= t_created + TTL + 0.5 or p.proc.poll() is not None, TTL)
    assert p.proc.poll() is None and child.event("term") is None, p.stderr()
    child.go()
    assert p.wait(15) == 7, p.stderr()
    assert child.event("term") is None
    assert_no_session(consul, name)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_dropped_connections_do_not_disturb_the_child(consul, proxy, name, tmp_path):
    child = Child(tmp_path, code=5)
    p = hold(consul, name, child, env=locker_env(consul, CONSUL_HTTP_ADDR=proxy.addr), verbose=True)
    t_created = p.wait_line(CREATE, 1)[0]
    # Reset every connection (the monitor's blocking query is always in flight), then again and again while
    # the first renewal is due: kept-alive and in-flight requests die.
    proxy.drop()
    wait_until(lambda: time.monotonic() >= t_created + TTL / 2 - 0.3, 10)
    for _ in range(4):
        proxy.drop()
        time.sleep(0.2)  # pacing of the fault, not synchronisation
    t_renew = p.wait_line(RENEW, TTL, after=t_created)[0]
    # The renewal went through: a later successful answer follows it, and the child is undisturbed.
    p.wait_line("<- 200", TTL, after=t_renew)
    assert p.proc.poll() is None and child.event("term") is None, p.stderr()
    child.go()
    assert p.wait(15) == 5, p.stderr()
    assert child.event("term") is None
    assert_no_session(consul, name)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_partition_longer_than_ttl_self_fences_within_ttl_of_last_renewal(consul, proxy, name, tmp_path):
    child = Child(tmp_path)
    p = hold(consul, name, child, env=locker_env(consul, CONSUL_HTTP_ADDR=proxy.addr), verbose=True)
    key = lock_key(name)
    session = consul.kv(key)["Session"]
    proxy.cut()
    t_cut = time.monotonic()
    last_sent = max(t for t, line in p.lines if t <= t_cut and (RENEW in line or CREATE in line))
    _, t_term, _, _ = child.wait("term", TTL + 5)
    # Self-fenced within TTL of the last renewal that could have succeeded, while Consul (not behind the cut)
    # still has the session: nobody else could have the key yet.
    assert consul.kv(key)["Session"] == session
    fence = t_term - last_sent
    # The shim gives up its release and destroy within its close budget, the partition still on.
    code = p.wait(20)
    t_exit = time.monotonic()
    print(f"\ncut {t_cut - last_sent:.2f} s after the last renewal; SIGTERM {fence:.2f} s after it (TTL 10 s);")
    print(f"shim exited {t_exit - t_term:.2f} s after the SIGTERM, still partitioned")
    assert code == LOCK_LOST, p.stderr()
    assert TTL - 0.5 <= fence <= TTL + 1.0
    assert t_exit - t_term <= 5.0 + 2.0  # the close budget (cli.CLOSE_BUDGET) and a margin
    assert "could not confirm the session" in p.stderr()
    assert child.event("end") is None
    # After the partition Consul expires the session (we could not destroy it); nothing is left to clean.
    proxy.heal()
    consul.api("PUT", f"/v1/session/destroy/{session}")


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_sigkilled_holder_is_replaced_within_two_ttl_plus_lock_delay(consul, locker, name, tmp_path):
    first, second = Child(tmp_path / "first"), Child(tmp_path / "second")
    timing = ["--ttl", "10s", "--lock-delay", "1s", "--kill-timeout", "0.5s"]
    holder = locker.popen(*timing, name, *first.argv)
    first.wait("start", 15)
    waiter = locker.popen(*timing, name, *second.argv)
    wait_until(lambda: len([s for s in consul.sessions() if name in s["Name"]]) == 2, 10, message="waiter")
    holder.send_signal(signal.SIGKILL)
    t_kill = time.monotonic()
    holder.wait()
    # PR_SET_PDEATHSIG: the holder's child dies with it, long before anyone else can hold the lock.
    pid = first.event("start")[2]
    wait_until(lambda: not _alive(pid), 2, message="the dead holder's child to die")
    t_child_dead = time.monotonic()
    bound = CONSUL_TTL_MULTIPLIER * TTL + 1.0 + 3.0  # 2 x TTL + lock-delay + a margin
    _, t_start, _, _ = second.wait("start", bound + 5)
    failover = t_start - t_kill
    print(
        f"\nholder SIGKILLed -> its child dead: {t_child_dead - t_kill:.3f} s; -> waiter's child started: "
        f"{failover:.2f} s (TTL 10 s, lock-delay 1 s)"
    )
    second.go()
    out, err = waiter.communicate(timeout=15)
    assert waiter.returncode == 0, err
    assert failover <= bound
    assert failover >= TTL  # Consul kept the dead holder's session at least a TTL
    assert_no_session(consul, name)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
