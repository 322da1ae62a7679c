"""Lock safety under the faults of issue 9, on a real Consul agent (tests/lib/faultproxy.py in http mode faults one
request at a time, chosen by method and path). Every rule tested here is in ../shared/contract.md, "Additions
(second round)", "Lock safety"; times come from the children's own logs (tests/lib/probe.py, mode `section`,
CLOCK_MONOTONIC).

Each test against the code before the fixes (SHIM_SRC=/work/snap-old, pytest started outside /work/main: `python
-m shim` puts the working directory first on sys.path), and how it failed there:
- item 1, partitioned semaphore holder: FAILED, the waiter started its command at once when Consul expired the
  holder's session, while the old holder's child (SIGTERM ignored) still ran: 3 inside a --limit 2 semaphore.
- item 1, a waiter arriving after another waiter saw the dead holder: FAILED, the first waiter took the slot at
  once after the session was destroyed (no lock-delay): 3 inside.
- item 2, grant vs the self-fencing clock: FAILED, the waiter's child ran until TTL after the *grant*, far past
  TTL after the last successful session create (renewals had all failed).
- item 3, fork-hopping leftovers: FAILED, every 2 ms: 8 runs of 8 had the leftover still forking after the next
  holder's command had started; every 50 ms (SIGTERM not ignored): 5 runs of 12 left a process of the leftover's
  group behind consul-locker's exit (still running, or dying unreaped and handed to PID 1).
- item 5, stop signal while the grant hangs: FAILED, exit 143 came only seconds after the SIGTERM (close() waited
  for the hanging grant).
- item 8, a hung renewal: FAILED, exit 75: the one renewal was given a timeout reaching to the fence and never
  retried.
- also seen, a late answer for an old session: FAILED, the 404 for the destroyed first session ended the new
  session's hold (exit 75).
- also seen, a malformed answer to the watch: FAILED, the watcher thread died on it; a deleted key was then never
  noticed (the child ran on).
- also seen, a semaphore grant whose answer was lost: FAILED, both holders got the same CONSUL_LOCK_INDEX.
- also seen, 429 while waiting: FAILED, exit 69 at the first 429.
- also seen, a SIGTSTP pending in the child before exec: FAILED (2 runs of 3 when it was one run), the child
  stopped before its exec ("python", state T) and consul-locker never ended after a SIGTERM.
"""

import json
import os
import signal
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest
from lib import sectionlog
from lib.consul_agent import wait_until
from lib.faultproxy import Child, DeathWatch, FaultProxy, Watched
from lib.locker import LOCKER, assert_no_session, lock_key, locker_env, sessions_named
from lib.probe import probe
from lib.procs import child_pids

TTL = 10.0  # Consul's smallest session TTL
# Consul invalidates a session TTL x 2 after the last renewal it received (it doubles the TTL as grace).
CONSUL_TTL_MULTIPLIER = 2
LOCK_FLAG = 0x2DDCCBC058A50C18  # hashicorp/consul api's lock flags (the layout of `consul lock`)
TIMING = ["--ttl", "10s", "--lock-delay", "3s", "--kill-timeout", "1s"]  # kill-timeout < lock-delay
CS = probe("section")
LOCK_LOST = 75
SIGTERM_EXIT = 128 + signal.SIGTERM


@pytest.fixture
def proxy(consul):
    fp = FaultProxy(("127.0.0.1", consul.http_port), http=True).start()
    yield fp
    fp.close()


@pytest.fixture
def deaths():
    watch = DeathWatch()
    yield watch
    watch.close()


@pytest.fixture
def run(consul):
    """run(*args, via=None): start consul-locker ARGS (against the agent, or through the proxy `via`) as a
    Watched process; every one still running at the end of the test is killed."""
    started = []

    def start(*args, via=None):
        env = locker_env(consul, CONSUL_HTTP_ADDR=via.addr) if via is not None else locker_env(consul)
        w = Watched(LOCKER + [str(a) for a in args], env)
        started.append(w)
        return w

    yield start
    for w in started:
        w.kill()


def kv_path(key):
    return "/v1/kv/" + urllib.parse.quote(key, safe="/")


def blocking(proxy, path):
    """The waiter's blocking query on PATH is in flight (sent through the proxy, not answered yet)."""
    return [r for r in proxy.requests("GET", path) if "index=" in r.query and r.status is None]


