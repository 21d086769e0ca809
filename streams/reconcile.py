"""Pure streaming reconciliation: the join of chain transfers and ledger entries per (tx_hash, log_index)."""

# One join value per chain transfer key (tx_hash, log_index). It holds the chain sides (a log
# between two watched wallets is published twice, direction `out` and `in`, so sides are keyed
# by direction) and the ledger entries that claim the key. After every event the wanted set of
# open discrepancies and matches is recomputed from the value alone and diffed against what was
# already emitted, so each discrepancy is emitted once per state change, a replayed event emits
# nothing, and the final open set does not depend on arrival order. No I/O: time and the chain
# head are passed in, so a replay of the same events gives the same outputs.

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sardis_ledger.streams.errors import LedgerError
from sardis_ledger.streams.money import DECIMALS_MAX, to_major, to_minor, to_wire

JOIN_VALUE_VERSION = 1
# Defaults of the grace window before a one-sided key is a missing_* discrepancy: ordinary
# latency between the ledger booking and the watcher publishing (12 confirmations, ~2.5 min on
# Ethereum, then the poll) must not raise one.
GRACE_WINDOW_S_DEFAULT = 900
GRACE_BLOCKS_DEFAULT = 64
MS_PER_S = 1000
# An entry that names a transaction but no log index is keyed here: no chain log has it.
NO_LOG_INDEX = -1
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_MS = timedelta(milliseconds=1)


class ReconcileError(LedgerError):
    """An event the reconciler cannot take (no chain reference, an amount it cannot hold exactly)."""


class DiscrepancyType(StrEnum):
    AMOUNT_MISMATCH = "amount_mismatch"
    CURRENCY_MISMATCH = "currency_mismatch"
    ACCOUNT_MISMATCH = "account_mismatch"
    MISSING_ON_CHAIN = "missing_on_chain"
    MISSING_IN_LEDGER = "missing_in_ledger"
    DUPLICATE_ENTRY = "duplicate_entry"
    STATUS_MISMATCH = "status_mismatch"


class DiscrepancyStatus(StrEnum):
    OPEN = "open"
    RESOLVED = "resolved"


class MatchStatus(StrEnum):
    MATCHED = "matched"
    UNMATCHED = "unmatched"  # a match that no longer holds (e.g. the transfer was reorged out)


SEVERITY: Mapping[DiscrepancyType, str] = {
    # The ledger shows money the chain does not: the books overstate what was settled.
    DiscrepancyType.MISSING_ON_CHAIN: "critical",
    DiscrepancyType.STATUS_MISMATCH: "critical",
    DiscrepancyType.DUPLICATE_ENTRY: "critical",
    DiscrepancyType.AMOUNT_MISMATCH: "high",
    DiscrepancyType.CURRENCY_MISMATCH: "high",
    DiscrepancyType.ACCOUNT_MISMATCH: "high",
    # Money moved on chain that the ledger has not booked yet: understated, usually late.
    DiscrepancyType.MISSING_IN_LEDGER: "medium",
}

# Which chain side an entry type books: money in to the account or out of it. Other types
# (adjustment, reversal) say nothing about direction and match the side of their account.
DIRECTION_OF_ENTRY_TYPE: Mapping[str, str] = {
    "credit": "in", "refund": "in", "debit": "out", "fee": "out",
}
MISSING_TYPES = frozenset({DiscrepancyType.MISSING_IN_LEDGER.value,
                           DiscrepancyType.MISSING_ON_CHAIN.value})
