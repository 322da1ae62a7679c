"""The Consul lock and semaphore: session life, acquisition by blocking query, monitoring, release.

Key layout and flags are those of `consul lock` (hashicorp/consul api/lock.go and api/semaphore.go), so a fleet
that mixes `consul lock PREFIX` and consul-locker on one prefix still has one holder:
  * --limit 1: key PREFIX/.lock, Flags LOCK_FLAG, held with ?acquire= by one session;
  * --limit N: contender keys PREFIX/<session> and a coordination key PREFIX/.lock, Flags SEMAPHORE_FLAG, whose
    JSON value {"Limit": N, "Holders": {session: true}} is changed only by check-and-set.

Safety rules, each of them a reason for code below:
  * We release only what we hold (?release=our session, or a CAS that removes only our session), never DELETE a
    key another session might hold.
  * A hold is given up by the holder when it cannot confirm its session for TTL, counted from when the last
    successful renewal was *sent*. Consul invalidates a session no earlier than TTL after it *received* that
    renewal, and then refuses the key to everyone for lock-delay; so with kill-timeout < lock-delay the old
    child is gone before a new holder can start.
  * Transient errors (leader election, 5xx, dropped connection, agent restart) are retried with backoff and
    jitter; they never end a hold by themselves.
"""

import json
import os
import socket
import threading
import time
from contextlib import contextmanager

from shim import consul
from shim.duration import format_go
from shim.exitcodes import KEY_CONFLICT, ShimError

# Magic Flags values of hashicorp/consul api: a lock key and a semaphore key must not be confused.
LOCK_FLAG = 0x2DDCCBC058A50C18
SEMAPHORE_FLAG = 0xE0F69A2BAA414DE0
LOCK_KEY = ".lock"

# How long one blocking query waits. Shorter means more requests; longer means a silently dead connection (no
# RST) is noticed later. Lost-lock detection does not depend on it: the renewer fences on its own clock.
BLOCKING_WAIT = 30.0
# Retry pacing for transient Consul errors: the first retry is quick (a dropped keep-alive, a leader election of
# a few hundred ms), later ones back off so a down agent is not hammered.
RETRY_FIRST = 0.05
RETRY_MAX = 1.0
# After an acquisition refused by lock-delay, Consul does not say when the delay ends; we retry on this backoff
# (instead of `consul lock`'s fixed 5 s) so the lock is taken at most RETRY_MAX after the delay has passed.
LOCK_DELAY_RETRY_FIRST = 0.05


class KeyConflict(ShimError):
    code = KEY_CONFLICT


class NotAcquired(Exception):
    """Raised by held() when the lock was not obtained (--no-wait, timeout, or stop requested)."""


class Options:
    """What to lock and how. unreachable_for: while waiting, how long Consul may stay unreachable (in a row)
    before acquire() gives up; None: never. (Plain classes here: `dataclasses` costs ~7 ms of start-up.)"""

    def __init__(self, prefix, limit=1, ttl=15.0, lock_delay=15.0, session_name="", unreachable_for=10.0):
        self.prefix, self.limit, self.ttl, self.lock_delay = prefix, limit, ttl, lock_delay
        self.session_name, self.unreachable_for = session_name, unreachable_for

    @property
    def key(self):
        return f"{self.prefix}/{LOCK_KEY}"


class Hold:
    """A granted hold. `index` is the fencing token; `lost` is set (with `lost_reason`) if the hold ends early."""

    def __init__(self, key, session, index):
        self.key, self.session, self.index = key, session, index
        self.lost = threading.Event()
        self.lost_reason = ""


class Backoff:
    def __init__(self, first=RETRY_FIRST, cap=RETRY_MAX):
        self.first, self.cap, self.next = first, cap, first

    def delay(self):
        d = self.next
        self.next = min(self.cap, self.next * 2)
        # Jitter (from os.urandom: `random` costs start-up time): contenders that failed together do not
        # retry together.
        return d * (0.5 + int.from_bytes(os.urandom(2), "big") / 131070)

    def reset(self):
        self.next = self.first


