"""The pure core of multi-account batches: pending holds on accounts and the two-phase coordinator.

A batch is decided in two phases, as TigerBeetle's pending transfers: the coordinator (keyed by
batch_id, on ledger.batches) sends a Reserve to each leg's account partition; the account places a
pending hold (a debit hold lowers `available` at once) or refuses; when every leg has answered the
coordinator sends post to all of them, or void if any refused or the batch timed out. Posting turns
a hold into a committed entry. Every step is idempotent by (batch_id, leg_index), so a replayed or
duplicated message never moves money twice. No Kafka, no asyncio: time and partitions come in as
arguments and the worker does the I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, TypeGuard

from sardis_ledger.streams import core, merkle
from sardis_ledger.streams.core import AccountState, Entry, Reason
from sardis_ledger.streams.errors import InvariantViolation
from sardis_ledger.streams.money import Currency, balance_minor_max

# ------------------------------------------------------------------ limits and names

BATCH_LEGS_MAX = 1000
BATCH_TIMEOUT_MS_DEFAULT = 30_000
BATCH_TIMEOUT_MS_MIN = 100
BATCH_TIMEOUT_MS_MAX = 3_600_000  # one hour: holds must not lock money away for days
ROLLBACK_REASON_LENGTH_MAX = 256
REVERSAL = "reversal"  # entry_type of the legs of a compensating (rollback) batch
ROLLBACK_ID_SEPARATOR = ":rollback:"
# A batch id names a batch, or the compensation of a rollback of it (batch:rollback:command),
# or the compensation of a rollback of that one: each part a valid id.
BATCH_ID_PARTS_MAX = 3
# What validation of an internal record calls the leg's command id: a leg's fields are checked
# exactly as a PostEntry's, and a PostEntry needs one.
LEG_COMMAND_ID = "leg"


class BatchStatus(StrEnum):
    RESERVING = "reserving"  # reserves sent, waiting for every leg's answer
    POSTING = "posting"  # decided: post sent to every leg, waiting for their entries
    COMMITTED = "committed"
    VOIDED = "voided"  # decided: void sent to every leg; the batch is rejected


class HoldStatus(StrEnum):
    PENDING = "pending"
    POSTED = "posted"
    VOIDED = "voided"
    REFUSED = "refused"


class ReportKind(StrEnum):
    RESERVED = "reserved"
    REFUSED = "refused"
    POSTED = "posted"
    VOIDED = "voided"


class SettleAction(StrEnum):
    POST = "post"
    VOID = "void"


# ------------------------------------------------------------------ data


@dataclass(frozen=True, slots=True)
class Leg:
    """One validated leg. `sign` is +1 (money in) or -1 (money out) on the account's balance."""

    account_id: str
    currency: str
    currency_decimals: int
    entry_type: str
    amount_minor: int
    sign: int
    reference: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    allow_overdraft: bool = False
    reverses_entry_id: str | None = None


@dataclass(frozen=True, slots=True)
class SubmitBatch:
    batch_id: str
    legs: tuple[Leg, ...]
    require_balanced: bool = True
    timeout_ms: int = BATCH_TIMEOUT_MS_DEFAULT


@dataclass(frozen=True, slots=True)
class RollbackBatch:
    command_id: str
    batch_id: str
    reason: str
    force: bool = False


@dataclass(frozen=True, slots=True)
class BatchRejection:
    reason: Reason
    detail: str
    batch_id: str | None = None
    leg_index: int | None = None


@dataclass(frozen=True, slots=True)
class BatchHeader:
    """The coordinator's state of one batch; its legs are kept under their own keys."""

    batch_id: str
    payload_digest: bytes
    leg_count: int
    status: BatchStatus
    deadline_ms: int
    require_balanced: bool = True
    result_key: str = ""  # key of the batch's result on ledger.results
    votes_yes: int = 0
    votes_no: int = 0
    posted: int = 0
    voided: int = 0  # legs that confirmed the void of a voided batch
    failed_leg_index: int | None = None
    reason: Reason | None = None
    detail: str | None = None
    original_batch_id: str | None = None  # set on a compensating batch
    rolled_back_by: str | None = None  # set on a committed batch: the rollback's command_id


@dataclass(frozen=True, slots=True)
class LegRecord:
    """What the coordinator knows of one leg: the leg, its vote and, once posted, its entry."""

    leg: Leg
    vote: HoldStatus | None = None  # PENDING (yes) or REFUSED (no) once the account answered
    reason: Reason | None = None
    detail: str | None = None
    entry: Entry | None = None
    voided: bool = False  # the account confirmed the void (voided batches only)


@dataclass(frozen=True, slots=True)
class Reserve:
    batch_id: str
    leg_index: int
    batch_size: int
    leg: Leg
    coordinator_partition: int

    @property
    def hold_key(self) -> str:
        return hold_key(self.batch_id, self.leg_index)


