"""Tests of streams.canonical (the hashed byte layout) and streams.records (wire and table values)."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sardis_ledger.schemas.codec import MESSAGE_SIZE_MAX_BYTES, AvroCodec
from sardis_ledger.streams import canonical, core, merkle, records
from sardis_ledger.streams.core import (
    AccountState,
    CommandRecord,
    Entry,
    LogHead,
    Outcome,
    Reason,
    Status,
    entry_id_for,
    seal,
    verify_entry_hash,
)
from sardis_ledger.streams.errors import InvariantViolation
from sardis_ledger.streams.money import BUILTIN_CURRENCIES, Currency, to_major

CODEC = AvroCodec()
CURRENCIES = dict(BUILTIN_CURRENCIES)
USD = CURRENCIES["USD"]
ETH = CURRENCIES["ETH"]


def make_entry(**changes: Any) -> Entry:
    base = Entry(
        entry_id=entry_id_for("cmd-1"),
        command_id="cmd-1",
        account_id="acct-1",
        currency="USD",
        entry_type="credit",
        amount_minor=10050,
        running_balance_minor=10050,
        sequence=1,
        committed_at_ms=1_700_000_000_123,
        partition=3,
        leaf_index=0,
        entry_hash=bytes(range(32)),
        merkle_root=bytes(range(32, 64)),
    )
    return dataclasses.replace(base, **changes)


FULL_OPTIONALS: dict[str, Any] = {
    "batch_id": "batch-9",
    "batch_size": 2,
    "leg_index": 1,
    "reverses_entry_id": entry_id_for("cmd-0"),
    "reference": "invoice 42 \u2013 é",
    "metadata": {"b": "2", "a": "1", "ключ": "значение"},
    "occurred_at_ms": 1_699_999_999_999,
    "chain": "base",
    "chain_tx_hash": "0x" + "ab" * 32,
    "chain_log_index": 7,
}


# ------------------------------------------------------------------ canonical: pinned layout


def test_entry_bytes_start_with_magic() -> None:
    assert canonical.MAGIC == b"SLE\x01"
    assert canonical.entry_bytes(make_entry()).startswith(b"SLE\x01")
    assert canonical.entry_bytes(make_entry(**FULL_OPTIONALS)).startswith(b"SLE\x01")


def test_entry_bytes_known_answer() -> None:
    """One small entry, encoded by hand from the layout in streams/canonical.py's docstring."""
    entry = Entry(
        entry_id="e",
        command_id="c",
        account_id="a",
        currency="USD",
        entry_type="debit",
        amount_minor=300,
        running_balance_minor=-5,
        sequence=1,
        committed_at_ms=1_700_000_000_000,
        partition=0,
        leaf_index=256,
        entry_hash=b"\xff" * 32,  # not part of the canonical bytes
        merkle_root=b"\xee" * 32,  # not part of the canonical bytes
        reference="r",
        metadata={"b": "2", "a": "1"},
        occurred_at_ms=0,
        chain_tx_hash="0x",
        chain_log_index=7,
    )
    expected = b"".join([
        b"SLE\x01",  # magic
        b"\x00\x00\x00\x01" b"e",  # entry_id: u32 length, UTF-8
        b"\x00\x00\x00\x01" b"c",  # command_id
        b"\x00\x00\x00\x01" b"a",  # account_id
        b"\x00\x00\x00\x03" b"USD",  # currency
        b"\x00\x00\x00\x05" b"debit",  # entry_type
        b"\x00" b"\x00\x02" b"\x01\x2c",  # amount_minor 300: sign 0, u16 length 2, 0x012c
        b"\x01" b"\x00\x01" b"\x05",  # running_balance_minor -5: sign 1, length 1, 0x05
        b"\x00" b"\x00\x01" b"\x01",  # sequence 1
        b"\x00",  # batch_id absent
        b"\x00",  # batch_size absent
        b"\x00",  # leg_index absent
        b"\x00",  # reverses_entry_id absent
        b"\x01" b"\x00\x00\x00\x01" b"r",  # reference present "r"
        b"\x00\x00\x00\x02",  # metadata: 2 pairs, sorted by key bytes
        b"\x00\x00\x00\x01" b"a" b"\x00\x00\x00\x01" b"1",
        b"\x00\x00\x00\x01" b"b" b"\x00\x00\x00\x01" b"2",
        b"\x01" b"\x00" b"\x00\x00",  # occurred_at_ms present, 0: sign 0, length 0, no bytes
        b"\x00" b"\x00\x06" b"\x01\x8b\xcf\xe5\x68\x00",  # committed_at_ms 1700000000000
        b"\x00" b"\x00\x00",  # partition 0
        b"\x00" b"\x00\x02" b"\x01\x00",  # leaf_index 256
        b"\x00",  # chain absent
        b"\x01" b"\x00\x00\x00\x02" b"0x",  # chain_tx_hash present "0x"
        b"\x01" b"\x00" b"\x00\x01" b"\x07",  # chain_log_index present 7
    ])
    data = canonical.entry_bytes(entry)
    assert data == expected
    assert canonical.entry_hash(data) == hashlib.sha256(expected).digest()
    assert merkle.leaf_hash(data) == hashlib.sha256(b"\x00" + expected).digest()


