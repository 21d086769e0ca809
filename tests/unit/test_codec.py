"""Unit tests of the Avro contracts (schemas/*.avsc) and the single-object wire codec."""

from __future__ import annotations

import io
import json
import shutil
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.schema import fingerprint as fastavro_fingerprint
from fastavro.schema import parse_schema, to_parsing_canonical_form
from hypothesis import given, settings
from hypothesis import strategies as st

from sardis_ledger.schemas.codec import (
    CRC64_AVRO_EMPTY,
    HEADER_SIZE_BYTES,
    MESSAGE_SIZE_MAX_BYTES,
    SCHEMA_DIR,
    SINGLE_OBJECT_MARKER,
    AvroCodec,
    crc64_avro,
    fingerprint_crc64_avro,
    load_history,
    load_schemas,
)
from sardis_ledger.streams.errors import CodecError
from tests.unit.read_forms import same_read_values

NAMESPACE = "sardis.ledger"
RECORDS = ("PostEntry", "Entry", "Result", "Balance", "TreeHead", "DeadLetter", "Receipt",
           "BatchLeg", "SubmitBatch", "RollbackBatch", "ReserveLeg", "SettleLeg", "LegReport",
           "BatchTick", "ChainTransfer", "Anchor", "Discrepancy", "Reconciliation",
           "ReconcileTick")
UINT64_MASK = 2**64 - 1

CODEC = AvroCodec()

T_OCCURRED = datetime(2025, 3, 14, 9, 26, 53, 589_000, tzinfo=UTC)
T_COMMITTED = datetime(2025, 3, 14, 9, 26, 54, 1_000, tzinfo=UTC)
HASH_A = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
HASH_B = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
TX_HASH = "0x5c504ed432cb51138bcf09aa5e8a410dd4a1e204ef84bfed1be16dfba1b22060"


def entry(**overrides: Any) -> dict[str, Any]:
    """A committed on-chain USDC credit with every field set."""
    record: dict[str, Any] = {
        "entry_id": "ent_01JPAZ7W3M2X",
        "command_id": "cmd_7f3a9c",
        "account_id": "acct_merchant_42",
        "currency": "USDC",
        "entry_type": "credit",
        "amount": Decimal("1250.000001"),
        "running_balance": Decimal("98765.432101"),
        "sequence": 17,
        "batch_id": "bat_55",
        "batch_size": 2,
        "leg_index": 0,
        "reverses_entry_id": None,
        "reference": "inv-2025-0042",
        "metadata": {"source": "base-indexer", "invoice": "2025-0042"},
        "occurred_at": T_OCCURRED,
        "committed_at": T_COMMITTED,
        "partition": 3,
        "leaf_index": 1_048_575,
        "entry_hash": HASH_A,
        "merkle_root": HASH_B,
        "chain": "base",
        "chain_tx_hash": TX_HASH,
        "chain_log_index": 7,
    }
    record.update(overrides)
    return record


def bare_entry() -> dict[str, Any]:
    """An off-chain single entry with every optional field null and an empty map."""
    return entry(
        entry_type="debit",
        amount=Decimal("0.000000000000000001"),
        running_balance=Decimal("-42.5"),
        batch_id=None,
        batch_size=None,
        leg_index=None,
        reference=None,
        metadata={},
        occurred_at=None,
        chain=None,
        chain_tx_hash=None,
        chain_log_index=None,
    )