@dataclass(frozen=True, slots=True)
class Settle:
    batch_id: str
    leg_index: int
    account_id: str
    currency: str
    action: SettleAction
    coordinator_partition: int

    @property
    def hold_key(self) -> str:
        return hold_key(self.batch_id, self.leg_index)


@dataclass(frozen=True, slots=True)
class LegReport:
    batch_id: str
    leg_index: int
    kind: ReportKind
    reason: Reason | None = None
    detail: str | None = None
    entry: Entry | None = None


@dataclass(frozen=True, slots=True)
class Hold:
    """An account's record of one leg: pending until the coordinator posts or voids it."""

    batch_id: str
    leg_index: int
    batch_size: int
    leg: Leg | None  # None for a void that arrived before its reserve (a tombstone)
    status: HoldStatus
    reason: Reason | None = None
    detail: str | None = None
    entry: Entry | None = None


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """A batch's result on ledger.results (keyed by result_key)."""

    result_key: str
    batch_id: str
    committed: bool
    reason: Reason | None = None
    detail: str | None = None
    failed_leg_index: int | None = None
    entries: tuple[Entry, ...] = ()


@dataclass(frozen=True, slots=True)
class Step:
    """What one coordinator step decided: new state, messages to send, maybe a result."""

    header: BatchHeader | None
    legs: Mapping[int, LegRecord] = field(default_factory=dict)  # leg records to write
    reserves: tuple[Reserve, ...] = ()
    settles: tuple[Settle, ...] = ()
    outcome: BatchOutcome | None = None
    extra_headers: tuple[BatchHeader, ...] = ()  # e.g. the original batch marked rolled back


# ------------------------------------------------------------------ ids and keys


def hold_key(batch_id: str, leg_index: int) -> str:
    return f"{batch_id}#{leg_index}"


def batch_entry_id(batch_id: str, leg_index: int) -> str:
    """Deterministic entry id of a batch leg; its own domain tag, so it never equals a
    PostEntry's entry id even when a batch_id equals a command_id."""
    digest = hashlib.sha256(f"sardis.batch-entry.v1\x00{batch_id}\x00{leg_index}".encode()).hexdigest()
    return f"ent_{digest[:32]}"


def compensation_batch_id(batch_id: str, rollback_command_id: str) -> str:
    return f"{batch_id}{ROLLBACK_ID_SEPARATOR}{rollback_command_id}"


def valid_batch_id(value: object) -> TypeGuard[str]:
    """A batch id or the id of a compensation (`batch:rollback:command`, nested at most
    BATCH_ID_PARTS_MAX - 1 times), each part 1..ID_LENGTH_MAX printable characters."""
    if not isinstance(value, str):
        return False
    parts = value.split(ROLLBACK_ID_SEPARATOR)
    return len(parts) <= BATCH_ID_PARTS_MAX and all(core.valid_id(part) for part in parts)


def coordinator_partition(batch_id: str, partitions: int) -> int:
    """The partition of ledger.batches whose coordinator runs a batch: the one its first part
    (the client's batch id) hashes to. A rollback of a batch, and so its compensation, is
    coordinated where the batch itself was, since it reads the batch's state."""
    return core.partition_for(batch_id.split(ROLLBACK_ID_SEPARATOR, 1)[0], partitions)


# ------------------------------------------------------------------ validation


def parse_submit_batch(record: Mapping[str, Any],
                       currencies: Mapping[str, Currency]) -> SubmitBatch | BatchRejection:
    """Validate a decoded SubmitBatch: every leg as a PostEntry would be, plus the batch rules."""
    batch_id = record.get("batch_id")
    if not (isinstance(batch_id, str) and 0 < len(batch_id) <= core.ID_LENGTH_MAX
            and batch_id.isprintable() and ROLLBACK_ID_SEPARATOR not in batch_id):
        return BatchRejection(Reason.INVALID_FIELD, f"batch_id must be 1..{core.ID_LENGTH_MAX} "
                              f"printable characters without {ROLLBACK_ID_SEPARATOR!r}")
    raw_legs = record.get("legs")
    if not isinstance(raw_legs, Sequence) or not 1 <= len(raw_legs) <= BATCH_LEGS_MAX:
        return BatchRejection(Reason.INVALID_FIELD, f"a batch has 1..{BATCH_LEGS_MAX} legs", batch_id)
    timeout_ms = record.get("timeout_ms")
    if timeout_ms is None:
        timeout_ms = BATCH_TIMEOUT_MS_DEFAULT
    if not isinstance(timeout_ms, int) or not BATCH_TIMEOUT_MS_MIN <= timeout_ms <= BATCH_TIMEOUT_MS_MAX:
        return BatchRejection(Reason.INVALID_FIELD, f"timeout_ms must be {BATCH_TIMEOUT_MS_MIN}.."
                              f"{BATCH_TIMEOUT_MS_MAX}", batch_id)
    legs: list[Leg] = []
    for index, raw in enumerate(raw_legs):
        if not isinstance(raw, Mapping):
            return BatchRejection(Reason.INVALID_FIELD, "a leg must be a record", batch_id, index)
        parsed = core.parse_post_entry({**raw, "command_id": batch_id}, currencies)
        if isinstance(parsed, core.Rejection):
            return BatchRejection(parsed.reason, f"leg {index}: {parsed.detail}", batch_id, index)
        legs.append(Leg(parsed.account_id, parsed.currency, parsed.currency_decimals,
                        parsed.entry_type, parsed.amount_minor, core.BALANCE_SIGN[parsed.entry_type],
                        parsed.reference, dict(parsed.metadata), parsed.allow_overdraft))
    require_balanced = record.get("require_balanced")
    require_balanced = True if require_balanced is None else bool(require_balanced)
    if require_balanced:
        problem = unbalanced_currency(legs)
        if problem is not None:
            return BatchRejection(Reason.UNBALANCED, problem, batch_id)
    return SubmitBatch(batch_id, tuple(legs), require_balanced, timeout_ms)


