"""The Consul lock and semaphore: session life, acquisition by blocking query, monitoring, release.

What the keys mean and what to do about them is decided by the protocol objects of shim.protocol (LockProtocol,
SemaphoreProtocol: pure, unit-tested). The Locker here runs them: it owns the session, the requests, the
retries, the deadlines and the threads.

Safety rules, each of them a reason for code below (docs/safety.md has the whole argument):
  * We release only what we hold (?release= our session, or a CAS that removes only our session), never DELETE
    a key another session might hold.
  * A hold is given up by its holder when it cannot confirm its session for TTL, counted from when the last
    successful session create or renewal was *sent* (a KV write or a grant does not renew a session). Consul
    invalidates a session no earlier than TTL after it *received* that renewal; so with kill-timeout <
    lock-delay the old child is gone before a new holder can start:
      - a lock key is refused by Consul itself to everyone for lock-delay after the invalidation;
      - a semaphore slot has no such server-side delay (the slot is a CAS-updated JSON entry), so a waiter counts
        a dead holder's slot as taken until lock-delay after it saw the holder's session gone. A waiter only
        sees that after the invalidation, so the rule holds for every waiter, however late it arrives: nobody
        removes a dead holder from the JSON before its own lock-delay has passed.
  * Transient errors (leader election, 5xx, 429, dropped connection, agent restart) are retried with backoff and
    jitter; they end a hold only through the self-fencing clock above.
"""

import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

from shim import consul
from shim.duration import format_go
from shim.errors import ConsulError, PermissionDenied, UsageError
from shim.protocol import (  # noqa: F401 (LOCK_FLAG, SEMAPHORE_FLAG: part of this module's API)
    DONE_KEY,
    LOCK_FLAG,
    LOCK_KEY,
    SEMAPHORE_FLAG,
    LockProtocol,
    SemaphoreProtocol,
    kv_op,
    protocol_for,
)

# Consul's bounds for a session (TTL) and for lock-delay.
MIN_TTL, MAX_TTL = 10.0, 86400.0
MAX_LOCK_DELAY = 60.0
# While waiting without --timeout: how long Consul may stay unreachable (in a row) before we give up with 69.
DEFAULT_UNREACHABLE_FOR = 10.0

# How long one blocking query waits. Shorter means more requests; longer means a silently dead connection (no
# RST) is noticed later. Lost-lock detection does not depend on it: the renewer fences on its own clock.
BLOCKING_WAIT = 30.0
# Retry pacing for transient Consul errors: the first retry is quick (a dropped keep-alive, a leader election),
# later ones back off so that a down agent is not hammered.
RETRY_FIRST = 0.05
RETRY_MAX = 1.0
# After a grant refused by lock-delay, Consul does not say when the delay ends: we retry on this backoff, and when
# our own lock-delay has passed since we saw the key free (instead of `consul lock`'s fixed 5 s).
LOCK_DELAY_RETRY_FIRST = 0.05
# After a grant lost to another contender, the next read comes after this (growing while grants keep failing):
# short, because a lost race is normal under contention and the next read will just show the winner.
RACE_RETRY_FIRST = 0.01
# One renewal attempt may take this share of the TTL. A renewal the agent forwarded to an isolated leader hangs;
# abandoning it early and retrying (on a new connection) lets a later attempt reach the new leader before the
# fence. Bounded below for slow agents, above so a long TTL still retries.
RENEW_ATTEMPT_SHARE = 0.2
RENEW_ATTEMPT_MIN, RENEW_ATTEMPT_MAX = 1.0, 10.0
# While holding, renew every this share of the TTL: an outage is survived when it ends before TTL has passed
# since the last renewal, so it may last TTL minus this interval wherever it falls (TTL/2 would leave only half).
RENEW_HELD_SHARE = 1 / 3
# Before a grant, a session not confirmed for this share of the TTL is renewed first: the hold's self-fencing
# clock starts at the last confirmation, and a hold that starts near its fence would be lost at once.
FRESH_SHARE = 0.5
# A request whose deadline has (nearly) passed still gets this long: a first attempt is always made.
MIN_ATTEMPT = 0.5