ROUND_TRIPS: list[tuple[str, str, dict[str, Any]]] = [
    (
        "post_entry_full",
        "PostEntry",
        {
            "command_id": "cmd_7f3a9c",
            "account_id": "acct_merchant_42",
            "currency": "ETH",
            "entry_type": "credit",
            "amount": Decimal("0.123456789012345678"),
            "reference": "inv-2025-0042",
            "metadata": {"source": "base-indexer"},
            "expected_sequence": 16,
            "allow_overdraft": True,
            "occurred_at": T_OCCURRED,
            "chain": "ethereum",
            "chain_tx_hash": TX_HASH,
            "chain_log_index": 0,
        },
    ),
    (
        "post_entry_bare",
        "PostEntry",
        {
            "command_id": "cmd_1",
            "account_id": "acct_1",
            "currency": "USDC",
            "entry_type": "fee",
            "amount": Decimal("0.30"),
            "reference": None,
            "metadata": {},
            "expected_sequence": None,
            "allow_overdraft": False,
            "occurred_at": None,
            "chain": None,
            "chain_tx_hash": None,
            "chain_log_index": None,
        },
    ),
    ("entry_full", "Entry", entry()),
    ("entry_bare", "Entry", bare_entry()),
    (
        "entry_reversal",
        "Entry",
        entry(
            entry_type="refund",
            reverses_entry_id="ent_01JPAZ7W3M2W",
            batch_id=None,
            batch_size=None,
            leg_index=None,
        ),
    ),
    (
        "result_committed",
        "Result",
        {
            "command_id": "cmd_7f3a9c",
            "status": "committed",
            "reason": None,
            "detail": None,
            "entry": entry(),
            "batch_id": None,
            "failed_leg_index": None,
            "entries": [],
        },
    ),
    (
        "result_batch_committed",
        "Result",
        {
            "command_id": "bat_55",
            "status": "committed",
            "reason": None,
            "detail": None,
            "entry": None,
            "batch_id": "bat_55",
            "failed_leg_index": None,
            "entries": [entry(), entry()],
        },
    ),
    (
        "result_rejected",
        "Result",
        {
            "command_id": "cmd_8",
            "status": "rejected",
            "reason": "insufficient_funds",
            "detail": "available 10.00 USDC < 12.50 USDC",
            "entry": None,
            "batch_id": "bat_9",
            "failed_leg_index": 1,
            "entries": [],
        },
    ),
    (
        "balance_negative",
        "Balance",
        {
            "account_id": "acct_1",
            "currency": "USDC",
            "balance": Decimal("-12.345678"),
            "available": Decimal("-112.345678"),
            "sequence": 9,
            "updated_at": T_COMMITTED,
        },
    ),
    (
        "tree_head",
        "TreeHead",
        {"partition": 11, "tree_size": 2**40, "root_hash": HASH_B, "published_at": T_COMMITTED},
    ),
    (
        "dead_letter_keyed",
        "DeadLetter",
        {
            "reason": "bad_marker",
            "detail": "starts with 7b22, not c301",
            "source_topic": "ledger.commands",
            "source_partition": 4,
            "source_offset": 123_456_789,
            "source_key": b"acct_1",
            "payload": b'{"not":"avro"}\x00\xff',
            "command_id": None,
            "failed_at": T_COMMITTED,
            "payload_size": 16,
            "payload_sha256": HASH_A,
        },
    ),
    (
        "dead_letter_unkeyed",
        "DeadLetter",
        {
            "reason": "unknown_fingerprint",
            "detail": "no known schema",
            "source_topic": "ledger.commands",
            "source_partition": 0,
            "source_offset": 0,
            "source_key": None,
            "payload": b"",
            "command_id": "cmd_9",
            "failed_at": T_OCCURRED,
            "payload_size": None,
            "payload_sha256": None,
        },
    ),
    ("batch_leg", "BatchLeg", {"account_id": "acct_sender", "currency": "USDC", "entry_type": "debit",
             "amount": Decimal("500.000000000000000000"), "reference": None, "metadata": {},
             "allow_overdraft": False}),
    (
        "submit_batch",
        "SubmitBatch",
        {"batch_id": "bat_1",
         "legs": [{"account_id": "acct_sender", "currency": "USDC", "entry_type": "debit",
                   "amount": Decimal("500.000000000000000000"), "reference": None, "metadata": {},
                   "allow_overdraft": False}],
         "require_balanced": True, "timeout_ms": 30_000},
    ),
    (
        "rollback_batch",
        "RollbackBatch",
        {"command_id": "rb_1", "batch_id": "bat_1", "reason": "dispute", "force": False},
    ),
    (
        "reserve_leg",
        "ReserveLeg",
        {"batch_id": "bat_1:rollback:rb_1", "leg_index": 3, "batch_size": 4,
         "coordinator_partition": 7, "account_id": "acct_sender", "currency": "USDC",
         "entry_type": "reversal", "amount": Decimal("500.000000000000000000"), "sign": 1,
         "reference": "dispute", "metadata": {"rollback_command_id": "rb_1"},
         "allow_overdraft": True, "reverses_entry_id": "ent_01JPAZ7W3M2X"},
    ),
    (
        "settle_leg",
        "SettleLeg",
        {"batch_id": "bat_1", "leg_index": 0, "account_id": "acct_sender", "currency": "USDC",
         "action": "post", "coordinator_partition": 7},
    ),
    (
        "leg_report_posted",
        "LegReport",
        {"batch_id": "bat_1", "leg_index": 0, "kind": "posted", "reason": None, "detail": None,
         "entry": entry()},
    ),
    ("batch_tick", "BatchTick", {"partition": 7, "now": T_COMMITTED}),
    ("reconcile_tick", "ReconcileTick",
     {"partition": 7, "now": T_COMMITTED, "chain_head_block": 19_000_012}),
    ("reconcile_tick_no_head", "ReconcileTick",
     {"partition": 0, "now": T_COMMITTED, "chain_head_block": None}),
    (
        "chain_transfer",
        "ChainTransfer",
        {"chain": "base", "block_number": 19_000_000, "block_hash": "0x" + "ab" * 32,
         "tx_hash": "0x" + "cd" * 32, "log_index": 7, "token": "0x" + "12" * 20,
         "from_address": "0x" + "34" * 20, "to_address": "0x" + "56" * 20,
         "amount": Decimal("1500.250000000000000000"), "currency": "USDC",
         "account_id": "acct_sender", "direction": "out", "status": "confirmed"},
    ),
    (
        "anchor",
        "Anchor",
        {"partition": 3, "tree_size": 1000, "root_hash": "ef" * 32, "chain": "base",
         "tx_hash": "0x" + "01" * 32, "block_number": 19_000_001,
         "contract_address": "0x" + "78" * 20, "anchored_at": T_COMMITTED},
    ),
    (
        "discrepancy_open",
        "Discrepancy",
        {"discrepancy_id": HASH_A, "type": "amount_mismatch", "status": "open",
         "severity": "high", "entry_id": "ent_01JPAZ7W3M2X", "tx_hash": TX_HASH, "log_index": 7,
         "expected": "1250.000001", "actual": "1250", "description": "entry books 1250 USDC",
         "detected_at": T_COMMITTED},
    ),
    (
        "discrepancy_missing_in_ledger",
        "Discrepancy",
        {"discrepancy_id": HASH_B, "type": "missing_in_ledger", "status": "resolved",
         "severity": "medium", "entry_id": None, "tx_hash": TX_HASH, "log_index": 0,
         "expected": "5 USDC in acct_1", "actual": None, "description": "no entry",
         "detected_at": T_OCCURRED},
    ),
    (
        "reconciliation",
        "Reconciliation",
        {"reconciliation_id": HASH_A, "status": "matched", "entry_id": "ent_01JPAZ7W3M2X",
         "tx_hash": TX_HASH, "log_index": 7, "direction": "in", "chain": "base",
         "block_number": 19_000_000, "block_hash": "0x" + "ab" * 32,
         "account_id": "acct_merchant_42", "currency": "USDC",
         "amount": Decimal("1250.000001000000000000"), "entry_committed_at": T_COMMITTED,
         "reconciled_at": T_OCCURRED},
    ),
    (
        "receipt",
        "Receipt",
        {
            "entry_id": "ent_01JPAZ7W3M2X",
            "immudb_tx": 4242,
            "immudb_database": "defaultdb",
            "verified": True,
            "receipted_at": T_COMMITTED,
        },
    ),
]