class Locker:
    """One lock (or semaphore slot) for one process. Thread-safe: acquire() may run in a worker thread while
    another thread calls close(). `notify` is called (from any thread) whenever the hold is lost."""

    def __init__(self, client, opts, notify=lambda: None):
        self.client, self.opts, self.notify = client, opts, notify
        self._mutex = threading.Lock()
        self._closed = threading.Event()
        self._session = None
        self._session_gone = False
        self._confirmed_at = 0.0  # monotonic time the last successful renewal (or create) was sent
        self._creating = None  # while a session create is in flight: an Event, set once its outcome is settled
        self.hold = None  # the Hold, once granted
        self.unreachable_since = None  # monotonic time of the first of the current run of failed calls
        self.last_error = None
        self._value = json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode()

    # -- retry policy ------------------------------------------------------------------------------------
    def _call(self, fn, *args, stop=None, give_up_after=None, deadline=None, **kw):
        """Call fn, retrying transient Consul errors. PermissionDenied and 4xx are final at once.

        With a deadline (monotonic time), every attempt's request timeout ends at it and no retry starts after
        it: a partitioned or frozen agent holds the caller no longer than that."""
        backoff = Backoff()
        while True:
            if deadline is not None:
                kw["timeout"] = max(0.05, deadline - time.monotonic())
            try:
                result = fn(*args, **kw)
                self.unreachable_since = None
                return result
            except consul.PermissionDenied:
                raise
            except consul.HTTPError as e:
                if e.status < 500:
                    raise
                err = e
            except consul.Unreachable as e:
                err = e
            now = time.monotonic()
            self.last_error = err
            if self.unreachable_since is None:
                self.unreachable_since = now
            if give_up_after is not None and now - self.unreachable_since >= give_up_after:
                raise err
            if deadline is not None and now >= deadline:
                raise err
            pause = backoff.delay() if deadline is None else min(backoff.delay(), deadline - now)
            if (stop or self._closed).wait(pause):
                raise err

    # -- session -----------------------------------------------------------------------------------------
    def _create_session(self, stop):
        name = self.opts.session_name or f"consul-locker {self.opts.prefix} on {socket.gethostname()} pid {os.getpid()}"
        behavior = "release" if self.opts.limit == 1 else "delete"  # as `consul lock` / `consul lock -n`
        settled = threading.Event()
        with self._mutex:
            if self._closed.is_set():
                return None
            self._creating = settled
        try:
            sent = time.monotonic()
            sid = self._call(
                self.client.session_create,
                name,
                format_go(self.opts.ttl),
                format_go(self.opts.lock_delay),
                behavior,
                stop=stop,
                give_up_after=self.opts.unreachable_for,
            )
            with self._mutex:
                closed = self._closed.is_set()
                if not closed:
                    self._session, self._session_gone, self._confirmed_at = sid, False, sent
            if closed:  # close() ran meanwhile and waits (on `settled`) for us to destroy this session
                try:
                    self.client.session_destroy(sid)
                except consul.ConsulError:
                    pass  # close() reports it: `settled` is set, but the session may outlive us until its TTL
                return None
        finally:
            settled.set()
        if self.opts.limit > 1:
            contender = f"{self.opts.prefix}/{sid}"
            _, err = self._call(
                self.client.kv_op,
                "lock",
                contender,
                self._value,
                SEMAPHORE_FLAG,
                sid,
                stop=stop,
                give_up_after=self.opts.unreachable_for,
            )
            if err:
                raise consul.ConsulError(f"cannot create contender key {contender}: {err}")
        return sid

    def _renew_loop(self):
        """Renew every TTL/2; fence (mark the hold lost) when the session cannot be confirmed for TTL."""
        ttl = self.opts.ttl
        backoff = Backoff(cap=min(RETRY_MAX, ttl / 10))
        next_at = self._confirmed_at + ttl / 2
        while not self._closed.wait(max(0.0, next_at - time.monotonic())):
            sid, fence_at = self._session, self._confirmed_at + ttl
            if sid is None:
                return
            sent = time.monotonic()
            try:
                # While held, a renewal may not wait past the fence; while waiting there is nothing to fence.
                limit = consul.DEFAULT_REQUEST_TIMEOUT
                if self.hold is not None:
                    limit = max(0.2, min(limit, fence_at - sent))
                alive = self.client.session_renew(sid, timeout=limit)
            except consul.ConsulError as e:  # transient or not, we just could not confirm the session
                self.last_error = e
                now = time.monotonic()
                if self.hold is None:  # still waiting: nothing to fence, just keep trying at a gentle pace
                    next_at = now + backoff.delay()
                    continue
                if now >= fence_at:
                    self._lose(f"could not confirm the session with Consul for {format_go(ttl)} (TTL): {e}")
                    return
                next_at = min(fence_at, now + backoff.delay())
                continue
            backoff.reset()
            if not alive:
                with self._mutex:
                    self._session_gone = True
                self._lose("the session was invalidated or destroyed in Consul")
                if self.hold is not None:
                    return
                next_at = time.monotonic() + ttl / 2
                continue
            self._confirmed_at = sent
            next_at = sent + ttl / 2

    def _lose(self, reason):
        hold = self.hold
        if hold is not None and not hold.lost.is_set() and not self._closed.is_set():
            hold.lost_reason = reason
            hold.lost.set()
            self.notify()

    # -- acquisition -------------------------------------------------------------------------------------
    def acquire(self, stop=None, deadline=None, wait=True):
        """Block until held; return the Hold, or None when not obtained (wait=False and busy, deadline, stop).

        Raises ShimError subclasses for what retrying cannot fix: ACL denial, key conflict, Consul unreachable
        for longer than opts.unreachable_for.
        """
        stop = stop or threading.Event()
        self._create_session(stop)
        threading.Thread(target=self._renew_loop, name="consul-locker-renew", daemon=True).start()
        attempt = self._acquire_lock if self.opts.limit == 1 else self._acquire_semaphore
        index, delay_backoff = None, Backoff(first=LOCK_DELAY_RETRY_FIRST)
        while not stop.is_set() and not self._closed.is_set():
            if self._session_gone:
                self._create_session(stop)
                index = None
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            blocking_wait = BLOCKING_WAIT if remaining is None else min(BLOCKING_WAIT, remaining)
            state, index = attempt(index, blocking_wait, stop)
            if state == "held":
                return self.hold
            if state == "busy" and not wait:
                return None
            if state in ("delay", "transient"):
                # delay: free but refused, lock-delay after a holder's session was invalidated; transient: the
                # grant met a Consul error. Neither has an index to block on, so pause before reading again.
                if state == "delay" and not wait:
                    return None
                pause = delay_backoff.delay()
                if remaining is not None:
                    pause = min(pause, max(0.0, remaining))
                if stop.wait(pause):
                    return None
        return None

    def _read(self, key, index, blocking_wait, stop, recurse=False):
        entries, new_index = self._call(
            self.client.kv_get,
            key,
            index=index,
            wait=blocking_wait if index else None,
            recurse=recurse,
            stop=stop,
            give_up_after=self.opts.unreachable_for,
        )
        return entries, _next_index(index, new_index)

    def _grant(self, verb, key, value, flags, index, stop):
        """Write the granting operation under the mutex, so close() never races a grant it cannot see.

        One attempt only (close() must not wait behind retries); a transient error returns (None, "transient").
        """
        with self._mutex:
            if self._closed.is_set() or stop.is_set():
                return None, "stopped"
            sent = time.monotonic()
            try:
                entry, err = self.client.kv_op(verb, key, value, flags, self._session, index)
            except consul.PermissionDenied:
                raise
            except consul.ConsulError as e:
                self.last_error = e
                return None, "transient"
            if entry is not None:
                self._confirmed_at = max(self._confirmed_at, sent)  # a granted write proves the session
                self._held(int(entry["ModifyIndex"]))
            return entry, err

    def _held(self, index):
        # The fencing token: the Raft index of the write that granted this hold. Unlike LockIndex it keeps
        # growing when `consul lock` deletes the key between holds.
        self.hold = Hold(key=self.opts.key, session=self._session, index=index)

    def _acquire_lock(self, index, blocking_wait, stop):
        key = self.opts.key
        entries, new_index = self._read(key, index, blocking_wait, stop)
        entry = entries[0] if entries else None
        if entry is not None and entry.get("Flags") != LOCK_FLAG:
            raise KeyConflict(_flags_conflict(key, entry, "a lock (--limit 1)"))
        if entry is not None and entry.get("Session") == self._session:
            self._held(int(entry["ModifyIndex"]))  # an earlier grant whose answer we never saw did succeed
            return "held", new_index
        if entry is not None and entry.get("Session"):
            return "busy", new_index
        granted, err = self._grant("lock", key, self._value, LOCK_FLAG, None, stop)
        if granted is not None:
            return "held", new_index
        if "lock delay" in err:
            return "delay", None
        if "invalid session" in err:
            with self._mutex:
                self._session_gone = True
        if err in ("stopped", "transient"):
            return err, None
        return "race", None  # somebody else won the race: read again at once, then block on the new holder

    def _semaphore_state(self, entries):
        prefix, limit = self.opts.prefix, self.opts.limit
        lock_entry = next((e for e in entries if e["Key"] == self.opts.key), None)
        if lock_entry is not None and lock_entry.get("Flags") != SEMAPHORE_FLAG:
            raise KeyConflict(_flags_conflict(self.opts.key, lock_entry, f"a semaphore (--limit {limit})"))
        sem = {"Limit": limit, "Holders": {}}
        if lock_entry is not None and lock_entry["Value"]:
            try:
                sem = json.loads(lock_entry["Value"])
            except ValueError:
                raise KeyConflict(f"key {self.opts.key} does not hold a semaphore's JSON value") from None
        if sem.get("Limit") != limit:
            raise KeyConflict(f"semaphore at {prefix} has limit {sem.get('Limit')}, this command asked for {limit}")
        alive = {e["Session"] for e in entries if e.get("Session")}
        holders = {h for h, v in (sem.get("Holders") or {}).items() if v and h in alive}
        return lock_entry, holders

    def _acquire_semaphore(self, index, blocking_wait, stop):
        entries, new_index = self._read(self.opts.prefix + "/", index, blocking_wait, stop, recurse=True)
        lock_entry, holders = self._semaphore_state(entries)
        if self._session not in {e.get("Session") for e in entries}:
            with self._mutex:  # our contender key is gone: the session was invalidated while we waited
                self._session_gone = True
            return "race", None
        if self._session in holders:  # an earlier CAS whose answer we never saw did succeed
            self._held(int(lock_entry["ModifyIndex"]))
            return "held", new_index
        if len(holders) >= self.opts.limit:
            return "busy", new_index
        holders.add(self._session)
        value = json.dumps({"Limit": self.opts.limit, "Holders": {h: True for h in sorted(holders)}}).encode()
        cas_index = int(lock_entry["ModifyIndex"]) if lock_entry is not None else 0
        granted, err = self._grant("cas", self.opts.key, value, SEMAPHORE_FLAG, cas_index, stop)
        if granted is not None:
            return "held", None
        return (err if err in ("stopped", "transient") else "race"), None

    # -- while held --------------------------------------------------------------------------------------
    def start_monitor(self):
        threading.Thread(target=self._monitor_loop, name="consul-locker-monitor", daemon=True).start()

    def _still_ours(self, entries):
        if self.opts.limit == 1:
            return bool(entries) and entries[0].get("Session") == self._session
        try:
            _, holders = self._semaphore_state(entries)
        except KeyConflict:
            return False
        return self._session in holders

    def _monitor_loop(self):
        """Watch the key with blocking queries; set lost as soon as it is no longer held by our session."""
        recurse = self.opts.limit > 1
        key = self.opts.prefix + "/" if recurse else self.opts.key
        index, backoff = None, Backoff()
        while not self._closed.is_set() and not self.hold.lost.is_set():
            try:
                entries, new_index = self.client.kv_get(
                    key, index=index, wait=BLOCKING_WAIT if index else None, recurse=recurse, consistent=True
                )
            except consul.ConsulError as e:  # the renewer's fence covers a long outage; here we just retry
                self.last_error = e
                self._closed.wait(backoff.delay())
                continue
            backoff.reset()
            if self._closed.is_set():
                return
            if not self._still_ours(entries):
                self._lose(f"the lock key {self.opts.key} is no longer held by this session")
                return
            index = _next_index(index, new_index)

    # -- release -----------------------------------------------------------------------------------------
    def close(self, budget=5.0):
        """Release what we hold (only that), then destroy the session. Idempotent; never raises.

        Call it only when nothing that relied on the lock runs any more. Returns a warning text or "".
        """
        with self._mutex:
            if self._closed.is_set():
                return ""
            self._closed.set()
            sid, hold, creating = self._session, self.hold, self._creating
        if sid is None:
            # A session create may be in flight (a stop signal right after start): wait, within the budget, for
            # its requester to destroy what it created, instead of exiting and leaving that session to its TTL.
            if creating is not None and not creating.wait(budget):
                return "a session being created when we stopped may stay in Consul until its TTL expires"
            return ""
        warning = ""
        # The budget bounds the whole of it, hanging requests included (a partition, a frozen agent): the
        # release may use half, the destroy (which frees the key too) the rest.
        deadline = time.monotonic() + budget
        try:
            if hold is not None:
                if self.opts.limit == 1:
                    self._call(
                        self.client.kv_release,
                        self.opts.key,
                        sid,
                        LOCK_FLAG,
                        self._value,
                        stop=threading.Event(),
                        deadline=deadline - budget / 2,
                    )
                else:
                    self._release_semaphore(sid, deadline - budget / 2)
        except consul.ConsulError as e:
            warning = f"could not release {self.opts.key} ({e}); destroying the session frees it"
        try:
            self._call(self.client.session_destroy, sid, stop=threading.Event(), deadline=deadline)
        except consul.ConsulError as e:
            warning = f"could not destroy session {sid} ({e}); Consul expires it after the TTL"
        return warning

    def _release_semaphore(self, sid, deadline):
        never = threading.Event()
        while True:
            entries, _ = self._call(self.client.kv_get, self.opts.key, stop=never, deadline=deadline)
            if not entries:
                break
            entry = entries[0]
            try:
                sem = json.loads(entry["Value"])
            except ValueError:
                break
            if sid not in (sem.get("Holders") or {}):
                break
            del sem["Holders"][sid]
            ok, _ = self._call(
                self.client.kv_op,
                "cas",
                self.opts.key,
                json.dumps(sem).encode(),
                SEMAPHORE_FLAG,
                None,
                int(entry["ModifyIndex"]),
                stop=never,
                deadline=deadline,
            )
            if ok is not None:
                break
        self._call(self.client.kv_op, "delete", f"{self.opts.prefix}/{sid}", stop=never, deadline=deadline)


def _next_index(old, new):
    """The index for the next blocking query: 0 (start over) when it went backwards (agent restarted, snapshot
    restored), as Consul's blocking-query documentation asks."""
    return 0 if old and new < old else new


def _flags_conflict(key, entry, wanted):
    return (
        f"key {key} has flags {entry.get('Flags')}, not those of {wanted}: is another tool, or a "
        "different --limit, using this prefix?"
    )


@contextmanager
def held(prefix, limit=1, ttl=15.0, lock_delay=15.0, timeout=None, wait=True, client=None):
    """Hold a Consul lock around a block of Python code::

        with held("consul-locker/report") as hold:
            do_work(fencing_token=hold.index)
            if hold.lost.is_set(): ...      # the lock was lost: stop writing

    Raises NotAcquired when the lock is not obtained (wait=False and busy, or timeout seconds passed).
    """
    locker = Locker(
        client or consul.Client(consul.Settings.from_env()),
        Options(prefix=prefix.strip("/"), limit=limit, ttl=ttl, lock_delay=lock_delay),
    )
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        hold = locker.acquire(deadline=deadline, wait=wait)
        if hold is None:
            raise NotAcquired(f"lock {prefix} not obtained")
        locker.start_monitor()
        yield hold
    finally:
        locker.close()