CONFIRMED = "confirmed"
REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class Grace:
    """How long a one-sided key may wait before it is a missing_* discrepancy: both windows that
    are set (not None) must have passed; GRACE_OFF does not wait (range reports)."""

    window_ms: int | None = GRACE_WINDOW_S_DEFAULT * MS_PER_S
    blocks: int | None = GRACE_BLOCKS_DEFAULT

    def __post_init__(self) -> None:
        for name, value in (("window_ms", self.window_ms), ("blocks", self.blocks)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 0):
                raise ReconcileError(f"grace {name} must be a whole number >= 0, got {value!r}")
        if self.window_ms is None and self.blocks is None:
            raise ReconcileError("grace: give a window in seconds, in blocks, or both")

    @classmethod
    def of(cls, *, seconds: float | None = None, blocks: int | None = None) -> Grace:
        return cls(None if seconds is None else round(seconds * MS_PER_S), blocks)

    def passed(self, since_ms: int, since_block: int | None, now_ms: int, head_block: int) -> bool:
        if self.window_ms is not None and now_ms - since_ms < self.window_ms:
            return False
        if self.blocks is not None and self.blocks > 0:
            # The chain head at arrival is learned at the first tick; until then it has not passed.
            return since_block is not None and head_block - since_block >= self.blocks
        return True


# No wait at all: a range report looks at finished history.
GRACE_OFF = Grace(None, 0)
GRACE_DEFAULT = Grace()


# ------------------------------------------------------------------ inputs


@dataclass(frozen=True, slots=True)
class EntryClaim:
    """The fields of a committed ledger entry the reconciler compares. Amounts are integers at
    the wire scale (10^-18 major units), so currencies need no table and nothing rounds."""

    entry_id: str
    account_id: str
    currency: str
    entry_type: str
    amount_e18: int
    committed_at_ms: int
    chain: str | None
    tx_hash: str
    log_index: int


@dataclass(frozen=True, slots=True)
class TransferEvent:
    """One ChainTransfer record (one side of a Transfer log), amount at the wire scale."""

    chain: str
    block_number: int
    block_hash: str
    tx_hash: str
    log_index: int
    amount_e18: int
    currency: str
    account_id: str
    direction: str
    status: str


def _e18(amount: Decimal, what: str) -> int:
    units = to_minor(amount, DECIMALS_MAX)
    if units is None:
        raise ReconcileError(f"{what}: amount {amount} has more than {DECIMALS_MAX} decimals")
    return units


def parse_tick(record: Mapping[str, Any], partition: int) -> tuple[int, int | None]:
    """(now_ms, chain_head_block) of a decoded ReconcileTick read on `partition`."""
    if record.get("partition") != partition:
        raise ReconcileError(f"a tick for partition {record.get('partition')!r:.20} read on "
                             f"partition {partition}")
    head = record.get("chain_head_block")
    if head is not None and (not isinstance(head, int) or head < 0):
        raise ReconcileError("chain_head_block must be >= 0")
    now_ms = epoch_ms(record.get("now"))
    if now_ms < 0:
        raise ReconcileError("now is before the epoch")
    return now_ms, head


def epoch_ms(value: Any) -> int:
    """Milliseconds since the Unix epoch of an aware datetime (or of epoch milliseconds)."""
    if isinstance(value, datetime):
        return (value - EPOCH) // ONE_MS
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ReconcileError(f"not a timestamp: {value!r}")


def claim_from_entry(record: Mapping[str, Any]) -> EntryClaim | None:
    """The claim of an Entry record (wire dict or PostgreSQL row); None for an off-chain entry."""
    tx_hash = record.get("chain_tx_hash")
    if not tx_hash:
        return None
    log_index = record.get("chain_log_index")
    return EntryClaim(
        entry_id=record["entry_id"], account_id=record["account_id"], currency=record["currency"],
        entry_type=record["entry_type"],
        amount_e18=_e18(Decimal(record["amount"]), f"entry {record['entry_id']}"),
        committed_at_ms=epoch_ms(record["committed_at"]), chain=record.get("chain"),
        tx_hash=str(tx_hash).lower(),
        log_index=NO_LOG_INDEX if log_index is None else int(log_index))


# Bounds of what a ChainTransfer or a tick may carry (validated before any join is touched).
CHAIN_TEXT_LENGTH_MAX = 128
DIRECTIONS = frozenset({"in", "out"})
STATUSES = frozenset({CONFIRMED, REMOVED})