def confirmations(proxy):
    """Times of session creates and renewals that Consul answered 200 and whose answer reached consul-locker."""
    return sorted(
        r.t
        for r in proxy.requests("PUT", "/v1/session/")
        if (r.path.startswith("/v1/session/create") or r.path.startswith("/v1/session/renew/"))
        and r.status == 200
        and r.answered
    )


def session_gone(consul, sid):
    try:
        return not consul.api("GET", f"/v1/session/info/{sid}")
    except OSError:
        return False


def spans(sections, deaths, now=None):
    """(start, end) of every section: its logged end, else when its process was seen dead, else still running."""
    out = []
    for s in sections.values():
        if s.start is None:
            continue
        end = s.end if s.end is not None else deaths.died(s.pid)
        out.append((s.start, end if end is not None else (now or time.monotonic())))
    return out


def started(path, count, timeout, procs=()):
    """Wait until COUNT sections have started in the log; fail early (with their stderr) if a process exits."""

    def ready():
        for p in procs:
            if p.proc.poll() is not None:
                raise AssertionError(f"consul-locker exited {p.proc.returncode} first:\n{p.stderr()}")
        secs = [s for s in sectionlog.read(path).values() if s.start is not None]
        return secs if len(secs) >= count else None

    return wait_until(ready, timeout, message=f"{count} critical section(s) in {path}")


# -- item 5: a stop signal while a request hangs -------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_stop_signal_while_the_grant_hangs_ends_the_wait_within_1s(consul, proxy, run, hold_lock, name, tmp_path):
    holder = hold_lock(name)
    key = lock_key(name)
    marker = tmp_path / "ran"
    w = run(*TIMING, name, "touch", marker, via=proxy)
    wait_until(lambda: blocking(proxy, kv_path(key)), 15, message="the waiter's blocking query")
    # Hold the grant (a transaction, or a PUT ?acquire=) open as a partitioned leader would.
    grants = [proxy.rule("hold", "PUT", "/v1/txn"), proxy.rule("hold", "PUT", kv_path(key), query="acquire=")]
    consul.api("PUT", f"/v1/session/destroy/{holder}")
    wait_until(lambda: any(g.hits for g in grants), 15, message="the grant to be sent (and held)")
    t0 = time.monotonic()
    os.kill(w.proc.pid, signal.SIGTERM)
    code = w.wait(20)
    elapsed = time.monotonic() - t0
    print(f"\nSIGTERM while the grant hangs -> exit {code} after {elapsed:.2f} s")
    assert code == SIGTERM_EXIT, w.stderr()
    assert elapsed < 1.0, f"exit came {elapsed:.2f} s after the SIGTERM"
    assert not marker.exists(), "the command ran"
    assert not (consul.kv(key) or {}).get("Session"), "the held grant must never take the lock"
    assert_no_session(consul, name)  # Consul answers everything but the grant: the destroy went through


# -- item 8: a hung renewal is abandoned and retried before the fence ----------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_hung_renewal_is_retried_and_does_not_fence_the_holder(consul, proxy, run, name, tmp_path):
    # The first renewal hangs longer than the TTL (forwarded by the agent to an isolated old leader, say); later
    # ones are answered at once.
    hung = proxy.rule("hold", "PUT", "/v1/session/renew/", times=1, seconds=TTL + 2)
    child = Child(tmp_path, code=7)
    p = run(*TIMING, name, *child.argv, via=proxy)
    child.wait("start", 15)
    created = confirmations(proxy)[0]
    stuck = hung.wait_hit(TTL)
    # Past the fence of the last confirmation before the hang (the create): the holder must have renewed meanwhile.
    wait_until(lambda: time.monotonic() >= created + TTL + 2 or p.proc.poll() is not None, TTL + 5)
    later = [t for t in confirmations(proxy) if t > stuck.t]
    print(f"\nrenewal hung {stuck.t - created:.2f} s after the create; next confirmed renewal: "
          f"{(later[0] - created) if later else float('nan'):.2f} s after it (TTL {TTL:.0f} s)")  # fmt: skip
    assert p.proc.poll() is None and child.event("term") is None, p.stderr()
    assert later and later[0] < created + TTL, "no renewal confirmed the session before the fence"
    child.go()
    assert p.wait(15) == 7, p.stderr()
    assert child.event("term") is None
    assert_no_session(consul, name)


