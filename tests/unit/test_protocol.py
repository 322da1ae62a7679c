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


def sem_entries(holders, alive, limit=2, index=9):
    entries = [{"Key": f"{PREFIX}/{s}", "Flags": SEMAPHORE_FLAG, "Session": s, "ModifyIndex": 1} for s in alive]
    if holders is not None:
        value = encode_semaphore(limit, holders, "someone")
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
def sem(limit=2, lock_delay=15.0):
    return SemaphoreProtocol(Options(PREFIX, limit=limit, lock_delay=lock_delay))


def test_a_free_slot_is_taken_by_cas_on_the_current_index():
    d = sem().decide(sem_entries(["a"], ["a", "me"]), "me", now=100.0)
    assert d.grant["Verb"] == "cas" and d.grant["Index"] == 9
    assert sem_value(d.grant) == {"Limit": 2, "Holders": {"a": True, "me": True}}


def test_the_first_holder_creates_the_key_with_cas_zero():
    d = sem().decide(sem_entries(None, ["me"]), "me", now=100.0)
    assert d.grant["Index"] == 0 and sem_value(d.grant)["Holders"] == {"me": True}


def test_full_means_busy_with_the_holders_named():
    d = sem().decide(sem_entries(["a", "b"], ["a", "b", "me"]), "me", now=100.0)
    assert d.grant is None and set(d.holders) == {"a", "b"} and d.retry_at is None


def test_a_dead_holder_keeps_its_slot_for_lock_delay_after_we_first_saw_it_gone():
    p = sem(lock_delay=15.0)
    # "b" is recorded but its contender key is gone: its session ended, its tree may still be dying.
    d = p.decide(sem_entries(["a", "b"], ["a", "me"]), "me", now=100.0)
    assert d.grant is None and d.retry_at == 115.0
    d = p.decide(sem_entries(["a", "b"], ["a", "me"]), "me", now=114.9)
    assert d.grant is None  # the clock runs from the first sighting, not from this read
    d = p.decide(sem_entries(["a", "b"], ["a", "me"]), "me", now=115.0)
    assert sem_value(d.grant)["Holders"] == {"a": True, "me": True}  # b is pruned only now


def test_a_late_waiter_starts_its_own_clock():
    # Another waiter saw "b" gone long ago; this one has just arrived: it waits its own full lock-delay.
    late = sem(lock_delay=15.0)
    assert late.decide(sem_entries(["a", "b"], ["a", "me"]), "me", now=500.0).retry_at == 515.0


def test_a_dead_holder_does_not_block_a_slot_that_is_free_anyway():
    d = sem(limit=3).decide(sem_entries(["a", "b"], ["a", "me"], limit=3), "me", now=100.0)
    # b stays recorded (its slot reserved), and we take the third slot.
    assert sem_value(d.grant)["Holders"] == {"a": True, "b": True, "me": True}


def test_lock_delay_zero_frees_a_dead_holders_slot_at_once():
    d = sem(lock_delay=0.0).decide(sem_entries(["a", "b"], ["a", "me"]), "me", now=100.0)
    assert sem_value(d.grant)["Holders"] == {"a": True, "me": True}


def test_our_missing_contender_key_means_our_session_is_gone():
    assert sem().decide(sem_entries(["a"], ["a"]), "me", now=1.0).missing_contender


def test_a_recorded_hold_of_ours_is_rewritten_for_a_fresh_index():
    d = sem().decide(sem_entries(["a", "me"], ["a", "me"]), "me", now=1.0)
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


def test_still_ours_needs_both_the_record_and_a_live_session():
    p = sem()
    assert p.still_ours(sem_entries(["me"], ["me"]), "me")
    assert not p.still_ours(sem_entries(["a"], ["a", "me"]), "me")
    assert not p.still_ours(sem_entries(["me"], []), "me")