def unbalanced_currency(legs: Sequence[Leg]) -> str | None:
    """Per currency, money in (credit, refund, adjustment) must equal money out (debit, fee)."""
    net: dict[str, int] = {}
    for leg in legs:
        net[leg.currency] = net.get(leg.currency, 0) + leg.sign * leg.amount_minor
    for currency, total in sorted(net.items()):
        if total != 0:
            return f"{currency}: credits and debits differ by {abs(total)} minor units"
    return None


def parse_rollback(record: Mapping[str, Any]) -> RollbackBatch | BatchRejection:
    command_id = record.get("command_id")
    batch_id = record.get("batch_id")
    for name, value in (("command_id", command_id), ("batch_id", batch_id)):
        if not (isinstance(value, str) and 0 < len(value) <= core.ID_LENGTH_MAX and value.isprintable()):
            return BatchRejection(Reason.INVALID_FIELD, f"{name} must be 1..{core.ID_LENGTH_MAX} "
                                  f"printable characters",
                                  command_id if isinstance(command_id, str) else None)
    reason = record.get("reason") or ""
    if not isinstance(reason, str) or len(reason) > ROLLBACK_REASON_LENGTH_MAX:
        return BatchRejection(Reason.INVALID_FIELD, f"reason must be at most "
                              f"{ROLLBACK_REASON_LENGTH_MAX} characters", command_id)
    return RollbackBatch(command_id, batch_id, reason, bool(record.get("force", False)))  # type: ignore[arg-type]


def submit_digest(submit: SubmitBatch) -> bytes:
    """Digest of everything a batch asks for: equal digests mean a true duplicate."""
    payload = ["SubmitBatch/1", submit.batch_id, submit.require_balanced, submit.timeout_ms,
               [[leg.account_id, leg.currency, leg.entry_type, str(leg.amount_minor), leg.sign,
                 leg.reference, sorted(leg.metadata.items()), leg.allow_overdraft,
                 leg.reverses_entry_id] for leg in submit.legs]]
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).digest()


# ------------------------------------------------------------------ internal records
# Reserves, settles, leg reports and ticks travel on ledger.internal.* topics that no client may
# write. They are validated like client commands all the same (defence in depth): a record that
# could not have come from a coordinator or an account of this ledger is rejected with a reason
# and never reaches a decision.


def _reject(reason: Reason, detail: str, batch_id: Any = None,
            leg_index: Any = None) -> BatchRejection:
    return BatchRejection(reason, detail, batch_id if valid_batch_id(batch_id) else None,
                          leg_index if isinstance(leg_index, int) else None)


def _batch_fields(record: Mapping[str, Any], partitions: int) -> BatchRejection | None:
    """batch_id, leg_index and coordinator_partition of a reserve or a settle."""
    batch_id, leg_index = record.get("batch_id"), record.get("leg_index")
    if not valid_batch_id(batch_id):
        return _reject(Reason.INVALID_FIELD, "batch_id is not a valid batch id")
    if not isinstance(leg_index, int) or not 0 <= leg_index < BATCH_LEGS_MAX:
        return _reject(Reason.INVALID_FIELD, f"leg_index must be 0..{BATCH_LEGS_MAX - 1}",
                       batch_id)
    expected = coordinator_partition(batch_id, partitions)
    if record.get("coordinator_partition") != expected:
        return _reject(Reason.WRONG_PARTITION, f"coordinator_partition "
                       f"{core.shown(record.get('coordinator_partition'))} is not the batch's "
                       f"coordinator {expected}", batch_id, leg_index)
    return None


