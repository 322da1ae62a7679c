"""Mutual-exclusion soak: many contenders (consul-locker and real `consul lock`) on one prefix, holders SIGKILLed
at random, and not one overlap between the critical sections their children log."""

import os
import random
import select
import signal
import subprocess
import sys
import threading
import time

import pytest
from lib.locker import LOCKER, lock_key, locker_env, sessions_named

LOCKERS, CONSUL_LOCKS = 7, 3  # contenders of each kind, always relaunched
SECTIONS = 200  # critical sections at least
KILLS = 10  # SIGKILLed consul-locker holders at least
LOCK_DELAY = 1.5
TIMING = ["--ttl", "10s", "--lock-delay", f"{LOCK_DELAY}s", "--kill-timeout", "0.2s"]  # kill-timeout < lock-delay
SOAK_FOR = 100.0  # hard bound of the contending phase

# The critical section: log start, work a little, log end. One write(2) with O_APPEND per line: lines from
# concurrent writers never interleave. Times are CLOCK_MONOTONIC (system-wide, same clock as the test's).
CHILD = r"""
import os, random, sys, time
path, kind = sys.argv[1], sys.argv[2]
token = os.urandom(8).hex()
def log(line):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, line.encode())
    os.close(fd)
session = os.environ.get("CONSUL_LOCK_SESSION", "-")
log(f"S {token} {time.monotonic():.6f} {os.getpid()} {os.getppid()} {kind} {session}\n")
time.sleep(random.uniform(0.005, 0.03))
log(f"E {token} {time.monotonic():.6f}\n")
"""


def read_log(path):
    starts, ends = {}, {}
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return starts, ends
    for line in lines:
        parts = line.split()
        if parts[0] == "S":
            _, tok, t, pid, ppid, kind, session = parts
            starts[tok] = (float(t), int(pid), int(ppid), kind, session)
        else:
            ends[parts[1]] = float(parts[2])
    return starts, ends


class Soak:
    def __init__(self, consul, consul_bin, name, tmp_path):
        self.consul, self.name = consul, name
        self.log = str(tmp_path / "sections.log")
        self.script = str(tmp_path / "child.py")
        with open(self.script, "w") as f:
            f.write(CHILD)
        self.tmp = tmp_path
        self.env = locker_env(consul)
        self.consul_bin = consul_bin
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.holders = {}  # pid -> Popen of running consul-locker processes
        self.codes = []  # (kind, exit code)
        self.kills = []  # (token, t_kill, t_child_dead)
        self.failures = []

    def sections(self):
        return len(read_log(self.log)[0])

    def argv(self, kind):
        if kind == "locker":
            return LOCKER + [*TIMING, self.name, sys.executable, self.script, self.log, kind]
        # consul lock runs its child through sh -c: one string.
        return [
            self.consul_bin,
            "lock",
            f"-http-addr={self.consul.addr}",
            f"consul-locker/{self.name}",
            f"{sys.executable} {self.script} {self.log} {kind}",
        ]

    def worker(self, kind, i):
        with open(self.tmp / f"{kind}{i}.err", "ab") as err:
            while not self.stop.is_set():
                p = subprocess.Popen(self.argv(kind), env=self.env, stdout=subprocess.DEVNULL, stderr=err)
                with self.lock:
                    if kind == "locker":
                        self.holders[p.pid] = p
                code = p.wait()
                with self.lock:
                    self.holders.pop(p.pid, None)
                    self.codes.append((kind, code))

    def killer(self):
        """KILLS times: after a random pause, watch for the next consul-locker holder in its section, kill it."""
        rng = random.Random()
        while len(self.kills) < KILLS and not self.stop.wait(rng.uniform(0.5, 2.0)):
            while not self.stop.is_set() and not self.kill_one():
                time.sleep(0.01)  # polling the sections log for a victim

    def kill_one(self):
        """SIGKILL the consul-locker whose child is in its critical section, if one is; then destroy its session
        at once (Consul's TTL expiry would do it 10-20 s later) so the next holder comes after lock-delay.
        True when it killed one."""
        starts, ends = read_log(self.log)
        killed = {k[0] for k in self.kills}
        running = [(tok, s) for tok, s in starts.items() if tok not in ends and tok not in killed]
        if len(running) != 1 or running[0][1][3] != "locker":
            return False
        tok, (_, pid, ppid, _, session) = running[0]
        with self.lock:
            shim = self.holders.get(ppid)
        if shim is None:
            return False
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        try:
            if tok in read_log(self.log)[1]:
                return False  # the section ended meanwhile: not a holder any more
            shim.send_signal(signal.SIGKILL)
            t_kill = time.monotonic()
            self.consul.api("PUT", f"/v1/session/destroy/{session}")
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            if not poller.poll(5000):
                self.failures.append(f"child {pid} of SIGKILLed consul-locker {ppid} still alive after 5 s")
                self.stop.set()
                return True
            self.kills.append((tok, t_kill, time.monotonic()))
            return True
        finally:
            os.close(pidfd)


