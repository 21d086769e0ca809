"""Range report: reconcile the chain transfers of a block range against the PostgreSQL ledger."""

# Chain side: the watcher's `chain.transfers` topic, read to its end (it carries the watched
# accounts and the reorg history, which the node alone does not). A transfer key belongs to the
# range when the block its transfer currently stands in (after reorgs) is in [start, end].
# Ledger side: the PostgreSQL projection's entries naming those transactions, plus entries naming
# transactions the watcher never published: those are placed by their receipt's block, or, when
# the chain has no such transaction, by commit time between the range's first and last block.
# Both sides go through the streaming core (streams.reconcile) with the grace window off.

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sardis_ledger.streams import reconcile as rc
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.errors import LedgerError
from sardis_ledger.streams.topics import LedgerTopic

EXIT_OK = 0
EXIT_DISCREPANCIES = 1
MS_PER_S = 1000
RECEIPT_BATCH_MAX = 100  # receipts looked up concurrently per round
ENTRY_COLUMNS = ("entry_id", "account_id", "currency", "entry_type", "amount", "committed_at",
                 "chain", "chain_tx_hash", "chain_log_index")


class ReportError(LedgerError):
    """A range report could not be computed (bad range, unreachable store or node)."""


@dataclass(frozen=True, slots=True)
class ReconciliationReport:
    start_block: int
    end_block: int
    matched_count: int
    discrepancies: list[rc.Discrepancy]
    matches: list[rc.Match] = field(default_factory=list)
    transfers_count: int = 0  # transfer sides in the range
    entries_count: int = 0  # entries with a chain reference in the range

    @property
    def ok(self) -> bool:
        return not self.discrepancies

    def as_json(self) -> dict[str, Any]:
        return {"start_block": self.start_block, "end_block": self.end_block,
                "matched_count": self.matched_count, "transfers_count": self.transfers_count,
                "entries_count": self.entries_count,
                "discrepancies": [d.to_wire() for d in self.discrepancies]}


def join_transfers(transfers: Iterable[Mapping[str, Any]], now_ms: int) -> dict[str, rc.KeyJoin]:
    """Every decoded ChainTransfer record joined by key (any block: a reorg's records differ)."""
    joins: dict[str, rc.KeyJoin] = {}
    rc.run(joins, (rc.transfer_from_wire(t) for t in transfers), now_ms, rc.GRACE_OFF)
    return joins


def in_range(join: rc.KeyJoin, start_block: int, end_block: int) -> bool:
    """Whether a transfer key belongs to the range: a side stands in a block of it now."""
    return any(start_block <= side.current()[2].block_number <= end_block
               for side in join.sides.values())


def build_report(start_block: int, end_block: int, transfer_joins: Mapping[str, rc.KeyJoin],
                 entries: Iterable[Mapping[str, Any]], now_ms: int) -> ReconciliationReport:
    """The report from the joined transfers (any blocks; those of the range are kept) and the
    entry records chosen for the range, which may add keys with no transfer."""
    joins = {key: join for key, join in transfer_joins.items()
             if in_range(join, start_block, end_block)}
    transfer_sides = sum(len(join.sides) for join in joins.values())
    claims = [c for c in (rc.claim_from_entry(e) for e in entries) if c is not None]
    rc.run(joins, claims, now_ms, rc.GRACE_OFF)
    discrepancies = sorted(rc.open_discrepancies(joins.values()).values(),
                           key=lambda d: (d.tx_hash, d.log_index, d.type, d.entry_id or ""))
    matches = sorted((m for join in joins.values() for m in join.matched.values()),
                     key=lambda m: (m.tx_hash, m.log_index, m.direction))
    return ReconciliationReport(start_block, end_block, len(matches), discrepancies, matches,
                                transfer_sides, len(claims))


