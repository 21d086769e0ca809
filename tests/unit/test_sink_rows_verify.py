"""Unit tests of the sinks' pure parts: rows, batches, migrations, Merkle/account verification."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiokafka import TopicPartition

from sardis_ledger.schemas.codec import AvroCodec
from sardis_ledger.sinks import rows
from sardis_ledger.sinks.errors import SinkError
from sardis_ledger.sinks.immudb import StateFile, TrustedState, entries_to_store, entry_key, receipt_record
from sardis_ledger.sinks.intake import SinkReject
from sardis_ledger.sinks.kafka import parse_from_offsets, parse_time
from sardis_ledger.sinks.postgres import build_batch
from sardis_ledger.sinks.schema import check_schema_name, migrations, pg_schema, quoted
from sardis_ledger.sinks.verify import AnchorRow, Report, check_accounts, check_anchor, check_partition
from sardis_ledger.sinks.workload import LedgerWorkload
from sardis_ledger.streams import merkle, records
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.money import currency_table
from sardis_ledger.streams.topics import LedgerTopic

CURRENCIES = currency_table()
CODEC = AvroCodec()


def _entries(count: int, partitions: int = 1, accounts: int = 5) -> list[dict]:
    return LedgerWorkload(partitions, accounts, seed=1).next(count).entries


def _core(wires: list[dict]) -> list:
    return [records.entry_from_wire(w, CURRENCIES) for w in wires]


def test_entry_row_round_trip_is_exact() -> None:
    for wire in _entries(50):
        row = dict(zip(rows.ENTRY_COLUMNS, rows.entry_row(wire, CURRENCIES), strict=True))
        assert isinstance(row["amount"], Decimal)
        assert row["amount"].as_tuple().exponent == -CURRENCIES["USDC"].decimals
        assert rows.entry_from_row(row, CURRENCIES) == records.entry_from_wire(wire, CURRENCIES)


def test_amount_with_more_decimals_than_its_currency_is_kept_not_rounded() -> None:
    wire = dict(_entries(1)[0], amount=Decimal("1.0000001"))
    row = rows.entry_row(wire, CURRENCIES)
    assert row[rows.ENTRY_COLUMNS.index("amount")] == Decimal("1.0000001")


def test_build_batch_dedupes_and_tracks_offsets() -> None:
    wires = _entries(10)
    topic = "p.ledger.entries"
    tp = TopicPartition(topic, 0)
    values = [CODEC.encode("Entry", w) for w in wires] + [CODEC.encode("Entry", wires[0]), b"junk"]
    messages = {tp: [SimpleNamespace(offset=i, value=v, partition=0, key=None)
                     for i, v in enumerate(values)]}
    batch = build_batch(messages, {topic: LedgerTopic.ENTRIES}, CODEC, CURRENCIES)
    assert len(batch.entries) == 10 and batch.records == 12
    assert [(r.offset, r.reason) for r in batch.rejects] == [(11, "bad_marker")]
    assert batch.offsets[tp] == 12


def _hostile_entries() -> list[bytes]:
    """Records on ledger.entries that no worker could have written."""
    good = _entries(1)[0]
    return [
        b"junk",
        b"",
        CODEC.encode("TreeHead", {"partition": 0, "tree_size": 1, "root_hash": "ab" * 32,
                                  "published_at": 1}),
        CODEC.encode("Entry", {**good, "currency": "XXX"}),
        CODEC.encode("Entry", {**good, "amount": Decimal("0")}),
        CODEC.encode("Entry", {**good, "amount": Decimal("0.0000001")}),
        CODEC.encode("Entry", {**good, "entry_id": "a\x00b"}),
        CODEC.encode("Entry", {**good, "sequence": 0}),
        CODEC.encode("Entry", good)[:-3],
    ]


def test_both_sinks_set_aside_the_same_records_for_the_same_reasons() -> None:
    settings = Settings(topic_prefix="p.")
    topic = settings.topic(LedgerTopic.ENTRIES)
    values = [CODEC.encode("Entry", w) for w in _entries(3)] + _hostile_entries()
    messages = [SimpleNamespace(offset=i, value=v, partition=2, key=b"k")
                for i, v in enumerate(values)]
    batch = build_batch({TopicPartition(topic, 2): messages}, {topic: LedgerTopic.ENTRIES},
                        CODEC, CURRENCIES)
    immudb_rejects: list[SinkReject] = []
    stored = entries_to_store(settings, messages, CODEC, CURRENCIES, immudb_rejects)
    assert len(batch.entries) == len(stored) == 3
    assert batch.rejects == immudb_rejects
    assert [r.offset for r in immudb_rejects] == list(range(3, len(values)))
    reasons = {r.reason for r in immudb_rejects}
    assert reasons == {"bad_marker", "empty_payload", "unexpected_record", "invalid_entry",
                       "truncated"}
    for reject in immudb_rejects:
        dead = reject.dead_letter("immudb", 5)
        assert dead["source_offset"] == reject.offset and dead["reason"] == reject.reason
        CODEC.encode("DeadLetter", dead)


def test_migrations_are_numbered_and_schema_names_checked() -> None:
    assert [m.version for m in migrations()] == list(range(1, len(migrations()) + 1))
    assert "balance_at" in migrations()[0].sql
    assert pg_schema({}) == "ledger" and pg_schema({"SARDIS_PG_SCHEMA": "t_1"}) == "t_1"
    assert quoted("ledger_replay_20260101") == '"ledger_replay_20260101"'
    for bad in ("", "Ledger", "a;drop", "1x", "x" * 41, 'a"b'):
        with pytest.raises(SinkError):
            check_schema_name(bad)


def test_parsers() -> None:
    assert parse_from_offsets(["3:1200", "0:5"]) == {3: 1200, 0: 5}
    with pytest.raises(SinkError):
        parse_from_offsets(["3-1200"])
    assert parse_time("2026-01-31T12:00:00").tzinfo is not None
    with pytest.raises(SinkError):
        parse_time("yesterday")


def test_verify_accepts_an_intact_log_and_its_tree_heads() -> None:
    workload = LedgerWorkload(1, 5, seed=2)
    produced = workload.next(600)
    heads = [(h["tree_size"], h["root_hash"]) for h in produced.tree_heads + workload.final_heads()]
    report = Report()
    entries = _core(produced.entries)
    check_partition(0, entries, heads, report)
    check_accounts(entries, report)
    assert report.ok and report.tree_heads == len(heads) >= 3


def test_verify_names_an_edited_entry() -> None:
    entries = _core(_entries(100))
    entries[40] = dataclasses.replace(entries[40], amount_minor=entries[40].amount_minor + 1)
    report = Report()
    check_partition(0, entries, [], report)
    assert report.problems[0].entry_id == entries[40].entry_id


def _anchor(leaf_hashes: list[bytes], size: int, chain_root: bytes | None = b"",
            root_hash: str | None = None) -> AnchorRow:
    root = merkle.root_from_leaf_hashes(leaf_hashes[:size])
    return AnchorRow(0, size, root_hash or root.hex(), "0xabc", "0xc0ffee",
                     root if chain_root == b"" else chain_root)


@pytest.mark.parametrize(("case", "problem"), [
    ("intact", None),
    ("chain holds nothing", "holds no root"),
    ("row differs from chain", "the anchors table says root"),
    ("entries missing", "only 20 are stored"),
    ("entry changed", "was changed"),
])
def test_check_anchor(case: str, problem: str | None) -> None:
    entries = _core(_entries(40))
    leaf_hashes = check_partition(0, entries, [], Report())
    anchor = _anchor(leaf_hashes, 30)
    if case == "chain holds nothing":
        anchor = dataclasses.replace(anchor, chain_root=bytes(32))
    elif case == "row differs from chain":
        anchor = dataclasses.replace(anchor, root_hash="00" * 32)
    elif case == "entries missing":
        leaf_hashes = leaf_hashes[:20]
    elif case == "entry changed":
        leaf_hashes = [*leaf_hashes[:7], bytes(32), *leaf_hashes[8:]]
    report = Report()
    check_anchor(anchor, leaf_hashes, report)
    assert report.anchors == 1
    if problem is None:
        assert report.ok, report.problems
    else:
        assert problem in report.problems[0].detail and report.problems[0].partition == 0


def test_verify_names_the_gap_of_a_deleted_entry() -> None:
    entries = _core(_entries(100))
    del entries[30]
    report = Report()
    check_partition(0, entries, [], report)
    check_accounts(entries, report)
    assert "missing" in report.problems[0].detail
    assert report.problems[0].entry_id == entries[30].entry_id  # the entry after the gap


def test_verify_catches_a_rewritten_log_by_its_tree_heads() -> None:
    """An attacker who edits an entry and recomputes every hash still fails the tree heads."""
    workload = LedgerWorkload(1, 5, seed=3)
    produced = workload.next(300)
    heads = [(h["tree_size"], h["root_hash"]) for h in produced.tree_heads + workload.final_heads()]
    from sardis_ledger.streams import core, merkle

    rewritten, frontier = [], merkle.MerkleFrontier()
    for i, entry in enumerate(_core(produced.entries)):
        if i == 10:
            entry = dataclasses.replace(entry, reference="changed")
        sealed, frontier = core.seal(entry, frontier)
        rewritten.append(sealed)
    report = Report()
    check_partition(0, rewritten, heads, report)
    assert not report.ok and "tree head" in report.problems[0].detail


def test_running_balance_that_does_not_add_up_is_named() -> None:
    entries = _core(_entries(60, accounts=2))
    victim = next(e for e in entries if e.sequence == 3)
    entries = [dataclasses.replace(e, running_balance_minor=e.running_balance_minor + 1)
               if e is victim else e for e in entries]
    report = Report()
    check_accounts(entries, report)
    assert report.problems[0].entry_id == victim.entry_id


def test_state_file_only_moves_forward(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "s.json")
    assert state.load() is None
    state.save(TrustedState("db", 10, b"\x01" * 32))
    state.save(TrustedState("db", 5, b"\x02" * 32))
    assert state.load() == TrustedState("db", 10, b"\x01" * 32)
    state.save(TrustedState("db", 11, b"\x03" * 32))
    assert state.load().tx_id == 11  # type: ignore[union-attr]


def test_receipt_record_encodes_and_keys_carry_the_prefix() -> None:
    from datetime import UTC, datetime

    from sardis_ledger.sinks.immudb import Stored

    record = receipt_record("ent_1", Stored(7, True), "defaultdb", datetime.now(UTC))
    name, decoded = CODEC.decode(CODEC.encode("Receipt", record))
    assert name == "Receipt" and decoded["immudb_tx"] == 7 and decoded["verified"] is True
    assert entry_key(Settings(topic_prefix="t-1."), "ent_1") == b"t-1.entry:ent_1"
    assert entry_key(Settings(), "ent_1") == b"entry:ent_1"


def test_workload_is_deterministic() -> None:
    a = LedgerWorkload(3, 10, seed=9).next(50).entries
    b = LedgerWorkload(3, 10, seed=9).next(50).entries
    assert a == b and len({e["entry_id"] for e in a}) == 50
