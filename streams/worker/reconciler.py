"""The streaming reconciler in the worker: chain transfers and re-keyed entries joined in a table."""

# Inputs, both keyed by tx hash and so co-partitioned (Kafka's default partitioner, murmur2):
# - chain.transfers: ChainTransfer records from `sardis-ledger chain watch`;
# - ledger.internal.chain-claims: every committed Entry that names a chain transfer, produced by the ledger
#   agent in the same transaction as the entry itself, plus this module's ReconcileTick records.
# The join of one (tx_hash, log_index) lives in the `reconcile` table under `j:tx_hash:log_index`;
# `o:topic:partition` holds the next undecided offset of each input partition. The decisions are
# streams/reconcile.py's pure functions; this module only reads, writes and produces, and passes
# in the record's own timestamp as the time, so a replay emits the same records.

from __future__ import annotations

import logging
import time
from typing import Any

from sardis_ledger.streams import core, metrics, reconcile, records
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.errors import CodecError
from sardis_ledger.streams.topics import LedgerTopic
from sardis_ledger.streams.worker.compat import table_items, table_value
from sardis_ledger.streams.worker.ports import Command, WorkerPort

log = logging.getLogger("sardis.reconciler")

RECONCILE_TICK_INTERVAL_S = 1.0
RECONCILE_TICK_KEYS_MAX = 1000  # keys re-checked per tick: one transaction stays bounded
CHAIN_HEAD_FETCH_TIMEOUT_MS = 100
CHAIN_HEAD_FETCHES_MAX = 20  # per read: a watcher writes a few records a second at most
CHAIN_HEAD_RECORDS_MAX = 1000
BACKFILL_FETCH_RECORDS_MAX = 5000
BACKFILL_FETCH_TIMEOUT_MS = 500
BACKFILL_IDLE_FETCHES_MAX = 120  # a minute of empty fetches below the end: the broker is stuck
JOIN_PREFIX = b"j:"
OFFSET_PREFIX = "o:"


class ChainHead:
    """The highest block any chain watcher has processed: the `next_block - 1` of the newest
    record per watcher on chain.watch-state, read incrementally. Grace windows in blocks count
    against it, so a watcher that is down or behind cannot make a booking look missing."""

    def __init__(self, settings: Settings, state_topic: str) -> None:
        self.settings = settings
        self.state_topic = state_topic
        self._consumer: Any = None
        self._heads: dict[bytes, int] = {}  # watcher key -> last processed block

    async def current(self) -> int | None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from sardis_ledger.streams.chain.state import WatchState

        if self._consumer is None:
            consumer = AIOKafkaConsumer(**self.settings.kafka_connection(),
                                        isolation_level="read_committed",
                                        enable_auto_commit=False, fetch_max_wait_ms=5)
            await consumer.start()
            self._consumer = consumer
        consumer = self._consumer
        tp = TopicPartition(self.state_topic, 0)
        if tp not in consumer.assignment():
            if self.state_topic not in await consumer.topics():
                return None  # no watcher has run yet
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
        for _ in range(CHAIN_HEAD_FETCHES_MAX):
            batch = await consumer.getmany(tp, timeout_ms=CHAIN_HEAD_FETCH_TIMEOUT_MS,
                                           max_records=CHAIN_HEAD_RECORDS_MAX)
            messages = batch.get(tp, [])
            for message in messages:
                if message.value is None:
                    continue
                try:
                    state = WatchState.from_bytes(message.value)
                except Exception:  # one unreadable progress record must not stop reconciling
                    log.warning("%s@%s: unreadable watch progress; skipped", tp, message.offset)
                    continue
                if state.next_block > state.start_block:
                    self._heads[message.key or b""] = state.next_block - 1
            if not messages:
                break
        return max(self._heads.values(), default=None)

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None


