"""Internal records (reserve, settle, leg report, ticks) are validated like client commands."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest

from sardis_ledger.streams import batches as b
from sardis_ledger.streams import core, merkle, records
from sardis_ledger.streams.core import AccountState, Reason
from sardis_ledger.streams.money import currency_table
from sardis_ledger.streams.topics import INPUT_RECORDS, LedgerTopic, misplaced_reason

CURRENCIES = currency_table()
PARTITIONS = 12
BATCH = "bat_1"
COORDINATOR = b.coordinator_partition(BATCH, PARTITIONS)


def reserve(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "batch_id": BATCH, "leg_index": 0, "batch_size": 2, "coordinator_partition": COORDINATOR,
        "account_id": "alice", "currency": "USD", "entry_type": "debit",
        "amount": Decimal("5.00"), "sign": -1, "reference": None, "metadata": {},
        "allow_overdraft": False, "reverses_entry_id": None}
    record.update(overrides)
    return record


def settle(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"batch_id": BATCH, "leg_index": 0, "account_id": "alice",
                              "currency": "USD", "action": "post",
                              "coordinator_partition": COORDINATOR}
    record.update(overrides)
    return record


def test_a_valid_reserve_parses_into_its_leg() -> None:
    parsed = b.parse_reserve(reserve(), CURRENCIES, PARTITIONS)
    assert parsed == b.Reserve(BATCH, 0, 2, b.Leg("alice", "USD", 2, "debit", 500, -1), COORDINATOR)


REVERSED = core.entry_id_for("c")


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"amount": Decimal("0")}, Reason.INVALID_AMOUNT),
    ({"amount": Decimal("-500"), "sign": -1}, Reason.INVALID_AMOUNT),
    ({"amount": Decimal("0.001")}, Reason.INVALID_AMOUNT),  # USD has 2 decimals
    ({"currency": "X" * 524_400}, Reason.UNKNOWN_CURRENCY),
    ({"currency": "XXX"}, Reason.UNKNOWN_CURRENCY),
    ({"account_id": "a\x00b"}, Reason.INVALID_FIELD),
    ({"account_id": "a" * 10_000}, Reason.INVALID_FIELD),
    ({"account_id": "a|b"}, Reason.INVALID_FIELD),
    ({"metadata": {"k": "v" * 600}}, Reason.METADATA_TOO_LARGE),
    ({"sign": 7}, Reason.INVALID_FIELD),
    ({"sign": 1}, Reason.INVALID_FIELD),  # a debit takes money out
    ({"entry_type": "mint"}, Reason.INVALID_ENTRY_TYPE),
    ({"leg_index": 2**40}, Reason.INVALID_FIELD),
    ({"leg_index": 2, "batch_size": 2}, Reason.INVALID_FIELD),
    ({"leg_index": -1}, Reason.INVALID_FIELD),
    ({"batch_size": b.BATCH_LEGS_MAX + 1}, Reason.INVALID_FIELD),
    ({"batch_id": ""}, Reason.INVALID_FIELD),
    ({"batch_id": "x" * 129}, Reason.INVALID_FIELD),
    ({"coordinator_partition": (COORDINATOR + 1) % PARTITIONS}, Reason.WRONG_PARTITION),
    ({"reverses_entry_id": REVERSED}, Reason.INVALID_FIELD),  # only reversals reverse
    ({"entry_type": b.REVERSAL, "reverses_entry_id": None}, Reason.INVALID_FIELD),
    ({"entry_type": b.REVERSAL, "reverses_entry_id": "ent_not_hex"}, Reason.INVALID_FIELD),
])
def test_a_reserve_is_validated_exactly_as_a_post_entry(overrides: dict[str, Any],
                                                         reason: Reason) -> None:
    parsed = b.parse_reserve(reserve(**overrides), CURRENCIES, PARTITIONS)
    assert isinstance(parsed, b.BatchRejection), parsed
    assert parsed.reason is reason
    assert len(parsed.detail) <= core.DETAIL_LENGTH_MAX


def test_a_reversal_leg_may_move_money_either_way() -> None:
    for sign in (1, -1):
        parsed = b.parse_reserve(reserve(entry_type=b.REVERSAL, sign=sign,
                                         reverses_entry_id=REVERSED), CURRENCIES, PARTITIONS)
        assert isinstance(parsed, b.Reserve) and parsed.leg.sign == sign


def test_a_compensation_is_coordinated_where_its_batch_was() -> None:
    comp = b.compensation_batch_id(BATCH, "rb_1")
    assert b.coordinator_partition(comp, PARTITIONS) == COORDINATOR
    parsed = b.parse_reserve(reserve(batch_id=comp, entry_type=b.REVERSAL, sign=1,
                                     reverses_entry_id=REVERSED), CURRENCIES, PARTITIONS)
    assert isinstance(parsed, b.Reserve)
    assert b.valid_batch_id(b.compensation_batch_id(comp, "rb_2"))
    assert not b.valid_batch_id(b.compensation_batch_id(b.compensation_batch_id(comp, "x"), "y"))


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"action": "mint"}, Reason.INVALID_FIELD),
    ({"currency": "XXX"}, Reason.UNKNOWN_CURRENCY),
    ({"account_id": ""}, Reason.INVALID_FIELD),
    ({"leg_index": b.BATCH_LEGS_MAX}, Reason.INVALID_FIELD),
    ({"coordinator_partition": -1}, Reason.WRONG_PARTITION),
])
def test_invalid_settles_are_rejected(overrides: dict[str, Any], reason: Reason) -> None:
    parsed = b.parse_settle(settle(**overrides), CURRENCIES, PARTITIONS)
    assert isinstance(parsed, b.BatchRejection) and parsed.reason is reason


def _held(account: str = "alice", amount_minor: int = 500, sign: int = -1) -> b.HoldStep:
    message = b.Reserve(BATCH, 0, 2, b.Leg(account, "USD", 2, "debit" if sign < 0 else "credit",
                                           amount_minor, sign), COORDINATOR)
    step = b.reserve(AccountState(balance_minor=10_000), None, message)
    assert isinstance(step, b.HoldStep)
    return step


def _settle(action: str, account: str = "alice") -> b.Settle:
    parsed = b.parse_settle(settle(action=action, account_id=account), CURRENCIES, PARTITIONS)
    assert isinstance(parsed, b.Settle)
    return parsed


def test_a_forged_reserve_and_post_without_a_genuine_hold_books_nothing() -> None:
    """The minting attack: a post needs a pending hold of the same leg; without one, nothing."""
    posted = b.post(AccountState(), merkle.MerkleFrontier(), None, _settle("post"),
                    partition=0, now_ms=1)
    assert isinstance(posted, b.BatchRejection) and posted.reason is Reason.SETTLE_MISMATCH


def test_a_settle_naming_another_account_than_its_hold_is_rejected() -> None:
    """Moving a hold: alice's hold, a settle naming mallory: no state of either changes."""
    held = _held("alice")
    for action in ("post", "void"):
        step = (b.post(AccountState(), merkle.MerkleFrontier(), held.hold,
                       _settle(action, "mallory"), partition=0, now_ms=1)
                if action == "post" else b.void(AccountState(), held.hold,
                                                 _settle(action, "mallory")))
        assert isinstance(step, b.BatchRejection) and step.reason is Reason.SETTLE_MISMATCH