def parse_reserve(record: Mapping[str, Any], currencies: Mapping[str, Currency],
                  partitions: int) -> Reserve | BatchRejection:
    """Validate a decoded ReserveLeg: its leg exactly as a PostEntry, plus the batch fields."""
    problem = _batch_fields(record, partitions)
    if problem is not None:
        return problem
    batch_id: str = record["batch_id"]
    leg_index: int = record["leg_index"]
    batch_size = record.get("batch_size")
    if not isinstance(batch_size, int) or not leg_index < batch_size <= BATCH_LEGS_MAX:
        return _reject(Reason.INVALID_FIELD, f"batch_size must be {leg_index + 1}.."
                       f"{BATCH_LEGS_MAX}", batch_id, leg_index)
    entry_type, sign = record.get("entry_type"), record.get("sign")
    reverses = record.get("reverses_entry_id")
    if sign not in (1, -1):
        return _reject(Reason.INVALID_FIELD, f"sign {core.shown(sign)} is not +1 or -1", batch_id,
                       leg_index)
    if entry_type == REVERSAL:
        if not core.valid_entry_id(reverses):
            return _reject(Reason.INVALID_FIELD, "a reversal leg needs the entry it reverses",
                           batch_id, leg_index)
    elif reverses is not None:
        return _reject(Reason.INVALID_FIELD, "only a reversal leg reverses an entry", batch_id,
                       leg_index)
    fields = {name: record.get(name) for name in ("account_id", "currency", "amount",
                                                   "reference", "metadata", "allow_overdraft")}
    parsed = core.parse_post_entry({**fields, "command_id": LEG_COMMAND_ID, "entry_type":
                                    core.EntryType.CREDIT if entry_type == REVERSAL else entry_type},
                                   currencies)
    if isinstance(parsed, core.Rejection):
        return _reject(parsed.reason, f"leg {leg_index}: {parsed.detail}", batch_id, leg_index)
    if entry_type != REVERSAL and sign != core.BALANCE_SIGN[parsed.entry_type]:
        return _reject(Reason.INVALID_FIELD, f"sign {core.shown(sign)} does not match entry_type "
                       f"{parsed.entry_type}", batch_id, leg_index)
    leg = Leg(parsed.account_id, parsed.currency, parsed.currency_decimals, str(entry_type),
              parsed.amount_minor, int(sign), parsed.reference, dict(parsed.metadata),
              parsed.allow_overdraft, reverses)
    return Reserve(batch_id, leg_index, batch_size, leg, record["coordinator_partition"])


def parse_settle(record: Mapping[str, Any], currencies: Mapping[str, Currency],
                 partitions: int) -> Settle | BatchRejection:
    """Validate a decoded SettleLeg (whether it matches a hold is `post`'s and `void`'s)."""
    problem = _batch_fields(record, partitions)
    if problem is not None:
        return problem
    batch_id: str = record["batch_id"]
    leg_index: int = record["leg_index"]
    account_id, currency, action = (record.get("account_id"), record.get("currency"),
                                    record.get("action"))
    if not core.valid_id(account_id, allow_separator=False):
        return _reject(Reason.INVALID_FIELD, "account_id is not a valid account id", batch_id,
                       leg_index)
    if not isinstance(currency, str) or currency not in currencies:
        return _reject(Reason.UNKNOWN_CURRENCY, f"unknown currency {core.shown(currency)}",
                       batch_id, leg_index)
    if action not in set(SettleAction):
        return _reject(Reason.INVALID_FIELD, f"action {core.shown(action)} is not post or void",
                       batch_id, leg_index)
    return Settle(batch_id, leg_index, account_id, currency, SettleAction(action),
                  record["coordinator_partition"])


def parse_report(record: Mapping[str, Any], entry: Entry | None,
                 partitions: int) -> LegReport | BatchRejection:
    """Validate a decoded LegReport whose `entry` the caller already validated (or None)."""
    batch_id, leg_index = record.get("batch_id"), record.get("leg_index")
    if not valid_batch_id(batch_id):
        return _reject(Reason.INVALID_FIELD, "batch_id is not a valid batch id")
    if not isinstance(leg_index, int) or not 0 <= leg_index < BATCH_LEGS_MAX:
        return _reject(Reason.INVALID_FIELD, f"leg_index must be 0..{BATCH_LEGS_MAX - 1}",
                       batch_id)
    kind, reason, detail = record.get("kind"), record.get("reason"), record.get("detail")
    if kind not in set(ReportKind):
        return _reject(Reason.INVALID_FIELD, f"kind {core.shown(kind)} is not a report kind",
                       batch_id, leg_index)
    if reason is not None and reason not in set(Reason):
        return _reject(Reason.INVALID_FIELD, f"reason {core.shown(reason)} is not a reason code",
                       batch_id, leg_index)
    if (kind == ReportKind.REFUSED) != (reason is not None):
        return _reject(Reason.INVALID_FIELD, "a refused leg, and only one, carries a reason",
                       batch_id, leg_index)
    if (kind == ReportKind.POSTED) != (entry is not None):
        return _reject(Reason.INVALID_FIELD, "a posted leg, and only one, carries its entry",
                       batch_id, leg_index)
    return LegReport(batch_id, leg_index, ReportKind(kind),
                     None if reason is None else Reason(reason),
                     None if detail is None else core.bounded(str(detail)), entry)