def test_utf8_lengths_are_byte_lengths() -> None:
    data = canonical.entry_bytes(make_entry(account_id="é€😀"))
    encoded = "é€😀".encode()
    assert len(encoded) == 9
    assert struct.pack(">I", 9) + encoded in data


# ------------------------------------------------------------------ canonical: a reference decoder


class _Reader:
    """Reads the canonical layout back, written from the module docstring alone."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def read_take(self, count: int) -> bytes:
        chunk = self.data[self.pos : self.pos + count]
        assert len(chunk) == count, "truncated"
        self.pos += count
        return chunk

    def read_u8(self) -> int:
        return self.read_take(1)[0]

    def read_str(self) -> str:
        (length,) = struct.unpack(">I", self.read_take(4))
        return self.read_take(length).decode("utf-8")

    def read_int(self) -> int:
        sign = self.read_u8()
        assert sign in (0, 1)
        (length,) = struct.unpack(">H", self.read_take(2))
        magnitude_bytes = self.read_take(length)
        assert not magnitude_bytes.startswith(b"\x00"), "magnitude must be minimal"
        magnitude = int.from_bytes(magnitude_bytes, "big")
        assert not (sign == 1 and magnitude == 0), "zero is never negative"
        return -magnitude if sign else magnitude

    def read_opt_str(self) -> str | None:
        flag = self.read_u8()
        assert flag in (0, 1)
        return self.read_str() if flag else None

    def read_opt_int(self) -> int | None:
        flag = self.read_u8()
        assert flag in (0, 1)
        return self.read_int() if flag else None

    def read_map(self) -> dict[str, str]:
        (count,) = struct.unpack(">I", self.read_take(4))
        pairs = [(self.read_str(), self.read_str()) for _ in range(count)]
        keys = [key.encode() for key, _ in pairs]
        assert keys == sorted(keys), "pairs sorted by key bytes"
        return dict(pairs)


# The docstring's field list, in order, with each field's type.
LAYOUT = [
    ("entry_id", "str"), ("command_id", "str"), ("account_id", "str"), ("currency", "str"),
    ("entry_type", "str"), ("amount_minor", "int"), ("running_balance_minor", "int"), ("sequence", "int"),
    ("batch_id", "opt_str"), ("batch_size", "opt_int"), ("leg_index", "opt_int"),
    ("reverses_entry_id", "opt_str"), ("reference", "opt_str"), ("metadata", "map"),
    ("occurred_at_ms", "opt_int"), ("committed_at_ms", "int"), ("partition", "int"), ("leaf_index", "int"),
    ("chain", "opt_str"), ("chain_tx_hash", "opt_str"), ("chain_log_index", "opt_int"),
]


def decode_canonical(data: bytes) -> dict[str, Any]:
    reader = _Reader(data)
    assert reader.read_take(4) == canonical.MAGIC
    fields = {name: getattr(reader, f"read_{kind}")() for name, kind in LAYOUT}
    assert reader.pos == len(data), "trailing bytes"
    return fields


HASHED_FIELDS = [f.name for f in dataclasses.fields(Entry) if f.name not in ("entry_hash", "merkle_root")]


def hashed_fields(entry: Entry) -> dict[str, Any]:
    values = {name: getattr(entry, name) for name in HASHED_FIELDS}
    values["metadata"] = dict(values["metadata"])
    return values


def test_decoder_covers_every_hashed_field_in_order() -> None:
    entry = make_entry(**FULL_OPTIONALS)
    decoded = decode_canonical(canonical.entry_bytes(entry))
    assert set(decoded) == set(HASHED_FIELDS)
    assert decoded == hashed_fields(entry)


TEXT = st.text(max_size=12)
BIG_INT = st.one_of(st.integers(-(2**16), 2**16), st.integers(-(2**200), 2**200))


@st.composite
def entries(draw: st.DrawFn) -> Entry:
    return Entry(
        entry_id=draw(TEXT), command_id=draw(TEXT), account_id=draw(TEXT), currency=draw(TEXT),
        entry_type=draw(TEXT), amount_minor=draw(BIG_INT), running_balance_minor=draw(BIG_INT),
        sequence=draw(BIG_INT), committed_at_ms=draw(BIG_INT), partition=draw(BIG_INT),
        leaf_index=draw(BIG_INT),
        entry_hash=draw(st.binary(min_size=32, max_size=32)),
        merkle_root=draw(st.binary(min_size=32, max_size=32)),
        batch_id=draw(st.none() | TEXT), batch_size=draw(st.none() | BIG_INT),
        leg_index=draw(st.none() | BIG_INT), reverses_entry_id=draw(st.none() | TEXT),
        reference=draw(st.none() | TEXT), metadata=draw(st.dictionaries(TEXT, TEXT, max_size=4)),
        occurred_at_ms=draw(st.none() | BIG_INT), chain=draw(st.none() | TEXT),
        chain_tx_hash=draw(st.none() | TEXT), chain_log_index=draw(st.none() | BIG_INT),
    )


@given(entry=entries())
def test_canonical_bytes_decode_back_to_the_entry(entry: Entry) -> None:
    # A lossless decoder exists, so the encoding is injective: distinct entries, distinct bytes.
    assert decode_canonical(canonical.entry_bytes(entry)) == hashed_fields(entry)


@given(entry=entries(), other=entries(), field_name=st.sampled_from(HASHED_FIELDS))
def test_any_single_field_change_changes_the_bytes(entry: Entry, other: Entry, field_name: str) -> None:
    changed = dataclasses.replace(entry, **{field_name: getattr(other, field_name)})
    same_bytes = canonical.entry_bytes(changed) == canonical.entry_bytes(entry)
    assert same_bytes == (hashed_fields(changed) == hashed_fields(entry))


# ------------------------------------------------------------------ canonical: sensitivity


CHANGED_VALUE: dict[str, Any] = {
    "entry_id": entry_id_for("cmd-2"),
    "command_id": "cmd-2",
    "account_id": "acct-2",
    "currency": "EUR",
    "entry_type": "debit",
    "amount_minor": 10051,
    "running_balance_minor": -10050,
    "sequence": 2,
    "committed_at_ms": 1_700_000_000_124,
    "partition": 4,
    "leaf_index": 1,
    "batch_id": "b",
    "batch_size": 0,
    "leg_index": 0,
    "reverses_entry_id": "",
    "reference": "",
    "metadata": {"": ""},
    "occurred_at_ms": 0,
    "chain": "",
    "chain_tx_hash": "",
    "chain_log_index": 0,
}


def test_every_hashed_field_has_a_sensitivity_case() -> None:
    assert set(CHANGED_VALUE) == set(HASHED_FIELDS)


@pytest.mark.parametrize("field_name", HASHED_FIELDS)
def test_changing_any_field_changes_the_bytes(field_name: str) -> None:
    entry = make_entry()
    changed = dataclasses.replace(entry, **{field_name: CHANGED_VALUE[field_name]})
    assert getattr(changed, field_name) != getattr(entry, field_name)
    assert canonical.entry_bytes(changed) != canonical.entry_bytes(entry)
    assert canonical.entry_hash(canonical.entry_bytes(changed)) != canonical.entry_hash(
        canonical.entry_bytes(entry))


@pytest.mark.parametrize("field_name", ["entry_hash", "merkle_root"])
def test_hash_and_root_are_not_hashed(field_name: str) -> None:
    entry = make_entry()
    change: dict[str, Any] = {field_name: b"\x00" * 32}
    changed = dataclasses.replace(entry, **change)
    assert canonical.entry_bytes(changed) == canonical.entry_bytes(entry)


@pytest.mark.parametrize(
    "field_name",
    ["batch_id", "batch_size", "leg_index", "reverses_entry_id", "reference", "occurred_at_ms",
     "chain", "chain_tx_hash", "chain_log_index"],
)
def test_absent_differs_from_empty_or_zero(field_name: str) -> None:
    # "" and 0 are the values closest to absence; they must still hash differently from None.
    empty: Any = 0 if field_name in ("batch_size", "leg_index", "occurred_at_ms", "chain_log_index") else ""
    absent = make_entry(**{field_name: None})
    present = make_entry(**{field_name: empty})
    assert canonical.entry_bytes(absent) != canonical.entry_bytes(present)


def test_metadata_order_does_not_matter() -> None:
    one = make_entry(metadata={"a": "1", "b": "2", "é": "3", "Z": "4"})
    two = make_entry(metadata={"é": "3", "Z": "4", "b": "2", "a": "1"})
    assert list(one.metadata) != list(two.metadata)
    assert canonical.entry_bytes(one) == canonical.entry_bytes(two)


@pytest.mark.parametrize(
    ("one", "two"),
    [
        ({"account_id": "ab", "currency": "c"}, {"account_id": "a", "currency": "bc"}),
        ({"metadata": {"a": "bc"}}, {"metadata": {"ab": "c"}}),
        ({"metadata": {"a": ""}}, {"metadata": {}}),
        ({"amount_minor": 1}, {"amount_minor": -1}),
        ({"running_balance_minor": 0}, {"running_balance_minor": 256}),
        ({"reference": "x", "chain": None}, {"reference": None, "chain": "x"}),
    ],
)
def test_boundaries_between_fields_are_unambiguous(one: dict[str, Any], two: dict[str, Any]) -> None:
    assert canonical.entry_bytes(make_entry(**one)) != canonical.entry_bytes(make_entry(**two))


def test_integer_magnitude_limit() -> None:
    largest = (1 << (8 * canonical.INT_MAGNITUDE_BYTES_MAX)) - 1  # 65535 magnitude bytes
    data = canonical.entry_bytes(make_entry(running_balance_minor=-largest))
    assert decode_canonical(data)["running_balance_minor"] == -largest
    with pytest.raises(InvariantViolation):
        canonical.entry_bytes(make_entry(running_balance_minor=largest + 1))


# ------------------------------------------------------------------ records: Avro wire


def sealed(**changes: Any) -> Entry:
    """An entry hashed into a one-leaf log, as the core would produce it."""
    entry, _ = seal(make_entry(**changes), merkle.MerkleFrontier())
    return entry


WIRE_ENTRIES = {
    "usd": sealed(),
    "usd_all_optionals": sealed(**FULL_OPTIONALS),
    "usd_negative_balance": sealed(entry_type="debit", amount_minor=1, running_balance_minor=-12345),
    "usd_zero_balance": sealed(entry_type="debit", amount_minor=10050, running_balance_minor=0),
    "eth_one_wei": sealed(currency="ETH", amount_minor=1, running_balance_minor=10**18 + 1),
    "eth_max_amount": sealed(currency="ETH", amount_minor=2**128, running_balance_minor=-(10**59)),
    "jpy": sealed(currency="JPY", amount_minor=2**128, running_balance_minor=2**128),
    "pre_epoch_occurrence": sealed(occurred_at_ms=-86_400_000 - 1),
}


@pytest.mark.parametrize("entry", WIRE_ENTRIES.values(), ids=list(WIRE_ENTRIES))
def test_entry_wire_round_trip(entry: Entry) -> None:
    assert verify_entry_hash(entry)
    currency = CURRENCIES[entry.currency]
    wire = records.entry_to_wire(entry, currency)
    assert wire["amount"] == to_major(entry.amount_minor, currency.decimals)
    assert wire["running_balance"] == to_major(entry.running_balance_minor, currency.decimals)
    assert wire["amount"].as_tuple().exponent == -18
    assert wire["running_balance"].as_tuple().exponent == -18
    assert wire["entry_hash"] == entry.entry_hash.hex() and len(wire["entry_hash"]) == 64
    assert wire["merkle_root"] == entry.merkle_root.hex()
    assert records.entry_from_wire(wire, CURRENCIES) == entry

    name, decoded = CODEC.decode(CODEC.encode("Entry", wire))
    assert name == "Entry"
    assert isinstance(decoded["committed_at"], datetime)
    assert decoded["committed_at"].utcoffset() == timedelta(0)
    assert decoded["amount"] == wire["amount"]
    assert decoded["running_balance"] == wire["running_balance"]
    back = records.entry_from_wire(decoded, CURRENCIES)
    assert back == entry
    assert verify_entry_hash(back)


def test_entry_from_wire_refuses_an_amount_finer_than_the_currency() -> None:
    wire = records.entry_to_wire(sealed(), USD)
    wire["amount"] = Decimal("100.501000000000000000")
    with pytest.raises(InvariantViolation):
        records.entry_from_wire(wire, CURRENCIES)


def _wire_entries(currency: Currency) -> st.SearchStrategy[Entry]:
    bound = 10 ** (42 + currency.decimals) - 1  # |major| < 10**42: the wire decimal's range
    timestamp = st.integers(-62_135_596_800_000, 253_402_300_799_999)  # years 1..9999
    optional_text = st.none() | st.text(max_size=8)
    return st.builds(
        Entry,
        entry_id=st.text(max_size=8), command_id=st.text(max_size=8), account_id=st.text(max_size=8),
        currency=st.just(currency.code),
        entry_type=st.sampled_from(["credit", "debit", "fee", "refund", "adjustment"]),
        amount_minor=st.integers(1, 2**128), running_balance_minor=st.integers(-bound, bound),
        sequence=st.integers(1, 2**63 - 1), committed_at_ms=st.integers(0, 253_402_300_799_999),
        partition=st.integers(0, 2**31 - 1), leaf_index=st.integers(0, 2**63 - 1),
        entry_hash=st.binary(min_size=32, max_size=32), merkle_root=st.binary(min_size=32, max_size=32),
        batch_id=optional_text, batch_size=st.none() | st.integers(0, 2**31 - 1),
        leg_index=st.none() | st.integers(0, 2**31 - 1), reverses_entry_id=optional_text,
        reference=optional_text,
        metadata=st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3),
        occurred_at_ms=st.none() | timestamp, chain=optional_text, chain_tx_hash=optional_text,
        chain_log_index=st.none() | st.integers(0, 2**63 - 1),
    )


@given(entry=st.sampled_from([USD, ETH, CURRENCIES["JPY"], CURRENCIES["USDC"]]).flatmap(_wire_entries))
def test_any_entry_survives_the_wire(entry: Entry) -> None:
    wire = records.entry_to_wire(entry, CURRENCIES[entry.currency])
    _, decoded = CODEC.decode(CODEC.encode("Entry", wire))
    assert records.entry_from_wire(decoded, CURRENCIES) == entry


@pytest.mark.parametrize(
    "outcome",
    [
        Outcome("cmd-1", Status.COMMITTED, entry=WIRE_ENTRIES["usd_all_optionals"]),
        Outcome("cmd-1", Status.COMMITTED, entry=WIRE_ENTRIES["eth_max_amount"]),
        Outcome("cmd-2", Status.REJECTED, Reason.INSUFFICIENT_FUNDS, "available 0 minor units < 5"),
        Outcome("cmd-3", Status.REJECTED, Reason.IDEMPOTENCY_CONFLICT, "used before"),
    ],
    ids=["committed_usd", "committed_eth", "insufficient_funds", "idempotency_conflict"],
)
def test_result_wire_round_trip(outcome: Outcome) -> None:
    wire = records.outcome_to_wire(outcome, CURRENCIES)
    assert wire["status"] == outcome.status.value
    assert wire["reason"] == (None if outcome.reason is None else outcome.reason.value)
    assert type(wire["status"]) is str
    name, decoded = CODEC.decode(CODEC.encode("Result", wire))
    assert name == "Result"
    back_entry = None if decoded["entry"] is None else records.entry_from_wire(decoded["entry"], CURRENCIES)
    back = Outcome(
        decoded["command_id"], Status(decoded["status"]),
        None if decoded["reason"] is None else Reason(decoded["reason"]), decoded["detail"], back_entry,
    )
    assert back == outcome


@pytest.mark.parametrize(
    ("currency", "state"),
    [
        (USD, AccountState(balance_minor=10050, pending_debit_minor=50, sequence=3,
                           last_committed_at_ms=1_700_000_000_000)),
        (USD, AccountState()),
        (ETH, AccountState(balance_minor=-(10**18) - 1, pending_debit_minor=2**128, sequence=2**63 - 1,
                           last_committed_at_ms=253_402_300_799_999)),
        (CURRENCIES["JPY"], AccountState(balance_minor=2**128, sequence=1, last_committed_at_ms=1)),
    ],
)
def test_balance_wire_round_trip(currency: Currency, state: AccountState) -> None:
    wire = records.balance_to_wire("acct-1", currency, state)
    name, decoded = CODEC.decode(CODEC.encode("Balance", wire))
    assert name == "Balance"
    assert decoded["account_id"] == "acct-1"
    assert decoded["currency"] == currency.code
    assert decoded["balance"] == to_major(state.balance_minor, currency.decimals)
    assert decoded["available"] == to_major(state.available_minor, currency.decimals)
    assert decoded["sequence"] == state.sequence
    assert records._ms(decoded["updated_at"]) == state.last_committed_at_ms


@pytest.mark.parametrize("size", [0, 1, 5, 8])
def test_tree_head_wire_round_trip(size: int) -> None:
    frontier = merkle.MerkleFrontier()
    leaves = [merkle.leaf_hash(bytes([n])) for n in range(size)]
    for leaf in leaves:
        frontier = frontier.append(leaf)
    wire = records.tree_head_to_wire(2, frontier, 1_700_000_000_000)
    name, decoded = CODEC.decode(CODEC.encode("TreeHead", wire))
    assert name == "TreeHead"
    assert decoded["partition"] == 2
    assert decoded["tree_size"] == size
    assert bytes.fromhex(decoded["root_hash"]) == merkle.root_from_leaf_hashes(leaves)
    assert records._ms(decoded["published_at"]) == 1_700_000_000_000


def test_dead_letter_wire_round_trip() -> None:
    wire = records.dead_letter(reason="bad_marker", detail="d", topic="ledger.commands", partition=1,
                               offset=42, key=b"acct-1", payload=b"\x00\xff", command_id=None,
                               failed_at_ms=5)
    _, decoded = CODEC.decode(CODEC.encode("DeadLetter", wire))
    assert {k: v for k, v in decoded.items() if k != "failed_at"} == {
        k: v for k, v in wire.items() if k != "failed_at"}
    assert records._ms(decoded["failed_at"]) == 5


@settings(max_examples=30, deadline=None)
@given(payload_size=st.sampled_from([0, 1, 983_040, 983_041, 1_048_576, 3_000_000]),
       key_size=st.sampled_from([0, 1024, 1025, 1_048_576]),
       detail=st.text(max_size=3000), reason=st.text(max_size=200),
       command_id=st.one_of(st.none(), st.text(max_size=300)))
def test_a_dead_letter_always_fits_a_kafka_message(payload_size: int, key_size: int, detail: str,
                                                   reason: str, command_id: str | None) -> None:
    payload = bytes(range(256)) * (payload_size // 256) + b"x" * (payload_size % 256)
    wire = records.dead_letter(reason=reason, detail=detail * 200, topic="t" * 249,
                               partition=1, offset=2**62, key=b"k" * key_size, payload=payload,
                               command_id=command_id, failed_at_ms=5)
    data = CODEC.encode("DeadLetter", wire)  # raises message_too_large if it did not fit
    assert len(data) <= MESSAGE_SIZE_MAX_BYTES
    _, decoded = CODEC.decode(data)
    assert decoded["payload"] == payload[:records.DLQ_PAYLOAD_BYTES_MAX]
    assert decoded["payload_size"] == payload_size
    assert decoded["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    assert decoded["command_id"] in (None, command_id)
    assert len(decoded["detail"]) <= core.DETAIL_LENGTH_MAX


@pytest.mark.parametrize(("text", "limit", "expected"), [
    ("short", 10, "short"),
    ("x" * 10, 10, "x" * 10),
    ("x" * 100, 30, "xxxxxxxxxx... (100 characters)"),
    ("x" * 100, 5, "xxxxx"),
])
def test_bounded_cuts_long_text_and_says_how_long_it_was(text: str, limit: int,
                                                          expected: str) -> None:
    assert core.bounded(text, limit) == expected


# ------------------------------------------------------------------ records: table values


STATES = st.builds(
    AccountState,
    balance_minor=st.integers(-(2**200), 2**200),
    pending_debit_minor=st.integers(0, 2**200),
    sequence=st.integers(0, 2**70),
    last_committed_at_ms=st.integers(0, 2**64),
)


@given(state=STATES)
def test_state_bytes_round_trip(state: AccountState) -> None:
    assert records.state_from_bytes(records.state_to_bytes(state)) == state


def test_state_table_value_layout() -> None:
    data = records.state_to_bytes(AccountState(-(10**40), 5, 7, 1_700_000_000_000))
    assert data == b"[1,-10000000000000000000000000000000000000000,5,7,1700000000000]"
    assert records.state_from_bytes(None) == AccountState()


def test_state_from_bytes_refuses_another_version() -> None:
    with pytest.raises(InvariantViolation):
        records.state_from_bytes(b"[2,0,0,0,0]")


RECORDS = {
    "committed": CommandRecord(hashlib.sha256(b"a").digest(),
                               Outcome("cmd-1", Status.COMMITTED, entry=WIRE_ENTRIES["usd_all_optionals"])),
    "committed_eth": CommandRecord(hashlib.sha256(b"b").digest(),
                                   Outcome("cmd-1", Status.COMMITTED, entry=WIRE_ENTRIES["eth_max_amount"])),
    "rejected": CommandRecord(hashlib.sha256(b"c").digest(),
                              Outcome("cmd-2", Status.REJECTED, Reason.SEQUENCE_CONFLICT,
                                      "expected sequence 4, account is at 3")),
}


@pytest.mark.parametrize("record", RECORDS.values(), ids=list(RECORDS))
def test_command_record_bytes_round_trip(record: CommandRecord) -> None:
    data = records.record_to_bytes(record)
    back = records.record_from_bytes(data)
    assert back == record
    assert isinstance(back.outcome.status, Status)
    assert back.outcome.reason is None or isinstance(back.outcome.reason, Reason)
    if back.outcome.entry is not None:
        assert verify_entry_hash(back.outcome.entry)


@given(entry=st.sampled_from([USD, ETH]).flatmap(_wire_entries), digest=st.binary(min_size=32, max_size=32))
def test_any_committed_record_round_trips(entry: Entry, digest: bytes) -> None:
    record = CommandRecord(digest, Outcome(entry.command_id, Status.COMMITTED, entry=entry))
    assert records.record_from_bytes(records.record_to_bytes(record)) == record


# Format 1 as workers before the packed format wrote it (JSON): changelogs written then recover.
FORMAT_1_REJECTED = (b'{"v":1,"digest":"' + hashlib.sha256(b"c").hexdigest().encode()
                     + b'","command_id":"cmd-2","status":"rejected","reason":"sequence_conflict",'
                     b'"detail":"expected sequence 4, account is at 3","entry":null}')


def test_format_1_json_records_are_still_read() -> None:
    assert records.record_from_bytes(FORMAT_1_REJECTED) == RECORDS["rejected"]
    with pytest.raises(InvariantViolation):
        records.record_from_bytes(FORMAT_1_REJECTED.replace(b'"v":1', b'"v":2'))


@pytest.mark.parametrize("name", list(RECORDS))
def test_packed_records_are_small_and_refuse_damage(name: str) -> None:
    data = records.record_to_bytes(RECORDS[name])
    assert data[0] == records.RECORD_FORMAT and len(data) < 400
    for damaged in (b"\x03" + data[1:], data[:-1], data + b"\x00", data[: len(data) // 2]):
        with pytest.raises(InvariantViolation):
            records.record_from_bytes(damaged)


@given(
    leaf_count=st.integers(0, 40),
    head_tree_size=st.integers(0, 2**63 - 1),
    head_published_at_ms=st.integers(0, 2**63 - 1),
    next_command_offset=st.integers(0, 2**63 - 1),
)
def test_log_bytes_round_trip(leaf_count: int, head_tree_size: int, head_published_at_ms: int,
                              next_command_offset: int) -> None:
    frontier = merkle.MerkleFrontier()
    for n in range(leaf_count):
        frontier = frontier.append(merkle.leaf_hash(n.to_bytes(2, "big")))
    log = LogHead(frontier, head_tree_size, head_published_at_ms, next_command_offset)
    data = records.log_to_bytes(log)
    assert len(data) == 24 + 8 + 32 * leaf_count.bit_count()
    back = records.log_from_bytes(data)
    assert back == log
    assert records.log_next_command_offset(data) == next_command_offset
    assert back.frontier.root() == frontier.root()


def test_log_from_nothing_is_an_empty_log() -> None:
    log = records.log_from_bytes(None)
    assert log == LogHead()
    assert log.frontier.tree_size == 0 and log.frontier.root() == merkle.EMPTY_ROOT