class NotAcquired(Exception):
    """The lock was not obtained: held elsewhere (wait=False), the deadline passed, or we were stopped."""

    BUSY, TIMEOUT, STOPPED = "busy", "timeout", "stopped"

    def __init__(self, reason, key):
        super().__init__(f"lock {key} not obtained ({reason})")
        self.reason, self.key = reason, key


def check_key_part(what, text):
    """NAME and PREFIX become KV paths: Consul's router redirects a path with an empty or dot segment, and a
    control character has no place in a key. Raise UsageError (nothing is sent to Consul)."""
    if not text:
        raise UsageError(f"{what} must be non-empty printable text")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise UsageError(f"{what} {text!r} contains a control character (it must be printable text)")
    if any(seg in ("", ".", "..") for seg in text.split("/")):
        raise UsageError(f"{what} {text!r} has an empty, '.' or '..' path segment (no leading, trailing or double /)")


@dataclass
class Options:
    """What to lock and how; validated on creation (UsageError), so every caller gets the same rules.

    unreachable_for: while waiting, how long Consul may stay unreachable (in a row) before acquire() gives up;
    None: never."""

    prefix: str
    limit: int = 1
    ttl: float = 15.0
    lock_delay: float = 15.0
    unreachable_for: Optional[float] = DEFAULT_UNREACHABLE_FOR
    session_name: str = ""

    def __post_init__(self):
        check_key_part("prefix", self.prefix)
        if not isinstance(self.limit, int) or self.limit < 1:
            raise UsageError(f"limit must be a whole number of at least 1, got {self.limit!r}")
        if not MIN_TTL <= self.ttl <= MAX_TTL:
            raise UsageError(f"TTL {format_go(self.ttl)} is outside Consul's range 10s-24h")
        if not 0 <= self.lock_delay <= MAX_LOCK_DELAY:
            raise UsageError(f"lock-delay {format_go(self.lock_delay)} is outside Consul's range 0s-60s")
        if not self.session_name:
            # Unique per process and attempt (the nonce): a create whose answer was lost is found by this name.
            nonce = os.urandom(4).hex()
            self.session_name = f"consul-locker {self.prefix} on {socket.gethostname()} pid {os.getpid()} {nonce}"

    @property
    def key(self):
        return f"{self.prefix}/{LOCK_KEY}"

    @property
    def done_key(self):
        return f"{self.prefix}/{DONE_KEY}"


@dataclass
class Hold:
    """A granted hold. `index` is the fencing token; `lost` is set (with `lost_reason`) if the hold ends early."""

    key: str
    session: str
    index: int
    lost: threading.Event = field(default_factory=threading.Event)
    lost_reason: str = ""

    def env(self):
        """What the child is told (contract: child environment)."""
        return {
            "CONSUL_LOCK_HELD": "true",
            "CONSUL_LOCK_KEY": self.key,
            "CONSUL_LOCK_SESSION": self.session,
            "CONSUL_LOCK_INDEX": str(self.index),
        }


# -- the Locker: session life, requests, retries, threads ----------------------------------------------------
class Backoff:
    def __init__(self, first=RETRY_FIRST, cap=RETRY_MAX):
        self.first, self.cap, self.next = first, cap, first

    def delay(self):
        d = self.next
        self.next = min(self.cap, self.next * 2)
        # Jitter: contenders that failed together do not retry together.
        return d * (0.5 + int.from_bytes(os.urandom(2), "big") / 131070)

    def reset(self):
        self.next = self.first


def _next_index(old, new):
    """The index for the next blocking query: 0 (start over) when it went backwards (agent restarted, snapshot
    restored), as Consul's blocking-query documentation asks."""
    return 0 if old and new < old else new