# --- Round trips ---


@pytest.mark.parametrize(
    ("record_name", "record"), [case[1:] for case in ROUND_TRIPS], ids=[c[0] for c in ROUND_TRIPS]
)
def test_round_trip(record_name: str, record: dict[str, Any]) -> None:
    data = CODEC.encode(record_name, record)
    assert data[:HEADER_SIZE_BYTES] == SINGLE_OBJECT_MARKER + CODEC.fingerprint_of(record_name)
    assert CODEC.decode(data) == (record_name, record)


def test_every_record_type_has_a_round_trip_case() -> None:
    assert {case[1] for case in ROUND_TRIPS} == set(RECORDS)


def test_full_and_short_names_encode_the_same() -> None:
    assert CODEC.encode("sardis.ledger.Entry", entry()) == CODEC.encode("Entry", entry())


def test_encode_leaves_the_callers_record_unchanged() -> None:
    result = {
        "command_id": "c",
        "status": "committed",
        "reason": None,
        "detail": None,
        "entry": entry(),
    }
    CODEC.encode("Result", result)
    assert result == {
        "command_id": "c",
        "status": "committed",
        "reason": None,
        "detail": None,
        "entry": entry(),
    }


def test_omitted_fields_take_their_schema_defaults() -> None:
    command = {"command_id": "c", "account_id": "a", "entry_type": "credit", "amount": Decimal("1")}
    name, decoded = CODEC.decode(CODEC.encode("PostEntry", command))
    assert name == "PostEntry"
    assert decoded == {
        **command,
        "currency": "USDC",
        "reference": None,
        "metadata": {},
        "expected_sequence": None,
        "allow_overdraft": False,
        "occurred_at": None,
        "chain": None,
        "chain_tx_hash": None,
        "chain_log_index": None,
    }


def test_decode_accepts_bytearray_and_memoryview() -> None:
    tree_head = next(case[2] for case in ROUND_TRIPS if case[1] == "TreeHead")
    data = CODEC.encode("TreeHead", tree_head)
    assert CODEC.decode(bytearray(data)) == CODEC.decode(data)
    assert CODEC.decode(memoryview(data)) == CODEC.decode(data)


