"""The old library's immutable audit trail: verified writes and reads of documents in immudb."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sardis_ledger.engine import canonical_json
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.errors import LedgerError
from sardis_ledger.streams.extras import require

AUDIT_KEY_TEMPLATE = "{prefix}audit:{entry_id}"  # beside the sink's entry:{entry_id} keys
IMMUDB_PORT_DEFAULT = 3322
DATABASE_NAME_LENGTH_MAX = 128


class VerificationStatus(StrEnum):
    VERIFIED = "verified"  # immudb's inclusion and consistency proofs checked (and data matched)
    NOT_FOUND = "not_found"  # no audit record under this id
    MISMATCH = "mismatch"  # the record verifies, but differs from the data given to verify()
    TAMPERED = "tampered"  # a proof did not check: the server's history changed


@dataclass(frozen=True, slots=True)
class ImmutableConfig:
    """The immudb server and database; credentials from SARDIS_IMMUDB_USER/PASSWORD (or *_FILE).

    The database is created on first use when it is missing (the user needs the right to).
    """

    host: str = "127.0.0.1"
    port: int = IMMUDB_PORT_DEFAULT
    database: str = "defaultdb"
    state_dir: Path | None = None  # trusted states; default SARDIS_STATE_DIR or ~/.local/state
    create_database: bool = True


@dataclass(frozen=True, slots=True)
class AuditReceipt:
    entry_id: str
    key: str
    tx_id: int  # the immudb transaction holding the record
    database: str
    verified: bool
    timestamp: datetime  # when this client checked the write
    merkle_proof: Mapping[str, Any]  # the transaction and the trusted state the proofs checked against


@dataclass(frozen=True, slots=True)
class Verification:
    entry_id: str
    status: VerificationStatus
    tx_id: int | None
    detail: str = ""


class AuditTrail:
    """Write-once audit records: `write` stores canonical JSON under audit:{entry_id} in one
    verified immudb transaction (a second write of the same data returns the first receipt, of
    different data raises); `verify` reads it back with proofs."""

    def __init__(self, config: ImmutableConfig, settings: Settings | None = None) -> None:
        require("create_audit_trail", "immudb")
        if not 0 < len(config.database) <= DATABASE_NAME_LENGTH_MAX:
            raise LedgerError(f"database name must be 1..{DATABASE_NAME_LENGTH_MAX} characters")
        base = settings or Settings.from_env()
        self.settings = dataclasses.replace(base, immudb_addr=f"{config.host}:{config.port}",
                                            immudb_database=config.database)
        self.config = config
        self._store: Any = None
        self._lock = asyncio.Lock()

    def key(self, entry_id: str) -> bytes:
        return AUDIT_KEY_TEMPLATE.format(prefix=self.settings.topic_prefix,
                                         entry_id=entry_id).encode()

    async def write(self, *, entry_id: str, data: Mapping[str, Any]) -> AuditReceipt:
        value = canonical_json(data)
        key = self.key(entry_id)
        async with self._lock:
            store = await asyncio.to_thread(self._opened)
            stored = (await asyncio.to_thread(store.write, {key: value}))[key]
            trusted = store.trusted
        proof = {"tx_id": stored.tx_id, "trusted_tx_id": trusted.tx_id,
                 "trusted_tx_hash": trusted.tx_hash.hex(), "database": trusted.db}
        return AuditReceipt(entry_id, key.decode(), stored.tx_id, self.config.database,
                            stored.verified, datetime.now(UTC), proof)

    async def verify(self, entry_id: str, data: Mapping[str, Any] | None = None) -> Verification:
        """VERIFIED when the record's proofs check (and it equals `data`, when given)."""
        from sardis_ledger.sinks.errors import SinkError, VerificationError

        async with self._lock:
            store = await asyncio.to_thread(self._opened)
            try:
                value, stored = await asyncio.to_thread(store.read_verified, self.key(entry_id))
            except VerificationError as exc:
                return Verification(entry_id, VerificationStatus.TAMPERED, None, str(exc))
            except SinkError as exc:
                if exc.retriable:
                    raise
                return Verification(entry_id, VerificationStatus.NOT_FOUND, None, str(exc))
        if not stored.verified:
            return Verification(entry_id, VerificationStatus.TAMPERED, stored.tx_id,
                                "immudb returned the record unverified")
        if data is not None and canonical_json(data) != value:
            return Verification(entry_id, VerificationStatus.MISMATCH, stored.tx_id,
                                "the stored record differs from the data given")
        return Verification(entry_id, VerificationStatus.VERIFIED, stored.tx_id)

    async def close(self) -> None:
        async with self._lock:
            if self._store is not None:
                store, self._store = self._store, None
                await asyncio.to_thread(store.close)

    def _opened(self) -> Any:
        from sardis_ledger.sinks.immudb import ImmudbStore

        if self._store is None:
            if self.config.create_database:
                self._ensure_database()
            store = ImmudbStore(self.settings, self.config.state_dir)
            store.open()
            self._store = store
        return self._store

    def _ensure_database(self) -> None:
        """Create the database if it is missing (immudb databases are created by an admin)."""
        from immudb import ImmudbClient

        from sardis_ledger.sinks.immudb import GRPC_TIMEOUT_S, translate

        name = self.config.database
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # immudb-py prints state warnings
                client = ImmudbClient(f"{self.config.host}:{self.config.port}", timeout=GRPC_TIMEOUT_S)
                client.login(self.settings.immudb_user, self.settings.immudb_password)
            try:
                if name not in client.databaseList():
                    client.createDatabase(name.encode())
            finally:
                with contextlib.suppress(Exception):
                    client.shutdown()
        except Exception as exc:
            if "already exists" in str(exc):  # created meanwhile by another process
                return
            raise translate(exc, f"creating immudb database {name}") from exc


def create_audit_trail(config: ImmutableConfig, settings: Settings | None = None) -> AuditTrail:
    """`create_audit_trail(config=ImmutableConfig(host=, port=, database=))`."""
    return AuditTrail(config, settings)