class Locker:
    """One lock (or semaphore slot) for one process.

    Threads: acquire() and monitor() run in the caller's thread (the CLI's worker, or the user's); a renewal
    thread keeps the session alive. close() may be called from any thread at any time: it never waits for a
    request of another thread, so a stop is never held up by a hanging Consul. `notify` is called (from any
    thread) whenever the hold is lost."""

    def __init__(self, client, opts, notify=None):
        self.client, self.opts = client, opts
        self.notify = notify or (lambda: None)
        value = json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode()
        self.protocol = protocol_for(opts, value)
        self._stop = threading.Event()  # set by close(): every wait and retry of ours ends
        self._kick = threading.Event()  # wakes the renewal thread: renew now (after a grant), or stop
        self._state = threading.Lock()  # guards the fields below; never held across a request
        self._session = None
        self._session_gone = False
        self._confirmed_at = 0.0  # monotonic time the last successful create or renewal of _session was sent
        self._creating = None  # while a session create is in flight: an Event, set once its outcome is settled
        self._renewer = None
        self.hold = None
        self.unreachable_since = None  # first of the current run of failed calls (monotonic)
        self.last_error = None

    # -- retry policy ------------------------------------------------------------------------------------
    def _call(self, fn, *args, deadline=None, give_up_after=None, interruptible=True, **kw):
        """Call fn, retrying transient Consul errors with backoff. Final errors (403, 4xx, redirects, bad
        configuration) are raised at once.

        deadline (monotonic): every attempt's request timeout ends at it (a first attempt gets MIN_ATTEMPT at
        least) and no retry starts after it. give_up_after: raise once calls have failed in a row that long."""
        backoff = Backoff()
        while True:
            if deadline is not None:
                kw["timeout"] = max(MIN_ATTEMPT, min(consul.DEFAULT_REQUEST_TIMEOUT, deadline - time.monotonic()))
            try:
                result = fn(*args, **kw)
                self.unreachable_since = None
                return result
            except ConsulError as e:
                if not e.transient:
                    raise
                err = e
            now = time.monotonic()
            self.last_error = err
            if self.unreachable_since is None:
                self.unreachable_since = now
            if give_up_after is not None and now - self.unreachable_since >= give_up_after:
                raise err
            if deadline is not None and now >= deadline:
                raise err
            pause = backoff.delay() if deadline is None else min(backoff.delay(), max(0.0, deadline - now))
            if interruptible and self._stop.wait(pause):
                raise err
            if not interruptible:
                time.sleep(pause)

    # -- session -----------------------------------------------------------------------------------------
    def _create_session(self):
        settled = threading.Event()
        with self._state:
            if self._stop.is_set():
                raise NotAcquired(NotAcquired.STOPPED, self.opts.key)
            self._creating = settled
        try:
            sent = time.monotonic()
            sid = self._call(
                self.client.session_create,
                self.opts.session_name,
                format_go(self.opts.ttl),
                format_go(self.opts.lock_delay),
                self.protocol.behavior,
                give_up_after=self.opts.unreachable_for,
            )
            with self._state:
                closed = self._stop.is_set()
                if not closed:
                    self._session, self._session_gone, self._confirmed_at = sid, False, sent
            if closed:  # close() ran meanwhile and waits (on `settled`) for us to destroy this session
                try:
                    self.client.session_destroy(sid)
                except ConsulError:
                    pass  # close() reports it: the session may outlive us until its TTL
                raise NotAcquired(NotAcquired.STOPPED, self.opts.key)
        finally:
            settled.set()
        op = self.protocol.contender_op(sid)
        if op is not None:
            _, err = self._call(self.client.txn_op, op, give_up_after=self.opts.unreachable_for)
            if err:
                raise ConsulError(f"cannot create contender key {op['Key']}: {err}")
        if self._renewer is None:
            self._renewer = threading.Thread(target=self._renew_loop, name="consul-locker-renew", daemon=True)
            self._renewer.start()
        return sid

    def _renew_once(self, sid, timeout):
        """One renewal of sid. Returns True (confirmed), False (the session is gone); raises ConsulError."""
        sent = time.monotonic()
        alive = self.client.session_renew(sid, timeout=timeout)
        with self._state:
            if self._session != sid:
                return alive  # a renewal of an older session: it tells nothing about the current one
            if alive:
                self._confirmed_at = max(self._confirmed_at, sent)
            else:
                self._session_gone = True
        return alive

    def _attempt_timeout(self):
        return max(RENEW_ATTEMPT_MIN, min(RENEW_ATTEMPT_MAX, self.opts.ttl * RENEW_ATTEMPT_SHARE))

    def _renew_loop(self):
        try:
            self._renew_until_closed()
        except BaseException as e:  # a bug must fence the hold, never leave it unguarded
            self._lose(f"internal error in the renewal thread: {type(e).__name__}: {e}")

    def _renew_until_closed(self):
        """Renew every TTL/2 while waiting and every TTL/3 while holding (RENEW_HELD_SHARE), and at once after a
        grant; retry failures until the fence: the hold is lost when the session could not be confirmed for TTL.
        Each attempt is short (a share of the TTL) so a hung one is abandoned and retried."""
        ttl = self.opts.ttl
        backoff = Backoff(cap=min(RETRY_MAX, ttl / 10))
        next_at = self._confirmed_at + ttl / 2
        while True:
            self._kick.wait(max(0.0, next_at - time.monotonic()))
            self._kick.clear()
            if self._stop.is_set():
                return
            with self._state:
                sid, confirmed, hold = self._session, self._confirmed_at, self.hold
            now = time.monotonic()
            if sid is None or (hold is None and self._session_gone):
                next_at = now + backoff.delay()  # being (re)created by the acquiring thread
                continue
            fence_at = confirmed + ttl
            if hold is not None and now >= fence_at:
                self._lose(f"could not confirm the session with Consul for {format_go(ttl)} (TTL): {self.last_error}")
                return
            attempt = self._attempt_timeout()
            if hold is not None:
                attempt = max(0.1, min(attempt, fence_at - now))
            try:
                alive = self._renew_once(sid, attempt)
            except ConsulError as e:  # transient or not, we just could not confirm the session
                self.last_error = e
                next_at = time.monotonic() + backoff.delay()
                if hold is not None:
                    next_at = min(next_at, fence_at)
                continue
            backoff.reset()
            if not alive:
                if hold is not None and hold.session == sid:
                    self._lose("the session was invalidated or destroyed in Consul")
                    return
                next_at = time.monotonic() + backoff.delay()
                continue
            next_at = time.monotonic() + ttl * (RENEW_HELD_SHARE if hold is not None else 0.5)

    def _lose(self, reason):
        with self._state:
            hold = self.hold
            if hold is None or hold.lost.is_set() or self._stop.is_set():
                return
            hold.lost_reason = reason
            hold.lost.set()
        self.notify()

    # -- acquisition -------------------------------------------------------------------------------------
    def acquire(self, deadline=None, wait=True, on_busy=None):
        """Block until held; return the Hold. Raises NotAcquired (busy with wait=False, deadline passed,
        stopped) or a ShimError that retrying cannot fix (ACL denial, key conflict, Consul unreachable for
        longer than opts.unreachable_for, an unexpected answer).

        on_busy(holders) is called once, from this thread, when the wait begins with the lock held elsewhere.
        A first attempt is always made, however close the deadline."""
        key = self.opts.key
        self._create_session()
        index, attempted, reported = None, False, False
        delay_backoff = Backoff(first=LOCK_DELAY_RETRY_FIRST)
        race_backoff = Backoff(first=RACE_RETRY_FIRST)
        delay_seen = None  # when a read first showed the key free but Consul refused it for lock-delay
        retry_at = None
        while True:
            if self._stop.is_set():
                raise NotAcquired(NotAcquired.STOPPED, key)
            if self._session_gone:
                self._create_session()
                index = None
            now = time.monotonic()
            remaining = None if deadline is None else deadline - now
            if attempted and remaining is not None and remaining <= 0:
                if self.unreachable_since is not None and self.last_error is not None:
                    raise self.last_error  # the deadline found Consul failing: that, not a busy lock, is the news
                raise NotAcquired(NotAcquired.TIMEOUT, key)
            blocking = BLOCKING_WAIT if remaining is None else max(0.0, min(BLOCKING_WAIT, remaining))
            if retry_at is not None:
                blocking = max(0.0, min(blocking, retry_at - now))
            entries, new_index = self._call(
                self.client.kv_get,
                self.protocol.watch_key,
                index=index,
                wait=blocking if index else None,
                recurse=self.protocol.recurse,
                deadline=deadline if attempted else None,
                give_up_after=self.opts.unreachable_for,
            )
            read_at = time.monotonic()
            decision = self.protocol.decide(entries, self._session, read_at, time.time())
            if decision.missing_contender:
                with self._state:
                    self._session_gone = True
                continue
            if decision.grant is not None:
                outcome = self._grant(decision.grant)
                attempted = True
                if isinstance(outcome, Hold):
                    return outcome
                if outcome == "delay" and not wait:  # free, but refused for lock-delay after a session ended
                    raise NotAcquired(NotAcquired.BUSY, key)
                # Read again (without an index: at once) after a pause, so that no answer of Consul's can make
                # this loop spin. A lock-delay refusal: on a backoff (capped at RETRY_MAX), and also exactly when
                # our own --lock-delay has passed since a read first showed the key free (Consul's delay began no
                # earlier; a fleet usually has one lock-delay per prefix). Lost races and failed writes: a short
                # pause that grows while they go on.
                pause = (delay_backoff if outcome == "delay" else race_backoff).delay()
                if outcome == "delay":
                    delay_seen = read_at if delay_seen is None else delay_seen
                    expected = delay_seen + self.opts.lock_delay - time.monotonic()
                    if expected > 0:
                        pause = min(pause, expected)
                if remaining is not None:
                    pause = min(pause, max(0.0, remaining))
                if self._stop.wait(pause):
                    raise NotAcquired(NotAcquired.STOPPED, key)
                index, retry_at = None, None
                continue
            delay_seen = None
            attempted = True
            if not wait:
                raise NotAcquired(NotAcquired.BUSY, key)
            if decision.record is not None:
                # Write down what later waiters must know (a dead holder's first sighting), then read again. A
                # failed write (somebody else wrote first) changes nothing: the next read shows what is there.
                try:
                    self.client.txn_op(decision.record)
                except ConsulError as e:
                    if not e.transient:
                        raise
                if self._stop.wait(race_backoff.delay()):
                    raise NotAcquired(NotAcquired.STOPPED, key)
                index = None
                continue
            race_backoff.reset()
            if not reported and on_busy is not None:
                reported = True
                on_busy(decision.holders)
            retry_at = decision.retry_at
            index = _next_index(index, new_index)

    def _grant(self, op):
        """Try the granting write once. Returns the Hold, or why not: "delay", "race", "transient"."""
        with self._state:
            sid, confirmed = self._session, self._confirmed_at
        if time.monotonic() - confirmed > self.opts.ttl * FRESH_SHARE:
            try:
                if not self._renew_once(sid, self._attempt_timeout()):
                    return "race"  # the session is gone: acquire() makes a new one
            except ConsulError as e:
                if not e.transient:
                    raise
                self.last_error = e
                return "transient"
        if op["Verb"] == "lock":
            op = dict(op, Session=sid)
        try:
            entry, err = self.client.txn_op(op)
        except ConsulError as e:
            if not e.transient:
                raise
            self.last_error = e
            return "transient"
        if entry is None:
            if "lock delay" in err:
                return "delay"
            if "invalid session" in err:
                with self._state:
                    self._session_gone = True
            return "race"
        # The fencing token: the Raft index of the write that granted this hold. Unlike LockIndex it keeps
        # growing when `consul lock` deletes the key between holds.
        hold = Hold(key=self.opts.key, session=sid, index=int(entry["ModifyIndex"]))
        with self._state:
            self.hold = hold  # also when close() ran meanwhile: destroying the session frees it
        return hold

    def renew_soon(self):
        """Have the renewal thread renew now. Called once the hold's work has started (not before: it would
        compete with the child's start): the fence counts from the last renewal, which may be up to TTL/2 old
        at the grant; a fresh one gives the hold its whole TTL against a Consul outage that starts soon."""
        self._kick.set()

    # -- while held --------------------------------------------------------------------------------------
    def monitor(self):
        """Watch the key with consistent blocking queries until close(); mark the hold lost as soon as it is no
        longer held by our session. Never raises: an unexpected error fences the hold."""
        try:
            self._watch()
        except BaseException as e:
            self._lose(f"could not watch the lock key: {type(e).__name__}: {e}")

    def _watch(self):
        # The first query blocks from the grant's index: a change since the grant answers it at once, and
        # otherwise it does not compete with the child's start for the CPU.
        hold, backoff = self.hold, Backoff()
        index = hold.index
        while not self._stop.is_set() and not hold.lost.is_set():
            try:
                entries, new_index = self.client.kv_get(
                    self.protocol.watch_key,
                    index=index,
                    wait=BLOCKING_WAIT if index else None,
                    recurse=self.protocol.recurse,
                    consistent=True,
                )
            except ConsulError as e:
                if not e.transient:
                    raise
                self.last_error = e  # the renewer's fence covers a long outage; here we just retry
                self._stop.wait(backoff.delay())
                continue
            backoff.reset()
            if self._stop.is_set():
                return
            if not self.protocol.still_ours(entries, hold.session):
                self._lose(f"the lock key {self.opts.key} is no longer held by this session")
                return
            index = _next_index(index, new_index)

    # -- the --once marker -------------------------------------------------------------------------------
    def read_marker(self):
        """The --once marker's JSON (a dict), or None when there is none."""
        entries, _ = self._call(
            self.client.kv_get, self.opts.done_key, consistent=True, give_up_after=self.opts.unreachable_for
        )
        if not entries or not entries[0].get("Value"):
            return None
        try:
            marker = json.loads(entries[0]["Value"])
        except ValueError:
            return {"unreadable": entries[0]["Value"].decode("utf-8", "replace")}
        return marker if isinstance(marker, dict) else {"value": marker}

    def write_marker(self, marker, deadline):
        """Write the marker in one transaction with a check that our session still holds the lock.
        Returns False when it does not (nothing written); raises ConsulError when Consul cannot say."""
        ops = [
            {"KV": {"Verb": "check-session", "Key": self.opts.key, "Session": self.hold.session}},
            {"KV": kv_op("set", self.opts.done_key, json.dumps(marker).encode())},
        ]
        ok, _ = self._call(self.client.txn, ops, deadline=deadline, interruptible=False)
        return ok

    # -- release -----------------------------------------------------------------------------------------
    def close(self, budget=5.0):
        """Release what we hold (only that), then destroy the session. Idempotent; never raises; never waits
        for another thread's request. Call it only when nothing that relied on the lock runs any more.
        Returns a warning text, or ""."""
        with self._state:
            if self._stop.is_set():
                return ""
            self._stop.set()
            self._kick.set()
            sid, hold, creating = self._session, self.hold, self._creating
        if sid is None:
            # A session create may be in flight (a stop right after start): wait, within the budget, for its
            # requester to destroy what it created, instead of leaving that session to its TTL.
            if creating is not None and not creating.wait(budget):
                return "a session being created when we stopped may stay in Consul until its TTL expires"
            return ""
        warning = ""
        # The budget bounds all of it, hanging requests included: the release may use half, the destroy (which
        # frees the key too) the rest.
        deadline = time.monotonic() + budget
        if hold is not None:
            try:
                self._release(sid, deadline - budget / 2)
            except ConsulError as e:
                warning = f"could not release {self.opts.key} ({e}); destroying the session frees it"
        try:
            self._call(self.client.session_destroy, sid, deadline=deadline, interruptible=False)
        except ConsulError as e:
            warning = f"could not destroy session {sid} ({e}); Consul expires it after the TTL"
        return warning

    def _release(self, sid, deadline):
        if isinstance(self.protocol, LockProtocol):
            self._call(
                self.client.kv_release, self.opts.key, sid, LOCK_FLAG, self.protocol.value,
                deadline=deadline, interruptible=False,
            )  # fmt: skip
            return
        while True:  # CAS may meet another holder's change: read again and retry, within the deadline
            entries, _ = self._call(
                self.client.kv_get, self.protocol.watch_key, recurse=True, deadline=deadline, interruptible=False
            )
            op = self.protocol.release_op(entries, sid)
            if op is None:
                return
            entry, _ = self._call(self.client.txn_op, op, deadline=deadline, interruptible=False)
            if entry is not None or time.monotonic() >= deadline:
                return


