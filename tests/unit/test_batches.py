"""Batches core: validation, the coordinator's two phases, holds, rollback, and hold invariants."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sardis_ledger.streams import batches as b
from sardis_ledger.streams import merkle
from sardis_ledger.streams.core import AccountState, Reason
from sardis_ledger.streams.money import currency_table

CURRENCIES = currency_table()


def leg(account: str, entry_type: str, amount: str, **extra: Any) -> dict[str, Any]:
    return {"account_id": account, "currency": "USDC", "entry_type": entry_type,
            "amount": Decimal(amount), **extra}


def parsed(legs: list[dict[str, Any]], **extra: Any) -> b.SubmitBatch:
    batch = b.parse_submit_batch({"batch_id": "bat_1", "legs": legs, **extra}, CURRENCIES)
    assert isinstance(batch, b.SubmitBatch), batch
    return batch


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(("record", "reason", "leg_index"), [
    ({"batch_id": "", "legs": [leg("a", "credit", "1")]}, Reason.INVALID_FIELD, None),
    ({"batch_id": "x:rollback:y", "legs": [leg("a", "credit", "1")]}, Reason.INVALID_FIELD, None),
    ({"batch_id": "b", "legs": []}, Reason.INVALID_FIELD, None),
    ({"batch_id": "b", "legs": [leg("a", "credit", "1")] * (b.BATCH_LEGS_MAX + 1)},
     Reason.INVALID_FIELD, None),
    ({"batch_id": "b", "legs": [leg("a", "debit", "1"), leg("b", "credit", "0")]},
     Reason.INVALID_AMOUNT, 1),
    ({"batch_id": "b", "legs": [leg("a", "debit", "1"), {**leg("b", "credit", "1"), "currency": "XXX"}]},
     Reason.UNKNOWN_CURRENCY, 1),
    ({"batch_id": "b", "legs": [leg("a", "debit", "1.0000001"), leg("b", "credit", "1")]},
     Reason.INVALID_AMOUNT, 0),
    ({"batch_id": "b", "legs": [leg("a", "debit", "2"), leg("b", "credit", "1")]}, Reason.UNBALANCED, None),
    ({"batch_id": "b", "legs": [leg("a", "debit", "1"), leg("b", "credit", "1")], "timeout_ms": 5},
     Reason.INVALID_FIELD, None),
])
def test_invalid_batches_are_rejected_with_reason_and_leg(record: dict[str, Any], reason: Reason,
                                                          leg_index: int | None) -> None:
    result = b.parse_submit_batch(record, CURRENCIES)
    assert isinstance(result, b.BatchRejection)
    assert (result.reason, result.leg_index) == (reason, leg_index)


def test_balance_is_checked_per_currency_and_can_be_waived() -> None:
    legs = [leg("a", "debit", "1"), leg("b", "credit", "1"),
            {**leg("a", "fee", "0.5"), "currency": "USD"}, {**leg("c", "refund", "0.5"), "currency": "USD"}]
    assert parsed(legs).require_balanced
    one_sided = [leg("a", "credit", "5")]
    rejected = b.parse_submit_batch({"batch_id": "b", "legs": one_sided}, CURRENCIES)
    assert isinstance(rejected, b.BatchRejection) and rejected.reason is Reason.UNBALANCED
    assert not parsed(one_sided, require_balanced=False).require_balanced


def test_digest_tells_true_duplicates_from_conflicts() -> None:
    one = parsed([leg("a", "debit", "1"), leg("b", "credit", "1")])
    same = parsed([leg("a", "debit", "1"), leg("b", "credit", "1")])
    other = parsed([leg("a", "debit", "1"), leg("c", "credit", "1")])
    assert b.submit_digest(one) == b.submit_digest(same) != b.submit_digest(other)


def test_batch_entry_ids_never_collide_with_command_entry_ids() -> None:
    from sardis_ledger.streams.core import entry_id_for

    assert b.batch_entry_id("same", 0) != entry_id_for("same", 0)
    assert b.batch_entry_id("x", 0) == b.batch_entry_id("x", 0) != b.batch_entry_id("x", 1)


# ------------------------------------------------------------------ a whole batch, in memory


class World:
    """Accounts, holds and one coordinator, wired together as the worker does it."""

    def __init__(self, balances: dict[str, int] | None = None) -> None:
        self.states: dict[str, AccountState] = {k: AccountState(balance_minor=v)
                                                for k, v in (balances or {}).items()}
        self.holds: dict[str, b.Hold] = {}
        self.headers: dict[str, b.BatchHeader] = {}
        self.legs: dict[str, dict[int, b.LegRecord]] = {}
        self.frontier = merkle.MerkleFrontier()
        self.outcomes: list[b.BatchOutcome] = []
        self.now_ms = 1_000

    def apply(self, step: b.Step) -> None:
        for header in (step.header, *step.extra_headers):
            if header is not None:
                self.headers[header.batch_id] = header
        if step.header is not None:
            self.legs.setdefault(step.header.batch_id, {}).update(step.legs)
        if step.outcome is not None:
            self.outcomes.append(step.outcome)
        for reserve in step.reserves:
            self.report(self.reserve(reserve))
        for settle in step.settles:
            report = self.settle(settle)
            if report is not None:
                self.report(report)

    def reserve(self, message: b.Reserve) -> b.LegReport:
        key = message.leg.account_id
        hold_step = b.reserve(self.states.get(key, AccountState()), self.holds.get(message.hold_key),
                              message)
        assert isinstance(hold_step, b.HoldStep)
        self.states[key] = hold_step.state
        self.holds[message.hold_key] = hold_step.hold
        assert hold_step.report is not None
        return hold_step.report

    def settle(self, message: b.Settle) -> b.LegReport | None:
        key = message.account_id
        hold = self.holds.get(message.hold_key)
        state = self.states.get(key, AccountState())
        if message.action is b.SettleAction.POST:
            hold_step = b.post(state, self.frontier, hold, message, partition=0, now_ms=self.now_ms)
            assert isinstance(hold_step, b.HoldStep)
            if hold_step.frontier is not None:
                self.frontier = hold_step.frontier
        else:
            hold_step = b.void(state, hold, message)
        assert isinstance(hold_step, b.HoldStep)
        self.states[key] = hold_step.state
        self.holds[message.hold_key] = hold_step.hold
        return hold_step.report

    def report(self, report: b.LegReport) -> None:
        header = self.headers[report.batch_id]
        legs = self.legs[report.batch_id]
        counted = b.record_report(header, legs[report.leg_index], report)
        if counted is None:
            return
        header, legs[report.leg_index] = counted
        self.headers[header.batch_id] = header
        ordered = [legs[i] for i in range(header.leg_count)]
        if b.all_answered(header):
            self.apply(b.decide(header, ordered, coordinator_partition=0))
        elif b.all_posted(header):
            header = replace(header, status=b.BatchStatus.COMMITTED)
            self.headers[header.batch_id] = header
            self.outcomes.append(b.committed_outcome(header, ordered))

    def submit(self, batch: b.SubmitBatch) -> None:
        self.apply(b.submit(self.headers.get(batch.batch_id), batch, coordinator_partition=0,
                            now_ms=self.now_ms))


def test_two_leg_batch_commits_both_entries_with_batch_fields() -> None:
    world = World({"alice": 1_000_000})
    world.submit(parsed([leg("alice", "debit", "0.5"), leg("bob", "credit", "0.5")]))
    (outcome,) = world.outcomes
    assert outcome.committed and outcome.result_key == "bat_1"
    assert [(e.account_id, e.running_balance_minor, e.leg_index, e.batch_size, e.batch_id)
            for e in outcome.entries] == [("alice", 500_000, 0, 2, "bat_1"), ("bob", 500_000, 1, 2, "bat_1")]
    assert world.states["alice"].pending_debit_minor == 0
    assert world.headers["bat_1"].status is b.BatchStatus.COMMITTED


def test_a_refused_leg_voids_every_hold_and_names_the_lowest_failing_leg() -> None:
    world = World({"alice": 100})
    world.submit(parsed([leg("alice", "debit", "0.0001"), leg("bob", "debit", "0.01"),
                         leg("carol", "debit", "0.01"), leg("dave", "credit", "0.0201")]))
    (outcome,) = world.outcomes
    assert not outcome.committed
    assert (outcome.reason, outcome.failed_leg_index) == (Reason.INSUFFICIENT_FUNDS, 1)
    assert world.states["alice"] == AccountState(balance_minor=100)
    assert all(h.status in (b.HoldStatus.VOIDED, b.HoldStatus.REFUSED) for h in world.holds.values())


def test_duplicate_submit_sends_nothing_and_a_conflicting_one_is_rejected() -> None:
    world = World({"alice": 10})
    batch = parsed([leg("alice", "debit", "0.00001"), leg("bob", "credit", "0.00001")])
    world.submit(batch)
    header = world.headers["bat_1"]
    assert b.submit(header, batch, coordinator_partition=0, now_ms=5) == b.Step(None)
    other = parsed([leg("alice", "debit", "0.00001"), leg("carol", "credit", "0.00001")])
    step = b.submit(header, other, coordinator_partition=0, now_ms=5)
    assert step.outcome is not None and step.outcome.reason is Reason.IDEMPOTENCY_CONFLICT


def test_timeout_voids_a_batch_with_an_unanswered_leg() -> None:
    batch = parsed([leg("alice", "debit", "1"), leg("bob", "credit", "1")], timeout_ms=1000)
    step = b.submit(None, batch, coordinator_partition=3, now_ms=0)
    assert step.header is not None and not b.timed_out(step.header, 999) and b.timed_out(step.header, 1000)
    header, legs = step.header, dict(step.legs)
    counted = b.record_report(header, legs[0], b.LegReport("bat_1", 0, b.ReportKind.RESERVED))
    assert counted is not None
    header, legs[0] = counted
    decided = b.decide(header, [legs[0], legs[1]], coordinator_partition=3, timed_out=True)
    assert decided.outcome is not None
    assert (decided.outcome.reason, decided.outcome.failed_leg_index) == (Reason.BATCH_TIMEOUT, 1)
    assert {s.action for s in decided.settles} == {b.SettleAction.VOID}
    # a late answer after the decision changes nothing
    assert decided.header is not None
    assert b.record_report(decided.header, legs[1], b.LegReport("bat_1", 1, b.ReportKind.RESERVED)) is None


def test_void_before_reserve_leaves_a_tombstone_that_refuses_the_late_reserve() -> None:
    batch = parsed([leg("alice", "debit", "1"), leg("bob", "credit", "1")])
    message = b.Reserve("bat_1", 0, 2, batch.legs[0], 0)
    settle = b.Settle("bat_1", 0, "alice", "USDC", b.SettleAction.VOID, 0)
    state = AccountState(balance_minor=10_000_000)
    voided = b.void(state, None, settle)
    assert isinstance(voided, b.HoldStep)
    late = b.reserve(voided.state, voided.hold, message)
    assert isinstance(late, b.HoldStep)
    assert late.report is not None and late.report.kind is b.ReportKind.REFUSED
    assert late.state.pending_debit_minor == 0


def test_post_of_a_voided_hold_is_rejected_with_no_effect() -> None:
    """A genuine coordinator never posts after a void; a forged post must not book anything."""
    batch = parsed([leg("alice", "debit", "1"), leg("bob", "credit", "1")])
    held = b.reserve(AccountState(balance_minor=10_000_000), None, b.Reserve("bat_1", 0, 2, batch.legs[0], 0))
    assert isinstance(held, b.HoldStep)
    voided = b.void(held.state, held.hold, b.Settle("bat_1", 0, "alice", "USDC", b.SettleAction.VOID, 0))
    assert isinstance(voided, b.HoldStep)
    posted = b.post(voided.state, merkle.MerkleFrontier(), voided.hold,
                    b.Settle("bat_1", 0, "alice", "USDC", b.SettleAction.POST, 0), partition=0,
                    now_ms=1)
    assert isinstance(posted, b.BatchRejection)
    assert posted.reason is Reason.SETTLE_MISMATCH


# ------------------------------------------------------------------ rollback


def committed_world() -> World:
    world = World({"alice": 1_000_000})
    world.submit(parsed([leg("alice", "debit", "0.5"), leg("bob", "credit", "0.5")]))
    return world


def rollback(world: World, command_id: str, force: bool = False) -> b.Step:
    command = b.RollbackBatch(command_id, "bat_1", "customer dispute", force)
    comp_id = b.compensation_batch_id("bat_1", command_id)
    original = world.headers.get("bat_1")
    legs = world.legs.get("bat_1", {})
    return b.rollback(original, [legs[i] for i in range(len(legs))], command,
                      world.headers.get(comp_id), coordinator_partition=0, now_ms=world.now_ms)


def test_rollback_posts_reversals_pointing_at_the_reversed_entries() -> None:
    world = committed_world()
    originals = world.outcomes[0].entries
    world.apply(rollback(world, "rb_1"))
    outcome = world.outcomes[-1]
    assert outcome.committed and outcome.result_key == "rb_1"
    assert [e.reverses_entry_id for e in outcome.entries] == [e.entry_id for e in originals]
    assert {e.entry_type for e in outcome.entries} == {b.REVERSAL}
    assert world.states["alice"].balance_minor == 1_000_000 and world.states["bob"].balance_minor == 0
    assert world.headers["bat_1"].rolled_back_by == "rb_1"


def test_second_rollback_is_rejected_and_a_retry_sends_nothing() -> None:
    world = committed_world()
    world.apply(rollback(world, "rb_1"))
    assert rollback(world, "rb_1") == b.Step(None)
    again = rollback(world, "rb_2")
    assert again.outcome is not None and again.outcome.reason is Reason.ALREADY_ROLLED_BACK


def test_rollback_of_an_unknown_or_voided_batch_is_rejected() -> None:
    world = World()
    step = rollback(world, "rb_1")
    assert step.outcome is not None and step.outcome.reason is Reason.BATCH_NOT_COMMITTED


def test_reversal_that_would_overdraw_needs_force() -> None:
    world = committed_world()
    world.states["bob"] = replace(world.states["bob"], balance_minor=0)  # bob spent it elsewhere
    world.apply(rollback(world, "rb_1"))
    refused = world.outcomes[-1]
    assert not refused.committed and refused.reason is Reason.INSUFFICIENT_FUNDS
    comp = world.headers[b.compensation_batch_id("bat_1", "rb_1")]
    freed = b.after_compensation(world.headers["bat_1"], comp)
    assert freed is not None and freed.rolled_back_by is None
    world.headers["bat_1"] = freed
    world.apply(rollback(world, "rb_2", force=True))
    assert world.outcomes[-1].committed
    assert world.states["bob"].balance_minor == -500_000


# ------------------------------------------------------------------ hold invariants (property)

ACCOUNT = "acct"
operations = st.lists(st.tuples(
    st.sampled_from(["reserve", "post", "void", "timeout", "repeat_reserve"]),
    st.integers(min_value=0, max_value=5),  # hold number
    st.sampled_from([+1, -1]),
    st.integers(min_value=1, max_value=2_000),
    st.booleans(),  # allow_overdraft
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(start=st.integers(min_value=0, max_value=5_000), ops=operations)
def test_no_sequence_of_hold_operations_breaks_the_invariants(
    start: int, ops: list[tuple[str, int, int, int, bool]]
) -> None:
    state = AccountState(balance_minor=start)
    frontier = merkle.MerkleFrontier()
    holds: dict[int, b.Hold] = {}
    posted_entries: dict[int, list[str]] = {}
    expected_balance = start
    for op, number, sign, amount, overdraft in ops:
        hold = holds.get(number)
        if op in ("reserve", "repeat_reserve"):
            if op == "repeat_reserve" and hold is None:
                continue
            the_leg = hold.leg if hold is not None and hold.leg is not None else b.Leg(
                ACCOUNT, "USDC", 6, "debit" if sign < 0 else "credit", amount, sign,
                allow_overdraft=overdraft)
            reserved = b.reserve(state, hold, b.Reserve("bat", number, 6, the_leg, 0))
            assert isinstance(reserved, b.HoldStep)
            step = reserved
        elif op == "post":
            message = b.Settle("bat", number, ACCOUNT, "USDC", b.SettleAction.POST, 0)
            posted = b.post(state, frontier, hold, message, partition=0, now_ms=1)
            if hold is None or hold.status not in (b.HoldStatus.PENDING, b.HoldStatus.POSTED):
                assert isinstance(posted, b.BatchRejection)  # nothing changes
                continue
            assert isinstance(posted, b.HoldStep)
            step = posted
            if step.frontier is not None:
                frontier = step.frontier
            if step.changed and step.entry is not None:
                posted_entries.setdefault(number, []).append(step.entry.entry_id)
                sign_posted = 1 if step.hold.leg and step.hold.leg.sign > 0 else -1
                expected_balance += step.entry.amount_minor * sign_posted
        else:  # void, or the coordinator's timeout, which voids
            voided = b.void(state, hold, b.Settle("bat", number, ACCOUNT, "USDC",
                                                  b.SettleAction.VOID, 0))
            if hold is not None and hold.status is b.HoldStatus.POSTED:
                assert isinstance(voided, b.BatchRejection)  # nothing changes
                continue
            assert isinstance(voided, b.HoldStep)
            step = voided
        state = step.state
        holds[number] = step.hold
        pending = sum(h.leg.amount_minor for h in holds.values()
                      if h.status is b.HoldStatus.PENDING and h.leg is not None and h.leg.sign < 0)
        assert state.pending_debit_minor == pending >= 0
        assert state.available_minor <= state.balance_minor
        assert state.balance_minor == expected_balance
        assert all(len(ids) == 1 for ids in posted_entries.values())  # never posted twice
        assert state.sequence == sum(len(ids) for ids in posted_entries.values()) == frontier.tree_size


def test_resend_repeats_only_unanswered_messages_and_voids_until_confirmed() -> None:
    batch = parsed([leg("alice", "debit", "1"), leg("bob", "credit", "1")])
    step = b.submit(None, batch, coordinator_partition=2, now_ms=0)
    assert step.header is not None
    header, legs = step.header, dict(step.legs)
    counted = b.record_report(header, legs[0], b.LegReport("bat_1", 0, b.ReportKind.RESERVED))
    assert counted is not None
    header, legs[0] = counted
    again = b.resend(header, [legs[0], legs[1]], coordinator_partition=2)
    assert [r.leg_index for r in again.reserves] == [1] and not again.settles
    decided = b.decide(header, [legs[0], legs[1]], coordinator_partition=2, timed_out=True)
    assert decided.header is not None and not b.settled(decided.header)
    header = decided.header
    voids = b.resend(header, [legs[0], legs[1]], coordinator_partition=2)
    void = b.SettleAction.VOID
    assert [(s.leg_index, s.action) for s in voids.settles] == [(0, void), (1, void)]
    for index in (0, 1):
        counted = b.record_report(header, legs[index], b.LegReport("bat_1", index, b.ReportKind.VOIDED))
        assert counted is not None
        header, legs[index] = counted
        assert b.record_report(header, legs[index], b.LegReport("bat_1", index, b.ReportKind.VOIDED)) is None
    assert b.settled(header) and b.resend(header, [legs[0], legs[1]], coordinator_partition=2) == b.Step(None)
