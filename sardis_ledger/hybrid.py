"""The old library's hybrid ledger: an entry returns once PostgreSQL and immudb both hold it."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sardis_ledger.engine import Entry, HybridReceipt, LedgerEngine, LockManager
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.errors import LedgerError
from sardis_ledger.streams.extras import require

RECEIPT_TIMEOUT_S = 60.0  # both sinks normally write within a second or two (README: Sinks)
RECEIPT_POLL_S = 0.1
IMMUDB_PORT_DEFAULT = 3322


class ReceiptTimeout(LedgerError):
    """The entry is committed, but the sinks have not both written it yet. Nothing is lost:
    `await ledger.wait_receipt(entry_id)` later returns its receipt."""

    retriable = True


@dataclass(frozen=True, slots=True)
class HybridConfig:
    """Where the sinks write: the PostgreSQL projection and the immudb server.

    immudb credentials come from SARDIS_IMMUDB_USER / SARDIS_IMMUDB_PASSWORD (or *_FILE), never
    from code. The sinks (`sardis-ledger sink postgres|immudb`) must be running.
    """

    postgres_url: str | None = None
    immudb_host: str = "127.0.0.1"
    immudb_port: int = IMMUDB_PORT_DEFAULT
    immudb_database: str | None = None
    pg_schema: str | None = None  # default: SARDIS_PG_SCHEMA or ledger
    bootstrap_servers: str | None = None
    receipt_timeout_s: float = RECEIPT_TIMEOUT_S


class HybridLedger(LedgerEngine):
    """A LedgerEngine whose create_entry also waits for the PostgreSQL row and the immudb receipt."""

    def __init__(self, config: HybridConfig, lock_manager: LockManager | None = None,
                 *, settings: Settings | None = None, **engine_args: Any) -> None:
        require("create_hybrid_ledger", "postgres", "immudb")
        super().__init__(config.postgres_url, lock_manager,
                         bootstrap_servers=config.bootstrap_servers, settings=settings,
                         **engine_args)
        changes: dict[str, Any] = {"immudb_addr": f"{config.immudb_host}:{config.immudb_port}"}
        if config.immudb_database is not None:
            changes["immudb_database"] = config.immudb_database
        self.settings = dataclasses.replace(self.settings, **changes)
        from sardis_ledger.sinks.schema import check_schema_name, pg_schema

        self.pg_schema = check_schema_name(config.pg_schema) if config.pg_schema else pg_schema()
        self.receipt_timeout_s = config.receipt_timeout_s

    async def create_entry(self, *, account_id: str, amount: Decimal | str, entry_type: str,
                           reference: str | None = None, metadata: Any = None,
                           currency: str | None = None, command_id: str | None = None,
                           allow_overdraft: bool = False,
                           occurred_at: datetime | None = None) -> Entry:
        """Post one entry and return it with `receipt` (pg_id, immudb_tx) once both sinks have it."""
        entry = await super().create_entry(
            account_id=account_id, amount=amount, entry_type=entry_type, reference=reference,
            metadata=metadata, currency=currency, command_id=command_id,
            allow_overdraft=allow_overdraft, occurred_at=occurred_at)
        return Entry.of(entry, await self.wait_receipt(entry.entry_id))

    async def wait_receipt(self, entry_id: str, timeout_s: float | None = None) -> HybridReceipt:
        """The entry's row in PostgreSQL and its immudb receipt, polled until both are there."""
        from sardis_ledger.sinks.schema import connect, quoted

        timeout_s = self.receipt_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        q = quoted(self.pg_schema)
        conn = await connect(self.settings.pg_dsn)
        try:
            while True:
                row = await conn.fetchrow(
                    f"SELECT e.entry_id, r.immudb_tx, r.immudb_database, r.verified, r.receipted_at "
                    f"FROM {q}.entries e JOIN {q}.receipts r USING (entry_id) "
                    "WHERE e.entry_id = $1", entry_id)
                if row is not None:
                    return HybridReceipt(row["entry_id"], self.pg_schema, row["immudb_tx"],
                                         row["immudb_database"], row["verified"],
                                         row["receipted_at"])
                if time.monotonic() > deadline:
                    raise ReceiptTimeout(f"{entry_id} is committed, but after {timeout_s}s "
                                         f"{self.pg_schema} has no row and receipt for it: are "
                                         "both sinks running?")
                await asyncio.sleep(RECEIPT_POLL_S)
        except LedgerError:
            raise
        except Exception as exc:  # asyncpg's errors share no useful base class
            raise LedgerError(f"reading the receipt of {entry_id}: {exc!r}", retriable=True) from exc
        finally:
            await conn.close()

    async def verify_receipt(self, entry_id: str) -> dict[str, Any]:
        """The full check `sardis-ledger receipt` prints: the row, its Merkle inclusion proof to
        a tree head, and a verified immudb read. `["verified"]` is true only if all hold."""
        from sardis_ledger.sinks.verify import receipt

        return await receipt(self.settings, self.pg_schema, entry_id)


def create_hybrid_ledger(config: HybridConfig, **engine_args: Any) -> HybridLedger:
    """`create_hybrid_ledger(config=HybridConfig(postgres_url=, immudb_host=, immudb_port=))`."""
    return HybridLedger(config, **engine_args)