# -- item 2: the self-fencing clock counts from the last create or renewal that succeeded ---------------------------
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_grant_does_not_restart_the_self_fencing_clock(consul, proxy, run, hold_lock, name, tmp_path):
    holder = hold_lock(name)
    key = lock_key(name)
    proxy.rule("reset", "PUT", "/v1/session/renew/")  # every renewal of the waiter fails; nothing else does
    wchild, cchild = Child(tmp_path / "waiter"), Child(tmp_path / "third")
    w = run(*TIMING, name, *wchild.argv, via=proxy)
    wait_until(lambda: blocking(proxy, kv_path(key)), 15, message="the waiter's blocking query")
    created = confirmations(proxy)[-1]
    # Free the lock after the waiter's first renewals failed, shortly before TTL after its create.
    wait_until(lambda: time.monotonic() >= created + 0.7 * TTL, TTL)
    consul.api("PUT", f"/v1/session/destroy/{holder}")
    t_free = time.monotonic()
    # The waiter may take the lock (its session is still alive in Consul) or not; then a third contender comes.
    wait_until(lambda: wchild.event("start") or time.monotonic() >= t_free + 2, 5)
    c = run(*TIMING, name, *cchild.argv)
    # Long enough for the waiter's child to be fenced and the third contender to take over.
    try:
        cchild.wait("start", 2 * CONSUL_TTL_MULTIPLIER * TTL)
    finally:
        cchild.go()
    assert c.wait(15) == 0, c.stderr()
    if w.proc.poll() is None:
        os.kill(w.proc.pid, signal.SIGTERM)
    code = w.wait(15)
    confirmed = confirmations(proxy)
    start = wchild.event("start")
    report = f"waiter exit {code}; confirmations at {[round(t - created, 2) for t in confirmed]} s"
    if start is not None:
        ends = [e[1] for e in wchild.events() if e[0] in ("term", "end")]
        end = ends[0] if ends else time.monotonic()
        # Every moment the child ran, a confirmation had been sent at most TTL (and a margin) before it.
        points = [end] + [t for t in confirmed if start[1] < t <= end]
        worst = max(p - max([t for t in confirmed if t < p], default=float("-inf")) for p in points)
        print(f"\n{report}; its child ran {start[1] - created:.2f}..{end - created:.2f} s after the create")
        assert worst <= TTL + 1.0, f"the waiter's child ran {worst:.2f} s after its last confirmation (TTL 10 s)"
        assert code in (LOCK_LOST, SIGTERM_EXIT), w.stderr()
        assert end <= cchild.event("start")[1], "the waiter's and the third contender's children overlapped"
    else:
        print(f"\n{report}; its child never ran")
        assert code == SIGTERM_EXIT, w.stderr()


# -- item 1: a semaphore slot freed by an expired (not released) session waits lock-delay ---------------------------
# kill-timeout is longer than TTL here so that, without the wait, the old holder's child (SIGTERM ignored) is still
# alive when Consul expires its session: the waiter must not start before lock-delay after it saw the session gone.
SEM_SLOW = ["--limit", "2", "--ttl", "10s", "--kill-timeout", "15s", "--lock-delay", "18s"]


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_semaphore_slot_of_a_partitioned_holder_waits_lock_delay(consul, proxy, run, deaths, name, tmp_path):
    log, go = tmp_path / "cs", tmp_path / "go"
    holder = [*CS, log, "300", "--monotonic", "--env", "--ignore-term", "--until", go]
    deaths.sections(str(log))
    a1 = run(*SEM_SLOW, name, *holder, via=proxy)
    (first,) = started(log, 1, 20, [a1])
    a2 = run(*SEM_SLOW, name, *holder)
    started(log, 2, 20, [a1, a2])
    b = run(*SEM_SLOW, name, *CS, log, "0.2", "--monotonic")
    wait_until(lambda: len(sessions_named(consul, name)) == 3, 15, message="the waiter's session")
    try:
        proxy.cut()  # A1 is partitioned from its agent: it fences itself; Consul expires its session later
        t_cut = time.monotonic()
        wait_until(lambda: session_gone(consul, first.session), CONSUL_TTL_MULTIPLIER * TTL + 10, 0.02)
        t_gone = time.monotonic()
        sections = started(log, 3, 18 + 15, [a2])
        b_start = max(s.start for s in sections)
        inside = sectionlog.max_inside(spans(sectionlog.read(log), deaths))
        a1_dead = deaths.died(first.pid)
        print(
            f"\ncut; A1's session gone {t_gone - t_cut:.2f} s later; A1's child dead "
            f"{(a1_dead - t_gone) if a1_dead else float('nan'):.2f} s after that; B started "
            f"{b_start - t_gone:.2f} s after it (lock-delay 18 s); most inside at once: {inside}"
        )
        assert inside <= 2, f"{inside} commands inside a --limit 2 semaphore"
        assert b_start >= t_gone + 18 - 0.5, f"B started {b_start - t_gone:.2f} s after A1's session was gone"
        assert a1_dead is not None and a1_dead <= b_start
    finally:
        go.touch()
        proxy.heal()
    assert a1.wait(30) == LOCK_LOST, a1.stderr()
    assert a2.wait(15) == 0, a2.stderr()
    assert b.wait(15) == 0, b.stderr()