@pytest.mark.parametrize(
    "amount",
    [
        Decimal("0.000000000000000001"),  # 1 wei
        Decimal("-999999999999999999999999999999999999999999.999999999999999999"),  # 60 digits
        Decimal(2**128).scaleb(-6),  # 2^128 minor units of a 6-decimal currency
        Decimal(2**128 + 987_654_321).scaleb(-6),
        Decimal(2**128 - 1).scaleb(-18),
        Decimal("1E+20"),  # positive exponent
        Decimal("-0"),
        Decimal("12.500"),
    ],
)
def test_decimal_edge_values_round_trip_exactly(amount: Decimal) -> None:
    _, decoded = CODEC.decode(CODEC.encode("Entry", entry(amount=amount)))
    assert decoded["amount"] == amount
    assert decoded["amount"].as_tuple().exponent == -18


def test_timestamps_decode_as_aware_utc_and_accept_epoch_millis() -> None:
    millis = int(T_COMMITTED.timestamp() * 1000)
    _, decoded = CODEC.decode(
        CODEC.encode(
            "TreeHead",
            {"partition": 0, "tree_size": 0, "root_hash": HASH_B, "published_at": millis},
        )
    )
    assert decoded["published_at"] == T_COMMITTED
    assert decoded["published_at"].utcoffset() is not None


# --- Fingerprints: known answers ---

# Canonical forms and fingerprints (signed 64-bit, as Java prints them) from Apache Avro's
# share/test/data/schema-tests.txt (apache/avro, cases 000, 004, 014, 020, 032, 033); the
# Java implementation cross-checks them against a direct implementation of the spec.
AVRO_SPEC_VECTORS = [
    ('"null"', 7195948357588979594),
    ('"int"', 8247732601305521295),
    ('"string"', -8142146995180207161),
    ('{"name":"x.y.foo","type":"record","fields":[]}', 5916914534497305771),
    ('{"type":"map","values":"string"}', -8732877298790414990),
    (
        '{"name":"PigValue","type":"record","fields":[{"name":"value",'
        '"type":["null","int","long","PigValue"]}]}',
        -1759257747318642341,
    ),
]


@pytest.mark.parametrize(("canonical", "expected"), AVRO_SPEC_VECTORS)
def test_crc64_avro_matches_the_avro_test_vectors(canonical: str, expected: int) -> None:
    assert crc64_avro(canonical.encode()) == expected & UINT64_MASK


def test_crc64_avro_of_nothing_is_empty() -> None:
    assert crc64_avro(b"") == CRC64_AVRO_EMPTY == 0xC15D213AA4D7A795


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        # schema-tests.txt case 026: doc, aliases, default and order are not in the canonical
        # form. The file's default is the string "true", which fastavro's parser refuses; the
        # boolean true used here is stripped from the canonical form all the same.
        (
            {
                "fields": [
                    {"type": "boolean", "aliases": [], "name": "f1", "default": True},
                    {"order": "descending", "name": "f2", "doc": "Hello", "type": "int"},
                ],
                "type": "record",
                "name": "foo",
            },
            -4860222112080293046,
        ),
        # case 028: namespace folded into the full name
        (
            {
                "namespace": "x.y.z",
                "type": "enum",
                "name": "foo",
                "doc": "foo bar",
                "symbols": ["A1", "A2"],
            },
            -4448647247586288245,
        ),
    ],
)
def test_fingerprint_of_schema_matches_the_avro_test_vectors(schema: Any, expected: int) -> None:
    fingerprint = fingerprint_crc64_avro(schema)
    assert fingerprint == (expected & UINT64_MASK).to_bytes(8, "little")


def test_fingerprint_byte_order_is_little_endian() -> None:
    # Apache Avro's Ruby test_fingerprints.rb (test_single_object_encoding_header): the
    # single-object header of "int" is C3 01 8F 5C 39 3F 1A D5 75 72, i.e. the fingerprint
    # 0x7275d51a3f395c8f least significant byte first.
    header = SINGLE_OBJECT_MARKER + fingerprint_crc64_avro("int")
    assert header == bytes([0xC3, 0x01, 0x8F, 0x5C, 0x39, 0x3F, 0x1A, 0xD5, 0x75, 0x72])


@pytest.mark.parametrize("record_name", RECORDS)
def test_fingerprints_agree_with_fastavro(record_name: str) -> None:
    # fastavro's hex string lists the fingerprint bytes in wire (little-endian) order.
    schema = load_schemas()[f"{NAMESPACE}.{record_name}"]
    expected = fastavro_fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO")
    assert CODEC.fingerprint_of(record_name).hex() == expected


