"""Every workaround for Faust (faust-streaming 0.15.3) and aiokafka, each naming its failure.

1. Sends keep their partition and transaction (ledger_transport's send). Faust's
   TransactionManager.send asks the *consumer's* metadata for the destination partition; the
   consumer knows only the topics it subscribes to, so for an output topic (ledger.entries,
   ledger.results, ...) it gets None: the explicit partition is dropped and the record bypasses
   the transaction. Every output is co-partitioned with ledger.commands, so a send to partition p
   of any topic goes through the transactional producer of ledger.commands partition p.
2. Commits are the ledger's (ledger_transport's commit -> streams/worker/commit.py). Faust
   commits on a timer whatever the agent is doing: a transaction could end between two sends of
   one command (the crash test found an entry committed without its partition's Merkle log head,
   so a later entry reused its leaf index); it commits per-partition transactions one after
   another, four round trips each; and it never flushes the records the worker holds.
3. A rebalance commits first (on_rebalance): Faust does not always commit before a rebalance
   and replays a kept partition's changelog over tables holding uncommitted decisions.
4. Table writes bypass Faust's buffered `table[k] = v` (memory_store): its changelog records
   could miss the transaction that committed their event's offset, and flushing that buffer at
   commit time blocked commits while the stream was busy.
5. Table reads bypass Table.get (table_value, table_items): ~2.5 us a read through a chain of
   mapping methods, several reads per command.
6. Changelog ends from ListOffsets (LedgerConsumerThread._highwaters). In exactly-once mode Faust
   takes each changelog partition's end from aiokafka's `last_stable_offset()`, which is None
   until the consumer has fetched that partition: Faust then counts the changelog as empty and
   recovers nothing (seen in CI: a worker restarted after kill -9 logged highwater -1 for every
   changelog, started with empty tables while its input offsets were committed, and decided
   commands again). ListOffsets honours read_committed and returns the last stable offset; Faust
   starts the transactional producers (aborting a killed worker's open transactions) before it
   recovers tables, so that offset is final when it is read.
7. Transaction markers are noted (record_control_batches): aiokafka skips control batches
   silently, so an offset gap could not be told from a record the consumer skipped (it has been
   seen to) without reading every gap back from Kafka.
8. Faust's transactional producers and their locks are private (transaction_producers,
   transaction_lock): the outbox must send into exactly those producers.
9. A short retry backoff for transactional producers (LedgerProducer): aiokafka sleeps 100 ms
   whenever the transaction coordinator is still finishing the previous transaction.
10. Transactions reopened before a commit or flush (open_transaction): Faust's stop path ends
   every transaction, then commits again, and its begin_transaction swallows failures; the next
   commit raised IllegalOperation('Not in the middle of a transaction') and the worker hung.
11. A bounded stop (StoppingWorker): Faust's shutdown on a signal can wait on a library without
   end; a deadline thread (streams/shutdown.py) ends the process 8 s after the signal.
12. Changelogs preloaded in bulk (PreloadedMemoryStore, streams/worker/preload.py). Faust's
   recovery applies changelog records one event at a time (~7,500 records/s: 262 s for the
   tables of 1,000,000 accounts after a kill -9), and its memory store reports no persisted
   offset, so every restart replays everything that way. The store reads its newly owned
   changelog partitions in bulk when a rebalance hands them over (Faust's tables.on_rebalance
   runs after the transactional producers have fenced a killed worker, before recovery) and
   reports how far it read as its persisted offset; Faust's recovery starts there.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Container, Iterator, Mapping, MutableMapping
from typing import Any, Final, Protocol

import faust
from aiokafka.consumer import fetcher
from aiokafka.errors import ProducerFenced
from aiokafka.producer.transaction_manager import TransactionState
from faust.stores.memory import Store as MemoryStore
from faust.transport.consumer import TransactionManager
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.transport.drivers.aiokafka import Producer as AIOKafkaProducer
from faust.transport.drivers.aiokafka import Transport as AIOKafkaTransport

from sardis_ledger.streams.errors import InvariantViolation
from sardis_ledger.streams.shutdown import arm_stop_deadline
from sardis_ledger.streams.worker.preload import ChangelogPreloader, Target

# aiokafka waits retry_backoff_ms (default 100) when the coordinator answers a transaction's
# AddOffsetsToTxn or a second AddPartitionsToTxn with CONCURRENT_TRANSACTIONS, i.e. while it still
# writes the previous transaction's markers (only the first AddPartitionsToTxn gets 20 ms,
# KAFKA-5477); with commits back to back that is most commits (workaround 9).
TRANSACTION_RETRY_BACKOFF_MS: Final[int] = 10
# Marker offsets remembered per partition, at most (oldest forgotten first; a forgotten marker only
# costs a read of its gap from Kafka).
CONTROL_OFFSETS_PER_PARTITION_MAX: Final[int] = 100_000
# A gap longer than this is read from Kafka whatever is remembered (bounds the check's work).
CONTROL_GAP_CHECK_MAX: Final[int] = 1_000


class ControlOffsets:
    """Offsets that hold a transaction marker (a control batch), per topic partition.

    Every transaction commit writes a marker into each partition it wrote to; the consumer skips
    markers, so the next record it delivers is one offset past the previous one. The worker must
    tell such a gap from a record the consumer skipped (it has seen Faust skip records), and
    used to read every gap back from Kafka: with batches (coordinator and account agents write
    each other's inputs in transactions) that was a fetch round trip for almost every event.
    aiokafka sees each control batch as it parses a fetch response, before it delivers any later
    record of that partition; `record_control_batches` makes it note them here. Thread-safe:
    Faust's consumer thread adds, the worker's event loop checks.
    """

    def __init__(self, per_partition_max: int = CONTROL_OFFSETS_PER_PARTITION_MAX) -> None:
        self._lock = threading.Lock()
        self._offsets: dict[tuple[str, int], set[int]] = {}
        self._per_partition_max = per_partition_max

    def add(self, topic: str, partition: int, start: int, end: int) -> None:
        with self._lock:
            offsets = self._offsets.setdefault((topic, partition), set())
            offsets.update(range(start, end))
            if len(offsets) > self._per_partition_max:
                keep = sorted(offsets)[len(offsets) - self._per_partition_max // 2:]
                self._offsets[(topic, partition)] = set(keep)

    def covers(self, topic: str, partition: int, start: int, end: int) -> bool:
        """True if every offset in [start, end) is a known marker (then none held a record);
        the markers checked are forgotten (a partition is read forward only)."""
        if end - start > CONTROL_GAP_CHECK_MAX:
            return False
        with self._lock:
            offsets = self._offsets.get((topic, partition))
            if offsets is None or any(offset not in offsets for offset in range(start, end)):
                return False
            offsets.difference_update(range(start, end))
            return True


CONTROL_OFFSETS: Final[ControlOffsets] = ControlOffsets()


class _ControlBatchRecorder:
    """aiokafka's MemoryRecords of one fetched partition, noting the control batches read."""

    __slots__ = ("_partition", "_records", "_topic")

    def __init__(self, records: Any, topic: str, partition: int) -> None:
        self._records = records
        self._topic = topic
        self._partition = partition

    def has_next(self) -> bool:
        return bool(self._records.has_next())

    def next_batch(self) -> Any:
        batch = self._records.next_batch()
        if batch is not None and batch.is_control_batch:
            CONTROL_OFFSETS.add(self._topic, self._partition, batch.base_offset, batch.next_offset)
        return batch


class _RecordingPartitionRecords(fetcher.PartitionRecords):
    def __init__(self, tp: Any, records: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(tp, _ControlBatchRecorder(records, tp.topic, tp.partition),
                         *args, **kwargs)


def record_control_batches() -> None:
    """Make every aiokafka consumer of this process note control batches in CONTROL_OFFSETS
    (aiokafka's fetcher builds PartitionRecords by its module-level name; idempotent)."""
    fetcher.PartitionRecords = _RecordingPartitionRecords


class LedgerConsumerThread(AIOKafkaConsumerThread):
    """Faust's consumer thread, with changelog ends that do not depend on earlier fetches."""

    async def _highwaters(self, partitions: Any) -> Any:
        consumer = self._ensure_consumer()
        ends = await consumer.end_offsets(list(partitions))  # read_committed: the LSO
        if any(end is None for end in ends.values()):
            raise InvariantViolation(f"no end offset for {sorted(map(str, ends))}")
        return ends


class LedgerConsumer(AIOKafkaConsumer):
    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return LedgerConsumerThread(self, loop=self.loop, beacon=self.beacon)


async def open_transaction(producer: Any, lock: asyncio.Lock) -> None:
    """Make sure `producer` (aiokafka, transactional) is in a transaction before a send or a commit.

    Faust ends every transaction (commit with start_new_transaction=False) when it waits for its
    streams to stop, then commits again when its consumer stops and on a rebalance; and its
    begin_transaction logs and swallows any failure. Events decided in between (the agent's
    last event, the catch-up timer) acked offsets with no open transaction, so the next commit's
    send_offsets_to_transaction raised IllegalOperation('Not in the middle of a transaction'):
    seen on SIGTERM after a kill -9 workload, the worker then hung in its stop path for minutes.
    A transaction that is not open has nothing in it (aiokafka refuses sends outside one), so
    opening one here and committing the offsets with the held records is exactly-once as before.
    Any other state (an abortable or fatal error, a commit in flight) is a bug or a fenced
    producer and is raised.
    """
    async with lock:
        manager = producer._txn_manager
        if manager.is_in_transaction():
            return
        if manager.state != TransactionState.READY:
            raise InvariantViolation(f"transaction {manager.transactional_id} cannot begin in "
                                     f"state {manager.state.name}")
        await producer.begin_transaction()


async def open_transactions(producer: Any, transactional_ids: Any) -> None:
    """open_transaction for each of `transactional_ids` Faust's `producer` keeps a producer for."""
    for transactional_id in transactional_ids:
        transaction_producer = producer._transaction_producers.get(transactional_id)
        if transaction_producer is not None:
            await open_transaction(transaction_producer, producer._trn_locks[transactional_id])


def transactional_id_for(app_id: str, topic_group: int, partition: int) -> str:
    """The transactional id of a partition's producer, as Faust's TransactionManager names it
    (`{app id}-{topic group}-{partition}`): the worker must find Faust's own producers."""
    return f"{app_id}-{topic_group}-{partition}"


class Committer(Protocol):
    """The commit protocol (streams/worker/commit.py), as the transport calls it."""

    async def commit(self, transactions: Mapping[str, Mapping[Any, int]], group_id: str,
                     start_new_transaction: bool) -> None: ...


class LedgerProducer(AIOKafkaProducer):
    """Faust's producer, with a short retry backoff for its transactional producers."""

    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "retry_backoff_ms": TRANSACTION_RETRY_BACKOFF_MS}


def ledger_transport(anchor_topic: str, committer: Committer) -> type[AIOKafkaTransport]:
    """A Transport class whose sends keep their partition and transaction, whose commits are
    the ledger's commit protocol (`committer`), and whose rebalances commit first."""

    class LedgerTransactionManager(TransactionManager):
        _commit_lock = asyncio.Lock()

        async def send(self, topic: str, key: bytes | None, value: bytes | None,
                       partition: int | None, timestamp: float | None, headers: Any,
                       *, transactional_id: str | None = None) -> Any:
            target = partition if partition is not None else \
                self.consumer.key_partition(topic, key, None)
            if target is None:
                raise InvariantViolation(f"exactly-once send to {topic} with no partition")
            assignor = self.app.assignor
            try:
                group = assignor.group_for_topic(topic)
            except KeyError:
                group = assignor.group_for_topic(anchor_topic)
            return await self.producer.send(
                topic, key, value, target, timestamp, headers,
                transactional_id=transactional_id_for(self.app.conf.id, group, target))

        async def commit(self, offsets: Any, start_new_transaction: bool = True) -> bool:
            """Faust's commit, replaced: offsets grouped by the transaction that owns them, then
            the ledger's commit protocol. Faust commits per-partition transactions one after
            another (four round trips each) and never flushes what the worker holds."""
            by_transactional_id: dict[str, dict[Any, int]] = {}
            group_id = self.app.conf.id
            for tp, offset in offsets.items():
                group = self.app.assignor.group_for_topic(tp.topic)
                by_transactional_id.setdefault(
                    transactional_id_for(group_id, group, tp.partition), {})[tp] = offset
            if not by_transactional_id:
                return True
            async with self._commit_lock:
                try:
                    await committer.commit(by_transactional_id, group_id, start_new_transaction)
                except ProducerFenced as exc:
                    # As Faust does: another worker owns these partitions now.
                    await self.app.crash(exc)
            return True

        async def on_rebalance(self, assigned: Any, revoked: Any, newly_assigned: Any) -> None:
            """Commit what the partitions this worker keeps have decided, before anything else
            of the rebalance.

            The worker writes its tables at once and their changelog records at commit. Faust
            does not always commit before a rebalance (not when the revocation finds the
            assignment already empty, nor when a timer commit is in flight), and it keeps the
            transactions of partitions that stay. Its recovery then replays a kept partition's
            changelog over tables that hold uncommitted decisions: keys in the changelog go back
            to their committed values, keys only those decisions wrote (a new hold) stay, and
            the partition is delivered again from its committed offset. Seen with three workers
            on the cluster, one killed: a reserve found its own hold, was taken for a repeat and
            added nothing to the pending debit, and the post of that hold then stopped every
            worker ("pending debit below zero"). Committed first, the replay ends at the tables'
            own values and nothing is delivered again. The new assignment is set by now, so
            only offsets of partitions that stay are committed; the transactions of revoked ones
            are stopped by Faust just after, as before. force_commit waits for a commit in
            flight (the commit lock) instead of returning at once as commit() does.
            """
            consumer: Any = self.consumer
            await consumer.force_commit(start_new_transaction=False)
            await super().on_rebalance(assigned, revoked, newly_assigned)

    class LedgerTransport(AIOKafkaTransport):
        TransactionManager = LedgerTransactionManager
        Consumer = LedgerConsumer
        Producer = LedgerProducer

    return LedgerTransport


def transaction_producers(app: Any) -> Mapping[str, Any]:
    """Faust's transactional aiokafka producers by transactional id (a private dict of its
    producer: Faust has no public accessor, and the outbox must send into exactly those)."""
    producers: Mapping[str, Any] = app.producer._transaction_producers
    return producers


def transaction_lock(app: Any, transactional_id: str) -> asyncio.Lock:
    """The lock Faust's producer takes around a transaction's calls (private, as above)."""
    lock: asyncio.Lock = app.producer._trn_locks[transactional_id]
    return lock


def memory_store(table: Any) -> tuple[MutableMapping[bytes, Any], MutableMapping[bytes, int]]:
    """A table's memory-store dict and its key -> partition bookkeeping (used to drop keys of
    revoked partitions after a rebalance), written as its changelog recovery writes them."""
    store = table.data
    return store.data, store._key_partition


# The worker writes table keys straight into the memory store (Effects.put in streams/worker/commit.py, so the
# changelog record joins the deciding event's transaction) and reads them back the same way.
# Faust's `table.get(key)` walks a chain of mapping methods (~2.5 us a read, several reads per
# command); the store keeps its dict in `.data` and its key -> partition bookkeeping in
# `._key_partition` (faust-streaming 0.15.3, faust/stores/memory.py).

def table_value(table: Any, key: bytes) -> bytes | None:
    """A table key's value, read from the memory store's dict (the store _put writes): Faust's
    Table.get runs a chain of mapping methods (~2.5 us a read, several reads per command)."""
    value: bytes | None = table.data.data.get(key)
    return value


def table_items(table: Any, prefix: bytes, partitions: Container[int]
                ) -> Iterator[tuple[int, bytes, bytes]]:
    """(partition, key, value) of a table's keys that start with `prefix` and belong to one of
    `partitions` (the memory store's own key -> partition bookkeeping, which _put keeps)."""
    data: Any = table.data
    for key, value in list(data.items()):
        partition = data._key_partition.get(key)
        if partition in partitions and key.startswith(prefix):
            yield partition, key, value


class StoppingWorker(faust.Worker):
    """Faust's worker, whose stop on a signal is bounded (streams/shutdown.py, workaround 11)."""

    def _schedule_shutdown(self, signal: Any) -> None:
        arm_stop_deadline("worker")
        super()._schedule_shutdown(signal)


class PreloadedMemoryStore(MemoryStore):
    """Faust's memory store, its changelog partitions read in bulk on a rebalance (workaround 12)."""

    def __init__(self, *args: Any, preloader: ChangelogPreloader, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._preloader = preloader
        preloader.register(self.table.changelog_topic.get_topic_name(),
                           Target(self.data, self._key_partition))

    def persisted_offset(self, tp: Any) -> int | None:
        return self._preloader.persisted_offset(tp.topic, tp.partition)

    async def on_rebalance(self, assigned: Any, revoked: Any, newly_assigned: Any,
                           generation_id: int = 0) -> None:
        actives = self.app.assignor.assigned_actives()  # changelog partitions included
        await self._preloader.on_rebalance(generation_id, [(tp.topic, tp.partition)
                                                           for tp in actives])


def use_preloaded_store(table: Any, preloader: ChangelogPreloader) -> None:
    """Give `table` a PreloadedMemoryStore, built as Faust builds its store (Collection.
    _new_store_by_url), before anything has asked for the table's data."""
    if table._data is not None:
        raise InvariantViolation(f"table {table.name}: its store exists already")
    table._data = PreloadedMemoryStore(
        "memory://", table.app, table, table_name=table.name, key_type=table.key_type,
        key_serializer=table.key_serializer, value_serializer=table.value_serializer,
        value_type=table.value_type, loop=table.loop, options=table.options, preloader=preloader)