class Reconciler:
    """Decides the records of chain.transfers and ledger.internal.chain-claims for the worker that owns
    their partition (the same worker, transaction and partition number as ledger.commands)."""

    def __init__(self, worker: WorkerPort, table: Any) -> None:
        from sardis_ledger.streams.chain.watch import state_topic

        self.worker = worker
        self.settings = worker.settings
        self.table = table
        self.transfers_topic = self.settings.topic(LedgerTopic.CHAIN_TRANSFERS)
        self.claims_topic = self.settings.topic(LedgerTopic.CHAIN_CLAIMS)
        self.grace = reconcile.Grace.of(seconds=self.settings.reconcile_grace_s,
                                        blocks=self.settings.reconcile_grace_blocks)
        self.chain_head = ChainHead(self.settings, state_topic(self.settings))
        # partition -> {join key: when a tick can next change it}, for the joins that a later
        # tick may turn into a missing_* discrepancy
        self._waiting: dict[int, dict[bytes, int]] = {}
        self._waiting_for: frozenset[int] | None = None  # owned partitions it was built for
        self._last_tick_ms: dict[int, int] = {}

    @property
    def topics(self) -> tuple[str, str]:
        return (self.transfers_topic, self.claims_topic)

    # ------------------------------------------------------------------ offsets

    def next_offset(self, topic: str, partition: int) -> int:
        return records.offset_from_bytes(table_value(self.table, self._offset_key(topic, partition)))

    async def advance_to(self, topic: str, partition: int, next_offset: int) -> None:
        if next_offset > self.next_offset(topic, partition):
            self.worker.put(self.table, self._offset_key(topic, partition),
                                   records.offset_to_bytes(next_offset), partition)

    @staticmethod
    def _offset_key(topic: str, partition: int) -> bytes:
        return f"{OFFSET_PREFIX}{topic}:{partition}".encode()

    # ------------------------------------------------------------------ claims (ledger side)

    async def claim(self, entry: core.Entry, value: bytes, partition: int) -> None:
        """Re-key an entry that names a chain transfer to its tx hash's partition, in the open
        transaction of the command that committed it."""
        if not entry.chain_tx_hash:
            return
        tx_hash = entry.chain_tx_hash.lower()
        self.worker.produce(self.claims_topic, tx_hash.encode(), value,
                                   core.partition_for(tx_hash, self.settings.partitions),
                                   transaction_of=partition)

    # ------------------------------------------------------------------ per record

    async def process(self, command: Command, name: str, record: dict[str, Any]) -> None:
        """Decide one decoded record of an input topic (the worker checked it may be there and
        records its offset)."""
        try:
            await self._record(command, name, record)
        except reconcile.ReconcileError as exc:
            self.worker.dead_letter(command, core.Reason.INVALID_FIELD, str(exc), None)

    async def _record(self, command: Command, name: str, record: dict[str, Any]) -> None:
        partition = command.partition
        event: reconcile.EntryClaim | reconcile.TransferEvent | None
        if command.topic == self.transfers_topic and name == "ChainTransfer":
            event = reconcile.transfer_from_wire(record)
        elif command.topic == self.claims_topic and name == "Entry":
            problem = records.entry_problem(record, self.worker.currencies)
            if problem is not None:
                raise reconcile.ReconcileError(f"entry: {problem}")
            event = reconcile.claim_from_entry(record)
            if event is None:
                self.worker.dead_letter(
                    command, core.Reason.INVALID_FIELD,
                    f"entry {record.get('entry_id')} names no chain transfer", None)
                return
        elif command.topic == self.claims_topic and name == "ReconcileTick":
            now_ms, head = reconcile.parse_tick(record, partition)
            await self._tick(partition, now_ms, head)
            return
        else:
            self.worker.dead_letter(command, core.Reason.UNKNOWN_COMMAND,
                                           f"{name} is not a record of {command.topic}", None)
            return
        owner = core.partition_for(event.tx_hash, self.settings.partitions)
        if owner != partition:
            # Produced with another key or partitioner: only the tx hash's partition may join it.
            self.worker.produce(command.topic, event.tx_hash.encode(), command.value,
                                       owner, transaction_of=partition)
            return
        key = JOIN_PREFIX + reconcile.join_key(event.tx_hash, event.log_index).encode()
        state = reconcile.join_from_bytes(table_value(self.table, key))
        if isinstance(event, reconcile.EntryClaim):
            joined, outputs = reconcile.on_entry(state, event, command.timestamp_ms, self.grace)
        else:
            joined, outputs = reconcile.on_transfer(state, event, command.timestamp_ms, self.grace)
        await self._store(key, state, joined, outputs, partition)

    async def _store(self, key: bytes, before: reconcile.KeyJoin | None, after: reconcile.KeyJoin,
                     outputs: list[reconcile.Output], partition: int) -> None:
        if after != before:
            self.worker.put(self.table, key, reconcile.join_to_bytes(after), partition)
        for output in outputs:
            await self._emit(output, partition)
        self._rebuild_waiting()
        waiting = self._waiting.setdefault(partition, {})
        if after.waiting():
            waiting[key] = reconcile.recheck_at_ms(after, self.grace)
        else:
            waiting.pop(key, None)

    async def _emit(self, output: reconcile.Output, partition: int) -> None:
        if isinstance(output, reconcile.Discrepancy):
            topic, record_name, key = LedgerTopic.DISCREPANCIES, "Discrepancy", output.tx_hash
            metrics.discrepancy(output.type, output.status)
            if output.status == reconcile.DiscrepancyStatus.OPEN.value:
                log.warning("discrepancy %s %s: %s", output.type, output.severity,
                            output.description)
        else:
            topic, record_name = LedgerTopic.RECONCILIATIONS, "Reconciliation"
            key = reconcile.join_key(output.tx_hash, output.log_index)
        self.worker.send(topic, key.encode(), record_name, output.to_wire(),
                                core.partition_for(key, self.settings.partitions),
                                transaction_of=partition)

    # ------------------------------------------------------------------ grace windows

    async def _tick(self, partition: int, now_ms: int, chain_head_block: int | None) -> None:
        """Raise the missing_* of this partition whose grace window has passed at the tick."""
        if chain_head_block is None and self.grace.blocks:
            return  # blocks cannot be counted without a head
        self._rebuild_waiting()
        waiting = self._waiting.get(partition, {})
        # Only joins a tick can change, earliest first; a bounded number per tick. Joins past
        # their time window that wait on blocks stay first, but the head that frees them frees
        # them all alike.
        due = sorted((at, key) for key, at in waiting.items() if at <= now_ms)
        for _, key in due[:RECONCILE_TICK_KEYS_MAX]:
            state = reconcile.join_from_bytes(table_value(self.table, key))
            if state is None:
                waiting.pop(key, None)
                continue
            joined, outputs = reconcile.on_tick(state, now_ms, chain_head_block or 0, self.grace)
            await self._store(key, state, joined, outputs, partition)

    def _rebuild_waiting(self) -> None:
        """After a (re)assignment, find the waiting joins of owned partitions in the table."""

        owned = self.worker.owned_partitions(self.claims_topic)
        if owned == self._waiting_for:
            return
        rebuilt: dict[int, dict[bytes, int]] = {p: {} for p in owned}
        for partition, key, value in table_items(self.table, JOIN_PREFIX, owned):
            join = reconcile.join_from_bytes(value)
            if join is not None and join.waiting():
                rebuilt[partition][key] = reconcile.recheck_at_ms(join, self.grace)
        self._waiting = rebuilt
        self._waiting_for = owned

    async def ticks(self) -> None:
        """Send a ReconcileTick to each owned partition with joins that wait on a grace window.
        The reconciler decides them when it reads the tick, so the outcome is in the tick's
        transaction and a replay uses the tick's own time and head."""
        try:
            self._rebuild_waiting()
            now_ms = time.time_ns() // 1_000_000
            due = [p for p, keys in self._waiting.items()
                   if any(at <= now_ms for at in keys.values())]
            if not due:
                return
            head = await self.chain_head.current()
            if head is None and self.grace.blocks:
                return
            for partition in due:
                if now_ms - self._last_tick_ms.get(partition, 0) < RECONCILE_TICK_INTERVAL_S * 1000:
                    continue
                await self.worker.send_tick(self.claims_topic, partition, "ReconcileTick", {
                    "partition": partition, "now": now_ms, "chain_head_block": head})
                self._last_tick_ms[partition] = now_ms
        except Exception:  # a dead timer would never raise a missing_* again
            log.exception("reconcile tick failed; retrying in %.0f s", RECONCILE_TICK_INTERVAL_S)