# The wire contract: changing a schema in a way that alters its canonical form changes its
# fingerprint, and consumers then refuse the new messages (unknown_fingerprint). Update
# these only together with a deliberate, coordinated schema migration. Docs do not count.
PINNED_FINGERPRINTS = {
    "PostEntry": "f9c5d8289a98fb93",
    "Entry": "2d29897226d27c00",
    "Result": "ee2b4c1a03fb8647",
    "Balance": "c933eb6a5164d6df",
    "TreeHead": "a8e9be1a71c9135c",
    "DeadLetter": "602ee1a0398a194d",  # 2.0: payload_size, payload_sha256
    "Receipt": "154847d2e55026ad",
    "BatchLeg": "9be981032edb16f4",
    "SubmitBatch": "50170d5d9ff265d7",
    "RollbackBatch": "bb33fe42606d7718",
    "ReserveLeg": "766b5e1458071bc3",
    "SettleLeg": "bf6683fe939c064a",
    "LegReport": "d26f9a362f4a1074",
    "BatchTick": "5bae980dff60825c",
    "ChainTransfer": "28ce911a28829f51",
    "Anchor": "891068decbc09a62",
    "Discrepancy": "b57a4100e7a9b190",
    "Reconciliation": "316c952ec548be92",
    "ReconcileTick": "ebfa2075014cbe77",
}


def test_fingerprints_are_pinned() -> None:
    assert {name: CODEC.fingerprint_of(name).hex() for name in RECORDS} == PINNED_FINGERPRINTS


def test_result_fingerprint_inlines_the_entry_definition() -> None:
    canonical = to_parsing_canonical_form(load_schemas()[f"{NAMESPACE}.Result"])
    assert '"type":["null",{"name":"sardis.ledger.Entry","type":"record"' in canonical


# --- Loading ---


def test_record_names() -> None:
    assert CODEC.record_names() == sorted(f"{NAMESPACE}.{name}" for name in RECORDS)


@pytest.mark.parametrize("prefix", [("0_", "1_"), ("1_", "0_")])
def test_cross_file_references_resolve_in_any_file_order(
    tmp_path: Path, prefix: tuple[str, str]
) -> None:
    shutil.copy(SCHEMA_DIR / "Result.avsc", tmp_path / f"{prefix[0]}Result.avsc")
    shutil.copy(SCHEMA_DIR / "Entry.avsc", tmp_path / f"{prefix[1]}Entry.avsc")
    codec = AvroCodec(load_schemas(tmp_path))
    assert codec.fingerprint_of("Result") == CODEC.fingerprint_of("Result")
    result = ROUND_TRIPS[5][2]
    assert codec.decode(CODEC.encode("Result", result)) == ("Result", result)


def test_unresolvable_reference_is_an_error(tmp_path: Path) -> None:
    shutil.copy(SCHEMA_DIR / "Result.avsc", tmp_path / "Result.avsc")
    with pytest.raises(CodecError) as caught:
        load_schemas(tmp_path)
    assert caught.value.reason == "invalid_schema"


# --- Contract shape: docs and conventions ---


def _avsc_files() -> list[Path]:
    return sorted(SCHEMA_DIR.glob("*.avsc"))


def _named_types(schema: Any) -> list[dict[str, Any]]:
    """Every record, enum and fixed defined in a schema, recursively."""
    if isinstance(schema, list):
        return [named for branch in schema for named in _named_types(branch)]
    if not isinstance(schema, dict):
        return []
    found: list[dict[str, Any]] = []
    if schema.get("type") in ("record", "enum", "fixed"):
        found.append(schema)
    for field in schema.get("fields", []):
        found += _named_types(field["type"])
    for key in ("items", "values"):
        found += _named_types(schema.get(key))
    if isinstance(schema.get("type"), (dict, list)):
        found += _named_types(schema["type"])
    return found


def test_one_file_per_record() -> None:
    assert sorted(path.stem for path in _avsc_files()) == sorted(RECORDS)
    for path in _avsc_files():
        schema = json.loads(path.read_text())
        assert (schema["namespace"], schema["name"], schema["type"]) == (
            NAMESPACE,
            path.stem,
            "record",
        )


@pytest.mark.parametrize("path", _avsc_files(), ids=lambda path: path.stem)
def test_every_record_and_field_has_a_doc(path: Path) -> None:
    for named in _named_types(json.loads(path.read_text())):
        assert isinstance(named.get("doc"), str) and named["doc"].strip(), named["name"]
        for field in named.get("fields", []):
            assert isinstance(field.get("doc"), str) and field["doc"].strip(), field["name"]


@pytest.mark.parametrize("path", _avsc_files(), ids=lambda path: path.stem)
def test_field_conventions(path: Path) -> None:
    for field in json.loads(path.read_text())["fields"]:
        kind = field["type"]
        if isinstance(kind, list):  # optional: ["null", T] defaulting to null
            assert kind[0] == "null" and len(kind) == 2 and field["default"] is None
            kind = kind[1]
        if isinstance(kind, dict) and kind.get("logicalType") == "decimal":
            assert kind == {"type": "bytes", "logicalType": "decimal", "precision": 60, "scale": 18}
            assert "MAJOR" in field["doc"]
        if isinstance(kind, dict) and kind.get("type") == "map":
            assert kind["values"] == "string" and field["default"] == {}
        if field["name"].endswith(("_at",)):
            assert kind == {"type": "long", "logicalType": "timestamp-millis"}


