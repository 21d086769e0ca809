"""The codec's Confluent framing: header build and parse, schema ids bound, learnt and refused."""

from __future__ import annotations

import io
import json
from decimal import Decimal
from typing import Any

import fastavro
import pytest
from fastavro.schema import parse_schema

from sardis_ledger.schemas.codec import (
    CONFLUENT_HEADER_SIZE_BYTES,
    LEARNT_SCHEMA_IDS_MAX,
    REFUSED_SCHEMA_IDS_MAX,
    AvroCodec,
    Framing,
    confluent_header,
    confluent_schema_id,
    schema_text,
)
from sardis_ledger.streams.errors import CodecError

POST = {"command_id": "c1", "account_id": "acc_1", "currency": "USD", "entry_type": "credit",
        "amount": Decimal("10.5")}


def _post_entry_schema(codec: AvroCodec) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(codec.schema_text("PostEntry"))
    return schema


def _framed(schema: dict[str, Any], record: dict[str, Any], schema_id: int) -> bytes:
    """What confluent-kafka's AvroSerializer writes: magic, id, then fastavro's body."""
    body = io.BytesIO()
    fastavro.schemaless_writer(body, parse_schema(schema, named_schemas={}), record)
    return confluent_header(schema_id) + body.getvalue()


def test_header_is_magic_zero_and_a_big_endian_id() -> None:
    assert confluent_header(1) == b"\x00\x00\x00\x00\x01"
    assert confluent_header(0x01020304) == b"\x00\x01\x02\x03\x04"
    assert confluent_schema_id(b"\x00\x01\x02\x03\x04rest") == 0x01020304
    with pytest.raises(CodecError):
        confluent_header(2**32)


@pytest.mark.parametrize("data", [None, b"", b"\x00\x00\x00\x01", b"\xc3\x01" + bytes(12), b"{}"])
def test_no_schema_id_outside_confluent_framing(data: bytes | None) -> None:
    assert confluent_schema_id(data) is None


def test_encode_writes_the_bound_id_and_decode_reads_both_framings() -> None:
    confluent = AvroCodec(framing=Framing.CONFLUENT)
    confluent.bind_schema_id("PostEntry", 7)
    framed = confluent.encode("PostEntry", POST)
    assert framed[:CONFLUENT_HEADER_SIZE_BYTES] == b"\x00\x00\x00\x00\x07"
    single = AvroCodec().encode("PostEntry", POST)
    assert single[:2] == b"\xc3\x01"
    assert framed[CONFLUENT_HEADER_SIZE_BYTES:] == single[10:]  # the same Avro body
    for data in (framed, single):
        name, record = confluent.decode(data)
        assert name == "PostEntry" and record["amount"] == Decimal("10.5")


def test_encode_without_an_id_is_refused_in_confluent_framing() -> None:
    with pytest.raises(CodecError) as caught:
        AvroCodec(framing=Framing.CONFLUENT).encode("PostEntry", POST)
    assert caught.value.reason == "unregistered_schema"


def test_an_id_is_bound_to_one_schema_only() -> None:
    codec = AvroCodec(framing=Framing.CONFLUENT)
    codec.bind_schema_id("PostEntry", 3)
    codec.bind_schema_id("PostEntry", 3)  # again: harmless
    with pytest.raises(CodecError, match="already"):
        codec.bind_schema_id("Entry", 3)


def test_an_unlearnt_id_is_unknown_and_asked_for() -> None:
    codec = AvroCodec()
    data = _framed(_post_entry_schema(codec), POST, 41)
    assert codec.unresolved_schema_id(data) == 41
    with pytest.raises(CodecError) as caught:
        codec.decode(data)
    assert caught.value.reason == "unknown_schema_id"


def test_our_own_schema_learnt_by_id_decodes_like_single_object() -> None:
    codec = AvroCodec()
    data = _framed(_post_entry_schema(codec), POST, 41)
    codec.learn_schema(41, codec.schema_text("PostEntry"))
    assert codec.unresolved_schema_id(data) is None
    assert codec.decode(data) == AvroCodec().decode(AvroCodec().encode("PostEntry", POST))


def test_older_and_newer_compatible_writers_resolve_into_the_current_schema() -> None:
    codec = AvroCodec()
    current = _post_entry_schema(codec)
    older = {**current, "fields": [f for f in current["fields"] if f["name"] != "chain_log_index"]}
    newer = {**current, "fields": [*current["fields"],
                                   {"name": "channel", "type": "string", "default": "api"}]}
    codec.learn_schema(11, json.dumps(older, indent=2))  # any text: the registry's, not ours
    codec.learn_schema(12, json.dumps(newer))
    _, old = codec.decode(_framed(older, POST, 11))
    _, new = codec.decode(_framed(newer, {**POST, "channel": "pos"}, 12))
    assert old["chain_log_index"] is None and "channel" not in new
    assert old == new


