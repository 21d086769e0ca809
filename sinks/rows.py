"""Pure translation between decoded Avro records, PostgreSQL rows and core entries."""

from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import Context, Decimal, Inexact, InvalidOperation
from typing import Any

from sardis_ledger.sinks.errors import SinkError
from sardis_ledger.streams import core, records
from sardis_ledger.streams.money import DIGITS_MAX, Currency

ENTRY_COLUMNS = (
    "entry_id", "command_id", "account_id", "currency", "entry_type", "amount",
    "running_balance", "sequence", "batch_id", "batch_size", "leg_index", "reverses_entry_id",
    "reference", "metadata", "occurred_at", "committed_at", "partition", "leaf_index",
    "entry_hash", "merkle_root", "chain", "chain_tx_hash", "chain_log_index",
)
BATCH_COLUMNS = ("batch_id", "batch_size", "partition", "committed_at")
TREE_HEAD_COLUMNS = ("partition", "tree_size", "root_hash", "published_at")
RECEIPT_COLUMNS = ("entry_id", "immudb_tx", "immudb_database", "verified", "receipted_at")
_QUANTA: dict[int, Decimal] = {}
_EXACT = Context(prec=DIGITS_MAX, traps=[Inexact, InvalidOperation])

ANCHOR_COLUMNS = ("partition", "tree_size", "root_hash", "chain", "tx_hash", "block_number",
                  "contract_address", "anchored_at")


def _at_currency_scale(amount: Decimal, currency: Currency | None) -> Decimal:
    """The wire's scale-18 amount at its currency's scale (10.50, not 10.500000000000000000).

    An amount with more decimals than its currency (or an unknown currency) is kept exactly as
    the wire carried it: the projection never rounds.
    """
    if currency is None:
        return amount
    quantum = _QUANTA.get(currency.decimals)
    if quantum is None:
        quantum = _QUANTA.setdefault(currency.decimals, Decimal(1).scaleb(-currency.decimals))
    try:
        # Exact or nothing: the context traps Inexact, so a digit past the scale is kept as is.
        return amount.quantize(quantum, context=_EXACT)
    except (InvalidOperation, Inexact):
        return amount


def entry_row(record: Mapping[str, Any], currencies: Mapping[str, Currency]) -> tuple[Any, ...]:
    """A decoded Entry record as an `entries` row, in ENTRY_COLUMNS order."""
    currency = currencies.get(record["currency"])
    return (
        record["entry_id"], record["command_id"], record["account_id"], record["currency"],
        record["entry_type"], _at_currency_scale(record["amount"], currency),
        _at_currency_scale(record["running_balance"], currency), record["sequence"],
        record.get("batch_id"), record.get("batch_size"), record.get("leg_index"),
        record.get("reverses_entry_id"), record.get("reference"),
        json.dumps(dict(record.get("metadata") or {}), sort_keys=True, ensure_ascii=False),
        record.get("occurred_at"), record["committed_at"], record["partition"],
        record["leaf_index"], record["entry_hash"], record["merkle_root"], record.get("chain"),
        record.get("chain_tx_hash"), record.get("chain_log_index"),
    )


def batch_row(record: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """The `batches` row an entry of a multi-leg batch implies (None for a single entry)."""
    if record.get("batch_id") is None:
        return None
    return (record["batch_id"], record.get("batch_size"), record["partition"],
            record["committed_at"])


def tree_head_row(record: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(record[name] for name in TREE_HEAD_COLUMNS)


def receipt_row(record: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(record[name] for name in RECEIPT_COLUMNS)


def anchor_row(record: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(record.get(name) for name in ANCHOR_COLUMNS)


def entry_wire_from_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """An `entries` row back as a wire-like Entry record (amounts exact, hashes hex)."""
    wire = {name: row[name] for name in ENTRY_COLUMNS}
    metadata = wire["metadata"]
    wire["metadata"] = json.loads(metadata) if isinstance(metadata, str) else dict(metadata or {})
    return wire


def entry_from_row(row: Mapping[str, Any], currencies: Mapping[str, Currency]) -> core.Entry:
    """An `entries` row as the core Entry whose canonical bytes it must hash to."""
    wire = entry_wire_from_row(row)
    if wire["currency"] not in currencies:
        raise SinkError(f"entry {wire['entry_id']}: currency {wire['currency']!r} is not in the "
                        "currency table (set SARDIS_CURRENCIES as the worker has it)")
    try:
        return records.entry_from_wire(wire, currencies)
    except (ValueError, TypeError) as exc:  # bad hex or amounts in a (possibly edited) row
        raise SinkError(f"entry {wire['entry_id']}: row cannot be read back: {exc}") from exc
