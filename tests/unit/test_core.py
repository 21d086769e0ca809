"""Tests of streams.core: validation, decisions, idempotency, partitioning and the ledger invariants."""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given
from hypothesis import strategies as st

from sardis_ledger.schemas.codec import AvroCodec
from sardis_ledger.streams import canonical, merkle, records
from sardis_ledger.streams.core import (
    BALANCE_SIGN,
    ID_LENGTH_MAX,
    METADATA_ENTRIES_MAX,
    METADATA_KEY_LENGTH_MAX,
    METADATA_VALUE_LENGTH_MAX,
    REFERENCE_LENGTH_MAX,
    AccountState,
    CommandRecord,
    Decision,
    Entry,
    EntryType,
    LogHead,
    Outcome,
    PostEntry,
    Reason,
    Rejection,
    Status,
    account_key,
    decide_post_entry,
    entry_id_for,
    murmur2,
    parse_post_entry,
    partition_for,
    payload_digest,
    replay,
    seal,
    tree_head_due,
    verify_entry_hash,
)
from sardis_ledger.streams.errors import InvariantViolation
from sardis_ledger.streams.merkle import MerkleFrontier
from sardis_ledger.streams.money import AMOUNT_MINOR_MAX, BUILTIN_CURRENCIES, balance_minor_max, to_wire

BALANCE_MINOR_MAX = balance_minor_max(18)  # ETH

CURRENCIES = dict(BUILTIN_CURRENCIES)
CODEC = AvroCodec()
T0 = 1_700_000_000_000
EMPTY = MerkleFrontier()


def record(**changes: Any) -> dict[str, Any]:
    """A valid decoded PostEntry record, as the codec hands it over, with `changes` applied."""
    base: dict[str, Any] = {
        "command_id": "cmd-1",
        "account_id": "acct-1",
        "currency": "USD",
        "entry_type": "credit",
        "amount": Decimal("100.50"),
        "reference": None,
        "metadata": {},
        "expected_sequence": None,
        "allow_overdraft": False,
        "occurred_at": None,
        "chain": None,
        "chain_tx_hash": None,
        "chain_log_index": None,
    }
    base.update(changes)
    return base


def command(**changes: Any) -> PostEntry:
    base = PostEntry(command_id="cmd-1", account_id="acct-1", currency="USD", currency_decimals=2,
                     entry_type="credit", amount_minor=10050)
    if "currency" in changes and "currency_decimals" not in changes:
        changes["currency_decimals"] = CURRENCIES[changes["currency"]].decimals
    return dataclasses.replace(base, **changes)


def decide(state: AccountState, cmd: PostEntry, frontier: MerkleFrontier = EMPTY, *,
           partition: int = 0, now_ms: int = T0) -> Decision:
    return decide_post_entry(state, frontier, cmd, partition=partition, now_ms=now_ms)


# ================================================================== parse_post_entry: accepted


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, {"amount_minor": 10050}),
        ({"amount": Decimal("100.5")}, {"amount_minor": 10050}),
        ({"amount": Decimal("0.01")}, {"amount_minor": 1}),
        ({"amount": Decimal("1.500000000000000000")}, {"amount_minor": 150}),  # wire scale 18
        ({"currency": "ETH", "amount": Decimal("1.000000000000000001")},
         {"currency": "ETH", "amount_minor": 10**18 + 1}),
        ({"currency": "ETH", "amount": Decimal("0.000000000000000001")},
         {"currency": "ETH", "amount_minor": 1}),
        ({"currency": "ETH", "amount": to_wire(AMOUNT_MINOR_MAX, 18)},
         {"currency": "ETH", "amount_minor": 2**128}),  # the largest amount accepted
        ({"currency": "JPY", "amount": Decimal("1E+3")}, {"currency": "JPY", "amount_minor": 1000}),
        ({"currency": "USDC", "amount": Decimal("12.345678")},
         {"currency": "USDC", "amount_minor": 12345678}),
        ({"entry_type": "debit"}, {"entry_type": "debit"}),
        ({"entry_type": "fee"}, {"entry_type": "fee"}),
        ({"entry_type": "refund"}, {"entry_type": "refund"}),
        ({"entry_type": "adjustment"}, {"entry_type": "adjustment"}),
        ({"entry_type": EntryType.DEBIT}, {"entry_type": "debit"}),
        ({"command_id": "c" * ID_LENGTH_MAX}, {"command_id": "c" * ID_LENGTH_MAX}),
        ({"command_id": "ключ-é"}, {"command_id": "ключ-é"}),
        ({"account_id": "a" * ID_LENGTH_MAX}, {"account_id": "a" * ID_LENGTH_MAX}),
        ({"command_id": "a|b"}, {"command_id": "a|b"}),  # only account ids form table keys
        ({"reference": "r" * REFERENCE_LENGTH_MAX}, {"reference": "r" * REFERENCE_LENGTH_MAX}),
        ({"reference": ""}, {"reference": ""}),
        ({"metadata": None}, {"metadata": {}}),
        ({"metadata": {"k": "v", "a": ""}}, {"metadata": {"k": "v", "a": ""}}),
        ({"metadata": {f"k{n}": "v" for n in range(METADATA_ENTRIES_MAX)}},
         {"metadata": {f"k{n}": "v" for n in range(METADATA_ENTRIES_MAX)}}),
        ({"metadata": {"k" * METADATA_KEY_LENGTH_MAX: "v" * METADATA_VALUE_LENGTH_MAX}},
         {"metadata": {"k" * METADATA_KEY_LENGTH_MAX: "v" * METADATA_VALUE_LENGTH_MAX}}),
        # 8 pairs of 2 + 510 bytes = 4096 bytes: exactly at the limit
        ({"metadata": {f"k{n}": "v" * 510 for n in range(8)}},
         {"metadata": {f"k{n}": "v" * 510 for n in range(8)}}),
        ({"expected_sequence": 0}, {"expected_sequence": 0}),
        ({"expected_sequence": 7}, {"expected_sequence": 7}),
        ({"allow_overdraft": True}, {"allow_overdraft": True}),
        ({"occurred_at": 1234}, {"occurred_at_ms": 1234}),
        ({"occurred_at": -1}, {"occurred_at_ms": -1}),
        ({"occurred_at": datetime(2024, 1, 1, tzinfo=UTC)}, {"occurred_at_ms": 1_704_067_200_000}),
        # float timestamps would round these up a millisecond; integer timedelta floors exactly
        ({"occurred_at": datetime(2024, 1, 1, 0, 0, 0, 999_999, tzinfo=UTC)},
         {"occurred_at_ms": 1_704_067_200_999}),
        ({"occurred_at": datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)},
         {"occurred_at_ms": 253_402_300_799_999}),
        ({"occurred_at": datetime(2024, 1, 1, 1, 0, 0, 500, tzinfo=timezone(timedelta(hours=1)))},
         {"occurred_at_ms": 1_704_067_200_000}),
        ({"occurred_at": datetime(1969, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC)}, {"occurred_at_ms": -1}),
        ({"chain": "base", "chain_tx_hash": "0x" + "ab" * 32, "chain_log_index": 0},
         {"chain": "base", "chain_tx_hash": "0x" + "ab" * 32, "chain_log_index": 0}),
        ({"chain": "c" * 128}, {"chain": "c" * 128}),
    ],
)
def test_parse_accepts(changes: dict[str, Any], expected: dict[str, Any]) -> None:
    parsed = parse_post_entry(record(**changes), CURRENCIES)
    assert parsed == command(**expected)
    assert isinstance(parsed, PostEntry)
    assert type(parsed.amount_minor) is int
    assert type(parsed.entry_type) is str