SEM_FAST = ["--limit", "2", "--ttl", "10s", "--kill-timeout", "3s", "--lock-delay", "6s"]


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_semaphore_waiter_arriving_after_the_dead_holder_was_seen_waits_too(consul, proxy, run, deaths, name, tmp_path):
    log, go = tmp_path / "cs", tmp_path / "go"
    holder = [*CS, log, "300", "--monotonic", "--env", "--ignore-term", "--until", go]
    deaths.sections(str(log))
    a1 = run(*SEM_FAST, name, *holder, via=proxy)
    (first,) = started(log, 1, 20, [a1])
    a2 = run(*SEM_FAST, name, *holder)
    started(log, 2, 20, [a1, a2])
    marker = tmp_path / "b-ran"
    b = run(*SEM_FAST, name, "touch", marker)
    wait_until(lambda: len(sessions_named(consul, name)) == 3, 15, message="the first waiter's session")
    try:
        # A1's session is invalidated (not released): its contender key goes, its child (SIGTERM ignored) lives
        # until A1's kill-timeout. B sees the holder gone (and may prune it and note when, e.g. in the JSON). A1
        # cannot write any more (as when it lost its session to a partition): its slot is not released by A1
        # itself once its tree is gone, only the waiters' rule frees it.
        proxy.rule("reset", "PUT", "/v1/txn")
        proxy.rule("reset", "DELETE", "/v1/kv/")
        consul.api("PUT", f"/v1/session/destroy/{first.session}")
        t_gone = time.monotonic()
        # Give B time to see the holder gone and act on it (prune it, note when): it must not run its command yet.
        wait_until(lambda: marker.exists() or time.monotonic() >= t_gone + 1.5, 5)
        assert not marker.exists(), f"B ran its command {time.monotonic() - t_gone:.2f} s after A1's session went"
        # B leaves (a stop signal while waiting); B2 arrives after B saw, and perhaps pruned, the dead holder.
        os.kill(b.proc.pid, signal.SIGTERM)
        assert b.wait(5) == SIGTERM_EXIT, b.stderr()
        b2 = run(*SEM_FAST, name, *CS, log, "0.2", "--monotonic")
        sections = started(log, 3, 6 + 15, [a2, b2])
        b2_start = max(s.start for s in sections)
        inside = sectionlog.max_inside(spans(sectionlog.read(log), deaths))
        a1_dead = deaths.died(first.pid)
        print(
            f"\nA1's session destroyed; A1's child dead {(a1_dead - t_gone) if a1_dead else float('nan'):.2f} s "
            f"later; B2 started {b2_start - t_gone:.2f} s after (lock-delay 6 s); most inside at once: {inside}"
        )
        assert not marker.exists()
        assert inside <= 2, f"{inside} commands inside a --limit 2 semaphore"
        assert b2_start >= t_gone + 6, f"B2 started {b2_start - t_gone:.2f} s after A1's session was destroyed"
        assert a1_dead is not None and a1_dead <= b2_start
    finally:
        go.touch()
    assert a1.wait(15) == LOCK_LOST, a1.stderr()
    assert a2.wait(15) == 0, a2.stderr()
    assert b2.wait(15) == 0, b2.stderr()