def check_report(header: BatchHeader | None, leg: LegRecord | None,
                 report: LegReport) -> BatchRejection | None:
    """A report must answer a leg this coordinator sent; a posted one must carry that leg's
    entry, sealed (its hash recomputes)."""
    if header is None or leg is None or report.leg_index >= header.leg_count:
        return _reject(Reason.UNKNOWN_BATCH, f"no leg {report.leg_index} of a batch "
                       f"{core.shown(report.batch_id)} on this coordinator", report.batch_id,
                       report.leg_index)
    entry = report.entry
    if entry is None:
        return None
    expected = (batch_entry_id(header.batch_id, report.leg_index), header.batch_id,
                header.leg_count, report.leg_index, leg.leg.account_id, leg.leg.currency,
                leg.leg.entry_type, leg.leg.amount_minor, leg.leg.reverses_entry_id)
    actual = (entry.entry_id, entry.batch_id, entry.batch_size, entry.leg_index,
              entry.account_id, entry.currency, entry.entry_type, entry.amount_minor,
              entry.reverses_entry_id)
    if actual != expected or not core.verify_entry_hash(entry):
        return _reject(Reason.REPORT_MISMATCH, f"the posted entry of leg {report.leg_index} is "
                       "not that leg's sealed entry", header.batch_id, report.leg_index)
    return None


def parse_tick(record: Mapping[str, Any], partition: int) -> int | BatchRejection:
    """The time of a decoded BatchTick read on `partition`."""
    if record.get("partition") != partition:
        return _reject(Reason.WRONG_PARTITION, f"a tick for partition "
                       f"{core.shown(record.get('partition'))} read on partition {partition}")
    try:
        now_ms = core._ms(record.get("now"))
    except (ValueError, OverflowError):
        now_ms = None
    if now_ms is None or now_ms < 0:
        return _reject(Reason.INVALID_FIELD, "now is not a timestamp")
    return now_ms


# ------------------------------------------------------------------ coordinator


def _rejected(result_key: str, batch_id: str, reason: Reason, detail: str,
              leg_index: int | None = None) -> BatchOutcome:
    return BatchOutcome(result_key, batch_id, False, reason, detail, leg_index)


def submit(existing: BatchHeader | None, batch: SubmitBatch, *, coordinator_partition: int,
           now_ms: int, result_key: str | None = None,
           original_batch_id: str | None = None) -> Step:
    """Start a batch: write its header and legs and send a reserve to every leg.

    A duplicate of a started batch sends nothing (its result comes when it is decided); of a
    decided one, it re-emits the result. A different batch under a used batch_id is rejected.
    """
    digest = submit_digest(batch)
    key = result_key or batch.batch_id
    if existing is not None:
        if existing.payload_digest != digest:
            return Step(None, outcome=_rejected(key, batch.batch_id, Reason.IDEMPOTENCY_CONFLICT,
                                                "batch_id was used before with a different batch"))
        return Step(None)  # the worker re-emits a decided batch's result from its stored legs
    header = BatchHeader(batch.batch_id, digest, len(batch.legs), BatchStatus.RESERVING,
                         now_ms + batch.timeout_ms, batch.require_balanced, key,
                         original_batch_id=original_batch_id)
    legs = {i: LegRecord(leg) for i, leg in enumerate(batch.legs)}
    reserves = tuple(Reserve(batch.batch_id, i, len(batch.legs), leg, coordinator_partition)
                     for i, leg in enumerate(batch.legs))
    return Step(header, legs, reserves=reserves)


def record_report(header: BatchHeader, leg: LegRecord,
                  report: LegReport) -> tuple[BatchHeader, LegRecord] | None:
    """Count one leg's answer; None when it changes nothing (a duplicate or a late answer)."""
    if report.kind is ReportKind.VOIDED:
        if header.status is not BatchStatus.VOIDED or leg.voided:
            return None
        return replace(header, voided=header.voided + 1), replace(leg, voided=True)
    if report.kind is ReportKind.POSTED:
        if header.status is not BatchStatus.POSTING or leg.entry is not None:
            return None
        if report.entry is None:
            raise InvariantViolation(f"posted report of {header.batch_id}#{report.leg_index} "
                                     f"without its entry")
        return replace(header, posted=header.posted + 1), replace(leg, entry=report.entry)
    if header.status is not BatchStatus.RESERVING or leg.vote is not None:
        return None
    if report.kind is ReportKind.RESERVED:
        return replace(header, votes_yes=header.votes_yes + 1), replace(leg, vote=HoldStatus.PENDING)
    failed = header.failed_leg_index
    lowest = failed is None or report.leg_index < failed
    return (replace(header, votes_no=header.votes_no + 1,
                    failed_leg_index=report.leg_index if lowest else failed,
                    reason=report.reason if lowest else header.reason,
                    detail=report.detail if lowest else header.detail),
            replace(leg, vote=HoldStatus.REFUSED, reason=report.reason, detail=report.detail))