def test_a_reserve_of_another_leg_under_a_held_key_is_rejected() -> None:
    held = _held("alice", 500)
    other = b.Reserve(BATCH, 0, 2, b.Leg("alice", "USD", 2, "debit", 900, -1), COORDINATOR)
    step = b.reserve(held.state, held.hold, other)
    assert isinstance(step, b.BatchRejection) and step.reason is Reason.RESERVE_MISMATCH
    assert held.hold.leg is not None
    same = b.reserve(held.state, held.hold, b.Reserve(BATCH, 0, 2, held.hold.leg, COORDINATOR))
    assert isinstance(same, b.HoldStep) and not same.changed


def test_a_void_of_a_posted_hold_is_rejected() -> None:
    held = _held()
    posted = b.post(held.state, merkle.MerkleFrontier(), held.hold, _settle("post"), partition=0,
                    now_ms=1)
    assert isinstance(posted, b.HoldStep)
    voided = b.void(posted.state, posted.hold, _settle("void"))
    assert isinstance(voided, b.BatchRejection) and voided.reason is Reason.SETTLE_MISMATCH


# ------------------------------------------------------------------ leg reports


def _header_and_leg() -> tuple[b.BatchHeader, b.LegRecord, core.Entry]:
    held = _held()
    posted = b.post(held.state, merkle.MerkleFrontier(), held.hold, _settle("post"), partition=3,
                    now_ms=1)
    assert isinstance(posted, b.HoldStep) and posted.entry is not None and held.hold.leg
    header = b.BatchHeader(BATCH, b"d" * 32, 2, b.BatchStatus.POSTING, 10)
    return header, b.LegRecord(held.hold.leg, vote=b.HoldStatus.PENDING), posted.entry


