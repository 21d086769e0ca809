"""The old library's LedgerEngine over the stream ledger: entries, balances, batches, locks."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from typing import Any

from sardis_ledger.streams import core
from sardis_ledger.streams.client import (
    RESULT_TIMEOUT_S,
    LedgerBatch,
    LedgerClient,
    LedgerEntry,
    LedgerRejected,
)
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.errors import LedgerError

# The old library's entry types are the stream ledger's (credit, debit, fee, refund, adjustment).
LedgerEntryType = core.EntryType
CURRENCY_DEFAULT = "USDC"  # the old library was single-currency; the stream ledger's default
METADATA_ITEMS_MAX = 64  # the core enforces its own byte limits; this only bounds our copying


class ConcurrencyError(LedgerError):
    """The account changed after `lock_account` read it: nothing was posted. Retry the block."""

    retriable = True

    def __init__(self, account_id: str, currency: str, expected_sequence: int,
                 detail: str | None) -> None:
        super().__init__(f"{account_id} ({currency}) changed since lock_account read it at "
                         f"sequence {expected_sequence}" + (f": {detail}" if detail else ""))
        self.account_id = account_id
        self.currency = currency
        self.expected_sequence = expected_sequence


@dataclass(frozen=True, slots=True)
class HybridReceipt:
    """Where a hybrid ledger's entry landed: its PostgreSQL row and its immudb transaction."""

    pg_id: str  # primary key of the row in <schema>.entries (the entry_id)
    pg_schema: str
    immudb_tx: int
    immudb_database: str
    verified: bool  # the immudb sink checked the write's inclusion and consistency proofs
    receipted_at: datetime


