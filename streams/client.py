"""LedgerClient: the seed's create_entry/get_balance calls, over Kafka (produce, await the result)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from sardis_ledger.streams import core
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.errors import CodecError, LedgerError, RegistryError
from sardis_ledger.streams.money import Currency, currency_table, to_major, to_minor
from sardis_ledger.streams.topics import LedgerTopic
from sardis_ledger.streams.wire import Wire

RESULT_TIMEOUT_S = 30.0
BATCH_RESULT_MARGIN_S = 10.0  # a batch's result may come this long after its own timeout
BALANCE_SCAN_TIMEOUT_S = 30.0
FETCH_BATCH_MAX = 5000
REQUEST_TIMEOUT_MS = 30_000
# A result fetch that finds nothing is answered after this long at most (aiokafka's default,
# 500 ms, is how late a result could be seen when the broker does not wake the fetch early).
RESULT_FETCH_MAX_WAIT_MS = 20
# Commands wait this long for others to share their produce request (0: each goes at once; a
# client awaiting each command has nothing to wait for).
COMMAND_LINGER_MS = 0


class LedgerClientError(LedgerError):
    """Kafka could not be reached or answered with an error."""


class LedgerRejected(LedgerError):
    """The ledger rejected the command; `reason` is the stable reason code."""

    def __init__(self, command_id: str, reason: str, detail: str | None) -> None:
        super().__init__(f"{command_id} rejected: {reason}" + (f" ({detail})" if detail else ""))
        self.command_id = command_id
        self.reason = reason
        self.detail = detail


class BatchRejected(LedgerRejected):
    """The ledger rejected a batch or rollback; `failed_leg_index` is the first failing leg."""

    def __init__(self, key: str, reason: str, detail: str | None,
                 failed_leg_index: int | None) -> None:
        super().__init__(key, reason, detail)
        self.failed_leg_index = failed_leg_index


class PastBalance(Protocol):
    """A posted balance at a past time, and the account's entry it is after."""

    @property
    def balance(self) -> Decimal: ...
    @property
    def sequence(self) -> int: ...
    @property
    def committed_at(self) -> datetime | None: ...


class BalanceHistory(Protocol):
    """Where get_balance(at=...) reads past balances (sinks.queries.PostgresHistory)."""

    async def balance_at(self, account_id: str, currency: str, at: datetime) -> PastBalance: ...


@dataclass(frozen=True, slots=True)
class LedgerBatch:
    """A committed batch (or the compensating batch of a rollback) with its entries in leg order."""

    batch_id: str
    entries: tuple[LedgerEntry, ...]


class LedgerTimeout(LedgerError):
    """No result within the timeout. Retrying with the same command_id is safe (idempotent)."""

    retriable = True


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """A committed entry as users see it: amounts are exact Decimals at the currency's scale."""

    entry_id: str
    command_id: str
    account_id: str
    currency: str
    entry_type: str
    amount: Decimal
    running_balance: Decimal
    sequence: int
    committed_at: datetime
    partition: int
    leaf_index: int
    entry_hash: str
    merkle_root: str
    batch_id: str | None = None
    batch_size: int | None = None
    leg_index: int | None = None
    reverses_entry_id: str | None = None
    reference: str | None = None
    metadata: Mapping[str, str] | None = None
    occurred_at: datetime | None = None
    chain: str | None = None
    chain_tx_hash: str | None = None
    chain_log_index: int | None = None

    @classmethod
    def from_wire(cls, record: Mapping[str, Any], currencies: Mapping[str, Currency]) -> LedgerEntry:
        decimals = currencies[record["currency"]].decimals
        values: dict[str, Any] = {f.name: record.get(f.name) for f in fields(cls)}
        values["amount"] = _at_scale(record["amount"], decimals)
        values["running_balance"] = _at_scale(record["running_balance"], decimals)
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Balance:
    account_id: str
    currency: str
    balance: Decimal  # posted
    available: Decimal  # posted minus pending debit holds
    sequence: int
    updated_at: datetime | None


def _at_scale(wire_amount: Decimal, decimals: int) -> Decimal:
    minor = to_minor(wire_amount, decimals)
    if minor is None:
        raise LedgerClientError(f"{wire_amount} has more decimals than its currency allows")
    return to_major(minor, decimals)


