"""encode_embedding: a Result that copies its already encoded Entry (or a batch's Entries) is
byte for byte encode's."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sardis_ledger.schemas.codec import AvroCodec, Framing
from sardis_ledger.schemas.errors import CodecError

SINGLE = AvroCodec()
CONFLUENT = AvroCodec(framing=Framing.CONFLUENT)
for schema_id, name in enumerate(("Entry", "Result", "Balance"), start=101):
    CONFLUENT.bind_schema_id(name, schema_id)

_text = st.text(min_size=1, max_size=40)
_hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
_amount = st.integers(min_value=-10**12, max_value=10**12).map(lambda n: Decimal(n).scaleb(-6))


@st.composite
def entries(draw: st.DrawFn) -> dict[str, Any]:
    optional_text = st.none() | _text
    return {
        "entry_id": draw(_text), "command_id": draw(_text), "account_id": draw(_text),
        "currency": "USDC", "entry_type": draw(st.sampled_from(["credit", "debit"])),
        "amount": draw(_amount), "running_balance": draw(_amount),
        "sequence": draw(st.integers(min_value=1, max_value=2**40)),
        "batch_id": draw(optional_text), "batch_size": draw(st.none() | st.integers(1, 100)),
        "leg_index": draw(st.none() | st.integers(0, 99)),
        "reverses_entry_id": draw(optional_text), "reference": draw(optional_text),
        "metadata": draw(st.dictionaries(_text, _text, max_size=3)),
        "occurred_at": draw(st.integers(0, 2**41)), "committed_at": draw(st.integers(0, 2**41)),
        "partition": draw(st.integers(0, 63)), "leaf_index": draw(st.integers(0, 2**40)),
        "entry_hash": draw(_hex64), "merkle_root": draw(_hex64),
        "chain": None, "chain_tx_hash": None, "chain_log_index": None,
    }


ENTRY: dict[str, Any] = {
    "entry_id": "e-1", "command_id": "c-1", "account_id": "acct-1", "currency": "USDC",
    "entry_type": "credit", "amount": Decimal("0.100000"), "running_balance": Decimal("0.100000"),
    "sequence": 1, "batch_id": None, "batch_size": None, "leg_index": None,
    "reverses_entry_id": None, "reference": None, "metadata": {}, "occurred_at": 0,
    "committed_at": 1, "partition": 0, "leaf_index": 0, "entry_hash": "ab" * 32,
    "merkle_root": "cd" * 32, "chain": None, "chain_tx_hash": None, "chain_log_index": None,
}


def _result(entry: dict[str, Any] | None, command_id: str, detail: str | None) -> dict[str, Any]:
    return {"command_id": command_id, "status": "committed", "reason": None, "detail": detail,
            "entry": entry, "batch_id": None, "failed_leg_index": None, "entries": []}


@pytest.mark.parametrize("codec", [SINGLE, CONFLUENT], ids=["single-object", "confluent"])
@settings(max_examples=60, deadline=None)
@given(entry=entries(), command_id=_text, detail=st.none() | _text)
def test_same_bytes_as_encoding_the_entry_again(codec: AvroCodec, entry: dict[str, Any],
                                                command_id: str, detail: str | None) -> None:
    message = codec.encode("Entry", entry)
    spliced = codec.encode_embedding("Result", _result(None, command_id, detail), "entry", message)
    assert spliced == codec.encode("Result", _result(entry, command_id, detail))
    name, decoded = codec.decode(spliced)
    assert name == "Result" and decoded["entry"]["entry_id"] == entry["entry_id"]


@pytest.mark.parametrize(("record_name", "field", "message_of", "reason"), [
    ("Result", "entry", "Balance", "must be an encoded Entry"),  # another record's message
    ("Result", "status", "Entry", "is neither [null, record] nor array"),  # a string field
    ("Result", "nope", "Entry", "no field 'nope'"),
])
def test_refuses_what_it_cannot_copy(record_name: str, field: str, message_of: str,
                                     reason: str) -> None:
    balance = {"account_id": "a", "currency": "USDC", "balance": Decimal("1.000000"),
               "available": Decimal("1.000000"), "sequence": 1, "updated_at": 0}
    message = SINGLE.encode(message_of, ENTRY if message_of == "Entry" else balance)
    with pytest.raises(CodecError, match=re.escape(reason)):
        SINGLE.encode_embedding(record_name, _result(None, "c", None), field, message)


def test_the_record_must_leave_the_field_out() -> None:
    message = SINGLE.encode("Entry", ENTRY)
    with pytest.raises(CodecError, match="comes from the message"):
        SINGLE.encode_embedding("Result", _result(ENTRY, "c", None), "entry", message)


def _batch_result(entries: list[dict[str, Any]], batch_id: str) -> dict[str, Any]:
    return {"command_id": batch_id, "status": "committed", "reason": None, "detail": None,
            "entry": None, "batch_id": batch_id, "failed_leg_index": None, "entries": entries}


@pytest.mark.parametrize("codec", [SINGLE, CONFLUENT], ids=["single-object", "confluent"])
@settings(max_examples=60, deadline=None)
@given(batch=st.lists(entries(), max_size=12), batch_id=_text)
def test_a_batch_result_copying_its_entries_is_the_same_bytes(
        codec: AvroCodec, batch: list[dict[str, Any]], batch_id: str) -> None:
    messages = [codec.encode("Entry", entry) for entry in batch]
    spliced = codec.encode_embedding("Result", _batch_result([], batch_id), "entries", messages)
    assert spliced == codec.encode("Result", _batch_result(batch, batch_id))
    name, decoded = codec.decode(spliced)
    assert name == "Result"
    assert [e["entry_id"] for e in decoded["entries"]] == [e["entry_id"] for e in batch]


def test_an_array_takes_a_sequence_of_messages_and_a_union_one() -> None:
    message = SINGLE.encode("Entry", ENTRY)
    with pytest.raises(CodecError, match="takes a sequence of messages"):
        SINGLE.encode_embedding("Result", _batch_result([], "b"), "entries", message)
    with pytest.raises(CodecError, match="takes one"):
        SINGLE.encode_embedding("Result", _result(None, "c", None), "entry", [message])
    with pytest.raises(CodecError, match="comes from the message"):
        SINGLE.encode_embedding("Result", _batch_result([ENTRY], "b"), "entries", [message])


@pytest.mark.parametrize("count", [0, 1, 63, 64, 65, 1000])
def test_array_counts_past_one_varint_byte(count: int) -> None:
    batch = [dict(ENTRY, leg_index=i % 100) for i in range(count)]
    messages = [SINGLE.encode("Entry", entry) for entry in batch]
    assert SINGLE.encode_embedding("Result", _batch_result([], "b"), "entries", messages) == \
        SINGLE.encode("Result", _batch_result(batch, "b"))
