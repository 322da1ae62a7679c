"""Node faults on a real Consul cluster, each node its own network namespace, judged by a fenced resource.

Three Consul servers and three client agents, each in its own network namespace (tests/lib/netns.py). On each client
node consul-locker runs in a loop against its local agent, twice: a lock and a `--limit 2` semaphore. Every child
enters a fenced resource (tests/lib/fenced.py) with its CONSUL_LOCK_INDEX, writes for a random 0.1-1 s, exits. The
resource sits on a data network that faults leave alone: a node cut off from Consul can still write, which is the
case a lock exists for. A nemesis makes the failures of machines, one at a time, on a bounded schedule:

    cut>ttl        the lock holder's node loses the Consul network for longer than the TTL
    cut<ttl        ... for less than the TTL
    leader-cut     the Raft leader loses the network
    leader-kill    the Raft leader is SIGKILLed, then restarted with its data
    agent-freeze   the lock holder's Consul agent is SIGSTOPped for longer than the TTL
    holder-pause   a holding consul-locker and its child are SIGSTOPped together until someone else holds (a paused
                   machine): resumed, the child writes, and only the fencing token can stop that write

Before each fault the next lock holder (and a semaphore holder on the same node) is given a task longer than any
fault, so the fault always catches a child inside: past the TTL only consul-locker's own fence ends it in time.

The checker (lib.fenced.check) reads the resource's history: accepted critical sections never overlap beyond the
limit, no stale token is accepted, one token per grant; and here: every consul-locker exit code is one the contract
allows (dying of a signal is not an exit code), a holder cut off or frozen past the TTL never finishes its task,
some section is accepted within PROGRESS_BOUND after each healed fault, no session and no contender key is left at
the end. One summary line and one line per fault (pytest -s prints them; netns.log in the test's tmp_path has them,
next to the resource histories and every consul-locker run's -v output, stamped with the histories' clock).

Sizes: the CI size runs each fault once (under 3 minutes). CONSUL_LOCKER_NETNS_LONG=1 runs LONG_ROUNDS rounds in a
shuffled order with random fault lengths (seed printed; CONSUL_LOCKER_NETNS_SEED replays one);
docs/netns-results.md has its latest figures.
"""

import collections
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types

import pytest
from lib import fenced
from lib.consul_agent import free_port, wait_until
from lib.locker import LOCKER, SRC, locker_env
from lib.netns import NS_PREFIX, Cluster, Net, sweep_stale, unavailable_reason

TTL = 10.0  # Consul's smallest session TTL
LOCK_DELAY = 5.0
KILL_TIMEOUT = 2.0  # < LOCK_DELAY, as the contract requires for its timing guarantee
TIMING = ["--ttl", f"{TTL:g}s", "--lock-delay", f"{LOCK_DELAY:g}s", "--kill-timeout", f"{KILL_TIMEOUT:g}s"]
# Consul expires a silent session 2 x TTL after the last renewal it received, then refuses the key for lock-delay;
# a waiter notices within a blocking query's answer. Past that, a healed cluster must have given the lock out again.
PROGRESS_BOUND = 2 * TTL + LOCK_DELAY + 10.0
MIN_AGE_FOR_STOP = 1.5
LONG = os.environ.get("CONSUL_LOCKER_NETNS_LONG", "") not in ("", "0")
LONG_ROUNDS = 5
# A task no fault outlasts: only consul-locker's fence (or the resource's) can end it in time.
LONG_TASK = 60.0
# How long a healed cluster may take to be whole again: gossip re-admits a node that was cut off within about 30 s
# (memberlist's reconnect), autopilot promotes a returning server after about 10 s of stability.
HEALTH_BOUND = 90.0
ELECTION = 4.0  # about what a Raft election takes here (raft_multiplier 1), to size tasks that should outlast one
FAULTS = ["holder-pause", "cut>ttl", "cut<ttl", "leader-cut", "leader-kill", "agent-freeze"]
FENCED = os.path.abspath(fenced.__file__)
LOCAL_AGENT = "http://127.0.0.1:8500"  # each client node's own agent, inside its namespace
CHILD_CODES = {0, fenced.REFUSED_EXIT, fenced.UNREACHABLE_EXIT}
# What the contract lets consul-locker exit with here: the child's codes, 1 (not obtained), 69 (Consul unreachable),
# 75 (lock lost), 128+N (a signal: the child killed by one, or our stop signal while waiting).
ALLOWED_CODES = CHILD_CODES | {1, 69, 75} | {128 + n for n in range(1, 65)}