class LedgerClient:
    """Produces commands to ledger.commands and awaits their results from ledger.results.

    Use as `async with LedgerClient() as ledger: await ledger.create_entry(...)`.
    """

    def __init__(self, settings: Settings | None = None,
                 currencies: Mapping[str, Currency] | None = None,
                 result_timeout_s: float = RESULT_TIMEOUT_S,
                 history: BalanceHistory | None = None) -> None:
        self.settings = settings or Settings.from_env()
        # Past balances come from a projection (the PostgreSQL sink's), not from Kafka.
        self.history = history
        self.currencies = dict(currencies) if currencies is not None else currency_table()
        self.result_timeout_s = result_timeout_s
        # Reads both framings, writes SARDIS_WIRE_FORMAT (streams/wire.py).
        self.wire = Wire(self.settings)
        self.codec = self.wire.codec
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LedgerClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        # Confluent framing: the ids of what this client writes, registered or found.
        await self.wire.start((LedgerTopic.COMMANDS, LedgerTopic.BATCHES))
        self._producer = AIOKafkaProducer(**self.settings.kafka_connection(),
                                          enable_idempotence=True,
                                          acks="all", linger_ms=COMMAND_LINGER_MS,
                                          request_timeout_ms=REQUEST_TIMEOUT_MS)
        self._consumer = AIOKafkaConsumer(**self.settings.kafka_connection(),
                                          isolation_level="read_committed",
                                          enable_auto_commit=False,
                                          fetch_max_wait_ms=RESULT_FETCH_MAX_WAIT_MS,
                                          request_timeout_ms=REQUEST_TIMEOUT_MS)
        try:
            await self._producer.start()
            await self._consumer.start()
            topic = self.settings.topic(LedgerTopic.RESULTS)
            partitions = await self._partitions(topic)
            tps = [TopicPartition(topic, p) for p in partitions]
            self._consumer.assign(tps)
            # Results of commands sent from now on; subscribe before the first send.
            await self._consumer.seek_to_end(*tps)
            for tp in tps:
                await self._consumer.position(tp)
        except KafkaError as exc:
            await self.stop()
            raise LedgerClientError(f"connecting to Kafka at {self.settings.kafka_bootstrap}: {exc!r}",
                                    retriable=True) from exc
        except LedgerClientError:
            await self.stop()  # a missing topic: close what started, no "Unclosed" warnings
            raise
        self._reader = asyncio.create_task(self._read_results())

    async def _partitions(self, topic: str) -> list[int]:
        if self._consumer is None:
            raise LedgerClientError("client not started")
        deadline = time.monotonic() + REQUEST_TIMEOUT_MS / 1000
        while time.monotonic() < deadline:
            partitions = self._consumer.partitions_for_topic(topic)
            if partitions:
                return sorted(partitions)
            await self._consumer._client.force_metadata_update()
            await asyncio.sleep(0.2)
        raise LedgerClientError(f"topic {topic} does not exist: run `sardis-ledger topics create`")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(LedgerClientError("client stopped before the result arrived"))
        self._pending.clear()
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def _read_results(self) -> None:
        if self._consumer is None:
            return
        while True:
            batches = await self._consumer.getmany(timeout_ms=200, max_records=FETCH_BATCH_MAX)
            for messages in batches.values():
                for message in messages:
                    key = message.key.decode() if message.key else ""
                    fut = self._pending.get(key)
                    if fut is None or fut.done():
                        continue
                    try:
                        await self.wire.learn([message.value])
                        _name, record = self.codec.decode(message.value)
                    except (CodecError, RegistryError) as exc:
                        fut.set_exception(exc)
                        continue
                    fut.set_result(record)

    # ------------------------------------------------------------------ commands

    async def send_command(self, record: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        """Produce one PostEntry record; return a future of its Result record (no waiting)."""
        if self._producer is None:
            raise LedgerClientError("client not started")
        command_id = record["command_id"]
        fut = self._pending.get(command_id)
        if fut is None or fut.done():
            fut = asyncio.get_running_loop().create_future()
            self._pending[command_id] = fut
        fut.add_done_callback(functools.partial(self._forget, command_id))
        value = self.codec.encode("PostEntry", record)
        account_id = record["account_id"]
        try:
            await self._producer.send(
                self.settings.topic(LedgerTopic.COMMANDS), value, key=account_id.encode(),
                partition=core.partition_for(account_id, self.settings.partitions))
        except KafkaError as exc:
            raise LedgerClientError(f"producing {command_id}: {exc!r}", retriable=True) from exc
        return fut

    async def send_batch_command(self, record_name: str,
                                 record: dict[str, Any]) -> tuple[str, asyncio.Future[dict[str, Any]]]:
        """Produce a SubmitBatch or RollbackBatch to ledger.batches (key batch_id); return the
        key its Result will carry (batch_id, or the rollback's command_id) and its future."""
        if self._producer is None:
            raise LedgerClientError("client not started")
        if record_name not in ("SubmitBatch", "RollbackBatch"):
            raise ValueError(f"{record_name} is not a batch command")
        key = record["batch_id"] if record_name == "SubmitBatch" else record["command_id"]
        fut = self._pending.get(key)
        if fut is None or fut.done():
            fut = asyncio.get_running_loop().create_future()
            self._pending[key] = fut
        fut.add_done_callback(functools.partial(self._forget, key))
        value = self.codec.encode(record_name, record)
        batch_id = record["batch_id"]
        try:
            await self._producer.send(
                self.settings.topic(LedgerTopic.BATCHES), value, key=batch_id.encode(),
                partition=core.partition_for(batch_id, self.settings.partitions))
        except KafkaError as exc:
            raise LedgerClientError(f"producing {key}: {exc!r}", retriable=True) from exc
        return key, fut

    async def create_batch(self, legs: list[Mapping[str, Any]], *, batch_id: str | None = None,
                           require_balanced: bool = True,
                           timeout_ms: int = 30_000) -> LedgerBatch:
        """Post every leg or none; returns the batch with its entries, or raises BatchRejected
        with the reason and the first failing leg.

        Each leg: account_id, amount (Decimal or decimal string), entry_type, and optionally
        currency (USDC), reference, metadata, allow_overdraft. Pass your own batch_id to make
        retries safe: the same id and legs return the original batch, never a second posting.
        """
        wire_legs = []
        for leg in legs:
            amount = leg["amount"]
            if isinstance(amount, float):
                raise TypeError("amount must be a Decimal or a decimal string, never a float")
            wire_legs.append({"account_id": leg["account_id"], "currency": leg.get("currency", "USDC"),
                              "entry_type": str(leg["entry_type"]), "amount": Decimal(amount),
                              "reference": leg.get("reference"),
                              "metadata": dict(leg.get("metadata") or {}),
                              "allow_overdraft": bool(leg.get("allow_overdraft", False))})
        record = {"batch_id": batch_id or f"bat_{uuid.uuid4().hex}", "legs": wire_legs,
                  "require_balanced": require_balanced, "timeout_ms": timeout_ms}
        key, fut = await self.send_batch_command("SubmitBatch", record)
        return self.batch_of(await self.wait(fut, key, timeout_ms / 1000))

    async def rollback_batch(self, *, batch_id: str, reason: str = "", force: bool = False,
                             command_id: str | None = None) -> LedgerBatch:
        """Reverse a committed batch with a compensating batch of `reversal` entries; returns
        the compensating batch. A retry with the same command_id reverses nothing twice."""
        record = {"command_id": command_id or f"rb_{uuid.uuid4().hex}", "batch_id": batch_id,
                  "reason": reason, "force": force}
        key, fut = await self.send_batch_command("RollbackBatch", record)
        return self.batch_of(await self.wait(fut, key))

    def batch_of(self, result: Mapping[str, Any]) -> LedgerBatch:
        if result["status"] != core.Status.COMMITTED:
            raise BatchRejected(result["command_id"], result["reason"] or "rejected",
                                result.get("detail"), result.get("failed_leg_index"))
        return LedgerBatch(result.get("batch_id") or result["command_id"],
                           tuple(LedgerEntry.from_wire(e, self.currencies)
                                 for e in result.get("entries") or []))

    def _forget(self, command_id: str, fut: asyncio.Future[dict[str, Any]]) -> None:
        if self._pending.get(command_id) is fut:
            del self._pending[command_id]

    async def create_entry(self, *, account_id: str, amount: Decimal | str, entry_type: str,
                           currency: str = "USDC", reference: str | None = None,
                           metadata: Mapping[str, str] | None = None,
                           command_id: str | None = None, expected_sequence: int | None = None,
                           allow_overdraft: bool = False, occurred_at: datetime | None = None,
                           ) -> LedgerEntry:
        """Post one entry and return it once committed; raises LedgerRejected with the reason.

        Pass your own command_id to make retries safe: the same id and payload return the
        original entry, never a second one.
        """
        if isinstance(amount, float):
            raise TypeError("amount must be a Decimal or a decimal string, never a float")
        command_id = command_id or f"cmd_{uuid.uuid4().hex}"
        record: dict[str, Any] = {
            "command_id": command_id,
            "account_id": account_id, "currency": currency, "entry_type": str(entry_type),
            "amount": Decimal(amount), "reference": reference, "metadata": dict(metadata or {}),
            "expected_sequence": expected_sequence, "allow_overdraft": allow_overdraft,
            "occurred_at": occurred_at,
        }
        result = await self.wait(await self.send_command(record), command_id)
        return self.entry_of(result)

    async def wait(self, fut: asyncio.Future[dict[str, Any]], command_id: str,
                   at_least_s: float = 0.0) -> dict[str, Any]:
        """The result of a sent command; waits result_timeout_s, or at_least_s if longer (a
        batch's own timeout)."""
        timeout_s = max(self.result_timeout_s, at_least_s + BATCH_RESULT_MARGIN_S if at_least_s else 0)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except TimeoutError as exc:
            raise LedgerTimeout(f"no result for {command_id} within {timeout_s}s; "
                                "retry with the same id") from exc

    def entry_of(self, result: Mapping[str, Any]) -> LedgerEntry:
        if result["status"] != core.Status.COMMITTED or result["entry"] is None:
            raise LedgerRejected(result["command_id"], result["reason"] or "rejected",
                                 result.get("detail"))
        return LedgerEntry.from_wire(result["entry"], self.currencies)

    # ------------------------------------------------------------------ queries

    async def get_balance(self, account_id: str, currency: str = "USDC",
                          at: datetime | None = None) -> Balance:
        """Latest balance from the compacted ledger.balances topic (the account's partition).

        With `at` (a timezone-aware time): the posted balance right after the account's last
        entry committed at or before it, from the client's `history` (the PostgreSQL
        projection's `balance_at`: sinks.queries.PostgresHistory); `available` equals
        `balance` there.
        """
        decimals = self._decimals(currency)
        if at is not None:
            return await self._balance_at(account_id, currency, at, decimals)
        topic = self.settings.topic(LedgerTopic.BALANCES)
        tp = TopicPartition(topic, core.partition_for(account_id, self.settings.partitions))
        key = core.account_key(account_id, currency).encode()
        consumer = AIOKafkaConsumer(**self.settings.kafka_connection(),
                                    isolation_level="read_committed", enable_auto_commit=False)
        latest: dict[str, Any] | None = None
        try:
            await consumer.start()
            consumer.assign([tp])
            end = (await consumer.end_offsets([tp]))[tp]
            # An explicit seek: seek_to_beginning() right after end_offsets() was seen to leave
            # the position at the end (aiokafka 0.14), which would read nothing.
            consumer.seek(tp, (await consumer.beginning_offsets([tp]))[tp])
            deadline = time.monotonic() + BALANCE_SCAN_TIMEOUT_S
            while await consumer.position(tp) < end:
                if time.monotonic() > deadline:
                    raise LedgerTimeout(f"reading {topic} took over {BALANCE_SCAN_TIMEOUT_S}s")
                batch = await consumer.getmany(tp, timeout_ms=500, max_records=FETCH_BATCH_MAX)
                for message in batch.get(tp, []):
                    if message.key == key:
                        await self.wire.learn([message.value])
                        latest = self.codec.decode(message.value)[1]
        except KafkaError as exc:
            raise LedgerClientError(f"reading balances: {exc!r}", retriable=True) from exc
        finally:
            await consumer.stop()
        if latest is None:
            zero = to_major(0, decimals)
            return Balance(account_id, currency, zero, zero, 0, None)
        return Balance(account_id, currency, _at_scale(latest["balance"], decimals),
                       _at_scale(latest["available"], decimals), latest["sequence"],
                       latest["updated_at"])

    async def _balance_at(self, account_id: str, currency: str, at: datetime,
                          decimals: int) -> Balance:
        if self.history is None:
            raise LedgerClientError(
                "get_balance(at=...) reads a projection of past balances: create the client "
                "with LedgerClient(history=sinks.queries.PostgresHistory(dsn, schema))")
        if at.tzinfo is None:
            raise LedgerClientError("at must be timezone-aware (e.g. datetime.now(UTC))")
        found = await self.history.balance_at(account_id, currency, at)
        minor = to_minor(found.balance, decimals)
        if minor is None:
            raise LedgerClientError(f"{found.balance} has more decimals than {currency} allows")
        balance = to_major(minor, decimals)
        return Balance(account_id, currency, balance, balance, found.sequence, found.committed_at)

    def _decimals(self, currency: str) -> int:
        known = self.currencies.get(currency)
        if known is None:
            raise LedgerRejected("-", core.Reason.UNKNOWN_CURRENCY, f"unknown currency {currency!r}")
        return known.decimals