def test_parse_defaults_allow_overdraft_to_false() -> None:
    raw = record()
    del raw["allow_overdraft"]
    parsed = parse_post_entry(raw, CURRENCIES)
    assert isinstance(parsed, PostEntry) and parsed.allow_overdraft is False


def test_parse_copies_metadata() -> None:
    metadata = {"k": "v"}
    parsed = parse_post_entry(record(metadata=metadata), CURRENCIES)
    metadata["k"] = "changed"
    assert isinstance(parsed, PostEntry) and parsed.metadata == {"k": "v"}


def test_parse_of_an_avro_decoded_command() -> None:
    wire = record(currency="ETH", amount=to_wire(10**18 + 1, 18), occurred_at=T0, metadata={"b": "1"})
    name, decoded = CODEC.decode(CODEC.encode("PostEntry", wire))
    assert name == "PostEntry"
    parsed = parse_post_entry(decoded, CURRENCIES)
    assert parsed == command(currency="ETH", amount_minor=10**18 + 1, occurred_at_ms=T0, metadata={"b": "1"})


# ================================================================== parse_post_entry: rejected

NO_COMMAND_ID = object()  # marker: delete the key instead of setting it


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        # command_id: Rejection.command_id is None, there is no id to answer to
        ({"command_id": NO_COMMAND_ID}, Reason.INVALID_FIELD),
        ({"command_id": None}, Reason.INVALID_FIELD),
        ({"command_id": ""}, Reason.INVALID_FIELD),
        ({"command_id": "c" * (ID_LENGTH_MAX + 1)}, Reason.INVALID_FIELD),
        ({"command_id": "cmd\n1"}, Reason.INVALID_FIELD),
        ({"command_id": 17}, Reason.INVALID_FIELD),
    ],
)
def test_parse_rejects_bad_command_id_without_an_id(changes: dict[str, Any], reason: Reason) -> None:
    raw = record(**changes)
    if raw["command_id"] is NO_COMMAND_ID:
        del raw["command_id"]
    rejection = parse_post_entry(raw, CURRENCIES)
    assert isinstance(rejection, Rejection)
    assert rejection.reason is reason
    assert rejection.command_id is None
    assert "command_id" in rejection.detail


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"account_id": "acct|1"}, Reason.INVALID_FIELD),
        ({"account_id": "|"}, Reason.INVALID_FIELD),
        ({"account_id": ""}, Reason.INVALID_FIELD),
        ({"account_id": None}, Reason.INVALID_FIELD),
        ({"account_id": "a" * (ID_LENGTH_MAX + 1)}, Reason.INVALID_FIELD),
        ({"account_id": "acct\x00"}, Reason.INVALID_FIELD),
        ({"currency": "XYZ"}, Reason.UNKNOWN_CURRENCY),
        ({"currency": "usd"}, Reason.UNKNOWN_CURRENCY),
        ({"currency": ""}, Reason.UNKNOWN_CURRENCY),
        ({"currency": None}, Reason.UNKNOWN_CURRENCY),
        ({"entry_type": "transfer"}, Reason.INVALID_ENTRY_TYPE),
        ({"entry_type": "CREDIT"}, Reason.INVALID_ENTRY_TYPE),
        ({"entry_type": ""}, Reason.INVALID_ENTRY_TYPE),
        ({"entry_type": None}, Reason.INVALID_ENTRY_TYPE),
        ({"amount": Decimal("0")}, Reason.INVALID_AMOUNT),
        ({"amount": Decimal("0.00")}, Reason.INVALID_AMOUNT),
        ({"amount": Decimal("-0")}, Reason.INVALID_AMOUNT),
        ({"amount": Decimal("-0.01")}, Reason.INVALID_AMOUNT),
        ({"amount": Decimal("-100")}, Reason.INVALID_AMOUNT),
        ({"amount": Decimal("1.001")}, Reason.INVALID_AMOUNT),  # 3 decimals for USD
        ({"amount": Decimal("100.500000000000000001")}, Reason.INVALID_AMOUNT),
        ({"currency": "JPY", "amount": Decimal("1.5")}, Reason.INVALID_AMOUNT),
        ({"currency": "ETH", "amount": Decimal("0.0000000000000000001")}, Reason.INVALID_AMOUNT),
        ({"currency": "ETH", "amount": to_wire(AMOUNT_MINOR_MAX + 1, 18)}, Reason.INVALID_AMOUNT),
        ({"amount": to_wire(AMOUNT_MINOR_MAX + 1, 2)}, Reason.INVALID_AMOUNT),
        ({"amount": Decimal("NaN")}, Reason.INVALID_AMOUNT),
        ({"amount": Decimal("Infinity")}, Reason.INVALID_AMOUNT),
        ({"amount": 100}, Reason.INVALID_AMOUNT),  # not a Decimal
        ({"amount": "100.50"}, Reason.INVALID_AMOUNT),
        ({"amount": None}, Reason.INVALID_AMOUNT),
        ({"reference": "r" * (REFERENCE_LENGTH_MAX + 1)}, Reason.INVALID_FIELD),
        ({"reference": 5}, Reason.INVALID_FIELD),
        ({"metadata": {f"k{n}": "v" for n in range(METADATA_ENTRIES_MAX + 1)}}, Reason.METADATA_TOO_LARGE),
        ({"metadata": {"k" * (METADATA_KEY_LENGTH_MAX + 1): "v"}}, Reason.METADATA_TOO_LARGE),
        ({"metadata": {"k": "v" * (METADATA_VALUE_LENGTH_MAX + 1)}}, Reason.METADATA_TOO_LARGE),
        # 4097 bytes in 9 pairs, each key and value within its own limit
        ({"metadata": {**{f"k{n}": "v" * 510 for n in range(8)}, "x": ""}}, Reason.METADATA_TOO_LARGE),
        # 4 x (2 + 1024) bytes: 512 characters each, but 2 UTF-8 bytes per character
        ({"metadata": {f"k{n}": "é" * 512 for n in range(4)}}, Reason.METADATA_TOO_LARGE),
        ({"metadata": {"k": 1}}, Reason.METADATA_TOO_LARGE),
        ({"metadata": {"k": None}}, Reason.METADATA_TOO_LARGE),
        ({"metadata": {1: "v"}}, Reason.METADATA_TOO_LARGE),
        ({"metadata": ["k", "v"]}, Reason.METADATA_TOO_LARGE),
        ({"expected_sequence": -1}, Reason.INVALID_FIELD),
        ({"expected_sequence": "1"}, Reason.INVALID_FIELD),
        ({"chain": "c" * 129}, Reason.INVALID_FIELD),
        ({"chain_tx_hash": "0x" + "a" * 127}, Reason.INVALID_FIELD),
        ({"chain": 1}, Reason.INVALID_FIELD),
        ({"chain_log_index": -1}, Reason.INVALID_FIELD),
        ({"chain_log_index": "0"}, Reason.INVALID_FIELD),
        ({"occurred_at": datetime(2024, 1, 1)}, Reason.INVALID_FIELD),  # naive
        ({"occurred_at": 1.5}, Reason.INVALID_FIELD),
        ({"occurred_at": "2024-01-01T00:00:00Z"}, Reason.INVALID_FIELD),
        ({"occurred_at": True}, Reason.INVALID_FIELD),
    ],
)
def test_parse_rejects(changes: dict[str, Any], reason: Reason) -> None:
    rejection = parse_post_entry(record(**changes), CURRENCIES)
    assert isinstance(rejection, Rejection)
    assert rejection.reason is reason
    assert rejection.command_id == "cmd-1"
    assert rejection.detail