def all_answered(header: BatchHeader) -> bool:
    return header.status is BatchStatus.RESERVING and header.votes_yes + header.votes_no == header.leg_count


def all_posted(header: BatchHeader) -> bool:
    return header.status is BatchStatus.POSTING and header.posted == header.leg_count


def settled(header: BatchHeader) -> bool:
    """Nothing more to send: committed, rejected before any reserve, or every void confirmed."""
    if header.status is BatchStatus.COMMITTED:
        return True
    return header.status is BatchStatus.VOIDED and header.voided >= header.leg_count


def resend(header: BatchHeader, legs: Sequence[LegRecord], *, coordinator_partition: int) -> Step:
    """The messages of an unsettled batch that have not been answered yet, sent again.

    Reserve, post and void are idempotent at the account (by batch_id and leg_index), so a
    resend is always safe; it makes the batch finish even if a message or its answer was lost
    (exactly-once is assumed to fail sometimes, see README).
    """
    if len(legs) != header.leg_count:
        raise InvariantViolation(f"batch {header.batch_id}: {len(legs)} legs, header says {header.leg_count}")
    if header.status is BatchStatus.RESERVING:
        return Step(None, reserves=tuple(
            Reserve(header.batch_id, i, header.leg_count, leg.leg, coordinator_partition)
            for i, leg in enumerate(legs) if leg.vote is None))
    if header.status is BatchStatus.POSTING:
        action, pending = SettleAction.POST, [i for i, leg in enumerate(legs) if leg.entry is None]
    elif header.status is BatchStatus.VOIDED:
        action, pending = SettleAction.VOID, [i for i, leg in enumerate(legs) if not leg.voided]
    else:
        return Step(None)
    return Step(None, settles=tuple(
        Settle(header.batch_id, i, legs[i].leg.account_id, legs[i].leg.currency, action,
               coordinator_partition) for i in pending))


def decide(header: BatchHeader, legs: Sequence[LegRecord], *, coordinator_partition: int,
           timed_out: bool = False) -> Step:
    """Every leg answered (or the batch timed out): post all legs, or void all of them."""
    if header.status is not BatchStatus.RESERVING:
        raise InvariantViolation(f"batch {header.batch_id} decided twice ({header.status})")
    if len(legs) != header.leg_count:
        raise InvariantViolation(f"batch {header.batch_id}: {len(legs)} legs, header says {header.leg_count}")
    post = not timed_out and header.votes_no == 0 and header.votes_yes == header.leg_count
    action = SettleAction.POST if post else SettleAction.VOID
    settles = tuple(Settle(header.batch_id, i, leg.leg.account_id, leg.leg.currency, action,
                           coordinator_partition) for i, leg in enumerate(legs))
    if post:
        return Step(replace(header, status=BatchStatus.POSTING), settles=settles)
    if timed_out and header.votes_no == 0:
        unanswered = next(i for i, leg in enumerate(legs) if leg.vote is None)
        header = replace(header, failed_leg_index=unanswered, reason=Reason.BATCH_TIMEOUT,
                         detail=f"leg {unanswered} did not answer before the batch's timeout")
    voided = replace(header, status=BatchStatus.VOIDED)
    outcome = _rejected(header.result_key, header.batch_id, header.reason or Reason.BATCH_TIMEOUT,
                        header.detail or "", header.failed_leg_index)
    return Step(voided, settles=settles, outcome=outcome)


def committed_outcome(header: BatchHeader, legs: Sequence[LegRecord]) -> BatchOutcome:
    entries = tuple(leg.entry for leg in legs if leg.entry is not None)
    if len(entries) != header.leg_count:
        raise InvariantViolation(f"batch {header.batch_id} committed with {len(entries)} of "
                                 f"{header.leg_count} entries")
    return BatchOutcome(header.result_key, header.batch_id, True, entries=entries)


def decided_outcome(header: BatchHeader, legs: Sequence[LegRecord]) -> BatchOutcome | None:
    """The result of a decided batch (to answer a duplicate), or None while it is undecided."""
    if header.status is BatchStatus.COMMITTED:
        return committed_outcome(header, legs)
    if header.status is BatchStatus.VOIDED:
        return _rejected(header.result_key, header.batch_id, header.reason or Reason.BATCH_TIMEOUT,
                         header.detail or "", header.failed_leg_index)
    return None


def timed_out(header: BatchHeader, now_ms: int) -> bool:
    return header.status is BatchStatus.RESERVING and now_ms >= header.deadline_ms