# --- Encode errors ---


def test_encode_unknown_schema() -> None:
    with pytest.raises(CodecError) as caught:
        CODEC.encode("Ledger", {})
    assert caught.value.reason == "unknown_schema"
    with pytest.raises(CodecError) as caught:
        CODEC.fingerprint_of("sardis.other.Entry")
    assert caught.value.reason == "unknown_schema"


ENCODE_ERRORS: list[tuple[str, dict[str, Any]]] = [
    ("missing_required", {k: v for k, v in entry().items() if k != "entry_hash"}),
    ("unknown_field", entry(ammount=Decimal("1"))),
    ("wrong_type", entry(sequence="17")),
    ("float_money", entry(amount=1250.5)),
    ("int_money", entry(amount=1250)),
    ("nan_money", entry(amount=Decimal("NaN"))),
    ("infinite_money", entry(amount=Decimal("-Infinity"))),
    ("19_fraction_digits", entry(amount=Decimal("0.0000000000000000001"))),
    ("over_precision", entry(amount=Decimal("1E+42"))),
    ("int_out_of_range", entry(partition=2**31)),
    ("long_out_of_range", entry(sequence=2**63)),
    ("naive_datetime", entry(committed_at=datetime(2025, 3, 14, 9, 26))),
    (
        "bad_nested_record",
        {
            "command_id": "c",
            "status": "committed",
            "reason": None,
            "detail": None,
            "entry": entry(amount=Decimal("1E+42")),
        },
    ),
    (
        "nested_missing_required",
        {
            "command_id": "c",
            "status": "committed",
            "reason": None,
            "detail": None,
            "entry": {k: v for k, v in entry().items() if k != "merkle_root"},
        },
    ),
]


@pytest.mark.parametrize(
    "record", [case[1] for case in ENCODE_ERRORS], ids=[case[0] for case in ENCODE_ERRORS]
)
def test_encode_invalid_record(record: dict[str, Any]) -> None:
    record_name = "Result" if "status" in record else "Entry"
    with pytest.raises(CodecError) as caught:
        CODEC.encode(record_name, record)
    assert caught.value.reason == "invalid_record"


def test_encode_refuses_messages_consumers_would_refuse() -> None:
    big = {
        "reason": "r",
        "detail": "d",
        "source_topic": "t",
        "source_partition": 0,
        "source_offset": 0,
        "source_key": None,
        "payload": bytes(MESSAGE_SIZE_MAX_BYTES),
        "command_id": None,
        "failed_at": T_OCCURRED,
    }
    with pytest.raises(CodecError) as caught:
        CODEC.encode("DeadLetter", big)
    assert caught.value.reason == "message_too_large"


# --- Decode errors: one case per reason ---

VALID = CODEC.encode("Entry", entry())
HEADER = VALID[:HEADER_SIZE_BYTES]

DECODE_ERRORS: list[tuple[str, bytes | None]] = [
    ("empty_payload", b""),
    ("empty_payload", None),  # a Kafka tombstone
    ("bad_marker", b'{"command_id": "cmd_1"}'),
    ("truncated", SINGLE_OBJECT_MARKER + HEADER[2:9]),  # header cut short
    ("truncated", VALID[:-1]),  # body ends early
    ("unknown_fingerprint", SINGLE_OBJECT_MARKER + b"\x00" * 8 + VALID[HEADER_SIZE_BYTES:]),
    ("message_too_large", HEADER + bytes(MESSAGE_SIZE_MAX_BYTES)),
    ("malformed_body", VALID + b"\x00"),  # trailing bytes
    ("malformed_body", HEADER + b"\x02\xff\xfe" + VALID[HEADER_SIZE_BYTES + 3 :]),  # bad UTF-8
]


@pytest.mark.parametrize(
    ("reason", "data"),
    DECODE_ERRORS,
    ids=[f"{case[0]}-{i}" for i, case in enumerate(DECODE_ERRORS)],
)
def test_decode_error_reasons(reason: str, data: bytes | None) -> None:
    with pytest.raises(CodecError) as caught:
        CODEC.decode(data)
    assert caught.value.reason == reason