class Workload:
    """One lock name, its fenced resource, and one consul-locker loop per client node."""

    def __init__(self, name, limit, port):
        self.name, self.limit, self.port = name, limit, port
        self.server = None
        self.history = None
        self.loops = []
        self.paused = set()  # ids of sections frozen together with their consul-locker


class Loop(threading.Thread):
    """consul-locker, again and again, on one client node, until stopped."""

    def __init__(self, net, agent, wl, resource_ip, log_path, runs, work_file):
        super().__init__(name=f"loop-{agent.role}-{wl.name}", daemon=True)
        self.net, self.agent, self.wl = net, agent, wl
        self.log_path, self.runs = log_path, runs
        self.cwd = os.path.dirname(log_path)
        self.stopping = threading.Event()
        self.current, self.started = None, 0.0
        self._mutex = threading.Lock()
        limit = ["--limit", str(wl.limit)] if wl.limit > 1 else []
        child = [sys.executable, FENCED, "child", f"{resource_ip}:{wl.port}", agent.role]
        self.argv = LOCKER + ["-v", *TIMING, *limit, wl.name, "--", *child]
        self.env = locker_env(types.SimpleNamespace(addr=LOCAL_AGENT), **{fenced.WORK_FILE_ENV: work_file})

    def run(self):
        n = 0
        with open(self.log_path, "a") as log:
            while not self.stopping.is_set():
                n += 1
                t0 = time.monotonic()
                log.write(f"=== run {n} at {t0:.3f}\n")
                log.flush()
                with self._mutex:
                    if self.stopping.is_set():
                        break
                    # cwd: `python -m` puts the current directory first on sys.path, before PYTHONPATH; run from
                    # the checkout it would import the checkout's shim even when SHIM_SRC names another.
                    try:
                        proc = self.net.popen(
                            self.agent.ns,
                            self.argv,
                            env=self.env,
                            cwd=self.cwd,
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                        )
                    except OSError as e:  # out of PIDs for a moment (fork EAGAIN): not consul-locker's doing
                        log.write(f"=== run {n} not started: {e}\n")
                        self.stopping.wait(0.5)
                        continue
                    self.current, self.started = proc, time.monotonic()
                # Every line with the time it was read (the clock of the resource's history): -v shows each
                # request, so a run's log says what consul-locker was doing at any moment of the history.
                for line in proc.stdout:
                    log.write(f"{time.monotonic():.3f} {line.decode(errors='replace')}")
                    log.flush()
                code = proc.wait()
                t1 = time.monotonic()
                log.write(f"=== run {n} pid {proc.pid} exit {code} after {t1 - t0:.3f} s\n")
                log.flush()
                self.runs.append((self.agent.role, self.wl.name, n, proc.pid, code, t0, t1, self.stopping.is_set()))
                if code not in (0, fenced.REFUSED_EXIT, 75) and not self.stopping.is_set():
                    self.stopping.wait(0.5)  # pacing: a run that failed fast is not retried in a hot loop

    def stop(self):
        with self._mutex:
            self.stopping.set()
            proc, started = self.current, self.started
        if proc is not None and proc.poll() is None:
            # A SIGTERM in the first moments of a Python process kills it before it can install its handlers (a
            # start-up race that tests/test_pid1.py covers); the stop of this test is not about that.
            wait_until(lambda: time.monotonic() >= started + MIN_AGE_FOR_STOP or proc.poll() is not None, 5, 0.05)
            try:
                os.kill(proc.pid, signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass


class Nemesis:
    """Faults, one at a time. Before each, the lock holder gets a long task (lib.fenced's work file), so the fault
    catches a child inside: a node fault must then end in consul-locker's own fence (cut>ttl, agent-freeze) or
    leave the child alone (cut<ttl, leader-cut, leader-kill: shorter than the TTL, or transient for Consul)."""

    def __init__(self, net, cluster, workloads, log, rng, work_dir):
        self.net, self.cluster, self.workloads, self.log, self.rng = net, cluster, workloads, log, rng
        self.work_dir = work_dir
        self.lock, self.sem = workloads
        self.faults = []  # dicts: kind, target, start, heal, progress (s after heal per workload), notes, victims

    def say(self, text):
        self.log(f"{time.monotonic():.3f} nemesis: {text}")

    # -- what the resource shows, and what the next children do ------------------------------------------------
    def work_file(self, role, wl):
        return os.path.join(self.work_dir, f"work-{role}-{wl.name}")

    def long_holder(self, wl, length, roles=None, timeout=PROGRESS_BOUND):
        """Have the next child of wl on one of `roles` (default: any client node) work `length` s; return its
        section once it is inside, or None after timeout."""
        roles = roles or [a.role for a in self.cluster.clients]
        t = time.monotonic()
        for role in roles:
            with open(self.work_file(role, wl), "w") as f:
                f.write(f"{length} {length}")

        def inside():
            return next(
                (
                    s
                    for s in wl.history.open_sections()
                    if s.start > t and s.node in roles and s.planned >= length - 0.05
                ),
                None,
            )

        try:
            return wait_until(inside, timeout, 0.05, f"a {wl.name} holder with a long task")
        except AssertionError:
            self.say(f"no {wl.name} holder with a long task on {roles} within {timeout:.0f} s")
            return None
        finally:
            for role in roles:
                os.unlink(self.work_file(role, wl))

    def victims(self, length, role=None):
        """Long-working holders for a fault: the lock's (on role, or wherever the next holder runs), and a
        semaphore holder on the same node if one comes soon."""
        s = self.long_holder(self.lock, length, [role] if role else None)
        if s is None:
            raise AssertionError(f"no {self.lock.name} holder took a long task within {PROGRESS_BOUND:.0f} s")
        t = self.long_holder(self.sem, length, [s.node], timeout=10)
        return [(wl, x) for wl, x in ((self.lock, s), (self.sem, t)) if x is not None]

    def outcome(self, f, victims):
        """What became of each long-working holder: it finished its task (undisturbed), consul-locker ended it
        (killed), or the fence refused it."""
        for wl, s in victims:

            def ended(wl=wl, s=s):
                now = wl.history.sections().get(s.conn)
                return now if now.phys_end is not None or now.refused else None

            # A task that outlives the fault ends by itself a little later; wait for it, within its plan.
            try:
                now = wait_until(ended, max(0.1, s.start + s.planned + 5 - time.monotonic()), 0.1, "the task's end")
            except AssertionError:
                now = wl.history.sections().get(s.conn)
            if now.finished:
                what = "finished its task"
            elif now.refused:
                what = f"refused by the fence {now.refused[0].t - f['start']:.1f} s after the fault began"
            elif now.phys_end is not None:
                what = f"killed {now.phys_end - f['start']:.1f} s after the fault began"
            else:
                what = "still inside"
            f["victims"].append((wl.name, s.id, what))

    def wait_progress(self, fault):
        """Record, per workload, how long after the heal the first section was accepted (None: not in bound)."""
        heal = fault["heal"]
        fault["progress"] = {}
        for wl in self.workloads:

            def entered(wl=wl):
                return next((e.t for e in reversed(wl.history.refresh()) if _accepted_enter(e) and e.t > heal), None)

            try:
                t = wait_until(entered, max(0.1, heal + PROGRESS_BOUND - time.monotonic()), 0.1, "progress")
                fault["progress"][wl.name] = t - heal
            except AssertionError:
                fault["progress"][wl.name] = None
        self.say(f"{fault['kind']} healed; progress after {fault['progress']}")

    def wait_cluster(self, f):
        """Wait until the cluster is whole again before the next fault: one fault at a time, and a second server
        lost while the first is still a non-voter would be a lost quorum, not the fault the schedule names."""
        t = f["heal"] or time.monotonic()
        try:
            wait_until(lambda: not self.cluster.health(), t + HEALTH_BOUND - time.monotonic(), 0.5, "a whole cluster")
            f["notes"].append(f"cluster whole {time.monotonic() - t:.0f} s after the heal")
        except AssertionError:
            f["notes"].append(f"cluster not whole {HEALTH_BOUND:.0f} s after the heal: {self.cluster.health()}")
            self.say(f["notes"][-1])

    def fault(self, kind, target, victims=()):
        f = {
            "kind": kind,
            "target": target,
            "start": time.monotonic(),
            "heal": None,
            "progress": {},
            "notes": [],
            "victims": [],
        }
        self.faults.append(f)
        inside = ", ".join(f"{wl.name} {s.id} token {s.token}" for wl, s in victims)
        self.say(f"{kind} on {target}; inside: {inside or 'nobody'}")
        return f

    def duration(self, lo, hi):
        """A fault's length: the middle of its range in the CI size, random within it in the long one."""
        return self.rng.uniform(lo, hi) if LONG else (lo + hi) / 2

    # -- faults ------------------------------------------------------------------------------------------------
    def cut(self, longer):
        length = self.duration(TTL + 1, TTL + 5) if longer else self.duration(1, TTL - 2)
        # Longer than the TTL, only consul-locker's fence can end the task in time; shorter, it should outlast
        # the cut and finish.
        victims = self.victims(LONG_TASK if longer else length + 4)
        role = victims[0][1].node
        f = self.fault("cut>ttl" if longer else "cut<ttl", role, victims)
        f["notes"].append(f"{length:.1f} s")
        self.net.cut(role)
        time.sleep(length)  # the fault's length, not a synchronisation
        self.net.heal(role)
        f["heal"] = time.monotonic()
        self.wait_progress(f)
        self.outcome(f, victims)

    def leader_cut(self):
        length = self.duration(1, TTL)
        victims = self.victims(ELECTION + length + 4)
        leader = wait_until(self.cluster.agreed_leader, 30, 0.2, "an agreed leader")
        f = self.fault("leader-cut", leader.role, victims)
        self.net.cut(leader.role)
        new = wait_until(lambda: self.cluster.agreed_leader(exclude=(leader,)), 30, 0.2, "a new leader")
        f["notes"].append(f"{new.role} elected after {time.monotonic() - f['start']:.1f} s")
        time.sleep(length)  # the isolation lasts a while after the election
        self.net.heal(leader.role)
        f["heal"] = time.monotonic()
        self.wait_progress(f)
        self.outcome(f, victims)

    def leader_kill(self):
        victims = self.victims(2 * ELECTION + 4)
        leader = wait_until(self.cluster.agreed_leader, 30, 0.2, "an agreed leader")
        f = self.fault("leader-kill", leader.role, victims)
        leader.kill()
        new = wait_until(lambda: self.cluster.agreed_leader(exclude=(leader,)), 30, 0.2, "a new leader")
        f["notes"].append(f"{new.role} elected after {time.monotonic() - f['start']:.1f} s")
        leader.start()
        self.cluster.wait_ready(leader, 60)
        f["heal"] = time.monotonic()
        f["notes"].append(f"{leader.role} back after {f['heal'] - f['start']:.1f} s")
        self.wait_progress(f)
        self.outcome(f, victims)

    def agent_freeze(self):
        length = self.duration(TTL + 1, TTL + 5)
        victims = self.victims(LONG_TASK)
        role = victims[0][1].node
        agent = self.cluster.agent(role)
        f = self.fault("agent-freeze", role, victims)
        f["notes"].append(f"{length:.1f} s")
        agent.pause()
        try:
            time.sleep(length)  # the fault's length
        finally:
            agent.resume()
        f["heal"] = time.monotonic()
        self.wait_progress(f)
        self.outcome(f, victims)

    def holder_pause(self):
        """Freeze a holding consul-locker with its child, in every workload at once, until the resource has let a
        newer holder in (lock) or fenced the frozen one (semaphore: N newer holders were inside beside it); resume
        the child first and let it write, then its consul-locker."""
        frozen = []
        for wl in self.workloads:
            s = self._freeze_inside(wl)
            if s is not None:
                frozen.append((wl, s))
        f = self.fault("holder-pause", ", ".join(s.node for _, s in frozen), frozen)
        bound = 2 * TTL + LOCK_DELAY + 15.0
        for wl, s in frozen:

            def newer_inside(wl=wl, s=s):
                if wl.limit == 1:
                    return any(_accepted_enter(e) and e.token > s.token for e in wl.history.refresh())
                # The resource fences a semaphore holder once `limit` newer ones were inside beside it.
                return any(e.kind == "FENCE" and e.conn == s.conn for e in wl.history.refresh())

            try:
                wait_until(newer_inside, max(0.1, f["start"] + bound - time.monotonic()), 0.05, "a newer holder")
                f["notes"].append(f"{wl.name}: newer holder inside {time.monotonic() - f['start']:.1f} s after")
            except AssertionError:
                f["notes"].append(f"{wl.name}: no newer holder within {bound:.0f} s")
        for wl, s in frozen:
            shim, child = s.pids
            t_resume = time.monotonic()
            _signal(child, signal.SIGCONT)
            try:
                # The child's next request (its writes come every WRITE_EVERY) reaches the resource first.
                wait_until(
                    lambda s=s, wl=wl, t=t_resume: any(e.conn == s.conn and e.t > t for e in wl.history.refresh()),
                    5,
                    0.02,
                    "the resumed child's request",
                )
            except AssertionError:
                f["notes"].append(f"{wl.name}: the resumed child sent nothing")
            _signal(shim, signal.SIGCONT)
        f["heal"] = time.monotonic()
        self.wait_progress(f)
        self.outcome(f, frozen)

    def _freeze_inside(self, wl, tries=3):
        for _ in range(tries):
            # One node only for a semaphore: two long tasks started together would leave a live holder beside the
            # frozen one, and the resource cannot tell which of the two lost its slot when a third comes in.
            roles = [self.rng.choice(self.cluster.clients).role] if wl.limit > 1 else None
            s = self.long_holder(wl, LONG_TASK, roles)
            if s is None:
                continue
            shim, child = s.pids
            if not (_signal(shim, signal.SIGSTOP) and _signal(child, signal.SIGSTOP)):
                _signal(shim, signal.SIGCONT)
                continue
            try:
                # A stop signal takes effect when the kernel next schedules the process, not when kill() returns.
                wait_until(lambda c=child, p=shim: _stopped(c) and _stopped(p), 5, 0.01, "the holder to stop")
            except AssertionError:
                pass
            now = wl.history.sections().get(s.conn)
            if now is not None and now.phys_end is None and not now.refused and _stopped(child) and _stopped(shim):
                wl.paused.add(s.id)
                self.say(f"froze {wl.name} holder {s.id} token {s.token}")
                return now
            self.say(f"{wl.name} holder {s.id} left before it could be frozen")
            _signal(child, signal.SIGCONT)
            _signal(shim, signal.SIGCONT)
        self.say(f"could not catch a {wl.name} holder inside")
        return None

    def run(self, kind):
        {
            "holder-pause": self.holder_pause,
            "cut>ttl": lambda: self.cut(True),
            "cut<ttl": lambda: self.cut(False),
            "leader-cut": self.leader_cut,
            "leader-kill": self.leader_kill,
            "agent-freeze": self.agent_freeze,
        }[kind]()
        self.wait_cluster(self.faults[-1])


def _accepted_enter(e):
    return e.kind == "ENTER" and e.verdict == "OK"


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def _stopped(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except FileNotFoundError:
        return False


@pytest.fixture
def cluster(tmp_path):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    removed = sweep_stale()
    net = Net()
    data_root = tempfile.mkdtemp(prefix=f"{net.tag}-data-")  # named like the namespaces: swept the same way
    c = None
    try:
        c = Cluster(net, data_root, str(tmp_path))
        c.stale_removed = removed
        yield c.start()
    finally:
        if c is not None:
            c.close()
        net.close()
        shutil.rmtree(data_root, ignore_errors=True)


def _leftovers(cluster, workloads):
    """Sessions and contender keys still in Consul, as a server sees them."""
    server = next(s for s in cluster.servers if s.running())
    sessions = cluster.try_api(server, "GET", "/v1/session/list")
    if sessions is None:
        return ["the server did not answer"]
    left = [f"session {s['ID']} {s.get('Name', '')!r}" for s in sessions]
    for wl in workloads:
        prefix = f"consul-locker/{wl.name}/"
        keys = cluster.try_api(server, "GET", f"/v1/kv/{prefix}?recurse") or []
        for k in keys:
            if k["Key"] != prefix + ".lock":
                left.append(f"contender key {k['Key']}")
            elif k.get("Session"):
                left.append(f"{k['Key']} held by {k['Session']}")
    return left


@pytest.mark.slow
@pytest.mark.timeout(1800 if LONG else 360)
def test_node_faults_never_let_two_holders_write(cluster, tmp_path):
    t_begin = time.monotonic()
    net = cluster.net
    log_path = tmp_path / "netns.log"
    log_file = open(log_path, "a")

    def log(text):
        log_file.write(text + "\n")
        log_file.flush()

    seed = int(os.environ.get("CONSUL_LOCKER_NETNS_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    schedule = list(FAULTS)
    if LONG:
        schedule = [k for _ in range(LONG_ROUNDS) for k in rng.sample(FAULTS, len(FAULTS))]
    log(f"netns run: shim from {SRC}, namespaces {net.tag}-*, net {net.net24}.0/24, seed {seed}")
    if cluster.stale_removed:
        log(f"removed stale namespaces of crashed runs: {cluster.stale_removed}")

    workloads = [Workload("netns-lock", 1, 7001), Workload("netns-sem", 2, 7002)]
    runs = []
    procs = []
    problems = []
    nemesis = Nemesis(net, cluster, workloads, log, rng, str(tmp_path))
    try:
        for wl in workloads:
            hist = str(tmp_path / f"history-{wl.name}.txt")
            wl.history = fenced.History(hist)
            argv = [sys.executable, FENCED, "serve", cluster.resource_ip, str(wl.port), str(wl.limit), hist]
            wl.server = net.popen(cluster.resource_ns, argv, stdin=subprocess.DEVNULL)
            procs.append(wl.server)
            wait_until(wl.history.listening, 10, 0.05, f"the {wl.name} resource to listen")
        for wl in workloads:
            for agent in cluster.clients:
                loop_log = str(tmp_path / f"{agent.role}-{wl.name}.log")
                loop = Loop(net, agent, wl, cluster.resource_ip, loop_log, runs, nemesis.work_file(agent.role, wl))
                wl.loops.append(loop)
                loop.start()
        # Warm-up: every workload hands its lock over a few times before the first fault.
        for wl in workloads:
            wait_until(lambda wl=wl: len(wl.history.sections()) >= 4, 60, 0.1, f"{wl.name} sections to start")
        try:
            for kind in schedule:
                nemesis.run(kind)
        except Exception:
            # Judge what happened so far anyway: the history up to a nemesis failure is still evidence.
            problems.append("the nemesis failed:\n" + traceback.format_exc())
            nemesis.say("failed; stopping the run")
        t_faults_end = time.monotonic()
    finally:
        for wl in workloads:
            for loop in wl.loops:
                loop.stop()
        for wl in workloads:
            for loop in wl.loops:
                loop.join(30)
                if loop.is_alive():  # a consul-locker that did not end on SIGTERM: recorded as its own failure
                    loop.stop()
                    if loop.current is not None:
                        loop.current.kill()
                    loop.join(5)
    # Sessions of runs that could not destroy theirs (cut off, frozen) end at Consul's TTL: wait for that.
    left = []
    try:
        wait_until(lambda: not _leftovers(cluster, workloads), 2 * TTL + 10, 0.5, "no session or contender key")
    except AssertionError:
        left = _leftovers(cluster, workloads)
    t_end = time.monotonic()
    for p in procs:
        p.kill()
        p.wait()

    # -- judge ---------------------------------------------------------------------------------------------------
    parts = []
    for wl in workloads:
        events = wl.history.refresh()
        v = fenced.check(events, wl.limit, wl.paused, horizon=t_end)
        for what, at in v.violations:
            problems.append(f"{wl.name}: {what}\n{v.excerpt(events, at)}")
        gap = f"{v.longest_gap:.1f} s"
        if v.longest_gap_at:
            gap += f" (at +{v.longest_gap_at[0] - t_begin:.0f} s)"
        parts.append(
            f"{wl.name} (limit {wl.limit}): {v.sections} sections, max {v.max_concurrent} inside, "
            f"{v.refused} refused stale writes ({v.refused_paused} by paused holders), longest take-over {gap}"
        )
    for f in nemesis.faults:
        for name, after in f["progress"].items():
            if after is None:
                problems.append(f"no {name} section accepted within {PROGRESS_BOUND:.0f} s after {f['kind']} healed")
    for f in nemesis.faults:
        for name, ident, what in f["victims"]:
            # Cut off or frozen for longer than the TTL, a holder that still finished its long task was never fenced
            # by consul-locker (whether or not someone else got in meanwhile).
            if f["kind"] in ("cut>ttl", "agent-freeze") and what == "finished its task":
                problems.append(f"{name} holder {ident} was not stopped during {f['kind']}: it {what}")
    lock = workloads[0]
    if "holder-pause" in schedule and not fenced.check(lock.history.events, 1, lock.paused).refused_paused:
        problems.append("the paused lock holder's child wrote nothing that the resource refused")
    codes = collections.Counter(r[4] for r in runs)
    for role, name, n, pid, code, _, t1, _ in runs:
        if code not in ALLOWED_CODES:
            how = f"was killed by signal {-code} (no exit code)" if code < 0 else f"exited {code}"
            problems.append(f"{role} {name} run {n} (pid {pid}) {how} at +{t1 - t_begin:.0f} s: see {role}-{name}.log")
    if left:
        problems.append(f"left in Consul after {2 * TTL + 10:.0f} s: {left}")

    kinds = collections.Counter(f["kind"] for f in nemesis.faults)
    summary = (
        f"netns summary [shim {'SHIM_SRC=' + SRC if os.environ.get('SHIM_SRC') else 'working tree'}"
        f"{', long' if LONG else ''}, seed {seed}]: "
        + "; ".join(parts)
        + f"; faults: {', '.join(f'{k} {n}' for k, n in kinds.items())}; "
        f"runs {len(runs)}, exit codes {dict(sorted(codes.items()))}; "
        f"violations {len(problems)}; faults took {t_faults_end - t_begin:.0f} s, "
        f"whole run {time.monotonic() - t_begin:.0f} s"
    )
    lines = []
    for f in nemesis.faults:
        progress = ", ".join(f"{k} {'never' if v is None else f'{v:.1f} s'}" for k, v in f["progress"].items())
        victims = "; ".join(f"{name} holder {what}" for name, _, what in f["victims"])
        lines.append(
            f"  {f['kind']} on {f['target']} at +{f['start'] - t_begin:.0f} s ({'; '.join(f['notes'])}): "
            f"{victims or 'nobody inside'}; first section after the heal: {progress}"
        )
    for line in lines:
        log(line)
    log(summary)
    # The same, for tables (docs/netns-results.md is written from it).
    with open(tmp_path / "netns-results.json", "w") as f:
        record = {"summary": summary, "seed": seed, "long": LONG, "shim": SRC, "problems": problems}
        record["faults"] = [
            dict(x, start=x["start"] - t_begin, heal=(x["heal"] or x["start"]) - t_begin) for x in nemesis.faults
        ]
        json.dump(record, f, indent=1)
    for p in problems:
        log("PROBLEM: " + p)
    log_file.close()
    print("\n" + summary)
    print("\n".join(lines))
    assert not problems, f"{len(problems)} problems (log: {log_path}):\n" + "\n\n".join(problems[:10])


# -- the judge and the plumbing, on their own (fast) -------------------------------------------------------------


def _events(*lines):
    return [fenced.Event(line) for line in lines]


def test_checker_sees_two_holders_inside_and_a_stale_token_accepted():
    events = _events(
        "1.0 1 ENTER 10 c1/1/2 OK 1",
        "1.5 2 ENTER 12 c2/3/4 OK 2",
        "2.0 1 WRITE 10 c1/1/2 OK 2",
        "2.1 1 EXIT 10 c1/1/2 OK 1",
        "2.2 1 CLOSE 10 c1/1/2 - 1",
        "3.0 2 EXIT 12 c2/3/4 OK 0",
        "3.1 2 CLOSE 12 c2/3/4 - 0",
    )
    v = fenced.check(events, 1)
    found = " | ".join(what for what, _ in v.violations)
    assert "2 sections inside at 1.500 (limit 1)" in found
    assert "stale token 10 accepted after 12" in found
    assert v.max_concurrent == 2
    assert "1.5 2 ENTER 12" in v.excerpt(events, v.violations[0][1])
    # Two inside is what a semaphore of 2 allows, and one newer holder beside a write is not yet a stale one.
    assert fenced.check(events, 2).violations == []


def test_checker_judges_a_paused_holder_by_what_the_fence_let_through():
    events = _events(
        "1.0 1 ENTER 10 c1/1/2 OK 1",
        "1.1 1 WRITE 10 c1/1/2 OK 1",
        "30.0 2 ENTER 20 c2/3/4 OK 2",
        "30.5 1 WRITE 10 c1/1/2 REFUSED 1",
        "30.5 1 CLOSE 10 c1/1/2 - 1",
        "31.0 2 EXIT 20 c2/3/4 OK 0",
        "31.0 2 CLOSE 20 c2/3/4 - 0",
    )
    v = fenced.check(events, 1, paused={"c1/1/2"})
    assert v.violations == []
    assert (v.refused, v.refused_paused, v.sections) == (1, 1, 2)
    assert v.longest_gap == pytest.approx(28.9)
    # The same history without a pause is a consul-locker that let its child live on beside the next holder.
    found = " | ".join(what for what, _ in fenced.check(events, 1).violations)
    assert "2 sections inside at 30.000" in found
    assert "c1/1/2 (not paused) sent WRITE with stale token 10: refused" in found
    # A child started on a stale grant is refused at once: never inside, and still the lock's failure.
    late = _events("1.0 2 ENTER 20 c2/3/4 OK 1", "2.0 1 ENTER 10 c1/1/2 REFUSED 1", "2.0 1 CLOSE 10 c1/1/2 - 1")
    assert [what for what, _ in fenced.check(late, 1).violations] == [
        "c1/1/2 (not paused) sent ENTER with stale token 10: refused"
    ]
    # Frozen right after its ENTER: the section ends where it began, and still counts as no overlap.
    frozen_at_once = [e for e in events if e.line.split()[2] != "WRITE" or e.conn != 1 or e.verdict != "OK"]
    assert fenced.check(frozen_at_once, 1, paused={"c1/1/2"}).violations == []


def _client(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    reader = sock.makefile("rb")

    def ask(line):
        sock.sendall(line.encode() + b"\n")
        return reader.readline().decode().strip()

    def close():
        reader.close()  # the socket's descriptor stays open while its file object does
        sock.close()

    ask.close = close
    return ask


@pytest.fixture
def resource(tmp_path):
    """A fenced resource on loopback: start(limit) -> (port, History)."""
    procs = []

    def start(limit):
        port = free_port()
        hist = fenced.History(str(tmp_path / f"history-{limit}.txt"))
        procs.append(subprocess.Popen([sys.executable, FENCED, "serve", "127.0.0.1", str(port), str(limit), hist.path]))
        wait_until(hist.listening, 10, 0.02, "the resource to listen")
        return port, hist

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_resource_refuses_a_token_older_than_the_newest_and_keeps_that_section_fenced(resource):
    port, hist = resource(1)
    a, b, c = _client(port), _client(port), _client(port)
    assert a("ENTER 10 c1/1/2") == "OK"
    assert b("ENTER 12 c2/3/4") == "OK"
    assert a("WRITE 10 c1/1/2").startswith("REFUSED")
    assert a("EXIT 10 c1/1/2").startswith("REFUSED")  # once fenced, always fenced
    assert c("ENTER 11 c3/5/6").startswith("REFUSED")  # a grant older than one already seen
    assert b("WRITE 13 c2/3/4") == "ERR"  # not the token the section entered with
    assert b("WRITE 12 c2/3/4") == "OK"
    assert b("EXIT 12 c2/3/4") == "OK"
    a.close()
    wait_until(lambda: any(e.kind == "CLOSE" for e in hist.refresh()), 5, 0.02, "the CLOSE")
    kinds = [(e.kind, e.token, e.verdict) for e in hist.refresh()]
    assert kinds[:4] == [("ENTER", 10, "OK"), ("ENTER", 12, "OK"), ("WRITE", 10, "REFUSED"), ("EXIT", 10, "REFUSED")]
    assert ("CLOSE", 10, "-") in kinds


def test_semaphore_resource_fences_a_holder_once_limit_newer_holders_were_inside_beside_it(resource):
    port, hist = resource(2)
    a, b, c = _client(port), _client(port), _client(port)
    assert a("ENTER 5 c1/1/2") == "OK"
    assert b("ENTER 7 c2/3/4") == "OK"
    assert a("WRITE 5 c1/1/2") == "OK"  # one newer holder: both may hold a slot
    assert c("ENTER 9 c3/5/6") == "OK"  # not refused: three inside is for the checker to judge
    assert a("WRITE 5 c1/1/2").startswith("REFUSED")  # two newer holders: this one cannot hold a slot any more
    assert b("WRITE 7 c2/3/4") == "OK"
    assert c("EXIT 9 c3/5/6") == "OK" and b("EXIT 7 c2/3/4") == "OK"
    assert a("WRITE 5 c1/1/2").startswith("REFUSED")  # the newer ones left; it lost its slot all the same
    assert [(e.kind, e.token) for e in hist.refresh() if e.kind == "FENCE"] == [("FENCE", 5)]


def test_checker_sees_a_semaphore_holder_write_after_its_slot_went_to_others():
    events = _events(
        "1.0 1 ENTER 5 c1/1/2 OK 1",
        "20.0 2 ENTER 7 c2/3/4 OK 2",
        "20.5 3 ENTER 9 c3/5/6 OK 3",
        "21.0 2 EXIT 7 c2/3/4 OK 2",
        "21.5 3 EXIT 9 c3/5/6 OK 1",
        "22.0 1 WRITE 5 c1/1/2 OK 1",
    )
    found = [what for what, _ in fenced.check(events, 2, paused={"c1/1/2"}).violations]
    assert "stale token 5 accepted after 2 newer holders were inside at once" in found
    assert any(what.startswith("3 sections inside at 20.500 (limit 2)") for what in found)


def test_sweep_removes_what_dead_runs_left_and_nothing_of_live_ones():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, alive = f"{NS_PREFIX}-{dead.pid}-abcdef-c1", f"{NS_PREFIX}-{os.getpid()}-abcdef-c1"
    dirs = [tempfile.mkdtemp(prefix=f"{name}-data-") for name in (stale, alive)]
    for name in (stale, alive):
        subprocess.run(["ip", "netns", "add", name], check=True)
    # What a crashed run leaves running: an agent in its namespace.
    leftover = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "300"])
    try:
        wait_until(
            lambda: (
                str(leftover.pid)
                in subprocess.run(["ip", "netns", "pids", stale], capture_output=True, text=True).stdout
            ),
            5,
            0.02,
            "the leftover inside",
        )
        removed = sweep_stale()
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert stale in removed and stale not in listed
        assert leftover.wait(5) == -signal.SIGKILL
        assert not os.path.exists(dirs[0])
        assert alive not in removed and alive in listed and os.path.isdir(dirs[1])
    finally:
        leftover.kill()
        leftover.wait()
        for name in (stale, alive):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
