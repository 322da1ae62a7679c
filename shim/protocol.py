"""The lock and the semaphore as protocol objects: they decode what Consul holds under a prefix and decide what
one session should do about it. No I/O, no clock of their own: shim.lock's Locker runs them (requests, retries,
threads), and the unit tests call them directly.

Key layout and flags are those of `consul lock` (hashicorp/consul api/lock.go and api/semaphore.go), so a fleet
that mixes `consul lock PREFIX` and consul-locker on one prefix still counts one set of holders:
  * LockProtocol (--limit 1): key PREFIX/.lock, Flags LOCK_FLAG, held with a lock operation by one session;
  * SemaphoreProtocol (--limit N): contender keys PREFIX/<session> and a coordination key PREFIX/.lock, Flags
    SEMAPHORE_FLAG, whose JSON value {"Limit": N, "Holders": {session: true}} is changed only by check-and-set.
"""

import base64
import json
from dataclasses import dataclass, field
from typing import Optional

from shim.errors import KeyConflict

# Magic Flags values of hashicorp/consul api: a lock key and a semaphore key must not be confused.
LOCK_FLAG = 0x2DDCCBC058A50C18
SEMAPHORE_FLAG = 0xE0F69A2BAA414DE0
LOCK_KEY = ".lock"
DONE_KEY = ".done"  # the --once marker


@dataclass
class Decision:
    """What a read of the lock's keys means for one session.

    grant: the KV operation that takes (or re-takes) the lock now; None when it is not to be had.
    holders: the sessions that hold it now (for the waiting line and --status).
    retry_at: monotonic time at which a reserved slot (a dead semaphore holder's) frees up, if that is what
    stands in the way; the next blocking query should not wait past it.
    missing_contender: our own semaphore contender key is gone, so our session was invalidated.
    record: a write that changes nothing but what later waiters must know (when a dead holder was first seen
    gone), to be made while we wait.
    """

    grant: Optional[dict] = None
    holders: tuple = ()
    retry_at: Optional[float] = None
    missing_contender: bool = False
    record: Optional[dict] = None


def kv_op(verb, key, value=None, flags=0, session=None, index=None):
    op = {"Verb": verb, "Key": key, "Flags": flags}
    if value is not None:
        op["Value"] = base64.b64encode(value).decode()
    if session is not None:
        op["Session"] = session
    if index is not None:
        op["Index"] = index
    return op


def _flags_conflict(key, entry, wanted):
    return KeyConflict(
        f"key {key} has flags {entry.get('Flags')}, not those of {wanted}: is another tool, or a "
        "different --limit, using this prefix?"
    )


class LockProtocol:
    """--limit 1: one session holds PREFIX/.lock with ?acquire (api/lock.go)."""

    flags = LOCK_FLAG
    behavior = "release"  # as `consul lock`: an invalidated session releases the key (and lock-delay starts)

    def __init__(self, opts, value=b""):
        self.opts, self.value = opts, value
        self.watch_key, self.recurse = opts.key, False

    def entry(self, entries):
        entry = next((e for e in entries if e.get("Key") == self.opts.key), None)
        if entry is not None and entry.get("Flags") != LOCK_FLAG:
            raise _flags_conflict(self.opts.key, entry, "a lock (--limit 1)")
        return entry

    def decide(self, entries, session, now=0.0, wall=0.0):
        entry = self.entry(entries)
        holder = (entry or {}).get("Session")
        if holder and holder != session:
            return Decision(holders=(holder,))
        # Free, or already ours (a grant whose answer we never saw): a lock op by our session (re)takes it and
        # gives a fresh ModifyIndex, so every hold has its own fencing token.
        return Decision(grant=kv_op("lock", self.opts.key, self.value, LOCK_FLAG, session))

    def still_ours(self, entries, session):
        entry = self.entry(entries)
        return entry is not None and entry.get("Session") == session

    def contender_op(self, session):
        return None

    def holders(self, entries):
        holder = (self.entry(entries) or {}).get("Session")
        return (holder,) if holder else ()


@dataclass
class SemaphoreState:
    """What a semaphore's .lock entry records: the holders, and when each holder that lost its session was first
    seen gone by a consul-locker waiter (wall-clock seconds, `Gone` in the JSON)."""

    holders: dict = field(default_factory=dict)
    gone: dict = field(default_factory=dict)


def decode_semaphore(entry, key, limit):
    """The SemaphoreState of a semaphore's .lock entry (empty when there is none yet). Raises KeyConflict when
    the key is not a semaphore of this limit."""
    if entry is None:
        return SemaphoreState()
    if entry.get("Flags") != SEMAPHORE_FLAG:
        raise _flags_conflict(key, entry, f"a semaphore (--limit {limit})")
    if not entry.get("Value"):
        return SemaphoreState()
    try:
        sem = json.loads(entry["Value"])
        found, holders, gone = sem.get("Limit"), sem.get("Holders") or {}, sem.get("Gone") or {}
        gone = {h: float(t) for h, t in gone.items()}
        holders = {h: True for h, v in holders.items() if v}
    except (ValueError, AttributeError, TypeError):
        raise KeyConflict(f"key {key} does not hold a semaphore's JSON value") from None
    if found != limit:
        raise KeyConflict(f"the semaphore at {key} has limit {found}, this command asked for {limit}")
    return SemaphoreState(holders, {h: t for h, t in gone.items() if h in holders})