def test_decode_refuses_a_decimal_beyond_the_precision_instead_of_rounding() -> None:
    # Precision is not part of the canonical form, so a writer declaring precision 80 has
    # the same fingerprint; fastavro would round its 61-digit value to 60 digits on read.
    raw = json.loads((SCHEMA_DIR / "TreeHead.avsc").read_text())
    raw = {
        **raw,
        "name": "Balance",
        "fields": json.loads((SCHEMA_DIR / "Balance.avsc").read_text())["fields"],
    }
    for field in raw["fields"]:
        if isinstance(field["type"], dict) and field["type"].get("logicalType") == "decimal":
            field["type"] = {**field["type"], "precision": 80}
    wide = parse_schema(raw)
    assert fingerprint_crc64_avro(wide) == CODEC.fingerprint_of("Balance")
    body = io.BytesIO()
    fastavro.schemaless_writer(
        body,
        wide,
        {
            "account_id": "a",
            "currency": "USDC",
            "balance": Decimal("1" * 43 + ".000000000000000001"),
            "available": Decimal("0"),
            "sequence": 1,
            "updated_at": T_COMMITTED,
        },
    )
    with pytest.raises(CodecError) as caught:
        CODEC.decode(SINGLE_OBJECT_MARKER + CODEC.fingerprint_of("Balance") + body.getvalue())
    assert caught.value.reason == "malformed_body"


# --- Properties ---

MAX_FRACTION_DIGITS = 18
MAGNITUDE_BOUND_DIGITS = 40  # |value| < 10**40


@st.composite
def money(draw: st.DrawFn) -> Decimal:
    places = draw(st.integers(0, MAX_FRACTION_DIGITS))
    bound = 10 ** (MAGNITUDE_BOUND_DIGITS + places) - 1
    return Decimal(draw(st.integers(-bound, bound))).scaleb(-places)


@given(amount=money())
def test_any_money_value_round_trips_exactly(amount: Decimal) -> None:
    _, decoded = CODEC.decode(CODEC.encode("Entry", entry(amount=amount)))
    assert decoded["amount"] == amount


_HEADERS = [SINGLE_OBJECT_MARKER + CODEC.fingerprint_of(name) for name in RECORDS]


@st.composite
def hostile_bytes(draw: st.DrawFn) -> bytes:
    """Random bytes, random bodies behind valid headers, and damaged valid messages."""
    kind = draw(st.sampled_from(["random", "known_header", "damaged"]))
    if kind == "random":
        return draw(st.binary(max_size=64))
    if kind == "known_header":
        return draw(st.sampled_from(_HEADERS)) + draw(st.binary(max_size=256))
    valid = CODEC.encode(*draw(st.sampled_from([case[1:] for case in ROUND_TRIPS])))
    data = bytearray(valid[: draw(st.integers(0, len(valid)))])
    for _ in range(draw(st.integers(0, 4))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data) + draw(st.binary(max_size=8))


@settings(max_examples=500)
@given(data=hostile_bytes())
def test_decode_never_raises_anything_but_codec_error(data: bytes) -> None:
    try:
        name, record = CODEC.decode(data)
    except CodecError:
        return
    assert name in RECORDS and isinstance(record, dict)


@settings(max_examples=1000)
@given(data=hostile_bytes())
def test_whatever_decode_accepts_encode_accepts_too(data: bytes) -> None:
    """Decode makes every check encode makes: a reader never acts on a value no writer of this
    codec could have produced (out-of-range ints, bad hex, over-precise decimals)."""
    try:
        name, record = CODEC.decode(data)
    except CodecError:
        return
    CODEC.encode(name, record)


def _body(record_name: str, record: dict[str, Any]) -> bytes:
    """A message encoded by fastavro alone, without the codec's checks (as a hostile writer)."""
    body = io.BytesIO()
    fastavro.schemaless_writer(body, load_schemas()[f"{NAMESPACE}.{record_name}"], record)
    return SINGLE_OBJECT_MARKER + CODEC.fingerprint_of(record_name) + body.getvalue()


SETTLE = {"batch_id": "b", "leg_index": 0, "account_id": "a", "currency": "USD", "action": "post",
          "coordinator_partition": 0}


@pytest.mark.parametrize("leg_index", [2**31, -(2**31) - 1, 2**40])
def test_decode_refuses_an_int_field_out_of_the_avro_int_range(leg_index: int) -> None:
    with pytest.raises(CodecError) as caught:
        CODEC.decode(_body("SettleLeg", {**SETTLE, "leg_index": leg_index}))
    assert caught.value.reason == "malformed_body"
    assert CODEC.decode(_body("SettleLeg", {**SETTLE, "leg_index": 2**31 - 1}))[1]["leg_index"] \
        == 2**31 - 1


@pytest.mark.parametrize("bad", ["", "ab", HASH_A.upper(), HASH_A[:-1] + "g", HASH_A + "0"])
def test_hex_fields_are_checked_both_ways(bad: str) -> None:
    wire = entry(entry_hash=bad)
    with pytest.raises(CodecError) as caught:
        CODEC.encode("Entry", wire)
    assert caught.value.reason == "invalid_record"
    with pytest.raises(CodecError) as caught:
        CODEC.decode(_body("Entry", wire))
    assert caught.value.reason == "malformed_body"


