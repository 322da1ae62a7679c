"""Mutual exclusion and semaphore limits, among consul-locker processes and mixed with real `consul lock`."""

import subprocess
import time
from pathlib import Path

import pytest
from lib.locker import assert_no_session
from lib.probe import probe

CHILD = probe("section")  # LOG HOLD [WANT]: logs "S <ns> <pid>" and "E <ns> <pid>"


def intervals(log):
    starts, ends = {}, {}
    for line in Path(log).read_text().splitlines():
        kind, ns, pid = line.split()
        (starts if kind == "S" else ends)[pid] = int(ns)
    assert starts.keys() == ends.keys(), "a critical section did not finish"
    return sorted((starts[p], ends[p]) for p in starts)


def max_concurrency(spans):
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    level = peak = 0
    for _, d in events:
        level += d
        peak = max(peak, level)
    return peak


def consul_lock_cmd(consul_bin, consul, name, *child, limit=1):
    return [consul_bin, "lock", f"-http-addr={consul.addr}", "-shell=false", f"-n={limit}", f"consul-locker/{name}"] + [
        str(c) for c in child
    ]


def wait_all(procs, timeout):
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        p.communicate(timeout=max(1, deadline - time.monotonic()))
        codes.append(p.returncode)
    return codes


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_eight_contenders_never_overlap(locker, consul, name, tmp_path):
    log = tmp_path / "log"
    procs = [locker.popen(name, *CHILD, log, "0.05") for _ in range(8)]
    assert wait_all(procs, 80) == [0] * 8
    spans = intervals(log)
    assert len(spans) == 8
    assert max_concurrency(spans) == 1, spans
    assert_no_session(consul, name)


def start_mixed(locker, consul, consul_bin, name, count, child, limit=1):
    """Start `count` contenders on one prefix, every other one a real `consul lock` (-n limit)."""
    procs = []
    for i in range(count):
        if i % 2:
            cmd = consul_lock_cmd(consul_bin, consul, name, *child, limit=limit)
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE))
        else:
            procs.append(locker.popen("--limit", limit, name, *child))
    return procs


@pytest.mark.timeout(120)
def test_mixed_with_consul_lock_never_overlap(locker, consul, consul_bin, name, tmp_path):
    log = tmp_path / "log"
    procs = start_mixed(locker, consul, consul_bin, name, 8, CHILD + [log, "0.05"])
    assert wait_all(procs, 110) == [0] * 8
    spans = intervals(log)
    assert len(spans) == 8
    assert max_concurrency(spans) == 1, spans


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_semaphore_allows_exactly_limit_holders(locker, consul, name, tmp_path):
    log = tmp_path / "log"
    procs = [locker.popen("--limit", "3", name, *CHILD, log, "5", "3") for _ in range(7)]
    assert wait_all(procs, 80) == [0] * 7
    assert max_concurrency(intervals(log)) == 3
    assert_no_session(consul, name)


@pytest.mark.timeout(120)
def test_semaphore_shares_the_layout_of_consul_lock_n(locker, consul, consul_bin, name, tmp_path):
    log = tmp_path / "log"
    procs = start_mixed(locker, consul, consul_bin, name, 6, CHILD + [log, "5", "2"], limit=2)
    assert wait_all(procs, 110) == [0] * 6
    assert max_concurrency(intervals(log)) == 2


def test_lock_and_semaphore_on_one_prefix_conflict_clearly(locker, consul, name, tmp_path):
    p = locker.popen(name, "sleep", "30")
    from lib.consul_agent import wait_until
    from lib.locker import lock_key

    wait_until(lambda: (consul.kv(lock_key(name)) or {}).get("Session"), 15, message="holder")
    r = locker.run("--limit", "2", name, "true")
    p.terminate()
    p.communicate(timeout=20)
    assert r.returncode == 76, r.stderr
    assert "flags" in r.stderr and "Traceback" not in r.stderr


def test_semaphore_limit_mismatch_is_a_conflict(locker, consul, name):
    p = locker.popen("--limit", "2", name, "sleep", "30")
    from lib.consul_agent import wait_until

    wait_until(lambda: consul.kv(f"consul-locker/{name}/.lock"), 15, message="semaphore holder")
    r = locker.run("--limit", "3", name, "true")
    p.terminate()
    p.communicate(timeout=20)
    assert r.returncode == 76
    assert "limit" in r.stderr