def test_parse_checks_fields_in_order() -> None:
    # Several problems: the first field in declaration order is the one reported.
    rejection = parse_post_entry(record(account_id="a|b", currency="XYZ", amount=Decimal("-1")), CURRENCIES)
    assert isinstance(rejection, Rejection) and rejection.reason is Reason.INVALID_FIELD
    rejection = parse_post_entry(record(currency="XYZ", amount=Decimal("-1")), CURRENCIES)
    assert isinstance(rejection, Rejection) and rejection.reason is Reason.UNKNOWN_CURRENCY


def test_parse_uses_the_given_currency_table() -> None:
    table = {**CURRENCIES, "XAU": dataclasses.replace(CURRENCIES["USD"], code="XAU", decimals=4)}
    parsed = parse_post_entry(record(currency="XAU", amount=Decimal("1.2345")), table)
    assert parsed == command(currency="XAU", currency_decimals=4, amount_minor=12345)
    rejection = parse_post_entry(record(currency="XAU", amount=Decimal("1.2345")), CURRENCIES)
    assert isinstance(rejection, Rejection) and rejection.reason is Reason.UNKNOWN_CURRENCY


# ================================================================== payload_digest and replay


PAYLOAD_CHANGES: dict[str, Any] = {
    "command_id": "cmd-2",
    "account_id": "acct-2",
    "currency": "EUR",
    "entry_type": "debit",
    "amount_minor": 10051,
    "reference": "",
    "metadata": {"k": "v"},
    "expected_sequence": 0,
    "allow_overdraft": True,
    "occurred_at_ms": 0,
    "chain": "",
    "chain_tx_hash": "",
    "chain_log_index": 0,
}


def test_every_command_field_has_a_digest_case() -> None:
    # currency_decimals is derived from currency by the currency table, not sent by the user.
    derived = {"currency_decimals"}
    assert set(PAYLOAD_CHANGES) == {f.name for f in dataclasses.fields(PostEntry)} - derived


@pytest.mark.parametrize("field_name", list(PAYLOAD_CHANGES))
def test_payload_digest_covers_every_field(field_name: str) -> None:
    base = command()
    changed = dataclasses.replace(base, **{field_name: PAYLOAD_CHANGES[field_name]})
    assert payload_digest(changed) != payload_digest(base)


def test_payload_digest_is_deterministic_and_ignores_metadata_order() -> None:
    one = command(metadata={"a": "1", "b": "2"})
    two = command(metadata={"b": "2", "a": "1"})
    assert payload_digest(one) == payload_digest(two)
    assert len(payload_digest(one)) == 32
    assert payload_digest(command(reference=None)) != payload_digest(command(reference="null"))
    assert payload_digest(command(reference="None")) != payload_digest(command(reference=None))


def test_replay_of_the_same_payload_is_the_very_same_outcome() -> None:
    cmd = command()
    decision = decide(AccountState(), cmd)
    assert decision.record.payload_digest == payload_digest(cmd)
    assert decision.record.outcome is decision.outcome
    assert replay(decision.record, payload_digest(cmd)) is decision.outcome


def test_replay_of_a_rejection_is_the_same_rejection() -> None:
    cmd = command(entry_type="debit")
    decision = decide(AccountState(), cmd)
    assert decision.outcome.reason is Reason.INSUFFICIENT_FUNDS
    assert replay(decision.record, payload_digest(cmd)) is decision.outcome


def test_replay_of_another_payload_is_an_idempotency_conflict() -> None:
    cmd = command()
    decision = decide(AccountState(), cmd)
    outcome = replay(decision.record, payload_digest(command(amount_minor=10051)))
    assert outcome.status is Status.REJECTED
    assert outcome.reason is Reason.IDEMPOTENCY_CONFLICT
    assert outcome.command_id == "cmd-1"
    assert outcome.entry is None
    assert outcome.detail


