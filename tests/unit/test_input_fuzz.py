"""Property fuzz of the pure decode -> validate -> decide path, for every input record type.

Whatever bytes arrive on an input topic, the pure functions the worker calls either reject them
with a reason or accept values that the decisions and the output encoders then handle without
raising: no input reaches the bug path (InvariantViolation, KeyError, ...), which stops a worker.
Mutations are made at two levels: bytes of valid messages (flips, cuts, tails) and fields of
valid records re-encoded by fastavro alone, without the codec's checks (a hostile writer).
"""

from __future__ import annotations

import io
import os
from decimal import Decimal
from typing import Any

import fastavro
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sardis_ledger.schemas.codec import SINGLE_OBJECT_MARKER, AvroCodec, load_schemas
from sardis_ledger.streams import batches as b
from sardis_ledger.streams import core, merkle, reconcile, records
from sardis_ledger.streams.core import AccountState
from sardis_ledger.streams.errors import CodecError
from sardis_ledger.streams.money import currency_table

CODEC = AvroCodec()
SCHEMAS = load_schemas()
CURRENCIES = currency_table()
PARTITIONS = 12
PARTITION = 0
NOW_MS = 1_700_000_000_000
BATCH = next(f"bat_{i}" for i in range(1000)
             if b.coordinator_partition(f"bat_{i}", PARTITIONS) == PARTITION)
ACCOUNT = next(f"acc_{i}" for i in range(1000)
               if core.partition_for(f"acc_{i}", PARTITIONS) == PARTITION)
TX = "0x" + "cd" * 32


def _entry_wire() -> dict[str, Any]:
    command = core.parse_post_entry({"command_id": "c1", "account_id": ACCOUNT, "currency": "USD",
                                     "entry_type": "credit", "amount": Decimal("5"),
                                     "chain": "base", "chain_tx_hash": TX, "chain_log_index": 1},
                                    CURRENCIES)
    assert isinstance(command, core.PostEntry)
    decision = core.decide_post_entry(AccountState(), merkle.MerkleFrontier(), command,
                                      partition=PARTITION, now_ms=NOW_MS)
    assert decision.outcome.entry is not None
    return records.entry_to_wire(decision.outcome.entry, CURRENCIES["USD"])


LEG = {"account_id": ACCOUNT, "currency": "USD", "entry_type": "debit", "amount": Decimal("1"),
       "reference": None, "metadata": {}, "allow_overdraft": False}
VALID: list[tuple[str, dict[str, Any]]] = [
    ("PostEntry", {"command_id": "c1", "account_id": ACCOUNT, "currency": "USD",
                   "entry_type": "debit", "amount": Decimal("1.50"), "reference": "r",
                   "metadata": {"k": "v"}, "expected_sequence": 0, "allow_overdraft": False,
                   "occurred_at": NOW_MS, "chain": None, "chain_tx_hash": None,
                   "chain_log_index": None}),
    ("SubmitBatch", {"batch_id": BATCH, "legs": [LEG, {**LEG, "entry_type": "credit"}],
                     "require_balanced": True, "timeout_ms": 1000}),
    ("RollbackBatch", {"command_id": "rb", "batch_id": BATCH, "reason": "r", "force": False}),
    ("ReserveLeg", {"batch_id": BATCH, "leg_index": 0, "batch_size": 2,
                    "coordinator_partition": PARTITION, "sign": -1, "reverses_entry_id": None,
                    **LEG}),
    ("SettleLeg", {"batch_id": BATCH, "leg_index": 0, "account_id": ACCOUNT, "currency": "USD",
                   "action": "post", "coordinator_partition": PARTITION}),
    ("LegReport", {"batch_id": BATCH, "leg_index": 0, "kind": "refused",
                   "reason": "insufficient_funds", "detail": "d", "entry": None}),
    ("LegReport", {"batch_id": BATCH, "leg_index": 0, "kind": "posted", "reason": None,
                   "detail": None, "entry": _entry_wire()}),
    ("BatchTick", {"partition": PARTITION, "now": NOW_MS}),
    ("ChainTransfer", {"chain": "base", "block_number": 19, "block_hash": "0x" + "ab" * 32,
                       "tx_hash": TX, "log_index": 1, "token": "0x" + "12" * 20,
                       "from_address": "0x" + "34" * 20, "to_address": "0x" + "56" * 20,
                       "amount": Decimal("5"), "currency": "USD", "account_id": ACCOUNT,
                       "direction": "in", "status": "confirmed"}),
    ("Entry", _entry_wire()),
    ("ReconcileTick", {"partition": PARTITION, "now": NOW_MS, "chain_head_block": 20}),
]
assert {name for name, _ in VALID} >= {"PostEntry", "SubmitBatch", "RollbackBatch", "ReserveLeg",
                                       "SettleLeg", "LegReport", "BatchTick", "ChainTransfer",
                                       "Entry", "ReconcileTick"}