async def backfill_claims(settings: Any, progress: Any = None) -> tuple[int, int]:
    """Re-key the entries already on ledger.entries that name a chain transfer onto
    ledger.internal.chain-claims, as the ledger agent does for new ones: once, after upgrading a ledger
    that ran without the streaming reconciler. Running it again is harmless (the reconciler
    ignores an entry_id it has seen). Returns (entries read, claims produced)."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from sardis_ledger.streams.wire import Wire

    wire = Wire(settings)
    codec = wire.codec
    entries_topic = settings.topic(LedgerTopic.ENTRIES)
    claims_topic = settings.topic(LedgerTopic.CHAIN_CLAIMS)
    consumer = AIOKafkaConsumer(**settings.kafka_connection(),
                                isolation_level="read_committed", enable_auto_commit=False)
    producer = AIOKafkaProducer(**settings.kafka_connection(),
                                enable_idempotence=True, acks="all", linger_ms=5)
    await consumer.start()
    await producer.start()
    read = produced = 0
    try:
        tps = [TopicPartition(entries_topic, p) for p in range(settings.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        total = sum(ends.values())
        idle = 0
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            batches = await consumer.getmany(timeout_ms=BACKFILL_FETCH_TIMEOUT_MS,
                                             max_records=BACKFILL_FETCH_RECORDS_MAX)
            idle = 0 if batches else idle + 1
            if idle > BACKFILL_IDLE_FETCHES_MAX:
                raise TimeoutError(f"{entries_topic}: no records for "
                                   f"{BACKFILL_IDLE_FETCHES_MAX} fetches before its end")
            for messages in batches.values():
                await wire.learn_retrying([m.value for m in messages])  # Confluent schema ids
                for message in messages:
                    read += 1
                    try:
                        name, record = codec.decode(message.value)
                    except CodecError:
                        continue  # not an Entry: nothing to reconcile
                    tx_hash = record.get("chain_tx_hash") if name == "Entry" else None
                    if tx_hash:
                        tx_hash = str(tx_hash).lower()
                        await producer.send(claims_topic, message.value, key=tx_hash.encode(),
                                            partition=core.partition_for(tx_hash,
                                                                         settings.partitions))
                        produced += 1
            if progress is not None:
                progress(min(read, total), total)
        await producer.flush()
        if progress is not None:
            progress(read, max(total, read), final=True)
    finally:
        await producer.stop()
        await consumer.stop()
    return read, produced