# ================================================================== decide_post_entry


@dataclass(frozen=True)
class Step:
    entry_type: str
    amount_minor: int
    reason: Reason | None  # None: committed
    balance_after: int
    options: dict[str, Any] = field(default_factory=dict)


DECISION_SCENARIOS: dict[str, list[Step]] = {
    "credit_then_debit": [Step("credit", 100, None, 100), Step("debit", 30, None, 70)],
    "debit_without_funds": [Step("debit", 1, Reason.INSUFFICIENT_FUNDS, 0)],
    "fee_without_funds": [Step("fee", 1, Reason.INSUFFICIENT_FUNDS, 0)],
    "debit_of_the_whole_balance": [Step("credit", 5, None, 5), Step("debit", 5, None, 0)],
    "debit_one_over": [Step("credit", 5, None, 5), Step("debit", 6, Reason.INSUFFICIENT_FUNDS, 5),
                       Step("debit", 5, None, 0)],
    "fee_one_over": [Step("refund", 5, None, 5), Step("fee", 6, Reason.INSUFFICIENT_FUNDS, 5)],
    "credits_of_every_kind": [Step("credit", 1, None, 1), Step("refund", 2, None, 3),
                              Step("adjustment", 4, None, 7)],
    "overdraft": [Step("debit", 10, None, -10, {"allow_overdraft": True}),
                  Step("fee", 5, None, -15, {"allow_overdraft": True}),
                  Step("debit", 1, Reason.INSUFFICIENT_FUNDS, -15),
                  Step("credit", 20, None, 5)],
    "expected_sequence_matches": [Step("credit", 10, None, 10, {"expected_sequence": 0}),
                                  Step("debit", 3, None, 7, {"expected_sequence": 1})],
    "expected_sequence_ahead": [Step("credit", 10, Reason.SEQUENCE_CONFLICT, 0, {"expected_sequence": 1})],
    "expected_sequence_stale": [Step("credit", 10, None, 10),
                                Step("credit", 10, Reason.SEQUENCE_CONFLICT, 10, {"expected_sequence": 0}),
                                Step("credit", 10, None, 20, {"expected_sequence": 1})],
    "sequence_conflict_before_funds": [
        Step("debit", 10, Reason.SEQUENCE_CONFLICT, 0, {"expected_sequence": 3})],
    "huge_wei_amounts": [Step("credit", 2**128, None, 2**128), Step("debit", 2**128 - 1, None, 1),
                         Step("fee", 2, Reason.INSUFFICIENT_FUNDS, 1)],
}


@pytest.mark.parametrize("steps", DECISION_SCENARIOS.values(), ids=list(DECISION_SCENARIOS))
def test_decide_scenarios(steps: list[Step]) -> None:
    state, frontier = AccountState(), EMPTY
    for number, step in enumerate(steps):
        cmd = command(command_id=f"cmd-{number}", entry_type=step.entry_type,
                      amount_minor=step.amount_minor, **step.options)
        decision = decide(state, cmd, frontier, now_ms=T0 + number)
        outcome = decision.outcome
        assert outcome.command_id == cmd.command_id
        assert decision.record == CommandRecord(payload_digest(cmd), outcome)
        if step.reason is None:
            assert outcome.status is Status.COMMITTED and outcome.reason is None
            assert outcome.entry is not None
            assert outcome.entry.running_balance_minor == step.balance_after
            assert outcome.entry.amount_minor == step.amount_minor
            assert decision.state.sequence == state.sequence + 1 == outcome.entry.sequence
            assert decision.frontier.tree_size == frontier.tree_size + 1
        else:
            assert outcome.status is Status.REJECTED and outcome.reason is step.reason
            assert outcome.entry is None and outcome.detail
            assert decision.state is state  # state unchanged
            assert decision.frontier is frontier  # nothing appended to the log
        assert decision.state.balance_minor == step.balance_after
        state, frontier = decision.state, decision.frontier


@pytest.mark.parametrize(
    ("pending", "amount", "reason"),
    [
        (60, 40, None),  # available 100 - 60 = 40: exactly enough
        (60, 41, Reason.INSUFFICIENT_FUNDS),
        (100, 1, Reason.INSUFFICIENT_FUNDS),
        (0, 100, None),
    ],
)
def test_pending_debits_reduce_what_is_available(pending: int, amount: int, reason: Reason | None) -> None:
    state = AccountState(balance_minor=100, pending_debit_minor=pending, sequence=1)
    assert state.available_minor == 100 - pending
    decision = decide(state, command(entry_type="debit", amount_minor=amount))
    assert decision.outcome.reason is reason
    if reason is None:
        assert decision.state.balance_minor == 100 - amount
        assert decision.state.pending_debit_minor == pending  # holds are not the core's to release
    else:
        assert decision.state is state


def test_pending_debits_do_not_block_overdraft_or_credits() -> None:
    state = AccountState(balance_minor=100, pending_debit_minor=100, sequence=1)
    overdraft = command(entry_type="debit", amount_minor=50, allow_overdraft=True)
    assert decide(state, overdraft).state.balance_minor == 50
    assert decide(state, command(entry_type="credit", amount_minor=1)).state.balance_minor == 101


@pytest.mark.parametrize(
    ("last_committed_at_ms", "now_ms", "expected"),
    [
        (0, T0, T0),
        (T0, T0 + 1, T0 + 1),
        (T0, T0, T0),
        (T0, T0 - 5000, T0),  # the clock went back: per-account time does not
        (T0, 0, T0),
    ],
)
def test_committed_at_never_goes_backwards(last_committed_at_ms: int, now_ms: int, expected: int) -> None:
    state = AccountState(balance_minor=0, sequence=3, last_committed_at_ms=last_committed_at_ms)
    decision = decide(state, command(), now_ms=now_ms)
    assert decision.outcome.entry is not None
    assert decision.outcome.entry.committed_at_ms == expected
    assert decision.state.last_committed_at_ms == expected


def test_rejection_does_not_touch_the_clock() -> None:
    state = AccountState(last_committed_at_ms=T0)
    decision = decide(state, command(entry_type="debit"), now_ms=T0 + 10)
    assert decision.state.last_committed_at_ms == T0