# -- item 3: leftovers that keep forking and exiting ---------------------------------------------------------------
def _group(pgid):
    """{pid: state letter} of the processes in process group PGID (zombies too: state "Z")."""
    members = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, _, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid:
            members[int(entry)] = state
    return members


def _end_group(log, pgid):
    """Stop a leftover that escaped (so that the test leaves nothing running), whatever the verdict."""
    Path(f"{log}.stop").touch()
    deadline = time.monotonic() + 10
    while any(state != "Z" for state in _group(pgid).values()) and time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            break
        time.sleep(0.01)


def _hop_run(consul, locker, name, log, go, interval_ms, ignore_term):
    """One holder whose child leaves a fork-hopping leftover, one next holder. Returns what escaped, or ""."""
    timing = ["--ttl", "10s", "--lock-delay", "1s", "--kill-timeout", "0.5s"]
    first = [*CS, log, "60", "--monotonic", "--until", go, "--hop", interval_ms]
    if ignore_term:
        first.append("--hop-ignore-term")
    # stderr to files, not pipes: an escaped leftover would hold a pipe open, and reading it would never end.
    out = {"stdout": subprocess.DEVNULL, "stderr": open(f"{log}.err", "w")}  # noqa: SIM115
    h1 = locker.popen(*timing, name, *first, **out)
    h2 = pgid = None
    try:
        wait_until(lambda: any(s.pgid for s in sectionlog.read(log).values()), 20, message="the leftover")
        pgid = next(s.pgid for s in sectionlog.read(log).values() if s.pgid)
        h2 = locker.popen(*timing, name, *CS, log, "0", "--monotonic", **out)
        wait_until(lambda: len(sessions_named(consul, name)) == 2, 15, message="the next holder waiting")
        go.touch()  # the first child leaves its section and exits; its leftover hops on
        codes = (h1.wait(30), h2.wait(30))
        assert codes == (0, 0), Path(f"{log}.err").read_text()
        sections = sectionlog.read(log)
        nxt = next(s for s in sections.values() if s.pgid is None and s.start is not None)
        hopper = next(s for s in sections.values() if s.pgid)
        late = [t for t in hopper.hops if t >= nxt.start]
        # An escaped leftover hops on forever. One that died after consul-locker had exited is left a zombie to
        # PID 1 (which reaps late or never on some hosts): consul-locker had not waited for it.
        try:
            wait_until(lambda: not _group(pgid), 0.5)
        except AssertionError:
            pass
        left = _group(pgid)
        if late or left:
            zombies = sum(1 for state in left.values() if state == "Z")
            return (
                f"{len(late)} hop(s) after the next holder started; after consul-locker's exit its group held "
                f"{len(left) - zombies} live process(es) and {zombies} unreaped zombie(s)"
            )
        return ""
    finally:
        out["stderr"].close()
        if pgid:
            _end_group(log, pgid)
        for p in (h1, h2):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "interval_ms, ignore_term, runs",
    [(2, True, 8), (50, False, 12)],
    ids=["every-2ms-ignoring-SIGTERM", "every-50ms"],
)
def test_fork_hopping_leftovers_are_gone_before_the_next_holder_starts(
    consul, locker, name, tmp_path, interval_ms, ignore_term, runs
):
    escaped = []
    for i in range(runs):
        what = _hop_run(consul, locker, name, tmp_path / f"run{i}", tmp_path / f"go{i}", interval_ms, ignore_term)
        if what:
            escaped.append(f"run {i}: {what}")
    print(f"\n{runs} runs, hops every {interval_ms} ms: {len(escaped)} leftovers outlived the hold: {escaped}")
    assert not escaped


