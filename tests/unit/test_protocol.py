"""The lock and semaphore decisions, from what Consul holds, without Consul (shim.protocol)."""

import base64
import json

import pytest

from shim.errors import KeyConflict
from shim.lock import Options
from shim.protocol import (
    LOCK_FLAG,
    SEMAPHORE_FLAG,
    LockProtocol,
    SemaphoreProtocol,
    decode_semaphore,
    encode_semaphore,
)

PREFIX = "consul-locker/unit"
KEY = f"{PREFIX}/.lock"


def lock_entry(session=None, index=7, flags=LOCK_FLAG):
    e = {"Key": KEY, "Flags": flags, "ModifyIndex": index, "Value": b""}
    if session:
        e["Session"] = session
    return e


def sem_entries(holders, alive, limit=2, index=9, gone=None):
    entries = [{"Key": f"{PREFIX}/{s}", "Flags": SEMAPHORE_FLAG, "Session": s, "ModifyIndex": 1} for s in alive]
    if holders is not None:
        value = encode_semaphore(limit, holders, "someone", gone)
        entries.append({"Key": KEY, "Flags": SEMAPHORE_FLAG, "ModifyIndex": index, "Value": value})
    return entries


def sem_value(op):
    value = json.loads(base64.b64decode(op["Value"]))
    assert value.pop("Writer") == "me"
    return value


# -- lock ---------------------------------------------------------------------------------------------------
def test_a_free_lock_is_granted_with_a_lock_op_of_our_session():
    d = LockProtocol(Options(PREFIX)).decide([], "me")
    assert d.grant["Verb"] == "lock" and d.grant["Key"] == KEY and d.grant["Session"] == "me"
    assert d.grant["Flags"] == LOCK_FLAG


def test_a_lock_held_elsewhere_names_its_holder_and_grants_nothing():
    d = LockProtocol(Options(PREFIX)).decide([lock_entry("other")], "me")
    assert d.grant is None and d.holders == ("other",)


def test_a_lock_already_ours_is_taken_again_for_a_fresh_fencing_index():
    # A grant whose answer was lost did succeed: the same session's lock op rewrites the key (new ModifyIndex).
    d = LockProtocol(Options(PREFIX)).decide([lock_entry("me")], "me")
    assert d.grant is not None and d.grant["Session"] == "me"


def test_a_semaphore_key_where_a_lock_is_asked_for_is_a_conflict():
    with pytest.raises(KeyConflict):
        LockProtocol(Options(PREFIX)).decide([lock_entry(flags=SEMAPHORE_FLAG)], "me")


def test_still_ours_only_while_our_session_holds_the_key():
    p = LockProtocol(Options(PREFIX))
    assert p.still_ours([lock_entry("me")], "me")
    assert not p.still_ours([lock_entry("other")], "me")
    assert not p.still_ours([lock_entry()], "me")
    assert not p.still_ours([], "me")


# -- semaphore ----------------------------------------------------------------------------------------------
W0 = 1_700_000_000.0  # wall-clock time at monotonic 0, in these tests: both clocks agree


def decide(p, entries, now, wall=None):
    return p.decide(entries, "me", now, W0 + now if wall is None else wall)


def sem(limit=2, lock_delay=15.0):
    return SemaphoreProtocol(Options(PREFIX, limit=limit, lock_delay=lock_delay))


def test_a_free_slot_is_taken_by_cas_on_the_current_index():
    d = decide(sem(), sem_entries(["a"], ["a", "me"]), now=100.0)
    assert d.grant["Verb"] == "cas" and d.grant["Index"] == 9
    assert sem_value(d.grant) == {"Limit": 2, "Holders": {"a": True, "me": True}}


def test_the_first_holder_creates_the_key_with_cas_zero():
    d = decide(sem(), sem_entries(None, ["me"]), now=100.0)
    assert d.grant["Index"] == 0 and sem_value(d.grant)["Holders"] == {"me": True}


def test_full_means_busy_with_the_holders_named():
    d = decide(sem(), sem_entries(["a", "b"], ["a", "b", "me"]), now=100.0)
    assert d.grant is None and set(d.holders) == {"a", "b"} and d.retry_at is None and d.record is None


