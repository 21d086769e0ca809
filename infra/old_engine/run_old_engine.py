"""Closed loop on the old engine; run by the scratch venv's python, prints one JSON line of figures."""

# This file is executed by the scratch virtual environment's interpreter (see compare.py), where
# sardis-ledger 1.1.0 is installed and this project is not: it imports nothing from the project,
# and the old library only inside functions, so that the project's own tools (mypy, the unit
# tests of `percentile`) can import this module where the old library is absent.

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from decimal import Decimal
from typing import Any

AMOUNT = Decimal("0.10")
CURRENCY = "USDC"
# The library's pool (sardis_v2_core.database) defaults to 30 connections; more clients than
# that would queue on the pool rather than on PostgreSQL, so the pool grows with the clients.
LIBRARY_POOL_MAX_DEFAULT = 30
# The tables PostgresLedgerEngine writes or reads; dropped before each run and recreated by the
# library's own SCHEMA_SQL (CREATE TABLE IF NOT EXISTS for its whole production schema).
ENGINE_TABLES = ("ledger_batch_entries", "ledger_batches", "ledger_entries_v2",
                 "ledger_audit_log", "balance_snapshots")
RESULT_PREFIX = "OLD_ENGINE_RESULT "


def percentile(sorted_ms: list[float], fraction: float) -> float:
    """The value at `fraction` (0..1) of an ascending list (nearest rank, as streams.bench)."""
    if not sorted_ms:
        return 0.0
    return sorted_ms[min(len(sorted_ms) - 1, int(len(sorted_ms) * fraction))]


def account_name(index: int) -> str:
    return f"loop_{index:05d}"


async def reset_tables(dsn: str) -> None:
    """Drop the engine's tables and recreate them with the DDL sardis-core 1.1.0 ships."""
    import asyncpg
    from sardis_v2_core.database import SCHEMA_SQL

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {', '.join(ENGINE_TABLES)} CASCADE")
        await conn.execute(SCHEMA_SQL)
    finally:
        await conn.close()


async def truncate_entries(dsn: str) -> None:
    """Empty what the warm-up wrote: each measured run starts on empty tables, as ours does on
    fresh topics (the engine sums an account's entries on every create, so history costs)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE ledger_entries_v2, ledger_audit_log")
    finally:
        await conn.close()


async def closed_loop(engine: Any, clients: int, accounts: int,
                      duration_s: float) -> tuple[list[float], float]:
    """`clients` tasks, each awaiting engine.create_entry before the next, for `duration_s`;
    returns the latencies (ms, ascending) and the elapsed seconds."""
    from sardis_ledger.models import LedgerEntryType

    latencies_ms: list[float] = []
    stop_at = time.monotonic() + duration_s

    async def client(index: int) -> None:
        rng = random.Random(index)
        while time.monotonic() < stop_at:
            account = account_name(rng.randrange(accounts))
            started = time.monotonic()
            await engine.create_entry(account_id=account, amount=AMOUNT,
                                      entry_type=LedgerEntryType.CREDIT, currency=CURRENCY)
            latencies_ms.append((time.monotonic() - started) * 1000)

    began = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed_s = time.monotonic() - began
    latencies_ms.sort()
    return latencies_ms, elapsed_s


async def exactness(dsn: str, engine: Any) -> dict[str, Any]:
    """What the engine stored against what was posted: every entry is a credit of 0.10, so
    each sum is count x 0.10 exactly, or the engine lost exactness; and the audit log's hash
    chain, whose forks are rows that name the same predecessor; and running balances written
    twice for one account (with credits only, each should be new): the engine releases its
    advisory lock before its transaction commits, so the next entry can sum a stale balance."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        count, total = await conn.fetchrow(
            "SELECT count(*), COALESCE(sum(amount), 0) FROM ledger_entries_v2")
        stored_amounts = await conn.fetch("SELECT DISTINCT amount FROM ledger_entries_v2")
        forks = await conn.fetchval(
            "SELECT count(previous_hash) - count(DISTINCT previous_hash) FROM ledger_audit_log")
        stale = await conn.fetchval(
            "SELECT count(*) - count(DISTINCT (account_id, running_balance)) FROM ledger_entries_v2")
        account_count = await conn.fetchval(
            "SELECT count(*) FROM ledger_entries_v2 WHERE account_id = $1", account_name(0))
    finally:
        await conn.close()
    balance = await engine.get_balance(account_name(0), CURRENCY)
    return {"entries": count, "sum": str(total), "expected_sum": str(AMOUNT * count),
            "stored_amounts": sorted(str(r[0]) for r in stored_amounts),
            "balance_account": account_name(0), "balance": str(balance),
            "expected_balance": str(AMOUNT * account_count), "audit_forks": forks,
            "stale_running_balances": stale}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["DATABASE_URL"] = args.dsn  # where sardis_v2_core's Database makes its pool
    os.environ.setdefault("SARDIS_DB_POOL_MAX", str(max(LIBRARY_POOL_MAX_DEFAULT, args.clients)))
    from sardis_v2_core.database import Database

    # The old library (1.1.0, in the scratch venv), not this repository's package of that name.
    from sardis_ledger import PostgresLedgerEngine  # type: ignore[attr-defined]

    await reset_tables(args.dsn)
    # The engine ignores its dsn argument: Database.get_pool() reads DATABASE_URL.
    engine = PostgresLedgerEngine(args.dsn)
    try:
        if args.warmup_s > 0:
            await closed_loop(engine, args.clients, args.accounts, args.warmup_s)
            await truncate_entries(args.dsn)
        latencies_ms, elapsed_s = await closed_loop(engine, args.clients, args.accounts,
                                                    args.duration_s)
        checks = await exactness(args.dsn, engine)
    finally:
        await Database.close()
    return {"clients": args.clients, "accounts": args.accounts, "commands": len(latencies_ms),
            "rate_per_s": len(latencies_ms) / elapsed_s,
            "p50_ms": percentile(latencies_ms, 0.50), "p99_ms": percentile(latencies_ms, 0.99),
            "checks": checks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", required=True, help="PostgreSQL database the engine may reset")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--accounts", type=int, default=1)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    args = parser.parse_args(argv)
    figures = asyncio.run(run(args))
    print(RESULT_PREFIX + json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