# -- also seen: an old session's late answer, a malformed answer, a lost semaphore CAS answer, 429 ------------------
@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_late_renewal_answer_for_an_old_session_does_not_end_the_new_hold(
    consul, proxy, run, hold_lock, name, tmp_path
):
    holder = hold_lock(name)
    key = lock_key(name)
    child = Child(tmp_path, code=7)
    w = run(*TIMING, name, *child.argv, via=proxy)
    wait_until(lambda: blocking(proxy, kv_path(key)), 15, message="the waiter's blocking query")
    (old,) = [s["ID"] for s in sessions_named(consul, name)]
    # The waiter's renewal of its first session is delayed in the network...
    stale = proxy.rule("hold", "PUT", f"/v1/session/renew/{old}", times=1, then="forward")
    stale.wait_hit(TTL)
    # ... meanwhile that session is destroyed and the lock freed: the waiter makes a new session and takes the lock.
    consul.api("PUT", f"/v1/session/destroy/{old}")
    consul.api("PUT", f"/v1/session/destroy/{holder}")
    _, _, _, session = child.wait("start", 15)
    assert session != old
    # Now the old session's renewal reaches Consul, and its answer (404: no such session) comes back.
    stale.release()
    late = stale.hits[0]
    wait_until(lambda: late.status is not None or w.proc.poll() is not None, 10, message="the late renewal")
    t_late = time.monotonic()
    if not late.answered:
        print("\nthe waiter had given up that renewal before its answer came: nothing late to ignore")
    # The new session's next renewal is answered: the renewer went on after the late answer.
    wait_until(
        lambda: (
            [r for r in proxy.requests("PUT", f"/v1/session/renew/{session}") if r.answered and r.t > t_late]
            or w.proc.poll() is not None
        ),
        TTL,
        message="a renewal of the new session",
    )
    assert w.proc.poll() is None and child.event("term") is None, w.stderr()
    child.go()
    assert w.wait(15) == 7, w.stderr()
    assert_no_session(consul, name)


@pytest.mark.timeout(60)
def test_a_malformed_answer_to_the_watch_does_not_silence_it(consul, proxy, run, name, tmp_path):
    key = lock_key(name)
    child = Child(tmp_path)
    p = run(*TIMING, name, *child.argv, via=proxy)
    child.wait("start", 15)
    wait_until(lambda: blocking(proxy, kv_path(key)), 15, message="the holder's watch on its key")
    entry = consul.kv(key)
    # The next read of the key gets an answer that is JSON but not what Consul sends (Value is not base64 text).
    bad = dict(entry, Value=5, ModifyIndex=entry["ModifyIndex"] + 1)
    headers = {"Content-Type": "application/json", "X-Consul-Index": str(entry["ModifyIndex"] + 1)}
    odd = proxy.rule("respond", "GET", kv_path(key), times=1, headers=headers, content=json.dumps([bad]))
    consul.api("PUT", f"/v1/kv/{key}?flags={LOCK_FLAG}", b"poke")  # a plain write keeps the lock; the watch wakes
    odd.wait_hit(10)
    # Whatever the watcher made of it (retry, or fence at once), losing the key must still end the child's hold.
    t_odd = time.monotonic()
    resumed = lambda: [r for r in blocking(proxy, kv_path(key)) if r.t > t_odd]  # noqa: E731
    try:
        wait_until(lambda: resumed() or child.event("term"), 5)
    except AssertionError:
        pass  # the watcher is silent: the deletion below shows whether anything else stands in for it
    t0 = time.monotonic()
    consul.api("DELETE", f"/v1/kv/{key}")
    try:
        _, t_term, _, _ = child.wait("term", 10)
    except AssertionError:
        raise AssertionError(
            f"the key was deleted and the child never got SIGTERM (watch resumed: {bool(resumed())})\n{p.stderr()}"
        ) from None
    print(f"\nmalformed answer, then key deleted -> SIGTERM to the child {t_term - t0:.2f} s after the delete")
    assert t_term - t0 <= 1.0
    assert p.wait(15) == LOCK_LOST, p.stderr()
    assert_no_session(consul, name)


@pytest.mark.timeout(60)
def test_semaphore_grant_whose_answer_was_lost_gets_its_own_fencing_index(consul, proxy, run, name, tmp_path):
    sem = ["--limit", "2", *TIMING]
    log, go = tmp_path / "cs", tmp_path / "go"
    child = [*CS, log, "60", "--monotonic", "--env", "--until", go]
    lost = proxy.rule("drop_answer", "PUT", "/v1/txn", body=b'"cas"', times=1)
    w1 = run(*sem, name, *child, via=proxy)
    try:
        granted = lost.wait_hit(15)  # W1's CAS reached Consul, which answered; W1 never sees the answer
        wait_until(lambda: granted.status is not None, 10, message="Consul's answer to the CAS")
        w2 = run(*sem, name, *child)
        started(log, 1, 15, [w2])  # W2 is a later holder: its CAS comes after W1's
        lost.release()  # W1's connection is reset: it has to find out what became of its CAS
        sections = started(log, 2, 15, [w1, w2])
    finally:
        go.touch()
    indexes = {s.pid: s.index for s in sections}
    print(f"\nfencing indexes: {indexes}")
    assert w1.wait(15) == 0, w1.stderr()
    assert w2.wait(15) == 0, w2.stderr()
    assert len(set(indexes.values())) == 2, f"two holds with one fencing index: {indexes}"