def test_a_dead_holder_keeps_its_slot_for_lock_delay_after_it_was_first_seen_gone():
    p = sem(lock_delay=15.0)
    # "b" is recorded but its contender key is gone: its session ended, its tree may still be dying. We are the
    # first to see it: the slot stays taken, and the sighting is written down for later waiters.
    d = decide(p, sem_entries(["a", "b"], ["a", "me"]), now=100.0)
    assert d.grant is None and d.retry_at == 115.0
    assert sem_value(d.record) == {"Limit": 2, "Holders": {"a": True, "b": True}, "Gone": {"b": W0 + 100.0}}
    recorded = {"b": W0 + 100.0}
    d = decide(p, sem_entries(["a", "b"], ["a", "me"], gone=recorded), now=114.9)
    assert d.grant is None and d.record is None  # the clock runs from the first sighting, not from this read
    d = decide(p, sem_entries(["a", "b"], ["a", "me"], gone=recorded), now=115.0)
    assert sem_value(d.grant)["Holders"] == {"a": True, "me": True}  # b is pruned only now


def test_a_late_waiter_counts_from_the_recorded_first_sighting():
    # Another waiter saw "b" gone at 100 and wrote it down; this one arrives at 110 and waits until 115, not 125.
    late = sem(lock_delay=15.0)
    d = decide(late, sem_entries(["a", "b"], ["a", "me"], gone={"b": W0 + 100.0}), now=110.0)
    assert d.retry_at == 115.0 and d.record is None
    d = decide(late, sem_entries(["a", "b"], ["a", "me"], gone={"b": W0 + 100.0}), now=115.0)
    assert sem_value(d.grant)["Holders"] == {"a": True, "me": True}


def test_a_recorded_sighting_from_a_clock_ahead_of_ours_never_lengthens_our_own_count():
    p = sem(lock_delay=15.0)
    d = decide(p, sem_entries(["a", "b"], ["a", "me"], gone={"b": W0 + 500.0}), now=100.0)
    assert d.retry_at == 115.0


def test_taking_a_live_slot_keeps_a_dead_holders_reservation_and_its_sighting():
    d = decide(sem(limit=3), sem_entries(["a", "b"], ["a", "me"], limit=3, gone={"b": W0 + 90.0}), now=100.0)
    assert sem_value(d.grant) == {"Limit": 3, "Holders": {"a": True, "b": True, "me": True}, "Gone": {"b": W0 + 90}}


def test_lock_delay_zero_frees_a_dead_holders_slot_at_once():
    d = decide(sem(lock_delay=0.0), sem_entries(["a", "b"], ["a", "me"]), now=100.0)
    assert sem_value(d.grant)["Holders"] == {"a": True, "me": True}


def test_our_missing_contender_key_means_our_session_is_gone():
    assert decide(sem(), sem_entries(["a"], ["a"]), now=1.0).missing_contender


def test_a_recorded_hold_of_ours_is_rewritten_for_a_fresh_index():
    d = decide(sem(), sem_entries(["a", "me"], ["a", "me"]), now=1.0)
    assert d.grant["Verb"] == "cas" and sem_value(d.grant)["Holders"] == {"a": True, "me": True}


def test_release_removes_only_our_session():
    p = sem()
    op = p.release_op(sem_entries(["a", "me"], ["a", "me"]), "me")
    assert op["Index"] == 9 and sem_value(op)["Holders"] == {"a": True}
    assert p.release_op(sem_entries(["a"], ["a", "me"]), "me") is None


@pytest.mark.parametrize(
    "entry, why",
    [
        ({"Key": KEY, "Flags": LOCK_FLAG, "Value": b"", "ModifyIndex": 1}, "flags"),
        ({"Key": KEY, "Flags": SEMAPHORE_FLAG, "Value": b"not json", "ModifyIndex": 1}, "JSON"),
        ({"Key": KEY, "Flags": SEMAPHORE_FLAG, "Value": encode_semaphore(3, [], "x"), "ModifyIndex": 1}, "limit 3"),
    ],
)
def test_a_key_of_another_layout_is_a_conflict(entry, why):
    with pytest.raises(KeyConflict, match=why):
        decode_semaphore(entry, KEY, 2)


def test_consul_lock_n_json_without_our_fields_is_read():
    value = json.dumps({"Limit": 2, "Holders": {"a": True, "b": False}}).encode()
    state = decode_semaphore({"Key": KEY, "Flags": SEMAPHORE_FLAG, "Value": value, "ModifyIndex": 1}, KEY, 2)
    assert state.holders == {"a": True} and state.gone == {}


def test_still_ours_needs_both_the_record_and_a_live_session():
    p = sem()
    assert p.still_ours(sem_entries(["me"], ["me"]), "me")
    assert not p.still_ours(sem_entries(["a"], ["a", "me"]), "me")
    assert not p.still_ours(sem_entries(["me"], []), "me")