def test_hex_fields_inside_nested_records_and_arrays_are_checked() -> None:
    result = dict(ROUND_TRIPS[5][2])
    result["entries"] = [entry(), entry(merkle_root="zz")]
    result["entry"] = None
    with pytest.raises(CodecError):
        CODEC.encode("Result", result)
    with pytest.raises(CodecError) as caught:
        CODEC.decode(_body("Result", result))
    assert caught.value.reason == "malformed_body"


def test_records_of_an_older_schema_version_decode_into_the_current_one() -> None:
    old = json.loads((SCHEMA_DIR / "history" / "DeadLetter.v1.avsc").read_text())
    body = io.BytesIO()
    record = {"reason": "bad_marker", "detail": "d", "source_topic": "t", "source_partition": 1,
              "source_offset": 2, "source_key": None, "payload": b"x", "command_id": None,
              "failed_at": T_COMMITTED}
    fastavro.schemaless_writer(body, parse_schema(old), record)
    old_fingerprint = fingerprint_crc64_avro(parse_schema(old))
    assert old_fingerprint == bytes.fromhex("a928b9a243f8986b")  # what 1.x wrote
    name, decoded = CODEC.decode(SINGLE_OBJECT_MARKER + old_fingerprint + body.getvalue())
    assert name == "DeadLetter"
    assert decoded == {**record, "payload_size": None, "payload_sha256": None}
    # Nothing is written with an older version.
    assert CODEC.fingerprint_of("DeadLetter") != old_fingerprint


def test_an_older_version_needs_a_current_one(tmp_path: Path) -> None:
    (tmp_path / "history").mkdir()
    shutil.copy(SCHEMA_DIR / "history" / "DeadLetter.v1.avsc", tmp_path / "history")
    shutil.copy(SCHEMA_DIR / "Entry.avsc", tmp_path / "Entry.avsc")
    with pytest.raises(CodecError) as caught:
        load_history(tmp_path, tmp_path / "history")
    assert caught.value.reason == "invalid_schema"


# --- The read form (decode's value without the bytes, for records handed over in-process) ---


def _same_form(form: Any, decoded: Any) -> bool:
    # The round-trip cases give Decimals with fewer digits than the schema's scale.
    return same_read_values(form, decoded, decimal_digits=False)



@pytest.mark.parametrize(
    ("record_name", "record"), [case[1:] for case in ROUND_TRIPS], ids=[c[0] for c in ROUND_TRIPS]
)
def test_the_read_form_is_what_decode_returns(record_name: str, record: dict[str, Any]) -> None:
    assert _same_form(CODEC.read_form(record_name, record),
                 CODEC.decode(CODEC.encode(record_name, record))[1])


@pytest.mark.parametrize("stamp", [0, 1_767_225_600_123, -1, T_OCCURRED, T_COMMITTED,
                                   datetime(2025, 1, 1, 12, 0, 0, 999_999, tzinfo=UTC)])
def test_the_read_form_of_a_timestamp_is_decodes_aware_utc_millisecond(stamp: Any) -> None:
    record = entry(committed_at=stamp, occurred_at=stamp)
    form = CODEC.read_form("Entry", record)
    assert _same_form(form, CODEC.decode(CODEC.encode("Entry", record))[1])
    assert form["committed_at"].tzinfo is UTC


def test_the_read_form_fills_defaults_copies_containers_and_converts_nested_records() -> None:
    command = {"command_id": "c", "account_id": "a", "entry_type": "credit", "amount": Decimal("1")}
    form = CODEC.read_form("PostEntry", command)
    assert _same_form(form, CODEC.decode(CODEC.encode("PostEntry", command))[1])
    form["metadata"]["x"] = "y"  # a default container is the form's own
    assert CODEC.read_form("PostEntry", command)["metadata"] == {}
    entry_of_result = entry(committed_at=1_767_225_600_000)
    result = {"command_id": "c", "status": "committed", "reason": None, "detail": None,
              "entry": entry_of_result}
    form = CODEC.read_form("Result", result)
    assert form["entry"]["committed_at"] == datetime(2026, 1, 1, tzinfo=UTC)
    assert entry_of_result["committed_at"] == 1_767_225_600_000  # the caller's record unchanged
    assert _same_form(form, CODEC.decode(CODEC.encode("Result", result))[1])


def test_the_read_form_refuses_a_record_without_a_required_field() -> None:
    with pytest.raises(CodecError, match="needs field 'command_id'"):
        CODEC.read_form("PostEntry", {"account_id": "a"})
    with pytest.raises(CodecError, match="offset-naive"):
        CODEC.read_form("Entry", entry(committed_at=datetime(2025, 1, 1)))  # naive