def encode_semaphore(limit, holders, writer, gone=None):
    """The .lock value. Two fields that `consul lock -n` ignores (and drops when it writes): `Gone` (see
    SemaphoreProtocol), and `Writer`, the session that wrote it: Consul keeps the ModifyIndex of a write that
    changes nothing, so without it a holder that rewrites its own recovered grant after another holder's write
    would get that holder's fencing index."""
    value = {"Limit": limit, "Holders": {h: True for h in sorted(holders)}, "Writer": writer}
    if gone:
        value["Gone"] = {h: round(t, 3) for h, t in sorted(gone.items())}
    return json.dumps(value).encode()


class SemaphoreProtocol:
    """--limit N: contender keys PREFIX/<session> (held by their session, deleted with it) and the holders' JSON
    in PREFIX/.lock, changed only by check-and-set (api/semaphore.go).

    A holder whose contender key is gone has lost its session. Unlike `consul lock -n`, which prunes it at once,
    its slot stays taken until lock-delay after it was first seen gone: the old holder fences itself at TTL and
    kills its tree within kill-timeout < lock-delay of Consul's invalidation, which came before any sighting.
    Each waiter counts from its own first sighting (`_dead_since`, monotonic) and from the first sighting of any
    consul-locker waiter, which the first one records in the JSON (`Gone`, wall clock): whichever ends first.
    So a late waiter does not start its count over (a dead holder's slot would never free while short holds keep
    cycling), at the price of trusting the recorder's clock: machine clocks must agree to well within
    lock-delay - kill-timeout."""

    flags = SEMAPHORE_FLAG
    behavior = "delete"  # as `consul lock -n`: an invalidated session's contender key disappears

    def __init__(self, opts, value=b""):
        self.opts, self.value = opts, value
        self.watch_key, self.recurse = opts.prefix + "/", True
        self._dead_since = {}  # session -> monotonic time this process first saw it gone while recorded

    def entry(self, entries):
        return next((e for e in entries if e.get("Key") == self.opts.key), None)

    @staticmethod
    def alive(entries):
        """Sessions that still hold a contender key."""
        return {e["Session"] for e in entries if e.get("Session")}

    def decide(self, entries, session, now, wall):
        """now: monotonic time of the read; wall: time.time() then."""
        entry = self.entry(entries)
        state = decode_semaphore(entry, self.opts.key, self.opts.limit)
        alive = self.alive(entries)
        if session not in alive:
            return Decision(missing_contender=True)
        dead = [h for h in state.holders if h not in alive]
        for h in dead:
            self._dead_since.setdefault(h, now)
        for h in list(self._dead_since):
            if h not in state.holders:
                del self._dead_since[h]  # removed by someone else after its delay, or released
        delay = self.opts.lock_delay
        free_at = {}  # dead holder -> monotonic time its slot frees, by our clock and by the recorded sighting
        for h in dead:
            free_at[h] = self._dead_since[h] + delay
            if h in state.gone:
                free_at[h] = min(free_at[h], now + state.gone[h] + delay - wall)
        reserved = [h for h in dead if now < free_at[h]]
        gone = {h: state.gone.get(h, wall) for h in reserved}  # the first sighting, kept for later waiters
        live = [h for h in state.holders if h in alive]
        cas = int(entry["ModifyIndex"]) if entry is not None else 0
        if session in state.holders:  # a CAS whose answer we never saw did succeed: rewrite it for a fresh index
            return Decision(grant=self._cas(live + reserved, cas, session, gone), holders=tuple(live))
        if len(live) + len(reserved) < self.opts.limit:
            return Decision(grant=self._cas(live + reserved + [session], cas, session, gone), holders=tuple(live))
        retry_at = min((free_at[h] for h in reserved), default=None)
        record = None
        if any(h not in state.gone for h in reserved):  # we are the first to see it: write down when
            record = self._cas(live + reserved, cas, session, gone)
        return Decision(holders=tuple(live + reserved), retry_at=retry_at, record=record)

    def _cas(self, holders, index, writer, gone=None):
        value = encode_semaphore(self.opts.limit, holders, writer, gone)
        return kv_op("cas", self.opts.key, value, SEMAPHORE_FLAG, index=index)

    def still_ours(self, entries, session):
        try:
            state = decode_semaphore(self.entry(entries), self.opts.key, self.opts.limit)
        except KeyConflict:
            return False
        return session in state.holders and session in self.alive(entries)

    def contender_op(self, session):
        return kv_op("lock", f"{self.opts.prefix}/{session}", self.value, SEMAPHORE_FLAG, session)

    def release_op(self, entries, session):
        """The CAS that removes only our session from the holders; None when we are not recorded."""
        entry = self.entry(entries)
        try:
            state = decode_semaphore(entry, self.opts.key, self.opts.limit)
        except KeyConflict:
            return None
        if session not in state.holders:
            return None
        del state.holders[session]
        return self._cas(list(state.holders), int(entry["ModifyIndex"]), session, state.gone)

    def holders(self, entries):
        return tuple(decode_semaphore(self.entry(entries), self.opts.key, self.opts.limit).holders)


def protocol_for(opts, value=b""):
    return LockProtocol(opts, value) if opts.limit == 1 else SemaphoreProtocol(opts, value)