@pytest.mark.parametrize(("change", "why"), [
    (lambda fields: [*fields, {"name": "amount_cents", "type": "long"}], None),  # extra: fine
    (lambda fields: [f for f in fields if f["name"] != "account_id"], "account_id"),
    (lambda fields: [{**f, "type": "long"} if f["name"] == "account_id" else f for f in fields],
     "string"),
    (lambda fields: [{**f, "type": {**f["type"], "scale": 2}} if f["name"] == "amount" else f
                     for f in fields], "scale"),
])
def test_an_unreadable_writer_is_refused_with_its_reason(change: Any, why: str | None) -> None:
    codec = AvroCodec()
    current = _post_entry_schema(codec)
    writer = {**current, "fields": change(current["fields"])}
    codec.learn_schema(20, json.dumps(writer))
    data = confluent_header(20) + b"\x00"
    assert codec.unresolved_schema_id(data) is None  # decided: no second lookup
    if why is None:
        return
    with pytest.raises(CodecError, match=why) as caught:
        codec.decode(data)
    assert caught.value.reason == "incompatible_schema"


@pytest.mark.parametrize("text", ['{"type": "record", "name": "com.acme.PostEntry", "fields": []}',
                                  '"string"', "syntax = \"proto3\";", "{not json"])
def test_schemas_that_are_not_one_of_our_records_are_refused(text: str) -> None:
    codec = AvroCodec()
    codec.learn_schema(30, text)
    with pytest.raises(CodecError) as caught:
        codec.decode(confluent_header(30) + b"\x00")
    assert caught.value.reason == "incompatible_schema"


def test_a_schema_nested_past_any_reason_is_refused_not_raised() -> None:
    depth = 5_000
    nested = '{"type": "array", "items": ' * depth + '"string"' + "}" * depth
    text = ('{"type": "record", "name": "sardis.ledger.PostEntry", "fields": '
            f'[{{"name": "x", "type": {nested}}}]}}')
    codec = AvroCodec()
    codec.learn_schema(31, text)
    with pytest.raises(CodecError) as caught:
        codec.decode(confluent_header(31) + b"\x00")
    assert caught.value.reason == "incompatible_schema"


def test_refused_and_learnt_ids_are_bounded() -> None:
    codec = AvroCodec()
    for schema_id in range(REFUSED_SCHEMA_IDS_MAX + 10):
        codec.refuse_schema_id(schema_id, "unknown_schema_id", "none")
    assert codec.unresolved_schema_id(confluent_header(0) + b"\x00") == 0  # forgotten first
    assert codec.unresolved_schema_id(confluent_header(REFUSED_SCHEMA_IDS_MAX + 9)) is None
    text = codec.schema_text("PostEntry")
    codec.bind_schema_id("PostEntry", 1_000_000)
    for schema_id in range(LEARNT_SCHEMA_IDS_MAX + 5):
        codec.learn_schema(10_000 + schema_id, text)
    assert codec.unresolved_schema_id(confluent_header(10_000)) == 10_000
    assert codec.unresolved_schema_id(confluent_header(1_000_000)) is None  # bound: kept


def test_a_bound_id_is_never_refused() -> None:
    codec = AvroCodec()
    codec.bind_schema_id("Entry", 5)
    codec.refuse_schema_id(5, "unknown_schema_id", "made up")
    assert codec.unresolved_schema_id(confluent_header(5) + b"\x00") is None
    with pytest.raises(CodecError) as caught:
        codec.decode(confluent_header(5) + b"\x00")
    assert caught.value.reason != "unknown_schema_id"


@pytest.mark.parametrize(("data", "reason"), [
    (b"\x00\x00\x00", "truncated"),
    (b"\x00" * 1_000, "unknown_schema_id"),
    (b"\x01\x02", "bad_marker"),
])
def test_malformed_confluent_headers(data: bytes, reason: str) -> None:
    with pytest.raises(CodecError) as caught:
        AvroCodec().decode(data)
    assert caught.value.reason == reason


def test_schema_text_is_one_canonical_text_without_fastavro_keys() -> None:
    codec = AvroCodec()
    text = codec.schema_text("SubmitBatch")
    assert "__fastavro" not in text and "__named_schemas" not in text
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    assert text == schema_text(json.loads(text) | {"__fastavro_parsed": True})
    # self-contained: the BatchLeg record it references is defined inline
    parse_schema(json.loads(text), named_schemas={})
    assert '"sardis.hex"' in codec.schema_text("Entry") and '"doc"' in text