def rollback(original: BatchHeader | None, original_legs: Sequence[LegRecord],
             command: RollbackBatch, compensation: BatchHeader | None, *,
             coordinator_partition: int, now_ms: int,
             timeout_ms: int = BATCH_TIMEOUT_MS_DEFAULT) -> Step:
    """Roll a committed batch back with a compensating batch of `reversal` legs.

    Nothing is updated or deleted: each reversal leg is a new entry that points at the entry it
    reverses. The original is marked with the rollback's command_id, so a second rollback is
    rejected and a retry of the same one gets the same result.
    """
    comp_id = compensation_batch_id(command.batch_id, command.command_id)
    if compensation is not None:
        return Step(None)  # a retry: the worker re-emits the compensation's result when decided
    if original is None or original.status is not BatchStatus.COMMITTED:
        return Step(None, outcome=_rejected(command.command_id, command.batch_id,
                                            Reason.BATCH_NOT_COMMITTED,
                                            f"batch {command.batch_id} has not committed"))
    if original.rolled_back_by is not None:
        return Step(None, outcome=_rejected(command.command_id, command.batch_id,
                                            Reason.ALREADY_ROLLED_BACK,
                                            f"batch {command.batch_id} was rolled back by "
                                            f"{original.rolled_back_by}"))
    legs: list[Leg] = []
    for leg in original_legs:
        if leg.entry is None:
            raise InvariantViolation(f"committed batch {original.batch_id} has a leg without entry")
        legs.append(Leg(leg.leg.account_id, leg.leg.currency, leg.leg.currency_decimals, REVERSAL,
                        leg.leg.amount_minor, -leg.leg.sign, command.reason or None,
                        {"rollback_command_id": command.command_id},
                        command.force or leg.leg.allow_overdraft, leg.entry.entry_id))
    batch = SubmitBatch(comp_id, tuple(legs), original.require_balanced, timeout_ms)
    step = submit(None, batch, coordinator_partition=coordinator_partition, now_ms=now_ms,
                  result_key=command.command_id, original_batch_id=original.batch_id)
    return replace(step, extra_headers=(replace(original, rolled_back_by=command.command_id),))


def after_compensation(original: BatchHeader, compensation: BatchHeader) -> BatchHeader | None:
    """A voided compensation frees its original for another rollback (e.g. one with force)."""
    if compensation.status is BatchStatus.VOIDED and original.rolled_back_by is not None \
            and compensation.batch_id == compensation_batch_id(original.batch_id, original.rolled_back_by):
        return replace(original, rolled_back_by=None)
    return None


# ------------------------------------------------------------------ account side: holds


@dataclass(frozen=True, slots=True)
class HoldStep:
    state: AccountState
    hold: Hold
    report: LegReport | None  # None: nothing to tell the coordinator
    entry: Entry | None = None  # a newly posted (or re-emitted) entry
    frontier: merkle.MerkleFrontier | None = None  # the partition's log after a post
    changed: bool = True  # False: state and hold are as they were


def reserve(state: AccountState, existing: Hold | None,
            message: Reserve) -> HoldStep | BatchRejection:
    """Place a pending hold for one leg, or refuse it. A repeated reserve gets the same answer;
    a reserve of another leg under a held key is rejected (coordinators resend the same leg)."""
    leg = message.leg
    if existing is not None and existing.leg is not None and existing.leg != leg:
        return _reject(Reason.RESERVE_MISMATCH, f"leg {message.leg_index} is held with another "
                       "leg", message.batch_id, message.leg_index)
    if existing is not None:
        kind = ReportKind.RESERVED if existing.status in (HoldStatus.PENDING, HoldStatus.POSTED) \
            else ReportKind.REFUSED
        reason = existing.reason if kind is ReportKind.REFUSED else None
        return HoldStep(state, existing, LegReport(message.batch_id, message.leg_index, kind,
                                                   reason or Reason.HOLD_VOIDED, existing.detail)
                        if kind is ReportKind.REFUSED
                        else LegReport(message.batch_id, message.leg_index, kind), changed=False)

    def refuse(reason: Reason, detail: str) -> HoldStep:
        hold = Hold(message.batch_id, message.leg_index, message.batch_size, leg,
                    HoldStatus.REFUSED, reason, detail)
        return HoldStep(state, hold, LegReport(message.batch_id, message.leg_index,
                                               ReportKind.REFUSED, reason, detail))

    if leg.sign < 0:
        if not leg.allow_overdraft and state.available_minor - leg.amount_minor < 0:
            return refuse(Reason.INSUFFICIENT_FUNDS, f"available {state.available_minor} minor "
                          f"units < {leg.amount_minor}")
        if abs(state.balance_minor - state.pending_debit_minor - leg.amount_minor) \
                > balance_minor_max(leg.currency_decimals):
            return refuse(Reason.BALANCE_OVERFLOW, "balance would leave the representable range")
        state = replace(state, pending_debit_minor=state.pending_debit_minor + leg.amount_minor)
    elif abs(state.balance_minor + leg.amount_minor) > balance_minor_max(leg.currency_decimals):
        return refuse(Reason.BALANCE_OVERFLOW, "balance would leave the representable range")
    hold = Hold(message.batch_id, message.leg_index, message.batch_size, leg, HoldStatus.PENDING)
    return HoldStep(state, hold, LegReport(message.batch_id, message.leg_index, ReportKind.RESERVED))