def test_entry_carries_the_command() -> None:
    cmd = command(reference="inv-1", metadata={"k": "v"}, occurred_at_ms=T0 - 1, chain="base",
                  chain_tx_hash="0xab", chain_log_index=3, expected_sequence=4, allow_overdraft=True)
    state = AccountState(balance_minor=7, sequence=4, last_committed_at_ms=T0 - 10)
    entry = decide(state, cmd, partition=5).outcome.entry
    assert entry is not None
    assert (entry.command_id, entry.account_id, entry.currency, entry.entry_type, entry.amount_minor) == (
        "cmd-1", "acct-1", "USD", "credit", 10050)
    assert (entry.reference, entry.metadata, entry.occurred_at_ms) == ("inv-1", {"k": "v"}, T0 - 1)
    assert (entry.chain, entry.chain_tx_hash, entry.chain_log_index) == ("base", "0xab", 3)
    assert (entry.sequence, entry.running_balance_minor, entry.partition) == (5, 10057, 5)
    assert (entry.batch_id, entry.batch_size, entry.leg_index, entry.reverses_entry_id) == (None,) * 4


def test_entry_id_is_deterministic() -> None:
    one = decide(AccountState(), command()).outcome.entry
    two = decide(AccountState(balance_minor=5, sequence=9, last_committed_at_ms=T0 + 9), command(),
                 merkle_frontier_of(3), partition=1, now_ms=T0 + 100).outcome.entry
    assert one is not None and two is not None
    assert one.entry_id == two.entry_id == entry_id_for("cmd-1")
    assert re.fullmatch(r"ent_[0-9a-f]{32}", one.entry_id)
    assert entry_id_for("cmd-1") != entry_id_for("cmd-2")
    assert entry_id_for("cmd-1", 0) != entry_id_for("cmd-1", 1)
    assert entry_id_for("cmd-1") == entry_id_for("cmd-1", 0)


def merkle_frontier_of(size: int) -> MerkleFrontier:
    frontier = EMPTY
    for n in range(size):
        frontier = frontier.append(merkle.leaf_hash(b"other %d" % n))
    return frontier


def test_entries_extend_the_partition_log() -> None:
    frontier = merkle_frontier_of(3)
    leaves = [merkle.leaf_hash(b"other %d" % n) for n in range(3)]
    states: dict[str, AccountState] = defaultdict(AccountState)
    for number, account in enumerate(["a", "b", "a", "c", "b", "a"]):
        cmd = command(command_id=f"cmd-{number}", account_id=account, amount_minor=number + 1)
        decision = decide(states[account], cmd, frontier, partition=2, now_ms=T0 + number)
        entry = decision.outcome.entry
        assert entry is not None
        assert entry.leaf_index == frontier.tree_size == len(leaves)
        leaves.append(merkle.leaf_hash(canonical.entry_bytes(entry)))
        assert entry.merkle_root == merkle.root_from_leaf_hashes(leaves) == decision.frontier.root()
        assert entry.entry_hash == canonical.entry_hash(canonical.entry_bytes(entry))
        assert verify_entry_hash(entry)
        frontier, states[account] = decision.frontier, decision.state
    assert frontier.tree_size == 9
    assert {key: s.sequence for key, s in states.items()} == {"a": 3, "b": 2, "c": 1}


ENTRY_FIELD_CHANGES: dict[str, Any] = {
    "entry_id": entry_id_for("other"),
    "command_id": "cmd-2",
    "account_id": "acct-2",
    "currency": "EUR",
    "entry_type": "refund",
    "amount_minor": 1,
    "running_balance_minor": -1,
    "sequence": 2,
    "committed_at_ms": T0 + 1,
    "partition": 1,
    "leaf_index": 1,
    "batch_id": "b",
    "batch_size": 1,
    "leg_index": 0,
    "reverses_entry_id": entry_id_for("cmd-0"),
    "reference": "r",
    "metadata": {"k": "v"},
    "occurred_at_ms": T0,
    "chain": "base",
    "chain_tx_hash": "0x",
    "chain_log_index": 0,
    "entry_hash": b"\x00" * 32,
}


@pytest.mark.parametrize("field_name", list(ENTRY_FIELD_CHANGES))
def test_verify_entry_hash_detects_a_changed_field(field_name: str) -> None:
    entry = decide(AccountState(), command()).outcome.entry
    assert entry is not None and verify_entry_hash(entry)
    tampered = dataclasses.replace(entry, **{field_name: ENTRY_FIELD_CHANGES[field_name]})
    assert not verify_entry_hash(tampered)


def test_every_entry_field_but_the_root_is_covered_by_the_hash() -> None:
    assert set(ENTRY_FIELD_CHANGES) | {"merkle_root"} == {f.name for f in dataclasses.fields(Entry)}
    entry = decide(AccountState(), command()).outcome.entry
    assert entry is not None
    # The root is computed after the hash; the inclusion proof, not entry_hash, vouches for it.
    assert verify_entry_hash(dataclasses.replace(entry, merkle_root=b"\x00" * 32))


def test_seal_refuses_a_leaf_index_off_the_log() -> None:
    entry = decide(AccountState(), command()).outcome.entry
    assert entry is not None
    with pytest.raises(InvariantViolation):
        seal(dataclasses.replace(entry, leaf_index=1), EMPTY)
    with pytest.raises(InvariantViolation):
        seal(entry, merkle_frontier_of(1))


# ------------------------------------------------------------------ balance range


@pytest.mark.parametrize(
    ("balance", "entry_type", "amount", "overdraft", "reason"),
    [
        (BALANCE_MINOR_MAX - 1, "credit", 1, False, None),
        (BALANCE_MINOR_MAX - 1, "credit", 2, False, Reason.BALANCE_OVERFLOW),
        (BALANCE_MINOR_MAX, "adjustment", 1, False, Reason.BALANCE_OVERFLOW),
        (-BALANCE_MINOR_MAX + 1, "debit", 1, True, None),
        (-BALANCE_MINOR_MAX, "fee", 1, True, Reason.BALANCE_OVERFLOW),
    ],
)
def test_balance_overflow(balance: int, entry_type: str, amount: int, overdraft: bool,
                          reason: Reason | None) -> None:
    state = AccountState(balance_minor=balance, sequence=1)
    cmd = command(currency="ETH", entry_type=entry_type, amount_minor=amount, allow_overdraft=overdraft)
    decision = decide(state, cmd)
    assert decision.outcome.reason is reason
    if reason is None:
        entry = decision.outcome.entry
        assert entry is not None
        # At 18 decimals the bound fits the wire decimal (|major| < 10**42).
        CODEC.encode("Entry", records.entry_to_wire(entry, CURRENCIES["ETH"]))
    else:
        assert decision.state is state