class ReconciliationEngine:
    """Range reports over the watcher's topic, the PostgreSQL projection and the chain node."""

    def __init__(self, settings: Settings, *, pg_schema: str | None = None,
                 transfers_topic: str = LedgerTopic.CHAIN_TRANSFERS) -> None:
        from sardis_ledger.sinks.schema import check_schema_name
        from sardis_ledger.sinks.schema import pg_schema as default_schema

        self.settings = settings
        self.schema = check_schema_name(pg_schema) if pg_schema else default_schema()
        self.transfers_topic = transfers_topic

    async def reconcile(self, *, start_block: int, end_block: int) -> ReconciliationReport:
        if not 0 <= start_block <= end_block:
            raise ReportError(f"block range {start_block}..{end_block}: need 0 <= start <= end")
        from sardis_ledger.streams.chain.anchor import read_records

        now_ms = int(time.time() * MS_PER_S)
        transfers = [record for _, record in await read_records(self.settings,
                                                                self.transfers_topic)]
        joins = join_transfers(transfers, now_ms)
        range_tx = {join.tx_hash for join in joins.values()
                    if in_range(join, start_block, end_block)}
        known_tx = {join.tx_hash for join in joins.values()}
        rows = await self._entries(sorted(range_tx), sorted(known_tx))
        chosen = [row for row in rows if str(row["chain_tx_hash"]).lower() in range_tx]
        strangers = [row for row in rows if str(row["chain_tx_hash"]).lower() not in known_tx]
        if strangers:
            chosen += await self._place(strangers, start_block, end_block)
        return build_report(start_block, end_block, joins, chosen, now_ms)

    async def _entries(self, range_tx: list[str], known_tx: list[str]) -> list[dict[str, Any]]:
        """Entries naming a transaction of the range or one the watcher never published."""
        from sardis_ledger.sinks.schema import connect, quoted

        conn = await connect(self.settings.pg_dsn)
        try:
            found = await conn.fetch(
                f"SELECT {', '.join(ENTRY_COLUMNS)} FROM {quoted(self.schema)}.entries "
                "WHERE chain_tx_hash IS NOT NULL AND (lower(chain_tx_hash) = ANY($1::text[]) "
                "OR NOT lower(chain_tx_hash) = ANY($2::text[]))", range_tx, known_tx)
        except Exception as exc:  # asyncpg errors share no base class worth naming here
            raise ReportError(f"reading {self.schema}.entries: {exc!r}", retriable=True) from exc
        finally:
            await conn.close()
        return [dict(row) for row in found]

    async def _place(self, rows: list[dict[str, Any]], start_block: int,
                     end_block: int) -> list[dict[str, Any]]:
        """The entries (naming transactions the watcher never published) that belong here."""
        from sardis_ledger.streams.chain import eth

        w3 = eth.connect(self.settings.chain_rpc)
        try:
            hashes = sorted({str(row["chain_tx_hash"]).lower() for row in rows})
            blocks: dict[str, int | None] = {}
            for at in range(0, len(hashes), RECEIPT_BATCH_MAX):
                chunk = hashes[at:at + RECEIPT_BATCH_MAX]
                found = await asyncio.gather(*(self._receipt_block(w3, h) for h in chunk))
                blocks.update(zip(chunk, found, strict=True))
            first_ms, last_ms = await self._block_time_ms(w3, start_block), \
                await self._block_time_ms(w3, end_block)
        finally:
            await w3.provider.disconnect()
        placed = []
        for row in rows:
            block = blocks[str(row["chain_tx_hash"]).lower()]
            if block is not None:
                if start_block <= block <= end_block:
                    placed.append(row)
            elif first_ms <= rc.epoch_ms(row["committed_at"]) <= last_ms:
                placed.append(row)
        return placed

    @staticmethod
    async def _receipt_block(w3: Any, tx_hash: str) -> int | None:
        from web3 import exceptions as w3e

        from sardis_ledger.streams.chain.eth import rpc_error

        try:
            receipt = await w3.eth.get_transaction_receipt(tx_hash)
        except (w3e.TransactionNotFound, ValueError):
            return None  # not a transaction of this chain (or not even a well-formed hash)
        except Exception as exc:
            raise rpc_error(f"eth_getTransactionReceipt {tx_hash}", exc) from exc
        return int(receipt["blockNumber"])

    @staticmethod
    async def _block_time_ms(w3: Any, number: int) -> int:
        from sardis_ledger.streams.chain.eth import rpc_error

        try:
            block = await w3.eth.get_block(number)
        except Exception as exc:
            raise rpc_error(f"eth_getBlockByNumber {number}", exc) from exc
        return int(block["timestamp"]) * MS_PER_S


# ------------------------------------------------------------------ CLI


def _print_report(report: ReconciliationReport, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.as_json(), default=str))
        return
    print(f"blocks {report.start_block}..{report.end_block}: {report.transfers_count} transfer "
          f"sides, {report.entries_count} entries, {report.matched_count} matched, "
          f"{len(report.discrepancies)} discrepancies")
    for d in report.discrepancies:
        print(f"  {d.severity:8s} {d.type:17s} {d.description}")


def _cmd_reconcile(args: argparse.Namespace) -> int:
    engine = ReconciliationEngine(Settings.from_env(), pg_schema=args.schema)
    report = asyncio.run(engine.reconcile(start_block=args.start_block, end_block=args.end_block))
    _print_report(report, args.json)
    if report.discrepancies:
        print(f"sardis-ledger: {len(report.discrepancies)} discrepancies in blocks "
              f"{args.start_block}..{args.end_block}", file=sys.stderr)
    return EXIT_DISCREPANCIES if report.discrepancies else EXIT_OK


def add_reconcile_commands(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "reconcile", help="range report: chain transfers of blocks A..B against the ledger",
        description="Reconcile the transfers `chain watch` published for blocks A..B (as they "
        "stand after reorgs) against the ledger entries in PostgreSQL that reference them, with "
        "no grace window. Prints the matches count and every discrepancy; exit code 1 when "
        "there is any.")
    parser.add_argument("--start-block", type=int, required=True, metavar="A")
    parser.add_argument("--end-block", type=int, required=True, metavar="B")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--schema", help="PostgreSQL schema of the projection (default: "
                        "$SARDIS_PG_SCHEMA or ledger)")
    parser.set_defaults(func=_cmd_reconcile)

