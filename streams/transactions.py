"""Faust transport whose exactly-once sends keep their partition and their transaction.

Faust's TransactionManager.send (faust-streaming 0.15.3) asks the *consumer's* metadata for the
destination partition. The consumer knows only the topics it subscribes to, so for a sink topic
(ledger.entries, ledger.results, ...) it gets None: the explicit partition is dropped (the record
lands wherever the key hashes) and the record bypasses the transaction. Every ledger output is
co-partitioned with ledger.commands, so here a send to partition p of any topic goes through the
transactional producer of ledger.commands partition p: outputs, table changelogs and the source
offset commit or abort together.

Faust also commits on a timer, whatever the agent is doing: a transaction could end between two
sends of one command (the crash test found an entry committed without its partition's Merkle log
head, so a later entry reused its leaf index). Commits here wait for `event_lock`, which the
worker holds while it decides an event, so every transaction holds whole events.

Table writes do not go through Faust's buffered `table[k] = v` (see LedgerWorker._put): its
changelog records could miss the transaction that committed their event's offset, and flushing
that buffer at commit time blocked commits while the stream was busy.

Table recovery: in exactly-once mode Faust takes each changelog partition's end from aiokafka's
`last_stable_offset()`, which is known only after the consumer has fetched that partition and is
None before: Faust then counts the changelog as empty and recovers nothing (seen in CI: a worker
restarted after kill -9 logged highwater -1 for every changelog, started with empty tables while
its input offsets were committed, and decided commands again: two entries at one leaf index,
matches emitted twice). Here the end comes from a ListOffsets request, which honours the
consumer's read_committed isolation and so returns the last stable offset every time. Faust
starts the transactional producers (aborting or finishing a killed worker's open transactions)
before it recovers tables, so that offset is final when it is read.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Final

from aiokafka.consumer import fetcher
from aiokafka.errors import ProducerFenced
from aiokafka.producer.transaction_manager import TransactionState
from faust.transport.consumer import TransactionManager
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.transport.drivers.aiokafka import Transport as AIOKafkaTransport

from streams.errors import InvariantViolation
from streams.outbox import Outbox

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


def ledger_transport(anchor_topic: str, event_lock: asyncio.Lock,
                     outbox: Outbox) -> type[AIOKafkaTransport]:
    """A Transport class whose transactions are anchored on `anchor_topic`'s partitions, take
    the worker's held records (`outbox`) first, and commit only between events (`event_lock`)."""

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
            """Faust's commit: held records first, then every partition's transaction
            committed concurrently, with events deciding meanwhile.

            Under `event_lock` (between two events) every record the outbox holds joins its open
            transaction; from then on events only add to the outbox (no send joins a committing
            transaction), so the round trips (offsets, end of transaction, next begin) run
            while the stream goes on instead of stalling it. Faust commits per-partition
            transactions one after another (four round trips each); here they run at once.
            """
            by_transactional_id: dict[str, dict[Any, int]] = {}
            group_id = self.app.conf.id
            for tp, offset in offsets.items():
                group = self.app.assignor.group_for_topic(tp.topic)
                by_transactional_id.setdefault(
                    transactional_id_for(group_id, group, tp.partition), {})[tp] = offset
            if not by_transactional_id:
                return True
            producer: Any = self.producer
            producers: Any = producer._transaction_producers
            async with self._commit_lock:
                async with event_lock:
                    await open_transactions(producer, {*by_transactional_id, *outbox.held_ids()})
                    await outbox.flush(producers.get)
                    outbox.commit_started()
                try:
                    await asyncio.gather(*(
                        self._commit_one(transactional_id, tp_offsets, group_id,
                                         start_new_transaction)
                        for transactional_id, tp_offsets in by_transactional_id.items()))
                except ProducerFenced as exc:
                    # As Faust does: another worker owns these partitions now.
                    await self.app.crash(exc)
                finally:
                    outbox.commit_ended()
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

        async def _commit_one(self, transactional_id: str, offsets: Any, group_id: str,
                              start_new_transaction: bool) -> None:
            producer: Any = self.producer
            async with producer._trn_locks[transactional_id]:
                transaction_producer = producer._transaction_producers.get(transactional_id)
                if transaction_producer is None:
                    raise InvariantViolation(f"commit for unknown transaction {transactional_id}")
                await transaction_producer.send_offsets_to_transaction(offsets, group_id)
                await transaction_producer.commit_transaction()
                if start_new_transaction:
                    await transaction_producer.begin_transaction()

    class LedgerTransport(AIOKafkaTransport):
        TransactionManager = LedgerTransactionManager
        Consumer = LedgerConsumer

    return LedgerTransport