def settle_mismatch(hold: Hold | None, message: Settle) -> BatchRejection | None:
    """A settle must name the account and currency of an existing hold of its batch and leg; a
    post needs that hold pending (or posted: a repeat), a void needs it not posted."""
    if hold is None or hold.leg is None:
        if message.action is SettleAction.VOID:
            return None  # a void before its reserve leaves a tombstone
        return _reject(Reason.SETTLE_MISMATCH, f"post of leg {message.leg_index} without a hold",
                       message.batch_id, message.leg_index)
    if (hold.leg.account_id, hold.leg.currency) != (message.account_id, message.currency):
        return _reject(Reason.SETTLE_MISMATCH, f"leg {message.leg_index} is held on another "
                       "account or currency", message.batch_id, message.leg_index)
    refused = (HoldStatus.VOIDED, HoldStatus.REFUSED) if message.action is SettleAction.POST \
        else (HoldStatus.POSTED,)
    if hold.status in refused:
        return _reject(Reason.SETTLE_MISMATCH, f"{message.action} of a {hold.status} hold",
                       message.batch_id, message.leg_index)
    return None


def post(state: AccountState, frontier: merkle.MerkleFrontier, hold: Hold | None,
         message: Settle, *, partition: int, now_ms: int) -> HoldStep | BatchRejection:
    """Turn a pending hold into a committed entry; a posted hold re-reports its entry."""
    mismatch = settle_mismatch(hold, message)
    if mismatch is not None:
        return mismatch
    if hold is None or hold.leg is None:
        raise InvariantViolation("settle_mismatch let a post without a hold through")
    if hold.status is HoldStatus.POSTED:
        return HoldStep(state, hold, LegReport(hold.batch_id, hold.leg_index, ReportKind.POSTED,
                                               entry=hold.entry), entry=hold.entry, changed=False)
    leg = hold.leg
    pending = state.pending_debit_minor - (leg.amount_minor if leg.sign < 0 else 0)
    if pending < 0:
        raise InvariantViolation(f"pending debit of {leg.account_id}|{leg.currency} below zero")
    balance = state.balance_minor + leg.sign * leg.amount_minor
    committed_at_ms = max(now_ms, state.last_committed_at_ms)
    entry = Entry(
        entry_id=batch_entry_id(hold.batch_id, hold.leg_index),
        command_id=hold.batch_id,
        account_id=leg.account_id,
        currency=leg.currency,
        entry_type=leg.entry_type,
        amount_minor=leg.amount_minor,
        running_balance_minor=balance,
        sequence=state.sequence + 1,
        committed_at_ms=committed_at_ms,
        partition=partition,
        leaf_index=frontier.tree_size,
        batch_id=hold.batch_id,
        batch_size=hold.batch_size,
        leg_index=hold.leg_index,
        reverses_entry_id=leg.reverses_entry_id,
        reference=leg.reference,
        metadata=dict(leg.metadata),
    )
    entry, new_frontier = core.seal(entry, frontier)
    new_state = replace(state, balance_minor=balance, pending_debit_minor=pending,
                        sequence=entry.sequence, last_committed_at_ms=committed_at_ms)
    posted = replace(hold, status=HoldStatus.POSTED, entry=entry)
    return HoldStep(new_state, posted, LegReport(hold.batch_id, hold.leg_index, ReportKind.POSTED,
                                                 entry=entry),
                    entry=entry, frontier=new_frontier)


def void(state: AccountState, hold: Hold | None, message: Settle) -> HoldStep | BatchRejection:
    """Release a pending hold. A void before its reserve leaves a tombstone that refuses it."""
    mismatch = settle_mismatch(hold, message)
    if mismatch is not None:
        return mismatch
    report = LegReport(message.batch_id, message.leg_index, ReportKind.VOIDED)
    if hold is None:
        tombstone = Hold(message.batch_id, message.leg_index, 0, None, HoldStatus.VOIDED,
                         Reason.HOLD_VOIDED, "the batch was voided before this leg was reserved")
        return HoldStep(state, tombstone, report)
    if hold.status is not HoldStatus.PENDING or hold.leg is None:
        return HoldStep(state, hold, report, changed=False)
    leg = hold.leg
    if leg.sign < 0:
        pending = state.pending_debit_minor - leg.amount_minor
        if pending < 0:
            raise InvariantViolation(f"pending debit of {leg.account_id}|{leg.currency} below zero")
        state = replace(state, pending_debit_minor=pending)
    return HoldStep(state, replace(hold, status=HoldStatus.VOIDED, reason=Reason.HOLD_VOIDED), report)