def test_a_posted_report_must_carry_the_legs_sealed_entry() -> None:
    header, leg, entry = _header_and_leg()
    report = b.LegReport(BATCH, 0, b.ReportKind.POSTED, entry=entry)
    assert b.check_report(header, leg, report) is None
    for forged in (replace(entry, amount_minor=1_000_000), replace(entry, account_id="mallory"),
                   replace(entry, entry_id=core.entry_id_for("x")),
                   replace(entry, running_balance_minor=10**9)):  # the hash no longer matches
        mismatch = b.check_report(header, leg, replace(report, entry=forged))
        assert mismatch is not None and mismatch.reason is Reason.REPORT_MISMATCH


def test_a_report_for_an_unknown_batch_or_leg_is_rejected_not_a_crash() -> None:
    header, _, _ = _header_and_leg()
    report = b.LegReport("nobody", 0, b.ReportKind.RESERVED)
    unknown = b.check_report(None, None, report)
    assert unknown is not None and unknown.reason is Reason.UNKNOWN_BATCH
    beyond = b.check_report(header, None, replace(report, batch_id=BATCH, leg_index=5))
    assert beyond is not None and beyond.reason is Reason.UNKNOWN_BATCH


@pytest.mark.parametrize(("record", "entry"), [
    ({"kind": "minted"}, None),
    ({"kind": "refused", "reason": None}, None),
    ({"kind": "refused", "reason": "made_up"}, None),
    ({"kind": "reserved", "reason": "insufficient_funds"}, None),
    ({"kind": "posted"}, None),
    ({"leg_index": 2**31 - 1}, None),
    ({"batch_id": "\n"}, None),
])
def test_invalid_reports_are_rejected(record: dict[str, Any], entry: core.Entry | None) -> None:
    base = {"batch_id": BATCH, "leg_index": 0, "kind": "reserved", "reason": None,
            "detail": None}
    assert isinstance(b.parse_report({**base, **record}, entry, PARTITIONS), b.BatchRejection)


def test_an_entry_from_the_wire_is_checked_before_use() -> None:
    _, _, entry = _header_and_leg()
    wire = records.entry_to_wire(entry, CURRENCIES["USD"])
    assert records.parse_entry(wire, CURRENCIES) == entry
    for name, value in [("entry_hash", "zz"), ("currency", "XXX"), ("amount", Decimal("0")),
                        ("amount", Decimal("0.001")), ("sequence", 0), ("leaf_index", -1),
                        ("entry_id", ""), ("batch_size", None), ("metadata", {"k" * 99: ""}),
                        ("reverses_entry_id", "\n"), ("committed_at", "yesterday")]:
        assert isinstance(records.parse_entry({**wire, name: value}, CURRENCIES), str), name


def test_ticks_must_be_for_the_partition_they_are_read_on() -> None:
    assert b.parse_tick({"partition": 3, "now": 5}, 3) == 5
    for record in ({"partition": 4, "now": 5}, {"partition": 3, "now": -1},
                   {"partition": 3, "now": None}):
        assert isinstance(b.parse_tick(record, 3), b.BatchRejection)


# ------------------------------------------------------------------ topics


@pytest.mark.parametrize(("topic", "name", "reason"), [
    (LedgerTopic.COMMANDS, "PostEntry", None),
    (LedgerTopic.COMMANDS, "ReserveLeg", Reason.NOT_A_CLIENT_COMMAND),
    (LedgerTopic.COMMANDS, "SettleLeg", Reason.NOT_A_CLIENT_COMMAND),
    (LedgerTopic.COMMANDS, "SubmitBatch", Reason.NOT_A_CLIENT_COMMAND),
    (LedgerTopic.BATCHES, "LegReport", Reason.NOT_A_CLIENT_COMMAND),
    (LedgerTopic.BATCHES, "BatchTick", Reason.NOT_A_CLIENT_COMMAND),
    (LedgerTopic.BATCHES, "SubmitBatch", None),
    (LedgerTopic.INTERNAL_COMMANDS, "ReserveLeg", None),
    (LedgerTopic.INTERNAL_COMMANDS, "LegReport", Reason.UNKNOWN_COMMAND),
    (LedgerTopic.CHAIN_TRANSFERS, "Entry", Reason.UNKNOWN_COMMAND),
])
def test_each_topic_takes_only_its_record_types(topic: LedgerTopic, name: str,
                                                reason: Reason | None) -> None:
    assert misplaced_reason(topic, name) is reason


def test_client_topics_take_client_commands_only_and_internal_topics_are_prefixed() -> None:
    assert INPUT_RECORDS[LedgerTopic.COMMANDS] | INPUT_RECORDS[LedgerTopic.BATCHES] == {
        "PostEntry", "SubmitBatch", "RollbackBatch"}
    for topic in (LedgerTopic.INTERNAL_COMMANDS, LedgerTopic.INTERNAL_COORDINATOR,
                  LedgerTopic.CHAIN_CLAIMS, LedgerTopic.QUARANTINE):
        assert topic.value.startswith("ledger.internal.")
