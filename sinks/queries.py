"""Read queries on the PostgreSQL projection: point-in-time balances and account history."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sardis_ledger.sinks import rows
from sardis_ledger.sinks.schema import connect, quoted

HISTORY_LIMIT_DEFAULT = 1000


@dataclass(frozen=True, slots=True)
class BalanceAt:
    """Posted balance of an account right after its last entry committed at or before `at`."""

    account_id: str
    currency: str
    at: datetime
    balance: Decimal
    sequence: int  # of that entry; 0 when the account had no entry yet
    committed_at: datetime | None


async def balance_at(dsn: str, schema: str, account_id: str, currency: str, at: datetime) -> BalanceAt:
    q = quoted(schema)
    conn = await connect(dsn)
    try:
        # The SQL function is the contract; the row beside it says which entry the balance is after.
        balance = await conn.fetchval(f"SELECT {q}.balance_at($1, $2, $3)", account_id, currency, at)
        last = await conn.fetchrow(
            f"SELECT sequence, committed_at FROM {q}.entries WHERE account_id = $1 AND currency = $2 "
            "AND committed_at <= $3 ORDER BY sequence DESC LIMIT 1", account_id, currency, at)
    finally:
        await conn.close()
    return BalanceAt(account_id, currency, at, balance, last["sequence"] if last else 0,
                     last["committed_at"] if last else None)


class PostgresHistory:
    """Point-in-time balances from the projection, for LedgerClient(history=...)."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn = dsn
        self.schema = schema

    async def balance_at(self, account_id: str, currency: str, at: datetime) -> BalanceAt:
        return await balance_at(self.dsn, self.schema, account_id, currency, at)


async def history(dsn: str, schema: str, account_id: str, *, currency: str | None = None,
                  from_time: datetime | None = None, to_time: datetime | None = None,
                  limit: int = HISTORY_LIMIT_DEFAULT) -> list[dict[str, Any]]:
    """The account's entries in sequence order, committed in [from_time, to_time]."""
    q = quoted(schema)
    conditions = ["account_id = $1"]
    args: list[Any] = [account_id]
    for clause, value in (("currency = ${}", currency), ("committed_at >= ${}", from_time),
                          ("committed_at <= ${}", to_time)):
        if value is not None:
            args.append(value)
            conditions.append(clause.format(len(args)))
    args.append(limit)
    conn = await connect(dsn)
    try:
        found = await conn.fetch(
            f"SELECT * FROM {q}.entries WHERE {' AND '.join(conditions)} "
            f"ORDER BY currency, sequence LIMIT ${len(args)}", *args)
    finally:
        await conn.close()
    return [rows.entry_wire_from_row(row) for row in found]