@pytest.mark.parametrize("currency", ["USD", "JPY", "USDC"])
def test_committed_balance_always_fits_the_wire(currency: str) -> None:
    decimals = CURRENCIES[currency].decimals
    largest_on_wire = 10 ** (42 + decimals) - 1  # |major| < 10**42 at scale 18
    state = AccountState(balance_minor=largest_on_wire, sequence=1, last_committed_at_ms=T0)
    cmd = command(currency=currency, amount_minor=1)
    decision = decide(state, cmd)
    if decision.outcome.entry is None:
        assert decision.outcome.reason is Reason.BALANCE_OVERFLOW
        assert decision.state is state
        return
    # Whatever the core commits, the worker must be able to publish.
    CODEC.encode("Entry", records.entry_to_wire(decision.outcome.entry, CURRENCIES[currency]))
    CODEC.encode("Balance", records.balance_to_wire("acct-1", CURRENCIES[currency], decision.state))


# ================================================================== murmur2 and partition_for

# Known answers of org.apache.kafka.common.utils.Utils.murmur2 (Kafka's UtilsTest.testMurmur2).
MURMUR2_KNOWN = [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107),
]


@pytest.mark.parametrize(("data", "expected"), MURMUR2_KNOWN)
def test_murmur2_known_answers(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected


@given(data=st.binary(max_size=64))
def test_murmur2_matches_aiokafka(data: bytes) -> None:
    ours = murmur2(data)
    assert -(2**31) <= ours < 2**31
    assert ours & 0xFFFFFFFF == aiokafka_murmur2(data)


@pytest.mark.parametrize(("data", "expected"), MURMUR2_KNOWN)
@pytest.mark.parametrize("partitions", [1, 3, 12])
def test_partition_for_is_kafkas_default_partitioner(data: bytes, expected: int, partitions: int) -> None:
    # Java: Utils.toPositive(Utils.murmur2(keyBytes)) % numPartitions
    assert partition_for(data.decode(), partitions) == (expected & 0x7FFFFFFF) % partitions


@given(account_id=st.text(min_size=1, max_size=40), partitions=st.integers(1, 1000))
def test_partition_for_is_in_range_and_stable(account_id: str, partitions: int) -> None:
    partition = partition_for(account_id, partitions)
    assert 0 <= partition < partitions
    assert partition_for(account_id, partitions) == partition
    assert partition == (aiokafka_murmur2(account_id.encode("utf-8")) & 0x7FFFFFFF) % partitions


# ================================================================== tree_head_due


def frontier_of_size(size: int) -> MerkleFrontier:
    return MerkleFrontier(size, tuple(bytes([n]) * 32 for n in range(size.bit_count())))


@pytest.mark.parametrize(
    ("tree_size", "head_size", "published_at", "now", "options", "due"),
    [
        (0, 0, 0, T0, {}, False),  # nothing logged at all
        (1, 0, 0, T0, {}, True),  # first entry, never published
        (5, 5, T0, T0 + 10**9, {}, False),  # nothing new, however long ago
        (5, 4, T0, T0 + 999, {}, False),
        (5, 4, T0, T0 + 1000, {}, True),  # time
        (5, 4, T0, T0 - 10, {}, False),  # the clock went back
        (999, 0, T0, T0, {}, False),
        (1000, 0, T0, T0, {}, True),  # entries
        (1001, 1, T0, T0, {}, True),
        (3, 1, T0, T0, {"every_entries": 2}, True),
        (2, 1, T0, T0, {"every_entries": 2}, False),
        (2, 1, T0, T0 + 10, {"every_ms": 10}, True),
        (2, 1, T0, T0 + 9, {"every_ms": 10}, False),
        (2, 3, 0, T0, {}, False),  # head ahead of the log (after a reset): nothing new
    ],
)
def test_tree_head_due(tree_size: int, head_size: int, published_at: int, now: int,
                       options: dict[str, int], due: bool) -> None:
    log = LogHead(frontier_of_size(tree_size), head_size, published_at)
    assert tree_head_due(log, now, **options) is due


# ================================================================== the core as a whole: invariants

ACCOUNT_POOL = ["alice", "bob", "carol", "dave", "erin", "frank", "ünïcode", "x"]
PROPERTY_CURRENCIES = ["USD", "ETH"]  # 2 and 18 decimals
ENTRY_TYPES = [t.value for t in EntryType]
DUPLICATE_KINDS = ["same", "amount", "type", "overdraft", "reference"]


@dataclass(frozen=True)
class Spec:
    """The random choices behind one command; turned into a command against the ledger's state."""

    duplicate: bool  # reuse an earlier command_id (if there is one)
    duplicate_kind: str  # same payload, or which field differs
    pick: int  # which earlier command (modulo) / which account (modulo) / which other entry type
    currency: str
    entry_type: str
    amount_minor: int
    expected_sequence: str  # "none", "right" or "wrong"
    wrong_by: int
    allow_overdraft: bool
    reference: str | None
    metadata: dict[str, str]
    occurred_at_ms: int | None
    clock_step_ms: int  # sometimes negative: the clock goes back


SPECS = st.builds(
    Spec,
    duplicate=st.integers(0, 9).map(lambda n: n == 0),
    duplicate_kind=st.sampled_from(DUPLICATE_KINDS),
    pick=st.integers(0, 10**6),
    currency=st.sampled_from(PROPERTY_CURRENCIES),
    entry_type=st.sampled_from(ENTRY_TYPES),
    amount_minor=st.one_of(st.integers(1, 1000), st.integers(1, 10**6), st.integers(1, 10**20)),
    expected_sequence=st.sampled_from(["none", "none", "none", "right", "wrong"]),
    wrong_by=st.sampled_from([1, 2, -1]),
    allow_overdraft=st.sampled_from([False, False, False, True]),
    reference=st.none() | st.sampled_from(["inv-1", "inv-2"]),
    metadata=st.dictionaries(st.sampled_from("abc"), st.sampled_from(["1", "2"]), max_size=2),
    occurred_at_ms=st.none() | st.integers(0, T0),
    clock_step_ms=st.integers(-20, 50),
)
STREAMS = st.tuples(
    st.lists(st.sampled_from(ACCOUNT_POOL), min_size=2, max_size=5, unique=True),
    st.integers(1, 4),  # partitions
    st.lists(SPECS, min_size=1, max_size=50),
)
Stream = tuple[list[str], int, list[Spec]]


@dataclass
class Ledger:
    """A pure stand-in for LedgerWorker._decide: the same three tables, without Kafka.

    through_bytes=True keeps the tables as the worker does, as records.*_to_bytes values.
    """

    partitions: int
    through_bytes: bool = False
    accounts: dict[str, Any] = field(default_factory=dict)
    commands: dict[str, Any] = field(default_factory=dict)
    logs: dict[int, Any] = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)

    def _state(self, key: str) -> AccountState:
        value = self.accounts.get(key)
        if self.through_bytes:
            return records.state_from_bytes(value)
        return AccountState() if value is None else value

    def _log(self, partition: int) -> LogHead:
        value = self.logs.get(partition)
        if self.through_bytes:
            return records.log_from_bytes(value)
        return LogHead() if value is None else value

    def state(self, key: str) -> AccountState:
        return self._state(key)

    def frontier(self, partition: int) -> MerkleFrontier:
        return self._log(partition).frontier

    def submit(self, cmd: PostEntry, now_ms: int) -> Outcome:
        partition = partition_for(cmd.account_id, self.partitions)
        seen = self.commands.get(cmd.command_id)
        if seen is not None:
            seen_record = records.record_from_bytes(seen) if self.through_bytes else seen
            outcome = replay(seen_record, payload_digest(cmd))
            if not self.through_bytes and payload_digest(cmd) == seen_record.payload_digest:
                assert outcome is seen_record.outcome
        else:
            state = self._state(cmd.account_key)
            log = self._log(partition)
            decision = decide_post_entry(state, log.frontier, cmd, partition=partition, now_ms=now_ms)
            self.commands[cmd.command_id] = (records.record_to_bytes(decision.record)
                                             if self.through_bytes else decision.record)
            outcome = decision.outcome
            if outcome.entry is not None:
                log = dataclasses.replace(log, frontier=decision.frontier)
                if tree_head_due(log, now_ms):
                    log = dataclasses.replace(log, head_tree_size=log.frontier.tree_size,
                                              head_published_at_ms=now_ms)
                if self.through_bytes:
                    self.accounts[cmd.account_key] = records.state_to_bytes(decision.state)
                    self.logs[partition] = records.log_to_bytes(log)
                else:
                    self.accounts[cmd.account_key] = decision.state
                    self.logs[partition] = log
                self.entries.append(outcome.entry)
            else:
                assert decision.state is state and decision.frontier is log.frontier
        self.outcomes.append(outcome)
        return outcome