HOSTILE_STRINGS = st.sampled_from(["", "x" * 10_000, "a|b", "\x00", "\n", "USD", "reversal",
                                   "post", "void", "posted", "reserved", "refused", BATCH,
                                   ACCOUNT, "bat_1:rollback:r", "ent_" + "0" * 32, "zz" * 32,
                                   "0" * 64, "ETH", "mint", "insufficient_funds"])
HOSTILE_INTS = st.sampled_from([0, 1, -1, 2, 7, 999, 1000, 2**31 - 1, -(2**31), PARTITION,
                                PARTITION + 1])
HOSTILE_LONGS = st.sampled_from([0, -1, 2**63 - 1, -(2**63), NOW_MS, 2**40])
HOSTILE_DECIMALS = st.sampled_from([Decimal(0), Decimal(-500), Decimal("1e41"),
                                    Decimal("0.000000000000000001"), Decimal("1.005"),
                                    Decimal("340282366920938463463374607431768211456")])


def _hostile_value(schema: Any, draw: st.DrawFn) -> Any:
    """A value of the field's Avro type, chosen to break assumptions rather than at random."""
    if isinstance(schema, list):
        branch = draw(st.sampled_from(schema))
        return None if branch == "null" else _hostile_value(branch, draw)
    kind = schema.get("type") if isinstance(schema, dict) else schema
    if isinstance(schema, dict) and schema.get("logicalType") == "decimal":
        return draw(HOSTILE_DECIMALS)
    if isinstance(schema, dict) and schema.get("logicalType") == "timestamp-millis":
        return draw(HOSTILE_LONGS)
    if kind == "string":
        return draw(HOSTILE_STRINGS)
    if kind == "int":
        return draw(HOSTILE_INTS)
    if kind == "long":
        return draw(HOSTILE_LONGS)
    if kind == "boolean":
        return draw(st.booleans())
    if kind == "map":
        return draw(st.sampled_from([{}, {"k": "v" * 600}, {str(i): "v" for i in range(40)}]))
    return None  # records and arrays: leave them to byte-level mutation


@st.composite
def hostile_message(draw: st.DrawFn) -> bytes:
    name, record = draw(st.sampled_from(VALID))
    schema = SCHEMAS[f"sardis.ledger.{name}"]
    record = dict(record)
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from(schema["fields"]))
        value = _hostile_value(field["type"], draw)
        if value is not None or "null" in (field["type"] if isinstance(field["type"], list)
                                           else []):
            record[field["name"]] = value
    body = io.BytesIO()
    try:
        fastavro.schemaless_writer(body, schema, record)
    except (ValueError, TypeError, OverflowError):
        return b""  # fastavro itself refused the value: nothing to send
    data = bytearray(SINGLE_OBJECT_MARKER + CODEC.fingerprint_of(name) + body.getvalue())
    if draw(st.integers(0, 3)) == 0:
        for _ in range(draw(st.integers(1, 3))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut] if draw(st.integers(0, 9)) == 0 else data)


def _encodes(record_name: str, record: dict[str, Any]) -> None:
    CODEC.encode(record_name, record)  # an output the worker cannot publish would stop it


def _dead_letter(reason: str, detail: str, payload: bytes) -> None:
    _encodes("DeadLetter", records.dead_letter(
        reason=reason, detail=detail, topic="ledger.commands", partition=0, offset=1, key=None,
        payload=payload, command_id=None, failed_at_ms=NOW_MS))


def _post_entry(record: dict[str, Any], payload: bytes) -> None:
    parsed = core.parse_post_entry(record, CURRENCIES)
    if isinstance(parsed, core.Rejection):
        _dead_letter(parsed.reason, parsed.detail, payload)
        if parsed.command_id is not None:
            _encodes("Result", records.outcome_to_wire(core.Outcome(
                parsed.command_id, core.Status.REJECTED, parsed.reason, parsed.detail),
                CURRENCIES))
        return
    for state in (AccountState(), AccountState(balance_minor=10**40, sequence=3)):
        decision = core.decide_post_entry(state, merkle.MerkleFrontier(), parsed,
                                          partition=PARTITION, now_ms=NOW_MS)
        _encodes("Result", records.outcome_to_wire(decision.outcome, CURRENCIES))
        records.record_to_bytes(decision.record)


def _submit(record: dict[str, Any], payload: bytes) -> None:
    parsed = b.parse_submit_batch(record, CURRENCIES)
    if isinstance(parsed, b.BatchRejection):
        _dead_letter(parsed.reason, parsed.detail, payload)
        return
    step = b.submit(None, parsed, coordinator_partition=PARTITION, now_ms=NOW_MS)
    for reserve in step.reserves:
        _encodes("ReserveLeg", records.reserve_to_wire(reserve))


