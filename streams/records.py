"""Pure translation between core dataclasses, Avro wire records and Faust table values."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any, Final

from sardis_ledger.streams import merkle
from sardis_ledger.streams.batches import (
    BATCH_LEGS_MAX,
    REVERSAL,
    BatchHeader,
    BatchOutcome,
    BatchStatus,
    Hold,
    HoldStatus,
    Leg,
    LegRecord,
    LegReport,
    Reserve,
    Settle,
    valid_batch_id,
)
from sardis_ledger.streams.core import (
    BALANCE_SIGN,
    CHAIN_FIELD_LENGTH_MAX,
    EPOCH,
    ONE_MS,
    REFERENCE_LENGTH_MAX,
    AccountState,
    CommandRecord,
    Entry,
    LogHead,
    Outcome,
    Reason,
    Status,
    bounded,
    metadata_problem,
    shown,
    valid_id,
)
from sardis_ledger.streams.errors import InvariantViolation
from sardis_ledger.streams.money import Currency, to_minor, to_wire
from sardis_ledger.streams.packing import Packer, Unpacker

TABLE_VALUE_VERSION = 1
# One compact encoder for every table value: json.dumps with separators builds a new encoder
# per call (~0.7 us of ~3-5 us, and a two-leg batch writes ~15 values). Same bytes. No cycle
# check: table values are trees this module builds.
_TABLE_JSON: Final = json.JSONEncoder(separators=(",", ":"), check_circular=False)


def _ms(value: Any) -> int:
    if isinstance(value, datetime):
        return (value - EPOCH) // ONE_MS
    if isinstance(value, int):
        return value
    raise InvariantViolation(f"not a timestamp: {value!r}")


def _opt_ms(value: Any) -> int | None:
    return None if value is None else _ms(value)


def _minor(amount: Decimal, currency: Currency) -> int:
    minor = to_minor(amount, currency.decimals)
    if minor is None:
        raise InvariantViolation(f"{amount} does not fit {currency.code}'s {currency.decimals} decimals")
    return minor


# ------------------------------------------------------------------ Avro wire records


def entry_to_wire(entry: Entry, currency: Currency) -> dict[str, Any]:
    return {
        "entry_id": entry.entry_id,
        "command_id": entry.command_id,
        "account_id": entry.account_id,
        "currency": entry.currency,
        "entry_type": entry.entry_type,
        "amount": to_wire(entry.amount_minor, currency.decimals),
        "running_balance": to_wire(entry.running_balance_minor, currency.decimals),
        "sequence": entry.sequence,
        "batch_id": entry.batch_id,
        "batch_size": entry.batch_size,
        "leg_index": entry.leg_index,
        "reverses_entry_id": entry.reverses_entry_id,
        "reference": entry.reference,
        "metadata": dict(entry.metadata),
        "occurred_at": entry.occurred_at_ms,
        "committed_at": entry.committed_at_ms,
        "partition": entry.partition,
        "leaf_index": entry.leaf_index,
        "entry_hash": entry.entry_hash.hex(),
        "merkle_root": entry.merkle_root.hex(),
        "chain": entry.chain,
        "chain_tx_hash": entry.chain_tx_hash,
        "chain_log_index": entry.chain_log_index,
    }


def entry_from_wire(record: Mapping[str, Any], currencies: Mapping[str, Currency]) -> Entry:
    currency = currencies[record["currency"]]
    return Entry(
        entry_id=record["entry_id"],
        command_id=record["command_id"],
        account_id=record["account_id"],
        currency=record["currency"],
        entry_type=record["entry_type"],
        amount_minor=_minor(record["amount"], currency),
        running_balance_minor=_minor(record["running_balance"], currency),
        sequence=record["sequence"],
        committed_at_ms=_ms(record["committed_at"]),
        partition=record["partition"],
        leaf_index=record["leaf_index"],
        entry_hash=bytes.fromhex(record["entry_hash"]),
        merkle_root=bytes.fromhex(record["merkle_root"]),
        batch_id=record.get("batch_id"),
        batch_size=record.get("batch_size"),
        leg_index=record.get("leg_index"),
        reverses_entry_id=record.get("reverses_entry_id"),
        reference=record.get("reference"),
        metadata=dict(record.get("metadata") or {}),
        occurred_at_ms=_opt_ms(record.get("occurred_at")),
        chain=record.get("chain"),
        chain_tx_hash=record.get("chain_tx_hash"),
        chain_log_index=record.get("chain_log_index"),
    )


ENTRY_HASH_BYTES = 32


def _digest(value: Any) -> bool:
    try:
        return isinstance(value, str) and len(bytes.fromhex(value)) == ENTRY_HASH_BYTES \
            and value == value.lower()
    except ValueError:
        return False


def _whole(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def entry_problem(record: Mapping[str, Any], currencies: Mapping[str, Currency]) -> str | None:
    """What makes a decoded Entry record one no worker of this ledger could have written, or
    None. Checked before anything reads an Entry it did not write itself (leg reports, sinks)."""
    code = record.get("currency")
    currency = currencies.get(code) if isinstance(code, str) else None
    if currency is None:
        return f"unknown currency {shown(record.get('currency'))}"
    # Workers name entries ent_ and 32 hex digits, but a projection may hold entries another
    # tool wrote (fixtures, migrations): any valid id is an entry id here.
    if not valid_id(record.get("entry_id")):
        return "entry_id is not an entry id"
    if not (valid_id(record.get("command_id")) or valid_batch_id(record.get("command_id"))):
        return "command_id is not a command or batch id"
    if not valid_id(record.get("account_id"), allow_separator=False):
        return "account_id is not an account id"
    if record.get("entry_type") not in BALANCE_SIGN and record.get("entry_type") != REVERSAL:
        return f"entry_type {shown(record.get('entry_type'))} is not an entry type"
    for name in ("amount", "running_balance"):
        value = record.get(name)
        if not isinstance(value, Decimal) or to_minor(value, currency.decimals) is None:
            return f"{name} does not fit {currency.code}'s {currency.decimals} decimals"
    if to_minor(record["amount"], currency.decimals) <= 0:  # type: ignore[operator]
        return "amount must be greater than zero"
    if not (_whole(record.get("sequence"), 1) and _whole(record.get("partition"), 0)
            and _whole(record.get("leaf_index"), 0)):
        return "sequence, partition and leaf_index must be whole numbers (sequence from 1)"
    if not (_digest(record.get("entry_hash")) and _digest(record.get("merkle_root"))):
        return "entry_hash and merkle_root must be 64 lowercase hex digits"
    return _entry_optional_problem(record)


def _entry_optional_problem(record: Mapping[str, Any]) -> str | None:
    batch = (record.get("batch_id"), record.get("batch_size"), record.get("leg_index"))
    if batch != (None, None, None) and not (
            valid_batch_id(batch[0]) and _whole(batch[1], 1) and _whole(batch[2], 0)
            and batch[2] < batch[1] <= BATCH_LEGS_MAX):  # type: ignore[operator]
        return "batch_id, batch_size and leg_index must all be absent or describe one leg"
    reverses = record.get("reverses_entry_id")
    if reverses is not None and not valid_id(reverses):
        return "reverses_entry_id is not an entry id"
    reference = record.get("reference")
    if reference is not None and len(reference) > REFERENCE_LENGTH_MAX:
        return f"reference is longer than {REFERENCE_LENGTH_MAX} characters"
    problem = metadata_problem(record.get("metadata") or {})
    if problem is not None:
        return problem
    for name in ("chain", "chain_tx_hash"):
        value = record.get(name)
        if value is not None and len(value) > CHAIN_FIELD_LENGTH_MAX:
            return f"{name} is longer than {CHAIN_FIELD_LENGTH_MAX} characters"
    log_index = record.get("chain_log_index")
    if log_index is not None and not _whole(log_index, 0):
        return "chain_log_index must be >= 0"
    try:
        _ms(record.get("committed_at"))
        _opt_ms(record.get("occurred_at"))
    except InvariantViolation:
        return "committed_at and occurred_at must be timestamps"
    return None


def parse_entry(record: Mapping[str, Any], currencies: Mapping[str, Currency]) -> Entry | str:
    """A decoded Entry record that passed entry_problem, or the problem."""
    problem = entry_problem(record, currencies)
    return problem if problem is not None else entry_from_wire(record, currencies)


def outcome_to_wire(outcome: Outcome, currencies: Mapping[str, Currency], *,
                    with_entry: bool = True) -> dict[str, Any]:
    """The Result of an outcome; without its entry when the caller copies the entry's encoded
    bytes into the Result instead (schemas/codec.py encode_embedding)."""
    entry = outcome.entry if with_entry else None
    return {
        "command_id": outcome.command_id,
        "status": str(outcome.status),
        "reason": None if outcome.reason is None else str(outcome.reason),
        "detail": None if outcome.detail is None else bounded(outcome.detail),
        "entry": None if entry is None else entry_to_wire(entry, currencies[entry.currency]),
        "batch_id": None,
        "failed_leg_index": None,
        "entries": [],
    }


def balance_to_wire(account_id: str, currency: Currency, state: AccountState) -> dict[str, Any]:
    return {
        "account_id": account_id,
        "currency": currency.code,
        "balance": to_wire(state.balance_minor, currency.decimals),
        "available": to_wire(state.available_minor, currency.decimals),
        "sequence": state.sequence,
        "updated_at": state.last_committed_at_ms,
    }


def tree_head_to_wire(partition: int, frontier: merkle.MerkleFrontier,
                      published_at_ms: int) -> dict[str, Any]:
    return {
        "partition": partition,
        "tree_size": frontier.tree_size,
        "root_hash": frontier.root().hex(),
        "published_at": published_at_ms,
    }


# A dead letter must always fit a Kafka message (1 MiB, schemas/codec.MESSAGE_SIZE_MAX_BYTES),
# whatever it echoes: the original value is cut to this many bytes (its length and SHA-256 are
# kept), the key to DLQ_KEY_BYTES_MAX, the detail to core.DETAIL_LENGTH_MAX characters (at most
# 4 bytes each in UTF-8), the reason to DLQ_REASON_LENGTH_MAX. 64 KiB remain for the rest.
DLQ_PAYLOAD_BYTES_MAX = 960 * 1024
DLQ_KEY_BYTES_MAX = 1024
DLQ_REASON_LENGTH_MAX = 64
TOPIC_NAME_LENGTH_MAX = 249  # Kafka's own limit


def dead_letter(*, reason: str, detail: str, topic: str, partition: int, offset: int,
                key: bytes | None, payload: bytes, command_id: Any,
                failed_at_ms: int) -> dict[str, Any]:
    """A DeadLetter record of one input record, bounded to fit a Kafka message."""
    return {
        "reason": bounded(str(reason), DLQ_REASON_LENGTH_MAX),
        "detail": bounded(detail),
        "source_topic": topic[:TOPIC_NAME_LENGTH_MAX],
        "source_partition": partition,
        "source_offset": offset,
        "source_key": None if key is None else bytes(key[:DLQ_KEY_BYTES_MAX]),
        "payload": bytes(payload[:DLQ_PAYLOAD_BYTES_MAX]),
        "command_id": command_id if valid_id(command_id) else None,
        "failed_at": failed_at_ms,
        "payload_size": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }


# ------------------------------------------------------------------ table values (JSON, ints only)
# JSON keeps the changelog readable with any tool; every number in it is an integer (Python's json
# reads and writes arbitrary-size ints exactly), hashes are hex.


def state_to_bytes(state: AccountState) -> bytes:
    return _TABLE_JSON.encode([TABLE_VALUE_VERSION, state.balance_minor, state.pending_debit_minor,
                               state.sequence, state.last_committed_at_ms]).encode()


def state_from_bytes(data: bytes | None) -> AccountState:
    if data is None:
        return AccountState()
    version, balance, pending, sequence, last_ms = json.loads(data)
    if version != TABLE_VALUE_VERSION:
        raise InvariantViolation(f"account state version {version} is not {TABLE_VALUE_VERSION}")
    return AccountState(balance, pending, sequence, last_ms)


def _entry_to_json(entry: Entry) -> dict[str, Any]:
    return {
        "entry_id": entry.entry_id, "command_id": entry.command_id, "account_id": entry.account_id,
        "currency": entry.currency, "entry_type": entry.entry_type,
        "amount_minor": entry.amount_minor, "running_balance_minor": entry.running_balance_minor,
        "sequence": entry.sequence, "committed_at_ms": entry.committed_at_ms,
        "partition": entry.partition, "leaf_index": entry.leaf_index,
        "entry_hash": entry.entry_hash.hex(), "merkle_root": entry.merkle_root.hex(),
        "batch_id": entry.batch_id, "batch_size": entry.batch_size, "leg_index": entry.leg_index,
        "reverses_entry_id": entry.reverses_entry_id, "reference": entry.reference,
        "metadata": dict(entry.metadata), "occurred_at_ms": entry.occurred_at_ms,
        "chain": entry.chain, "chain_tx_hash": entry.chain_tx_hash,
        "chain_log_index": entry.chain_log_index,
    }


def _entry_from_json(data: dict[str, Any]) -> Entry:
    data = dict(data)
    data["entry_hash"] = bytes.fromhex(data["entry_hash"])
    data["merkle_root"] = bytes.fromhex(data["merkle_root"])
    return Entry(**data)


# A command record, format 2 (the idempotency table's value: one per command ever decided, so the
# worker's memory and its recovery time are mostly these). Byte layout, fields as streams/packing:
#   0x02 | digest: blob | command_id: opt str | status: uint (index in STATUSES) |
#   reason: opt str | detail: opt str |
#   has entry: uint (0/1) | entry: entry_id, account_id, currency, entry_type: opt str each;
#   amount_minor, running_balance_minor: sint; sequence, committed_at_ms, partition, leaf_index:
#   uint; entry_hash, merkle_root: blob; batch_id: opt str; batch_size, leg_index: opt int;
#   reverses_entry_id, reference: opt str; metadata: str map; occurred_at_ms: opt int; chain,
#   chain_tx_hash: opt str; chain_log_index: opt int.
# The entry's command_id is the record's (the entry is this command's). Format 1 was JSON (a
# value starting with "{"): still read, so changelogs written before stay recoverable. Format 2
# holds a USDC credit in 240 bytes instead of 845.
RECORD_FORMAT = 2
STATUSES: tuple[Status, ...] = tuple(Status)


def record_to_bytes(record: CommandRecord) -> bytes:
    outcome = record.outcome
    out = Packer(bytes((RECORD_FORMAT,)))
    out.blob(record.payload_digest)
    out.opt_str(outcome.command_id)
    out.uint(STATUSES.index(outcome.status))
    out.opt_str(None if outcome.reason is None else str(outcome.reason))
    out.opt_str(outcome.detail)
    entry = outcome.entry
    if entry is None:
        out.uint(0)
        return out.done()
    if entry.command_id != outcome.command_id:
        raise InvariantViolation(f"entry {entry.entry_id} of another command in a record")
    out.uint(1)
    for text in (entry.entry_id, entry.account_id, entry.currency, entry.entry_type):
        out.opt_str(text)
    out.sint(entry.amount_minor)
    out.sint(entry.running_balance_minor)
    for number in (entry.sequence, entry.committed_at_ms, entry.partition, entry.leaf_index):
        out.uint(number)
    out.blob(entry.entry_hash)
    out.blob(entry.merkle_root)
    out.opt_str(entry.batch_id)
    out.opt_int(entry.batch_size)
    out.opt_int(entry.leg_index)
    out.opt_str(entry.reverses_entry_id)
    out.opt_str(entry.reference)
    out.str_map(entry.metadata)
    out.opt_int(entry.occurred_at_ms)
    out.opt_str(entry.chain)
    out.opt_str(entry.chain_tx_hash)
    out.opt_int(entry.chain_log_index)
    return out.done()


def record_from_bytes(data: bytes) -> CommandRecord:
    if data[:1] == b"{":
        return _record_from_json(data)
    if data[:1] != bytes((RECORD_FORMAT,)):
        raise InvariantViolation(f"command record format {data[:1]!r} is unknown")
    reader = Unpacker(data, 1)
    digest = reader.blob()
    command_id = reader.text()
    status = STATUSES[reader.uint()]
    reason_text = reader.opt_str()
    detail = reader.opt_str()
    entry = _entry_from_packed(reader, command_id) if reader.uint() else None
    reader.end()
    return CommandRecord(digest, Outcome(command_id, status,
                                         None if reason_text is None else Reason(reason_text),
                                         detail, entry))


def _entry_from_packed(reader: Unpacker, command_id: str) -> Entry:
    entry_id, account_id, currency, entry_type = (reader.text() for _ in range(4))
    amount_minor, running_balance_minor = reader.sint(), reader.sint()
    sequence, committed_at_ms, partition, leaf_index = (reader.uint() for _ in range(4))
    return Entry(entry_id, command_id, account_id, currency, entry_type, amount_minor,
                 running_balance_minor, sequence, committed_at_ms, partition, leaf_index,
                 entry_hash=reader.blob(), merkle_root=reader.blob(), batch_id=reader.opt_str(),
                 batch_size=reader.opt_int(), leg_index=reader.opt_int(),
                 reverses_entry_id=reader.opt_str(), reference=reader.opt_str(),
                 metadata=reader.str_map(), occurred_at_ms=reader.opt_int(),
                 chain=reader.opt_str(), chain_tx_hash=reader.opt_str(),
                 chain_log_index=reader.opt_int())


def _record_from_json(data: bytes) -> CommandRecord:
    """Format 1 (JSON), as workers before format 2 wrote it."""
    raw = json.loads(data)
    if raw["v"] != TABLE_VALUE_VERSION:
        raise InvariantViolation(f"command record version {raw['v']} is not {TABLE_VALUE_VERSION}")
    outcome = Outcome(
        command_id=raw["command_id"],
        status=Status(raw["status"]),
        reason=None if raw["reason"] is None else Reason(raw["reason"]),
        detail=raw["detail"],
        entry=None if raw["entry"] is None else _entry_from_json(raw["entry"]),
    )
    return CommandRecord(bytes.fromhex(raw["digest"]), outcome)


LOG_HEAD_HEADER_BYTES = 24


def log_to_bytes(log: LogHead) -> bytes:
    """Layout: 8-byte head tree size, 8-byte head time (ms), 8-byte next command offset (all
    big-endian), then MerkleFrontier.to_bytes()."""
    return (log.head_tree_size.to_bytes(8, "big") + log.head_published_at_ms.to_bytes(8, "big")
            + log.next_command_offset.to_bytes(8, "big") + log.frontier.to_bytes())


def log_next_command_offset(data: bytes | None) -> int:
    """next_command_offset of a log-head record without decoding its Merkle frontier."""
    if data is None:
        return 0
    if len(data) < LOG_HEAD_HEADER_BYTES:
        raise InvariantViolation(f"log head record of {len(data)} bytes is truncated")
    return int.from_bytes(data[16:24], "big")


def log_from_bytes(data: bytes | None) -> LogHead:
    if data is None:
        return LogHead()
    if len(data) < LOG_HEAD_HEADER_BYTES:
        raise InvariantViolation(f"log head record of {len(data)} bytes is truncated")
    return LogHead(frontier=merkle.MerkleFrontier.from_bytes(data[LOG_HEAD_HEADER_BYTES:]),
                   head_tree_size=int.from_bytes(data[:8], "big"),
                   head_published_at_ms=int.from_bytes(data[8:16], "big"),
                   next_command_offset=int.from_bytes(data[16:24], "big"))


# ------------------------------------------------------------------ batches: wire records and table values


def _leg_to_json(leg: Leg) -> dict[str, Any]:
    return {"account_id": leg.account_id, "currency": leg.currency,
            "currency_decimals": leg.currency_decimals, "entry_type": leg.entry_type,
            "amount_minor": leg.amount_minor, "sign": leg.sign, "reference": leg.reference,
            "metadata": dict(leg.metadata), "allow_overdraft": leg.allow_overdraft,
            "reverses_entry_id": leg.reverses_entry_id}


def _leg_from_json(data: dict[str, Any]) -> Leg:
    return Leg(**data)


def _dumps(value: dict[str, Any]) -> bytes:
    return _TABLE_JSON.encode({"v": TABLE_VALUE_VERSION, **value}).encode()


def _loads(data: bytes, what: str) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(data)
    if raw.pop("v") != TABLE_VALUE_VERSION:
        raise InvariantViolation(f"{what} record version is not {TABLE_VALUE_VERSION}")
    return raw


def header_to_bytes(header: BatchHeader) -> bytes:
    return _dumps({
        "batch_id": header.batch_id, "digest": header.payload_digest.hex(),
        "leg_count": header.leg_count, "status": str(header.status),
        "deadline_ms": header.deadline_ms, "require_balanced": header.require_balanced,
        "result_key": header.result_key, "votes_yes": header.votes_yes,
        "votes_no": header.votes_no, "posted": header.posted, "voided": header.voided,
        "failed_leg_index": header.failed_leg_index,
        "reason": None if header.reason is None else str(header.reason), "detail": header.detail,
        "original_batch_id": header.original_batch_id, "rolled_back_by": header.rolled_back_by,
    })


def header_from_bytes(data: bytes | None) -> BatchHeader | None:
    if data is None:
        return None
    raw = _loads(data, "batch header")
    return BatchHeader(
        batch_id=raw["batch_id"], payload_digest=bytes.fromhex(raw["digest"]),
        leg_count=raw["leg_count"], status=BatchStatus(raw["status"]),
        deadline_ms=raw["deadline_ms"], require_balanced=raw["require_balanced"],
        result_key=raw["result_key"], votes_yes=raw["votes_yes"], votes_no=raw["votes_no"],
        posted=raw["posted"], voided=raw["voided"], failed_leg_index=raw["failed_leg_index"],
        reason=None if raw["reason"] is None else Reason(raw["reason"]), detail=raw["detail"],
        original_batch_id=raw["original_batch_id"], rolled_back_by=raw["rolled_back_by"])


def leg_record_to_bytes(record: LegRecord) -> bytes:
    return _dumps({
        "leg": _leg_to_json(record.leg), "vote": None if record.vote is None else str(record.vote),
        "reason": None if record.reason is None else str(record.reason), "detail": record.detail,
        "entry": None if record.entry is None else _entry_to_json(record.entry),
        "voided": record.voided})


def leg_record_from_bytes(data: bytes) -> LegRecord:
    raw = _loads(data, "batch leg")
    return LegRecord(
        leg=_leg_from_json(raw["leg"]),
        vote=None if raw["vote"] is None else HoldStatus(raw["vote"]),
        reason=None if raw["reason"] is None else Reason(raw["reason"]), detail=raw["detail"],
        entry=None if raw["entry"] is None else _entry_from_json(raw["entry"]),
        voided=raw["voided"])


def hold_to_bytes(hold: Hold) -> bytes:
    return _dumps({
        "batch_id": hold.batch_id, "leg_index": hold.leg_index, "batch_size": hold.batch_size,
        "leg": None if hold.leg is None else _leg_to_json(hold.leg), "status": str(hold.status),
        "reason": None if hold.reason is None else str(hold.reason), "detail": hold.detail,
        "entry": None if hold.entry is None else _entry_to_json(hold.entry)})


def hold_from_bytes(data: bytes | None) -> Hold | None:
    if data is None:
        return None
    raw = _loads(data, "hold")
    return Hold(
        batch_id=raw["batch_id"], leg_index=raw["leg_index"], batch_size=raw["batch_size"],
        leg=None if raw["leg"] is None else _leg_from_json(raw["leg"]),
        status=HoldStatus(raw["status"]),
        reason=None if raw["reason"] is None else Reason(raw["reason"]), detail=raw["detail"],
        entry=None if raw["entry"] is None else _entry_from_json(raw["entry"]))


def _leg_wire(leg: Leg) -> dict[str, Any]:
    return {"account_id": leg.account_id, "currency": leg.currency, "entry_type": leg.entry_type,
            "amount": to_wire(leg.amount_minor, leg.currency_decimals), "reference": leg.reference,
            "metadata": dict(leg.metadata), "allow_overdraft": leg.allow_overdraft}


def reserve_to_wire(message: Reserve) -> dict[str, Any]:
    return {"batch_id": message.batch_id, "leg_index": message.leg_index,
            "batch_size": message.batch_size, "coordinator_partition": message.coordinator_partition,
            "sign": message.leg.sign, "reverses_entry_id": message.leg.reverses_entry_id,
            **_leg_wire(message.leg)}


def settle_to_wire(message: Settle) -> dict[str, Any]:
    return {"batch_id": message.batch_id, "leg_index": message.leg_index,
            "account_id": message.account_id, "currency": message.currency,
            "action": str(message.action), "coordinator_partition": message.coordinator_partition}


def report_to_wire(report: LegReport, currencies: Mapping[str, Currency]) -> dict[str, Any]:
    entry = report.entry
    return {"batch_id": report.batch_id, "leg_index": report.leg_index, "kind": str(report.kind),
            "reason": None if report.reason is None else str(report.reason),
            "detail": None if report.detail is None else bounded(report.detail),
            "entry": None if entry is None else entry_to_wire(entry, currencies[entry.currency])}


def batch_outcome_to_wire(outcome: BatchOutcome) -> dict[str, Any]:
    """The Result of a batch, its entries left out: the caller copies their encoded Entry
    records into it (schemas/codec.py encode_embedding; streams/worker/entry_messages.py)."""
    return {
        "command_id": outcome.result_key,
        "status": str(Status.COMMITTED if outcome.committed else Status.REJECTED),
        "reason": None if outcome.reason is None else str(outcome.reason),
        "detail": None if outcome.detail is None else bounded(outcome.detail),
        "entry": None,
        "batch_id": outcome.batch_id,
        "failed_leg_index": outcome.failed_leg_index,
        "entries": [],
    }


def offset_to_bytes(offset: int) -> bytes:
    return offset.to_bytes(8, "big")


def offset_from_bytes(data: bytes | None) -> int:
    return 0 if data is None else int.from_bytes(data, "big")