@dataclass
class Model:
    """The independent expectation: balances and sequences from first principles."""

    balance: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    sequence: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    first: dict[str, tuple[PostEntry, Outcome]] = field(default_factory=dict)


def make_command(spec: Spec, model: Model, accounts: list[str], number: int) -> PostEntry:
    """A fresh command, or now and then one whose command_id was used before."""
    if spec.duplicate and model.first:
        earlier, _ = model.first[sorted(model.first)[spec.pick % len(model.first)]]
        if spec.duplicate_kind == "same":
            return earlier
        if spec.duplicate_kind == "amount":
            return dataclasses.replace(earlier, amount_minor=earlier.amount_minor + 1)
        if spec.duplicate_kind == "type":
            others = [t for t in ENTRY_TYPES if t != earlier.entry_type]
            return dataclasses.replace(earlier, entry_type=others[spec.pick % len(others)])
        if spec.duplicate_kind == "overdraft":
            return dataclasses.replace(earlier, allow_overdraft=not earlier.allow_overdraft)
        return dataclasses.replace(earlier, reference=(earlier.reference or "") + "!")
    account = accounts[spec.pick % len(accounts)]
    key = account_key(account, spec.currency)
    expected_sequence = None
    if spec.expected_sequence == "right":
        expected_sequence = model.sequence[key]
    elif spec.expected_sequence == "wrong":
        expected_sequence = model.sequence[key] + spec.wrong_by
        if expected_sequence < 0:
            expected_sequence = 1
    raw = {
        "command_id": f"cmd-{number}",
        "account_id": account,
        "currency": spec.currency,
        "entry_type": spec.entry_type,
        # as the codec decodes it: major units at scale 18
        "amount": to_wire(spec.amount_minor, CURRENCIES[spec.currency].decimals),
        "reference": spec.reference,
        "metadata": spec.metadata,
        "expected_sequence": expected_sequence,
        "allow_overdraft": spec.allow_overdraft,
        "occurred_at": spec.occurred_at_ms,
    }
    parsed = parse_post_entry(raw, CURRENCIES)
    assert isinstance(parsed, PostEntry)
    assert parsed.amount_minor == spec.amount_minor
    assert parsed.expected_sequence == expected_sequence
    return parsed


def expect(model: Model, cmd: PostEntry) -> tuple[Status, Reason | None]:
    key = cmd.account_key
    if cmd.expected_sequence is not None and cmd.expected_sequence != model.sequence[key]:
        return Status.REJECTED, Reason.SEQUENCE_CONFLICT
    if BALANCE_SIGN[cmd.entry_type] < 0 and not cmd.allow_overdraft \
            and model.balance[key] < cmd.amount_minor:
        return Status.REJECTED, Reason.INSUFFICIENT_FUNDS
    return Status.COMMITTED, None