# -- read-only report ----------------------------------------------------------------------------------------
def status(client, opts):
    """What --status reports: a dict with key, held, limit, index, holders, done. No session is created.
    Raises KeyConflict when the prefix holds another layout, ConsulError when Consul cannot answer."""
    protocol = protocol_for(opts)
    entries, _ = client.kv_get(protocol.watch_key, recurse=protocol.recurse, consistent=True)
    sessions = protocol.holders(entries)
    if isinstance(protocol, SemaphoreProtocol):
        alive = protocol.alive(entries)
        sessions = tuple(s for s in sessions if s in alive)
    holders = []
    for sid in sessions:
        info = None
        try:
            info = client.session_info(sid)
        except PermissionDenied:
            pass
        holders.append({"session": sid, "node": (info or {}).get("Node"), "name": (info or {}).get("Name")})
    index = None
    if isinstance(protocol, LockProtocol) and sessions:
        index = int(protocol.entry(entries)["ModifyIndex"])
    done_entries, _ = client.kv_get(opts.done_key, consistent=True)
    done = None
    if done_entries and done_entries[0].get("Value"):
        try:
            done = json.loads(done_entries[0]["Value"])
        except ValueError:
            done = {"unreadable": done_entries[0]["Value"].decode("utf-8", "replace")}
    return {"key": opts.key, "held": bool(holders), "limit": opts.limit, "index": index, "holders": holders,
            "done": done}  # fmt: skip