def _rollback(record: dict[str, Any], payload: bytes) -> None:
    parsed = b.parse_rollback(record)
    if isinstance(parsed, b.BatchRejection):
        _dead_letter(parsed.reason, parsed.detail, payload)


def _reserve(record: dict[str, Any], payload: bytes) -> None:
    parsed = b.parse_reserve(record, CURRENCIES, PARTITIONS)
    if isinstance(parsed, b.BatchRejection):
        _dead_letter(parsed.reason, parsed.detail, payload)
        return
    for state in (AccountState(), AccountState(balance_minor=10**40)):
        step = b.reserve(state, None, parsed)
        if isinstance(step, b.HoldStep) and step.report is not None:
            _encodes("LegReport", records.report_to_wire(step.report, CURRENCIES))
            records.hold_to_bytes(step.hold)


def _settle(record: dict[str, Any], payload: bytes) -> None:
    parsed = b.parse_settle(record, CURRENCIES, PARTITIONS)
    if isinstance(parsed, b.BatchRejection):
        _dead_letter(parsed.reason, parsed.detail, payload)
        return
    leg = b.Leg(ACCOUNT, "USD", 2, "debit", 100, -1)
    held = b.reserve(AccountState(balance_minor=1000), None,
                     b.Reserve(BATCH, 0, 2, leg, PARTITION))
    assert isinstance(held, b.HoldStep)
    for state, hold in ((AccountState(), None), (held.state, held.hold)):
        step = b.void(state, hold, parsed) if parsed.action is b.SettleAction.VOID else \
            b.post(state, merkle.MerkleFrontier(), hold, parsed, partition=PARTITION,
                   now_ms=NOW_MS)
        if isinstance(step, b.HoldStep) and step.report is not None:
            _encodes("LegReport", records.report_to_wire(step.report, CURRENCIES))


def _report(record: dict[str, Any], payload: bytes) -> None:
    entry = None
    if record.get("entry") is not None:
        parsed_entry = records.parse_entry(record["entry"], CURRENCIES)
        if isinstance(parsed_entry, str):
            _dead_letter("invalid_field", parsed_entry, payload)
            return
        entry = parsed_entry
    parsed = b.parse_report(record, entry, PARTITIONS)
    if isinstance(parsed, b.BatchRejection):
        _dead_letter(parsed.reason, parsed.detail, payload)
        return
    header = b.BatchHeader(parsed.batch_id, b"d" * 32, 2, b.BatchStatus.POSTING, NOW_MS)
    leg = b.LegRecord(b.Leg(ACCOUNT, "USD", 2, "debit", 100, -1))
    assert b.check_report(None, None, parsed) is not None
    if b.check_report(header, leg, parsed) is None:
        b.record_report(header, leg, parsed)


def _tick(record: dict[str, Any], payload: bytes) -> None:
    b.parse_tick(record, PARTITION)


def _transfer(record: dict[str, Any], payload: bytes) -> None:
    try:
        event = reconcile.transfer_from_wire(record)
    except reconcile.ReconcileError:
        return
    reconcile.on_transfer(None, event, NOW_MS)


def _claim(record: dict[str, Any], payload: bytes) -> None:
    if records.entry_problem(record, CURRENCIES) is not None:
        return
    claim = reconcile.claim_from_entry(record)
    if claim is not None:
        reconcile.on_entry(None, claim, NOW_MS)


def _reconcile_tick(record: dict[str, Any], payload: bytes) -> None:
    try:
        reconcile.parse_tick(record, PARTITION)
    except reconcile.ReconcileError:
        return


PATHS = {"PostEntry": _post_entry, "SubmitBatch": _submit, "RollbackBatch": _rollback,
         "ReserveLeg": _reserve, "SettleLeg": _settle, "LegReport": _report, "BatchTick": _tick,
         "ChainTransfer": _transfer, "Entry": _claim, "ReconcileTick": _reconcile_tick}


# SARDIS_FUZZ_EXAMPLES raises it (`make fuzz`: 100,000).
FUZZ_EXAMPLES = int(os.environ.get("SARDIS_FUZZ_EXAMPLES", "3000"))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=hostile_message())
def test_no_input_reaches_the_bug_path(data: bytes) -> None:
    try:
        name, record = CODEC.decode(data)
    except CodecError as exc:
        event(f"codec: {exc.reason}")
        _dead_letter(exc.reason, str(exc), data)
        return
    event(f"decoded: {name}")
    path = PATHS.get(name)
    if path is None:  # not an input record type: dead-lettered as unknown_command
        _dead_letter("unknown_command", name, data)
        return
    path(record, data)


def test_every_valid_example_takes_its_accepting_path() -> None:
    for name, record in VALID:
        PATHS[name](CODEC.decode(CODEC.encode(name, record))[1], b"")
