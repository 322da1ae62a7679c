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
from dataclasses import dataclass
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
    """

    grant: Optional[dict] = None
    holders: tuple = ()
    retry_at: Optional[float] = None
    missing_contender: bool = False


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

    def decide(self, entries, session, now=0.0):
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


def decode_semaphore(entry, key, limit):
    """The holders recorded in a semaphore's .lock entry (None: no entry yet). Raises KeyConflict when the key
    is not a semaphore of this limit."""
    if entry is None:
        return {}
    if entry.get("Flags") != SEMAPHORE_FLAG:
        raise _flags_conflict(key, entry, f"a semaphore (--limit {limit})")
    if not entry.get("Value"):
        return {}
    try:
        sem = json.loads(entry["Value"])
        found, holders = sem.get("Limit"), sem.get("Holders") or {}
    except (ValueError, AttributeError):
        raise KeyConflict(f"key {key} does not hold a semaphore's JSON value") from None
    if found != limit:
        raise KeyConflict(f"the semaphore at {key} has limit {found}, this command asked for {limit}")
    return {h: True for h, v in holders.items() if v}


def encode_semaphore(limit, holders, writer):
    """The .lock value. `Writer` (ignored by `consul lock -n`) names the session that wrote it: Consul keeps the
    ModifyIndex of a write that changes nothing, so without it a holder that rewrites its own recovered grant
    after another holder's write would get that holder's fencing index."""
    return json.dumps({"Limit": limit, "Holders": {h: True for h in sorted(holders)}, "Writer": writer}).encode()


class SemaphoreProtocol:
    """--limit N: contender keys PREFIX/<session> (held by their session, deleted with it) and the holders' JSON
    in PREFIX/.lock, changed only by check-and-set (api/semaphore.go).

    A holder whose contender key is gone has lost its session. Unlike `consul lock -n`, which prunes it at once,
    its slot stays taken until lock-delay after *this* waiter first saw it gone (`_dead_since`): the old holder
    fences itself at TTL and kills its tree within kill-timeout < lock-delay of Consul's invalidation, which came
    before our sighting. Nobody removes a dead holder earlier, so a late waiter is covered too."""

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

    def decide(self, entries, session, now):
        entry = self.entry(entries)
        recorded = decode_semaphore(entry, self.opts.key, self.opts.limit)
        alive = self.alive(entries)
        if session not in alive:
            return Decision(missing_contender=True)
        dead = [h for h in recorded if h not in alive]
        for h in dead:
            self._dead_since.setdefault(h, now)
        for h in list(self._dead_since):
            if h not in recorded:
                del self._dead_since[h]  # removed by someone else after its delay, or released
        reserved = [h for h in dead if now < self._dead_since[h] + self.opts.lock_delay]
        live = [h for h in recorded if h in alive]
        cas = int(entry["ModifyIndex"]) if entry is not None else 0
        if session in recorded:  # a CAS whose answer we never saw did succeed: rewrite it for a fresh index
            return Decision(grant=self._cas(live + reserved, cas, session), holders=tuple(live))
        if len(live) + len(reserved) < self.opts.limit:
            return Decision(grant=self._cas(live + reserved + [session], cas, session), holders=tuple(live))
        retry_at = min((self._dead_since[h] + self.opts.lock_delay for h in reserved), default=None)
        return Decision(holders=tuple(live + reserved), retry_at=retry_at)

    def _cas(self, holders, index, writer):
        value = encode_semaphore(self.opts.limit, holders, writer)
        return kv_op("cas", self.opts.key, value, SEMAPHORE_FLAG, index=index)

    def still_ours(self, entries, session):
        try:
            recorded = decode_semaphore(self.entry(entries), self.opts.key, self.opts.limit)
        except KeyConflict:
            return False
        return session in recorded and session in self.alive(entries)

    def contender_op(self, session):
        return kv_op("lock", f"{self.opts.prefix}/{session}", self.value, SEMAPHORE_FLAG, session)

    def release_op(self, entries, session):
        """The CAS that removes only our session from the holders; None when we are not recorded."""
        entry = self.entry(entries)
        try:
            recorded = decode_semaphore(entry, self.opts.key, self.opts.limit)
        except KeyConflict:
            return None
        if session not in recorded:
            return None
        del recorded[session]
        return self._cas(list(recorded), int(entry["ModifyIndex"]), session)

    def holders(self, entries):
        return tuple(decode_semaphore(self.entry(entries), self.opts.key, self.opts.limit))


def protocol_for(opts, value=b""):
    return LockProtocol(opts, value) if opts.limit == 1 else SemaphoreProtocol(opts, value)