@dataclass(frozen=True, slots=True)
class Entry(LedgerEntry):
    """A committed entry (every LedgerEntry field) plus, from a hybrid ledger, its receipt."""

    receipt: HybridReceipt | None = None

    @classmethod
    def of(cls, entry: LedgerEntry, receipt: HybridReceipt | None = None) -> Entry:
        return cls(**{f.name: getattr(entry, f.name) for f in fields(LedgerEntry)}, receipt=receipt)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields: amounts as exact decimal strings, times as ISO-8601."""
        out: dict[str, Any] = {}
        for f in fields(LedgerEntry):
            out[f.name] = _plain(getattr(self, f.name))
        if self.receipt is not None:
            out["receipt"] = {k: _plain(v) for k, v in dataclasses.asdict(self.receipt).items()}
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return dict(value)
    return value


def canonical_json(data: Mapping[str, Any]) -> bytes:
    """Sorted keys, no spaces, Decimals and times as strings: the same data gives the same bytes."""
    return json.dumps(_plain_tree(data), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def _plain_tree(value: Any) -> Any:
    if isinstance(value, float):
        raise TypeError("floats are not exact; pass Decimal or a decimal string")
    if isinstance(value, Mapping):
        return {str(k): _plain_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_tree(v) for v in value]
    return _plain(value)


@dataclass(frozen=True, slots=True)
class Batch:
    """A committed batch (or a rollback's compensating batch), its entries in leg order."""

    batch_id: str
    entries: tuple[Entry, ...]

    @classmethod
    def of(cls, batch: LedgerBatch) -> Batch:
        return cls(batch.batch_id, tuple(Entry.of(e) for e in batch.entries))


@dataclass(slots=True)
class _Hold:
    sequence: int  # the account's sequence the next entry in the block must find


_HOLDS: ContextVar[Mapping[tuple[int, str, str], _Hold] | None] = ContextVar("sardis_ledger_holds",
                                                                             default=None)


class LockManager:
    """Optimistic account locks: the sequences `lock_account` blocks read, per asyncio task.

    Nothing blocks: an entry made inside a block carries the sequence the block read as its
    expected_sequence, and the ledger rejects it if the account moved on (ConcurrencyError).
    """

    def held(self, account_id: str, currency: str) -> _Hold | None:
        return (_HOLDS.get() or {}).get((id(self), account_id, currency))

    @contextlib.contextmanager
    def hold(self, account_id: str, currency: str, sequence: int) -> Iterator[None]:
        key = (id(self), account_id, currency)
        token = _HOLDS.set({**(_HOLDS.get() or {}), key: _Hold(sequence)})
        try:
            yield
        finally:
            _HOLDS.reset(token)


def engine_settings(settings: Settings | None, *, database_url: str | None = None,
                    bootstrap_servers: str | None = None, topic_prefix: str | None = None) -> Settings:
    """SARDIS_* settings (or the given ones) with the constructor's connection arguments on top."""
    base = settings or Settings.from_env()
    changes: dict[str, Any] = {}
    if database_url is not None:
        changes["pg_dsn"] = database_url
    if bootstrap_servers is not None:
        changes["kafka_bootstrap"] = bootstrap_servers
    if topic_prefix is not None:
        changes["topic_prefix"] = topic_prefix
    return dataclasses.replace(base, **changes)


class LedgerEngine:
    """`LedgerEngine(database_url=...)` as in sardis-ledger 1.x, producing to the stream ledger.

    Kafka is reached from SARDIS_KAFKA_BOOTSTRAP (or `bootstrap_servers=`); `database_url` is
    the PostgreSQL projection, used only for point-in-time balances (`get_balance(at=)`). The
    Kafka client starts on the first call; `await engine.close()` (or `async with`) stops it.
    """

    def __init__(self, database_url: str | None = None, lock_manager: LockManager | None = None,
                 *, bootstrap_servers: str | None = None, topic_prefix: str | None = None,
                 currency: str = CURRENCY_DEFAULT, settings: Settings | None = None,
                 result_timeout_s: float = RESULT_TIMEOUT_S) -> None:
        self.settings = engine_settings(settings, database_url=database_url,
                                        bootstrap_servers=bootstrap_servers,
                                        topic_prefix=topic_prefix)
        self.lock_manager = lock_manager or LockManager()
        self.currency = currency
        self.result_timeout_s = result_timeout_s
        self._client: LedgerClient | None = None
        self._starting = asyncio.Lock()

    async def __aenter__(self) -> LedgerEngine:
        await self.client()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def client(self) -> LedgerClient:
        """The started LedgerClient underneath (the new API, for what the old one lacks)."""
        async with self._starting:
            if self._client is None:
                client = LedgerClient(self.settings, result_timeout_s=self.result_timeout_s)
                await client.start()
                self._client = client
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.stop()

    async def create_entry(self, *, account_id: str, amount: Decimal | str,
                           entry_type: str, reference: str | None = None,
                           metadata: Mapping[str, str] | None = None, currency: str | None = None,
                           command_id: str | None = None, allow_overdraft: bool = False,
                           occurred_at: datetime | None = None) -> Entry:
        """Post one entry; returns it committed (entry_id, running_balance, merkle_root, ...).

        Raises LedgerRejected with the reason code; inside `lock_account`, ConcurrencyError when
        the account changed since the block read it.
        """
        currency = currency or self.currency
        hold = self.lock_manager.held(account_id, currency)
        client = await self.client()
        try:
            entry = await client.create_entry(
                account_id=account_id, amount=amount, entry_type=str(entry_type), currency=currency,
                reference=reference, metadata=_string_metadata(metadata), command_id=command_id,
                expected_sequence=hold.sequence if hold else None, allow_overdraft=allow_overdraft,
                occurred_at=occurred_at)
        except LedgerRejected as exc:
            if hold is not None and exc.reason == core.Reason.SEQUENCE_CONFLICT:
                raise ConcurrencyError(account_id, currency, hold.sequence, exc.detail) from exc
            raise
        if hold is not None:
            hold.sequence = entry.sequence
        return Entry.of(entry)

    async def get_balance(self, account_id: str, currency: str | None = None,
                          at: datetime | None = None) -> Decimal:
        """The account's posted balance (now, or at a timezone-aware time from PostgreSQL)."""
        client = await self.client()
        return (await client.get_balance(account_id, currency or self.currency, at=at)).balance

    async def create_batch(self, entries: Sequence[Mapping[str, Any]], *,
                           batch_id: str | None = None, require_balanced: bool = True) -> Batch:
        """Post every entry or none (legs: account_id, amount, entry_type, reference, ...)."""
        legs: list[Mapping[str, Any]] = []
        for leg in entries:
            currency = leg.get("currency", self.currency)
            if self.lock_manager.held(leg["account_id"], currency) is not None:
                raise LedgerError(f"{leg['account_id']} is held by lock_account: a batch leg "
                                  "carries no expected sequence, so post it outside the block")
            legs.append({**leg, "currency": currency,
                         "metadata": _string_metadata(leg.get("metadata"))})
        client = await self.client()
        return Batch.of(await client.create_batch(legs, batch_id=batch_id,
                                                  require_balanced=require_balanced))

    async def rollback_batch(self, *, batch_id: str, reason: str = "", force: bool = False,
                             command_id: str | None = None) -> Batch:
        """Reverse a committed batch with a compensating batch; returns that batch."""
        client = await self.client()
        return Batch.of(await client.rollback_batch(batch_id=batch_id, reason=reason, force=force,
                                                    command_id=command_id))

    @contextlib.asynccontextmanager
    async def lock_account(self, account_id: str, currency: str | None = None) -> AsyncIterator[None]:
        """Optimistic: reads the account's sequence; entries made in the block must find it
        unchanged (each advances it), else ConcurrencyError. Never blocks other writers."""
        currency = currency or self.currency
        client = await self.client()
        balance = await client.get_balance(account_id, currency)
        with self.lock_manager.hold(account_id, currency, balance.sequence):
            yield


def _string_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """The wire's metadata is string to string; anything else is refused, not converted."""
    if not metadata:
        return {}
    if len(metadata) > METADATA_ITEMS_MAX:
        raise ValueError(f"metadata has {len(metadata)} items; at most {METADATA_ITEMS_MAX}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata[{key!r}] must be a string (the ledger stores strings)")
    return dict(metadata)