def describe_holder(client, sid):
    """'HOST pid PID' from a consul-locker session name, else 'node NODE (session name)', else the session ID
    when the token may not read the session. Never raises: it only decorates a log line."""
    try:
        info = client.session_info(sid, timeout=2.0)
    except ConsulError:
        return f"session {sid}"
    if not info:  # gone meanwhile, or hidden from this token by the ACL (Consul then answers as if gone)
        return f"session {sid}"
    name, node = info.get("Name") or "", info.get("Node") or "?"
    words = name.split()  # "consul-locker PREFIX on HOST pid PID NONCE"; PREFIX may hold spaces
    if len(words) >= 7 and words[0] == "consul-locker" and words[-5] == "on" and words[-3] == "pid":
        return f"{words[-4]} pid {words[-2]} (session {sid})"
    return f"node {node} ({name or 'unnamed session'}, session {sid})"


# -- library use -----------------------------------------------------------------------------------------------
@contextmanager
def held(prefix, limit=1, ttl=15.0, lock_delay=15.0, timeout=None, wait=True, client=None):
    """Hold a Consul lock around a block of Python code::

        with held("consul-locker/report") as hold:
            do_work(fencing_token=hold.index)
            if hold.lost.is_set(): ...      # the lock was lost: stop writing

    Raises NotAcquired when the lock is not obtained (wait=False and busy, or timeout seconds passed), and
    UsageError for a bad prefix or bounds.
    """
    opts = Options(prefix=prefix, limit=limit, ttl=ttl, lock_delay=lock_delay)
    locker = Locker(client or consul.Client(consul.Settings.from_env()), opts)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        hold = locker.acquire(deadline=deadline, wait=wait)
        locker.renew_soon()
        threading.Thread(target=locker.monitor, name="consul-locker-monitor", daemon=True).start()
        yield hold
    finally:
        locker.close()