def _text(record: Mapping[str, Any], name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= CHAIN_TEXT_LENGTH_MAX \
            or not value.isprintable():
        raise ReconcileError(f"{name} must be 1..{CHAIN_TEXT_LENGTH_MAX} printable characters")
    return value


def transfer_from_wire(record: Mapping[str, Any]) -> TransferEvent:
    """The event of a decoded ChainTransfer record; ReconcileError when a field is out of
    range (chain.transfers is written by the watcher, but read as untrusted input)."""
    for name in ("chain", "block_hash", "tx_hash", "currency", "account_id"):
        _text(record, name)
    if record.get("direction") not in DIRECTIONS or record.get("status") not in STATUSES:
        raise ReconcileError("direction must be in or out, status confirmed or removed")
    for name in ("block_number", "log_index"):
        value = record.get(name)
        if not isinstance(value, int) or value < 0:
            raise ReconcileError(f"{name} must be a whole number >= 0")
    if not isinstance(record.get("amount"), Decimal) or record["amount"] < 0:
        raise ReconcileError("amount must be a decimal >= 0")
    return TransferEvent(
        chain=record["chain"], block_number=record["block_number"], block_hash=record["block_hash"],
        tx_hash=record["tx_hash"].lower(), log_index=record["log_index"],
        amount_e18=_e18(record["amount"], f"transfer {record['tx_hash']}:{record['log_index']}"),
        currency=record["currency"], account_id=record["account_id"],
        direction=record["direction"], status=record["status"])


# ------------------------------------------------------------------ join state


@dataclass(frozen=True, slots=True)
class ChainRecord:
    """One confirmed-or-removed publication of a side, per block hash (a reorg may re-include
    the same transaction in another block)."""

    chain: str
    block_number: int
    amount_e18: int
    currency: str
    account_id: str
    seen_at_ms: int


@dataclass(frozen=True, slots=True)
class ChainSide:
    """Everything published for one side: records by block hash and the block hashes removed.
    Removal is sticky per block hash, so a replayed `confirmed` after its `removed` changes
    nothing and the outcome does not depend on order."""

    records: Mapping[str, ChainRecord] = field(default_factory=dict)
    removed: frozenset[str] = frozenset()

    def current(self) -> tuple[str, str, ChainRecord]:
        """(status, block hash, record) the side stands at: the highest live block, else the
        highest removed one."""
        live = [h for h in self.records if h not in self.removed]
        pool = live or list(self.records)
        block_hash = max(pool, key=lambda h: (self.records[h].block_number, h))
        return (CONFIRMED if live else REMOVED), block_hash, self.records[block_hash]


@dataclass(frozen=True, slots=True)
class LedgerClaim:
    account_id: str
    currency: str
    entry_type: str
    amount_e18: int
    committed_at_ms: int
    chain: str | None
    seen_at_ms: int
    seen_head_block: int | None  # chain head when it arrived; learned at the next tick if unknown


@dataclass(frozen=True, slots=True)
class Discrepancy:
    """One ledger.discrepancies record (the Discrepancy.avsc fields; amounts as exact strings)."""

    discrepancy_id: str
    type: str
    status: str
    severity: str
    entry_id: str | None
    tx_hash: str
    log_index: int
    expected: str | None
    actual: str | None
    description: str
    detected_at_ms: int

    def to_wire(self) -> dict[str, Any]:
        return {"discrepancy_id": self.discrepancy_id, "type": self.type, "status": self.status,
                "severity": self.severity, "entry_id": self.entry_id, "tx_hash": self.tx_hash,
                "log_index": self.log_index, "expected": self.expected, "actual": self.actual,
                "description": self.description, "detected_at": self.detected_at_ms}


@dataclass(frozen=True, slots=True)
class Match:
    """One ledger.reconciliations record: an entry and the chain side it agrees with."""

    reconciliation_id: str
    status: str
    entry_id: str
    tx_hash: str
    log_index: int
    direction: str
    chain: str
    block_number: int
    block_hash: str
    account_id: str
    currency: str
    amount_e18: int
    entry_committed_at_ms: int
    reconciled_at_ms: int

    def to_wire(self) -> dict[str, Any]:
        return {"reconciliation_id": self.reconciliation_id, "status": self.status,
                "entry_id": self.entry_id, "tx_hash": self.tx_hash, "log_index": self.log_index,
                "direction": self.direction, "chain": self.chain,
                "block_number": self.block_number, "block_hash": self.block_hash,
                "account_id": self.account_id, "currency": self.currency,
                "amount": to_wire(self.amount_e18, DECIMALS_MAX),
                "entry_committed_at": self.entry_committed_at_ms,
                "reconciled_at": self.reconciled_at_ms}


Output = Discrepancy | Match


@dataclass(frozen=True, slots=True)
class KeyJoin:
    """The join value of one chain transfer key, with what has been emitted for it."""

    tx_hash: str
    log_index: int
    sides: Mapping[str, ChainSide] = field(default_factory=dict)  # by direction
    entries: Mapping[str, LedgerClaim] = field(default_factory=dict)  # by entry_id
    head_block: int | None = None  # highest chain head this key has heard of
    open: Mapping[str, Discrepancy] = field(default_factory=dict)  # emitted, still open
    matched: Mapping[str, Match] = field(default_factory=dict)  # emitted, by reconciliation_id

    @property
    def key(self) -> tuple[str, int]:
        return (self.tx_hash, self.log_index)

    def waiting(self) -> bool:
        """Whether a later tick may still raise a missing_* here (the agent ticks only these)."""
        wanted, _ = _wanted(self, 0, GRACE_OFF)
        return any(d.type in MISSING_TYPES and ident not in self.open
                   for ident, d in wanted.items())


def recheck_at_ms(join: KeyJoin, grace: Grace) -> int:
    """The earliest time a tick can change a waiting join: 0 while an entry has not learned the
    chain head yet (its block window starts at the first tick), else when the first time window
    of what the join holds ends. Never later than the true time, so no missing_* is delayed;
    after it, ticks re-check the join until its block window has passed too. A skipped early
    tick only leaves `head_block` lower until the next one; outputs depend on the later tick's
    head, which is at least as high."""
    if any(claim.seen_head_block is None for claim in join.entries.values()):
        return 0
    window_ms = grace.window_ms or 0
    seen = [claim.seen_at_ms for claim in join.entries.values()]
    seen += [record.seen_at_ms for side in join.sides.values() for record in side.records.values()]
    return min(seen, default=0) + window_ms


def join_key(tx_hash: str, log_index: int) -> str:
    """The table key of a transfer: `tx_hash:log_index` (the ledger.reconciliations key too)."""
    return f"{tx_hash.lower()}:{log_index}"


def _digest(*parts: object) -> str:
    return hashlib.sha256("|".join("" if p is None else str(p) for p in parts).encode()).hexdigest()


def discrepancy_id(kind: str, tx_hash: str, log_index: int, direction: str | None,
                   entry_id: str | None) -> str:
    """Deterministic: SHA-256 of type | tx_hash | log_index | chain side | entry_id."""
    return _digest(kind, tx_hash, log_index, direction, entry_id)


def _amount(amount_e18: int) -> str:
    """Exact major-unit string without trailing zeros (1.5, not 1.500000000000000000)."""
    text = format(to_major(amount_e18, DECIMALS_MAX), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


# ------------------------------------------------------------------ the wanted outputs


def _expected_direction(entry_type: str) -> str | None:
    return DIRECTION_OF_ENTRY_TYPE.get(entry_type)


def _assign(join: KeyJoin, claim: LedgerClaim) -> str | None:
    """The chain side an entry claims: the side of its entry type's direction, else a side of
    its account (booked in the wrong direction); None when the chain shows neither yet. Never
    "the only side there is": the other side of a two-wallet transfer may still be on its way."""
    wanted = _expected_direction(claim.entry_type)
    if wanted in join.sides:
        return wanted
    for direction in sorted(join.sides):
        if join.sides[direction].current()[2].account_id == claim.account_id:
            return direction
    return None


def _wanted(join: KeyJoin, now_ms: int, grace: Grace) -> tuple[dict[str, Discrepancy],
                                                                  dict[str, Match]]:
    """Open discrepancies and live matches the join value calls for now."""
    found: dict[str, Discrepancy] = {}
    matches: dict[str, Match] = {}
    head = join.head_block if join.head_block is not None else 0

    def flag(kind: DiscrepancyType, entry_id: str | None, direction: str | None,
             expected: str | None, actual: str | None, description: str) -> None:
        ident = discrepancy_id(kind, join.tx_hash, join.log_index, direction, entry_id)
        found[ident] = Discrepancy(ident, kind.value, DiscrepancyStatus.OPEN.value, SEVERITY[kind],
                                   entry_id, join.tx_hash, join.log_index, expected, actual,
                                   description, now_ms)

    where = f"{join.tx_hash} log {join.log_index}"
    # Entries in a fixed order, so the first claim of a side (the one kept) never depends on
    # which arrived first.
    ordered = sorted(join.entries.items(), key=lambda item: (item[1].committed_at_ms, item[0]))
    claimed: dict[str, str] = {}  # side (or wanted direction when no side) -> first entry_id
    for entry_id, claim in ordered:
        direction = _assign(join, claim)
        slot = direction if direction is not None else (_expected_direction(claim.entry_type) or "")
        first = claimed.setdefault(slot, entry_id)
        if first != entry_id:
            flag(DiscrepancyType.DUPLICATE_ENTRY, entry_id, direction, first, entry_id,
                 f"entry {entry_id} claims transfer {where}"
                 f"{'' if direction is None else ' ' + direction} already booked by {first}")
            continue
        if direction is None:
            if grace.passed(claim.seen_at_ms, claim.seen_head_block, now_ms, head):
                flag(DiscrepancyType.MISSING_ON_CHAIN, entry_id, None, None,
                     f"{_amount(claim.amount_e18)} {claim.currency} {claim.entry_type} "
                     f"{claim.account_id}",
                     f"entry {entry_id} references transfer {where}, which the chain watcher "
                     "has not published")
            continue
        status, block_hash, side = join.sides[direction].current()
        if status == REMOVED:
            flag(DiscrepancyType.STATUS_MISMATCH, entry_id, direction, CONFIRMED, REMOVED,
                 f"entry {entry_id} booked transfer {where} {direction}, whose block "
                 f"{side.block_number} was orphaned by a reorg")
            continue
        problems = False
        wanted_direction = _expected_direction(claim.entry_type)
        if side.account_id != claim.account_id or wanted_direction not in (None, direction):
            problems = True
            flag(DiscrepancyType.ACCOUNT_MISMATCH, entry_id, direction,
                 f"{side.account_id} {direction}",
                 f"{claim.account_id} {wanted_direction or claim.entry_type}",
                 f"entry {entry_id} books transfer {where} on {claim.account_id} "
                 f"({claim.entry_type}); the chain moved it {direction} of {side.account_id}")
        if side.currency != claim.currency:
            problems = True
            flag(DiscrepancyType.CURRENCY_MISMATCH, entry_id, direction, side.currency,
                 claim.currency, f"entry {entry_id} books transfer {where} in {claim.currency}; "
                 f"the chain moved {side.currency}")
        elif side.amount_e18 != claim.amount_e18:
            # Compared only in one currency: amounts of different currencies say nothing.
            problems = True
            flag(DiscrepancyType.AMOUNT_MISMATCH, entry_id, direction, _amount(side.amount_e18),
                 _amount(claim.amount_e18),
                 f"entry {entry_id} books {_amount(claim.amount_e18)} {claim.currency}; "
                 f"transfer {where} moved {_amount(side.amount_e18)} {side.currency}")
        if not problems:
            ident = _digest("match", join.tx_hash, join.log_index, direction, entry_id)
            matches[ident] = Match(ident, MatchStatus.MATCHED.value, entry_id, join.tx_hash,
                                   join.log_index, direction, side.chain, side.block_number,
                                   block_hash, side.account_id, side.currency, side.amount_e18,
                                   claim.committed_at_ms, now_ms)
    booked = set(claimed)
    for direction in sorted(join.sides):
        status, _, side = join.sides[direction].current()
        if status != CONFIRMED or direction in booked:
            continue
        if grace.passed(side.seen_at_ms, side.block_number, now_ms, head):
            flag(DiscrepancyType.MISSING_IN_LEDGER, None, direction,
                 f"{_amount(side.amount_e18)} {side.currency} {direction} {side.account_id}", None,
                 f"transfer {where} ({_amount(side.amount_e18)} {side.currency} {direction} of "
                 f"{side.account_id}, block {side.block_number}) has no ledger entry")
    return found, matches


def _settle(join: KeyJoin, now_ms: int, grace: Grace) -> tuple[KeyJoin, list[Output]]:
    """Diff the wanted outputs against the emitted ones: new opens, resolutions, match changes."""
    wanted, matches = _wanted(join, now_ms, grace)
    out: list[Output] = []
    open_now = dict(join.open)
    for ident in sorted(set(join.open) - set(wanted)):
        out.append(replace(open_now.pop(ident), status=DiscrepancyStatus.RESOLVED.value,
                           detected_at_ms=now_ms))
    for ident in sorted(set(wanted) - set(join.open)):
        open_now[ident] = wanted[ident]
        out.append(wanted[ident])
    matched_now = dict(join.matched)
    for ident in sorted(set(join.matched) - set(matches)):
        out.append(replace(matched_now.pop(ident), status=MatchStatus.UNMATCHED.value,
                           reconciled_at_ms=now_ms))
    for ident in sorted(set(matches) - set(join.matched)):
        matched_now[ident] = matches[ident]
        out.append(matches[ident])
    return replace(join, open=open_now, matched=matched_now), out


# ------------------------------------------------------------------ events


def on_entry(state: KeyJoin | None, entry: EntryClaim, now_ms: int,
             grace: Grace = GRACE_DEFAULT) -> tuple[KeyJoin, list[Output]]:
    """An entry that references a chain transfer. The same entry_id again changes nothing."""
    join = state if state is not None else KeyJoin(entry.tx_hash, entry.log_index)
    if join.key != (entry.tx_hash, entry.log_index):
        raise ReconcileError(f"entry {entry.entry_id} for {join_key(entry.tx_hash, entry.log_index)}"
                             f" given the join of {join_key(*join.key)}")
    if entry.entry_id in join.entries:
        return join, []  # entries are immutable: a re-emitted entry is the same entry
    claim = LedgerClaim(entry.account_id, entry.currency, entry.entry_type, entry.amount_e18,
                        entry.committed_at_ms, entry.chain, now_ms, join.head_block)
    return _settle(replace(join, entries={**join.entries, entry.entry_id: claim}), now_ms, grace)


def on_transfer(state: KeyJoin | None, transfer: TransferEvent, now_ms: int,
                grace: Grace = GRACE_DEFAULT) -> tuple[KeyJoin, list[Output]]:
    """A ChainTransfer (confirmed or removed). The same record again changes nothing."""
    join = state if state is not None else KeyJoin(transfer.tx_hash, transfer.log_index)
    if join.key != (transfer.tx_hash, transfer.log_index):
        raise ReconcileError(f"transfer {join_key(transfer.tx_hash, transfer.log_index)} given "
                             f"the join of {join_key(*join.key)}")
    if transfer.status not in (CONFIRMED, REMOVED):
        raise ReconcileError(f"transfer {join_key(*join.key)}: unknown status {transfer.status!r}")
    side = join.sides.get(transfer.direction, ChainSide())
    records = dict(side.records)
    if transfer.block_hash not in records:
        records[transfer.block_hash] = ChainRecord(transfer.chain, transfer.block_number,
                                                   transfer.amount_e18, transfer.currency,
                                                   transfer.account_id, now_ms)
    removed = side.removed | ({transfer.block_hash} if transfer.status == REMOVED else set())
    updated = ChainSide(records, frozenset(removed))
    if updated == side:
        return join, []
    head = max(join.head_block or 0, transfer.block_number)
    return _settle(replace(join, sides={**join.sides, transfer.direction: updated},
                           head_block=head), now_ms, grace)


def on_tick(state: KeyJoin, now_ms: int, chain_head_block: int,
            grace: Grace = GRACE_DEFAULT) -> tuple[KeyJoin, list[Output]]:
    """Time and the chain head moved on: raise the missing_* whose grace window has passed."""
    entries = {entry_id: claim if claim.seen_head_block is not None
               else replace(claim, seen_head_block=chain_head_block)
               for entry_id, claim in state.entries.items()}
    head = max(state.head_block or 0, chain_head_block)
    return _settle(replace(state, entries=entries, head_block=head), now_ms, grace)


def run(joins: dict[str, KeyJoin], events: Iterable[EntryClaim | TransferEvent], now_ms: int,
        grace: Grace = GRACE_OFF) -> list[Output]:
    """Feed events into a dict of joins (by join_key); the outputs in order. For batch use."""
    out: list[Output] = []
    for event in events:
        key = join_key(event.tx_hash, event.log_index)
        if isinstance(event, EntryClaim):
            joins[key], emitted = on_entry(joins.get(key), event, now_ms, grace)
        else:
            joins[key], emitted = on_transfer(joins.get(key), event, now_ms, grace)
        out += emitted
    return out


def open_discrepancies(joins: Iterable[KeyJoin]) -> dict[str, Discrepancy]:
    return {ident: d for join in joins for ident, d in join.open.items()}


# ------------------------------------------------------------------ table values (JSON, ints only)
# Like streams/records.py: readable with any tool, every number an integer (exact at any size).


def join_to_bytes(join: KeyJoin) -> bytes:
    return json.dumps({
        "v": JOIN_VALUE_VERSION, "tx": join.tx_hash, "log": join.log_index, "head": join.head_block,
        "sides": {direction: {
            "records": {h: [r.chain, r.block_number, r.amount_e18, r.currency, r.account_id,
                            r.seen_at_ms] for h, r in sorted(side.records.items())},
            "removed": sorted(side.removed)} for direction, side in sorted(join.sides.items())},
        "entries": {entry_id: [c.account_id, c.currency, c.entry_type, c.amount_e18,
                               c.committed_at_ms, c.chain, c.seen_at_ms, c.seen_head_block]
                    for entry_id, c in sorted(join.entries.items())},
        "open": [[d.discrepancy_id, d.type, d.severity, d.entry_id, d.expected, d.actual,
                  d.description, d.detected_at_ms] for _, d in sorted(join.open.items())],
        "matched": [[m.reconciliation_id, m.entry_id, m.direction, m.chain, m.block_number,
                     m.block_hash, m.account_id, m.currency, m.amount_e18,
                     m.entry_committed_at_ms, m.reconciled_at_ms]
                    for _, m in sorted(join.matched.items())],
    }, separators=(",", ":")).encode()


def join_from_bytes(data: bytes | None) -> KeyJoin | None:
    if data is None:
        return None
    raw = json.loads(data)
    if raw.get("v") != JOIN_VALUE_VERSION:
        raise ReconcileError(f"join value version {raw.get('v')} is not {JOIN_VALUE_VERSION}")
    tx_hash, log_index = raw["tx"], raw["log"]
    sides = {direction: ChainSide({h: ChainRecord(*r) for h, r in side["records"].items()},
                                  frozenset(side["removed"]))
             for direction, side in raw["sides"].items()}
    entries = {entry_id: LedgerClaim(*c) for entry_id, c in raw["entries"].items()}
    open_ = {d[0]: Discrepancy(d[0], d[1], DiscrepancyStatus.OPEN.value, d[2], d[3], tx_hash,
                               log_index, d[4], d[5], d[6], d[7]) for d in raw["open"]}
    matched = {m[0]: Match(m[0], MatchStatus.MATCHED.value, m[1], tx_hash, log_index, m[2], m[3],
                           m[4], m[5], m[6], m[7], m[8], m[9], m[10]) for m in raw["matched"]}
    return KeyJoin(tx_hash, log_index, sides, entries, raw["head"], open_, matched)