def overlaps(starts, ends, kills):
    """Check the sections pairwise in start order; return (problems, smallest gap, smallest gap after a kill)."""
    killed = {tok: (t_kill, t_dead) for tok, t_kill, t_dead in kills}
    intervals = []
    for tok, (t, _, _, kind, _) in starts.items():
        # A killed child's end is when we saw it dead (an upper bound); a section that logged no end and was
        # not killed by us never ended as far as we know.
        end = killed[tok][1] if tok in killed else ends.get(tok, float("inf"))
        intervals.append((t, end, tok, kind))
    intervals.sort()
    problems, gap, gap_after_kill = [], float("inf"), float("inf")
    for prev, cur in zip(intervals, intervals[1:]):
        if cur[0] <= prev[1]:
            problems.append(f"{cur[3]} section {cur[2]} started {prev[1] - cur[0]:.4f} s before {prev[2]} ended")
        gap = min(gap, cur[0] - prev[1])
        if prev[2] in killed:
            gap_after_kill = min(gap_after_kill, cur[0] - killed[prev[2]][0])
    return problems, gap, gap_after_kill


@pytest.mark.timeout(170)
def test_no_two_holders_ever_overlap_under_random_sigkills_and_mixed_clients(consul, consul_bin, name, tmp_path):
    soak = Soak(consul, consul_bin, name, tmp_path)
    t0 = time.monotonic()
    workers = [threading.Thread(target=soak.worker, args=("locker", i)) for i in range(LOCKERS)]
    workers += [threading.Thread(target=soak.worker, args=("consul-lock", i)) for i in range(CONSUL_LOCKS)]
    killer = threading.Thread(target=soak.killer)
    for t in [*workers, killer]:
        t.start()
    try:
        while time.monotonic() - t0 < SOAK_FOR and (soak.sections() < SECTIONS or len(soak.kills) < KILLS):
            time.sleep(0.2)  # progress check of a timed soak, not synchronisation
    finally:
        # Drain: no new contenders; those left get the lock in turn, run their section and exit.
        soak.stop.set()
        killer.join(10)
        for t in workers:
            t.join(40)
        with soak.lock:
            left = list(soak.holders.values())
        for p in left:
            p.kill()
    elapsed = time.monotonic() - t0
    starts, ends = read_log(soak.log)
    problems, gap, gap_after_kill = overlaps(starts, ends, soak.kills)
    kinds = {k: sum(1 for s in starts.values() if s[3] == k) for k in ("locker", "consul-lock")}
    odd = [(k, c) for k, c in soak.codes if c not in (0, -signal.SIGKILL)]
    print(
        f"\nsoak: {len(starts)} sections ({kinds}) in {elapsed:.1f} s, {len(soak.kills)} holders SIGKILLed; "
        f"smallest handoff gap {gap * 1000:.1f} ms; smallest gap kill -> next start {gap_after_kill:.2f} s"
    )
    assert not left, "contenders still running after the drain"
    assert not soak.failures, soak.failures
    assert not problems, problems[:10]
    assert len(starts) >= SECTIONS and len(soak.kills) >= KILLS
    assert kinds["consul-lock"] > 0 and kinds["locker"] > 0
    assert not odd, f"unexpected exit codes: {odd}"
    assert gap_after_kill >= LOCK_DELAY - 0.1  # Consul's lock-delay after a lost session held for everyone
    # Every consul-locker session is gone (`consul lock` may leave its own to expire: not ours to judge).
    assert not [s for s in sessions_named(consul, name) if s["Name"].startswith("consul-locker")]
    entry = consul.kv(lock_key(name))
    assert entry is None or not entry.get("Session")