def run_stream(stream: Stream) -> tuple[Ledger, list[tuple[PostEntry, int]]]:
    """Submit the stream's commands one by one, checking each outcome against the model."""
    accounts, partitions, specs = stream
    ledger = Ledger(partitions=partitions)
    model = Model()
    submitted: list[tuple[PostEntry, int]] = []
    now_ms = T0
    for number, spec in enumerate(specs):
        now_ms += spec.clock_step_ms
        cmd = make_command(spec, model, accounts, number)
        entries_before = len(ledger.entries)
        outcome = ledger.submit(cmd, now_ms)
        submitted.append((cmd, now_ms))
        assert outcome.command_id == cmd.command_id
        if cmd.command_id in model.first:
            # (6) a command id decides once: a true duplicate gets the first answer, anything else
            # a conflict, and neither adds an entry.
            earlier, first_outcome = model.first[cmd.command_id]
            if payload_digest(cmd) == payload_digest(earlier):
                assert outcome == first_outcome
            else:
                assert cmd != earlier
                assert outcome.status is Status.REJECTED
                assert outcome.reason is Reason.IDEMPOTENCY_CONFLICT and outcome.entry is None
            assert len(ledger.entries) == entries_before
            continue
        status, reason = expect(model, cmd)
        assert (outcome.status, outcome.reason) == (status, reason)
        model.first[cmd.command_id] = (cmd, outcome)
        key = cmd.account_key
        if status is Status.COMMITTED:
            assert outcome.entry is not None and len(ledger.entries) == entries_before + 1
            model.balance[key] += BALANCE_SIGN[cmd.entry_type] * cmd.amount_minor
            model.sequence[key] += 1
            assert outcome.entry.running_balance_minor == model.balance[key]
            assert outcome.entry.sequence == model.sequence[key]
        else:
            assert outcome.entry is None and len(ledger.entries) == entries_before
        assert ledger.state(key).balance_minor == model.balance[key]
        assert ledger.state(key).sequence == model.sequence[key]
    return ledger, submitted


def check_invariants(ledger: Ledger, stream: list[tuple[PostEntry, int]]) -> None:
    commands = {cmd.command_id: cmd for cmd, _ in reversed(stream)}  # the first use of each id
    by_account: dict[tuple[str, str], list[Entry]] = defaultdict(list)
    by_partition: dict[int, list[Entry]] = defaultdict(list)
    for entry in ledger.entries:
        by_account[entry.account_id, entry.currency].append(entry)
        by_partition[entry.partition].append(entry)

    # (6) one entry per command id, with its deterministic id
    assert len({e.command_id for e in ledger.entries}) == len(ledger.entries)
    assert all(e.entry_id == entry_id_for(e.command_id) for e in ledger.entries)
    committed = {o.command_id for o in ledger.outcomes if o.status is Status.COMMITTED}
    assert committed == {e.command_id for e in ledger.entries}

    assert set(ledger.accounts) == {account_key(a, c) for a, c in by_account}
    for (account, currency), entries in by_account.items():
        # (2) sequences 1..n without gaps
        assert [e.sequence for e in entries] == list(range(1, len(entries) + 1))
        total = 0
        overdraft_used = False
        last_ms = 0
        for entry in entries:
            cmd = commands[entry.command_id]
            assert (entry.account_id, entry.currency, entry.entry_type, entry.amount_minor) == (
                cmd.account_id, cmd.currency, cmd.entry_type, cmd.amount_minor)
            sign = BALANCE_SIGN[entry.entry_type]
            total += sign * entry.amount_minor
            # (4) running balance is the prefix sum
            assert entry.running_balance_minor == total
            # (3) below zero only after a committed debit/fee that allowed it
            overdraft_used = overdraft_used or (sign < 0 and cmd.allow_overdraft)
            if total < 0:
                assert overdraft_used
            assert entry.committed_at_ms >= last_ms  # per-account time never goes back
            last_ms = entry.committed_at_ms
        # (1) the balance is the signed sum of the committed entries
        state = ledger.state(account_key(account, currency))
        assert state.balance_minor == total
        assert total == sum(BALANCE_SIGN[e.entry_type] * e.amount_minor for e in entries)
        assert state.sequence == len(entries)
        assert state.last_committed_at_ms == last_ms
        assert state.pending_debit_minor == 0

    # (7) each partition's Merkle log holds exactly its entries, in commit order
    assert set(ledger.logs) == set(by_partition)
    for partition, entries in by_partition.items():
        assert all(partition_for(e.account_id, ledger.partitions) == partition for e in entries)
        assert [e.leaf_index for e in entries] == list(range(len(entries)))
        leaves = [merkle.leaf_hash(canonical.entry_bytes(e)) for e in entries]
        size = len(leaves)
        root = merkle.root_from_leaf_hashes(leaves)
        frontier = ledger.frontier(partition)
        assert (frontier.tree_size, frontier.root()) == (size, root)
        assert entries[-1].merkle_root == root
        for entry in entries:
            assert verify_entry_hash(entry)
            index = entry.leaf_index
            assert entry.merkle_root == merkle.root_from_leaf_hashes(leaves[: index + 1])
            proof = merkle.inclusion_proof(leaves, index, size)
            assert merkle.verify_inclusion(leaves[index], index, size, proof, root)
            consistency = merkle.consistency_proof(leaves, index + 1, size)
            assert merkle.verify_consistency(index + 1, size, entry.merkle_root, root, consistency)


@given(stream=STREAMS)
def test_random_command_streams_keep_the_ledger_invariants(stream: Stream) -> None:
    ledger, submitted = run_stream(stream)
    check_invariants(ledger, submitted)


@given(stream=STREAMS)
def test_replaying_a_command_stream_is_deterministic(stream: Stream) -> None:
    ledger, submitted = run_stream(stream)
    # (5) the same commands from scratch give the same entries, hashes and roots, whether the
    # tables hold dataclasses or the worker's table bytes.
    for through_bytes in (False, True):
        again = Ledger(partitions=ledger.partitions, through_bytes=through_bytes)
        for cmd, now_ms in submitted:
            again.submit(cmd, now_ms)
        assert again.entries == ledger.entries
        assert [(e.entry_id, e.entry_hash, e.merkle_root) for e in again.entries] == [
            (e.entry_id, e.entry_hash, e.merkle_root) for e in ledger.entries]
        assert again.outcomes == ledger.outcomes
        for partition in ledger.logs:
            assert again.frontier(partition) == ledger.frontier(partition)
        for key in ledger.accounts:
            assert again.state(key) == ledger.state(key)
        check_invariants(again, submitted)


@given(stream=STREAMS)
def test_every_committed_entry_and_result_survive_the_wire(stream: Stream) -> None:
    ledger, _ = run_stream(stream)
    for outcome in ledger.outcomes:
        _, decoded = CODEC.decode(CODEC.encode("Result", records.outcome_to_wire(outcome, CURRENCIES)))
        if outcome.entry is None:
            assert decoded["entry"] is None
        else:
            assert records.entry_from_wire(decoded["entry"], CURRENCIES) == outcome.entry
