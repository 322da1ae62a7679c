"""A leader election under a running child: a real 3-server Consul cluster on loopback loses its leader."""

import time

import pytest
from lib.consul_agent import Agent, wait_until
from lib.faultproxy import Child, Watched
from lib.locker import LOCKER, lock_key, locker_env

TTL = 10.0


def start_cluster(tmp_path, n=3):
    agents = [Agent(f"server{i}", dev=False, log_dir=str(tmp_path)) for i in range(n)]
    for a in agents:
        a.config = {
            "server": True,
            "bootstrap_expect": n,
            "retry_join": [f"127.0.0.1:{b.ports['serf_lan']}" for b in agents if b is not a],
            "retry_interval": "1s",
            "raft_protocol": 3,
            "performance": {"raft_multiplier": 1},
        }
    try:
        for a in agents:
            a.start(wait_leader=False)
        for a in agents:
            a.wait_leader(60)
    except BaseException:
        for a in agents:
            a.cleanup()
        raise
    return agents


def leader_of(agents, via):
    """The agent that `via` says is the Raft leader, or None while there is none."""
    try:
        addr = via.api("GET", "/v1/status/leader", timeout=2)
    except OSError:
        return None
    return next((a for a in agents if addr and addr.endswith(f":{a.ports['server']}")), None)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_leader_killed_while_child_runs_child_finishes_and_keeps_the_lock(name, tmp_path):
    agents = start_cluster(tmp_path)
    try:
        leader = wait_until(lambda: leader_of(agents, agents[0]), 10, message="a leader")
        follower, other = [a for a in agents if a is not leader]
        timing = ["--ttl", "10s", "--lock-delay", "3s", "--kill-timeout", "1s"]
        child, waiter_child = Child(tmp_path / "holder", code=7), Child(tmp_path / "waiter")
        # The holder talks to a follower, the waiter to the other follower: neither agent dies.
        holder = Watched(LOCKER + ["-v", *timing, name, *child.argv], locker_env(follower))
        waiter = None
        try:
            child.wait("start", 20)
            # Only now the waiter: started together, it could win the lock and leave the holder waiting.
            waiter = Watched(LOCKER + [*timing, name, *waiter_child.argv], locker_env(other))
            key = lock_key(name)
            before = follower.kv(key)
            t_created = holder.wait_line("-> PUT /v1/session/create", 1)[0]
            # Kill the leader just before the first renewal (due TTL/2 after the session was created), so that
            # renewal and the monitor's consistent reads meet the election ("No cluster leader", HTTP 500).
            wait_until(lambda: time.monotonic() >= t_created + TTL / 2 - 0.7, 10)
            leader.proc.kill()
            leader.proc.wait()
            t_kill = time.monotonic()
            new = wait_until(
                lambda: (lambda x: x if x is not None and x is not leader else None)(leader_of(agents, follower)),
                20,
                message="a new leader",
            )
            t_elected = time.monotonic()
            # A renewal answered by the new leader: the session survived the election.
            t_renewed = holder.wait_line('"TTL":"10s"', TTL, after=t_elected)[0]
            print(
                f"\nleader {leader.name} killed; {new.name} elected after {t_elected - t_kill:.2f} s; "
                f"renewal confirmed {t_renewed - t_kill:.2f} s after the kill; "
                f"{len(holder.lines_with('<- 5', after=t_kill))} answers 5xx retried meanwhile"
            )
            assert holder.proc.poll() is None and child.event("term") is None, holder.stderr()
            after = follower.kv(key)
            # Same session, same acquisition (LockIndex counts acquisitions): nobody else held it meanwhile.
            assert after["Session"] == before["Session"] == child.event("start")[3]
            assert after["LockIndex"] == before["LockIndex"]
            assert waiter_child.event("start") is None
            child.go()
            assert holder.wait(20) == 7, holder.stderr()
            t_end = child.event("end")[1]
            # The waiter gets the lock only after the holder's child ended and the lock was released.
            _, t_waiter, _, _ = waiter_child.wait("start", 20)
            assert t_waiter > t_end
            waiter_child.go()
            assert waiter.wait(20) == 0, waiter.stderr()
        finally:
            holder.kill()
            if waiter is not None:
                waiter.kill()
    finally:
        for a in agents:
            a.cleanup()