@pytest.mark.timeout(60)
def test_429_while_waiting_is_retried(consul, proxy, run, hold_lock, name, tmp_path):
    holder = hold_lock(name)
    key = lock_key(name)
    marker = tmp_path / "ran"
    throttled = [
        proxy.rule("respond", "PUT", "/v1/session/create", times=2, status=429, content="rate limit exceeded"),
        proxy.rule("respond", "GET", kv_path(key), times=3, status=429, content="rate limit exceeded"),
    ]
    w = run(*TIMING, name, "touch", marker, via=proxy)
    wait_until(lambda: blocking(proxy, kv_path(key)) or w.proc.poll() is not None, 20, message="the wait")
    grant = proxy.rule("respond", "PUT", "/v1/txn", times=2, status=429, content="rate limit exceeded")
    acquire = proxy.rule("respond", "PUT", kv_path(key), query="acquire=", times=2, status=429)
    consul.api("PUT", f"/v1/session/destroy/{holder}")
    code = w.wait(30)
    hits = [len(r.hits) for r in [*throttled, grant, acquire]]
    print(f"\n429 answers given (create, read, txn, acquire): {hits}")
    assert code == 0, w.stderr()
    assert marker.exists()
    assert hits[:2] == [2, 3]
    assert_no_session(consul, name)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_sigtstp_storm_at_the_childs_start_never_blocks_the_supervisor(consul, name):
    # SIGTSTP to consul-locker's process group (Ctrl-Z at a terminal; here a storm of them) while the child is
    # being started: one may be pending in the child between fork and exec. The supervisor must stay responsive:
    # a SIGTERM afterwards ends the run within kill-timeout, whatever stopped the child. A few runs: the window is
    # narrow (the old code was caught in about two runs of three).
    for run in range(3):
        _tstp_storm_run(consul, f"{name}-{run}")


def _tstp_storm_run(consul, name):
    marker = f"{300 + time.monotonic() % 1:.6f}"  # tells this run's `sleep` apart
    # A group of its own, whose leader's parent (pytest) is in another group of the same session: not orphaned,
    # so SIGTSTP's stop is not discarded by the kernel.
    p = subprocess.Popen(
        LOCKER + ["--kill-timeout", "1s", "--lock-delay", "0s", name, "sleep", marker],
        env=locker_env(consul),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        process_group=0,
    )
    try:
        # Past the interpreter's start-up (where SIGTSTP's default action would stop consul-locker itself).
        wait_until(lambda: sessions_named(consul, name) or p.poll() is not None, 20, 0.005, message="the session")
        t_child, sent = None, 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and p.poll() is None:
            os.killpg(p.pid, signal.SIGTSTP)
            sent += 1
            if t_child is None and child_pids(p.pid):
                t_child = time.monotonic()
            if t_child is not None and time.monotonic() > t_child + 0.2:
                break
        assert t_child is not None, f"no child appeared; consul-locker exit {p.poll()}"
        t0 = time.monotonic()
        os.kill(p.pid, signal.SIGTERM)
        try:
            _, err = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"consul-locker did not end within 10 s of SIGTERM after {sent} SIGTSTPs: its supervisor is "
                f"blocked (child state: {_states(p.pid)})"
            ) from None
        print(f"\n{sent} SIGTSTPs; SIGTERM -> exit {p.returncode} after {time.monotonic() - t0:.2f} s")
        assert p.returncode in (128 + signal.SIGTERM, 128 + signal.SIGKILL), err
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for s in sessions_named(consul, name):
            consul.api("PUT", f"/v1/session/destroy/{s['ID']}")


def _states(pid):
    out = {}
    for c in child_pids(pid):
        try:
            with open(f"/proc/{c}/stat") as f:
                comm, rest = f.read().rsplit(")", 1)
            out[c] = (comm.split("(", 1)[1], rest.split()[0])
        except OSError:
            pass
    return out
