"""Every workaround for Faust (faust-streaming 0.15.3) and aiokafka, each naming its failure.

1. No record goes through Faust's send (ledger_transport's send raises). Faust's
   TransactionManager.send asks the *consumer's* metadata for the destination partition (None
   for an output topic: the record would bypass the transaction), and sends into a
   per-partition producer whose transaction the worker never commits (workaround 13): such a
   record would be aborted after the transaction timeout, holding back its partition's last
   stable offset until then. Every record goes through the commit protocol's outbox.
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
8. Faust's transactional producers are private (transaction_producers): the one Faust keeps
   for an input partition exists exactly while this worker owns the partition, which is how the
   outbox tells records it may still commit from records of a revoked partition.
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
   offset, so every restart and every rebalance (Faust's revoke everything, kept partitions
   too) replays everything that way, and then waits two idle 5 s polls before it takes the
   transaction marker ending each changelog for read. The store reads every changelog partition
   it owns in bulk on each rebalance (Faust's tables.on_rebalance runs after the transactional
   producers have fenced a killed worker, before recovery) and reports how far it read as its
   persisted offset; Faust's recovery starts there. It first waits (at most 3 s) until no
   transaction is in flight on those partitions: a commit's markers land after its EndTxn
   returns, and an end read before them would leave that commit's records out.
13. Offsets committed as a group member (send_member_offsets, TxnOffsetCommit v3, KIP-447).
   The worker runs one transaction per process instead of Faust's one per input partition
   (streams/worker/commit.py). Faust's design fences a removed worker (a zombie) through the
   per-partition transactional ids its successor takes over; with one id per worker only the
   group generation can, and aiokafka 0.14 sends TxnOffsetCommit v0 (no generation, no member),
   which the coordinator takes from anyone. v3 carries both; the coordinator refuses a gone
   generation, and the worker aborts and crashes (MemberStale) as it does when fenced.
14. A new assignment waits for settled offsets (wait_offsets_stable, OffsetFetch v7 with
   require_stable). A zombie's transaction may hold offsets it sent before its generation
   ended and may still commit them; aiokafka's consumer fetches offsets without
   require_stable (v3), and tables recovered before that commit would miss its changelog
   records. The worker asks until no transaction holds the group's offsets, before its tables
   recover (their end offsets are read after this, so they include such a commit).
15. A worker's fetches wait at most WORKER_FETCH_MAX_WAIT_MS (LedgerConsumerThread). Faust
   hard-codes fetch_max_wait_ms=1500 for its consumer. With one transaction per worker, a burst
   of 10,000 commands on one account stopped once for 0.7-1.4 s: the worker had taken every
   record it was given, and its next read_committed fetch was answered only when its wait ran
   out, although the client's next records (written in the same millisecond) were in the
   partition. That made 2,650 against 3,990 cmd/s (five runs each); with 100 ms, 3,760/s and no
   stop. Why the broker did not answer the fetch earlier was not found. The cost is at most ten
   empty fetches a second per broker while the worker is idle.
16. Records are delivered a poll at a time (LedgerConsumer._drain_messages, to a PollSink).
   Faust hands each record to its agents one by one: a Message and an Event per record, two
   tasks per record (`wait_first` on the callback and the flow-control event), a queue put, the
   stream iterator's per-event steps and an ack. With the same decisions, that delivery cost
   the worker ~115 us of CPU per command (burst of 20,000 commands: 268-291 against 131-166 us,
   3,450 against 4,300-6,300 cmd/s; the issue measured a do-nothing exactly-once agent at 3,750
   events/s). The worker's fetcher now passes each poll's input records (aiokafka's, per
   partition, in offset order) to the worker whole. Changelog records, which Faust's table
   recovery reads with the same consumer, still go through Faust one by one (the first version
   sent them to the decider too, and every worker of the cluster test crashed on a rebalance).
   Faust's agents stay registered, so the consumer subscribes to their topics and the assignor
   keeps them co-partitioned with the tables, but no record reaches them.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Container, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Final, Protocol

import faust
from aiokafka.client import CoordinationType
from aiokafka.consumer import fetcher
from aiokafka.errors import GroupAuthorizationFailedError, ProducerFenced
from aiokafka.producer.sender import TxnOffsetCommitHandler
from aiokafka.producer.transaction_manager import TransactionState
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Int64,
    Schema,
    TaggedFields,
)
from faust.stores.memory import Store as MemoryStore
from faust.transport.consumer import TransactionManager
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.transport.drivers.aiokafka import Producer as AIOKafkaProducer
from faust.transport.drivers.aiokafka import Transport as AIOKafkaTransport

from sardis_ledger.streams.errors import InvariantViolation, LedgerError
from sardis_ledger.streams.shutdown import arm_stop_deadline
from sardis_ledger.streams.worker.preload import ChangelogPreloader, Target

log = logging.getLogger(__name__)

# aiokafka waits retry_backoff_ms (default 100) when the coordinator answers a transaction's
# AddOffsetsToTxn or a second AddPartitionsToTxn with CONCURRENT_TRANSACTIONS, i.e. while it still
# writes the previous transaction's markers (only the first AddPartitionsToTxn gets 20 ms,
# KAFKA-5477); with commits back to back that is most commits (workaround 9).
TRANSACTION_RETRY_BACKOFF_MS: Final[int] = 10
# How long the worker's fetch may wait for records (Faust: 1,500 ms; workaround 15).
WORKER_FETCH_MAX_WAIT_MS: Final[int] = 100
# How long one poll of the worker's consumer waits for records (Faust's fetch loop: 1 s).
POLL_TIMEOUT_S: Final[float] = 1.0
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
    """Faust's consumer thread, with changelog ends that do not depend on earlier fetches and
    fetches that wait at most WORKER_FETCH_MAX_WAIT_MS (workaround 15)."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = WORKER_FETCH_MAX_WAIT_MS  # read when the consumer starts
        return consumer

    async def _highwaters(self, partitions: Any) -> Any:
        consumer = self._ensure_consumer()
        ends = await consumer.end_offsets(list(partitions))  # read_committed: the LSO
        if any(end is None for end in ends.values()):
            raise InvariantViolation(f"no end offset for {sorted(map(str, ends))}")
        return ends


class PollSink(Protocol):
    """Takes a poll's records of the worker's input topics: aiokafka ConsumerRecords per
    partition, in offset order, and the consumer group generation they were fetched in."""

    topics: frozenset[str]  # the input topics whose records go to `put`

    async def put(self, records: Mapping[Any, Sequence[Any]], generation: int) -> None: ...


def _ledger_consumer(sink: PollSink) -> type[AIOKafkaConsumer]:
    class LedgerConsumer(AIOKafkaConsumer):
        def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
            return LedgerConsumerThread(self, loop=self.loop, beacon=self.beacon)

        async def _drain_messages(self, fetcher: Any) -> None:
            """Faust's fetch loop, handing each poll's input records to `sink` whole
            (workaround 16); changelog records (Faust's table recovery reads them with this
            consumer) still go to Faust one by one. Records of partitions that are not active
            are left out, as Faust does; a poll fetched while the flow stopped (a rebalance
            began) seeks back to the committed offsets instead, as Faust's getmany does."""
            consumer_stopped, fetcher_stopped = self._stopped.is_set, fetcher._stopped.is_set
            try:
                while not (consumer_stopped() or fetcher_stopped()):
                    if not self.flow_active:
                        await self.wait(self.can_resume_flow)  # type: ignore[arg-type]  # as Faust
                        continue
                    # The generation the poll is asked in, with the flow active, so the active
                    # partitions it asks for are that generation's (see _poll_crossed_rebalance).
                    generation = self.app.consumer_generation_id
                    records, active = await self._wait_next_records(POLL_TIMEOUT_S)
                    await asyncio.sleep(0)
                    if not records or self.should_stop:
                        continue
                    if not self.flow_active:
                        await self.perform_seek()
                        continue
                    if self.app.consumer_generation_id != generation:
                        await self._poll_crossed_rebalance(records)
                        continue
                    await self._hand_over(records, active, generation)
            except self.consumer_stopped_errors:
                if not self.transport.app.should_stop:
                    raise

        async def _hand_over(self, records: Mapping[Any, Sequence[Any]],
                             active: Container[Any] | None, generation: int) -> None:
            """Input records to `sink` in one put, every other topic's to Faust."""
            inputs: dict[Any, Sequence[Any]] = {}
            for tp, batch in records.items():
                if not batch or (active is not None and tp not in active):
                    continue
                if tp.topic in sink.topics:
                    inputs[tp] = batch
                else:
                    await self._deliver_to_faust(tp, batch, generation)
            if inputs:
                await sink.put(inputs, generation)

        async def _poll_crossed_rebalance(self, records: Mapping[Any, Sequence[Any]]) -> None:
            """A poll asked before a rebalance returned after it: undo it.

            Its records are current (aiokafka returns nothing fetched before a seek or a
            reassignment) but it asked for the old generation's active partitions, so it can
            hold input records of partitions the new assignment's recovery has paused: decided
            then, the recovery's changelog re-read overwrote their account state (a credit was
            lost in the three-worker kill -9 test). Dropping such a poll (002732f) was worse:
            aiokafka had moved past its records, so the recovery never got its changelog
            records and stalled until the next rebalance, and clients waited ~60 s for the
            stall check (tests/integration/test_rebalance.py). Each partition is sought back to
            its first record, so the next poll, asked in the new generation, fetches them."""
            offsets = {tp: batch[0].offset for tp, batch in records.items() if batch}
            log.info("a poll crossed a rebalance; %d partitions sought back to its first records",
                     len(offsets))
            await self._seek_back(offsets)

        async def _seek_back(self, offsets: Mapping[Any, int]) -> None:
            """Seek still-assigned partitions back to records taken from aiokafka but not
            delivered (a revoked partition's records are its new owner's to fetch)."""
            assigned = self.assignment()
            for tp, offset in offsets.items():
                if tp in assigned:
                    await self.seek(tp, offset)

        async def _deliver_to_faust(self, tp: Any, batch: Sequence[Any], generation: int) -> None:
            """Faust's own per-record delivery, for records of topics that are not inputs; a
            rebalance that begins meanwhile seeks the rest back (see _poll_crossed_rebalance)."""
            for record in batch:
                if not self.flow_active or self.app.consumer_generation_id != generation:
                    await self._seek_back({tp: record.offset})
                    return
                await self.wait_first(self.callback(self._to_message(tp, record)),
                                      self.suspend_flow.wait())
                self._read_offset[tp] = record.offset

    return LedgerConsumer


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


def transactional_id_for(app_id: str, topic_group: int, partition: int) -> str:
    """The transactional id of a partition's producer, as Faust's TransactionManager names it
    (`{app id}-{topic group}-{partition}`): the worker must find Faust's own producers."""
    return f"{app_id}-{topic_group}-{partition}"


# -- workarounds 13 and 14: one transaction per worker (KIP-447) -----------------------------------

# How long the worker's transaction may stay open before the coordinator aborts it (and the
# worker's next call fails as fenced). Kafka's default, as Faust's producers had: a broker
# outage kept a transaction's produce retrying on NotEnoughReplicas for 14 s in the cluster test
# (10 s crashed the worker there). It is also what a partition's new owner waits at most for
# the open transaction of a worker that died and did not come back with its id.
WORKER_TRANSACTION_TIMEOUT_MS: Final[int] = 60_000
# How long a new assignment waits for offsets another worker's transaction holds (its commit, its
# abort, or the coordinator's timeout above), and how often it asks meanwhile.
STABLE_OFFSETS_WAIT_S: Final[float] = 2 * WORKER_TRANSACTION_TIMEOUT_MS / 1000
STABLE_OFFSETS_RETRY_S: Final[float] = 0.02
# Kafka error codes these requests answer (org.apache.kafka.common.protocol.Errors).
_COORDINATOR_RETRY_CODES: Final[frozenset[int]] = frozenset({14, 15, 16})  # loading, n/a, not it
_MEMBER_STALE_CODES: Final[frozenset[int]] = frozenset({22, 25, 82})  # generation, member, inst.
_REBALANCE_IN_PROGRESS: Final[int] = 27
_UNSTABLE_OFFSET_COMMIT: Final[int] = 88


@dataclass(frozen=True, slots=True)
class GroupMember:
    """The consumer group member a transaction's offsets are committed as (KIP-447)."""

    generation_id: int
    member_id: str
    group_instance_id: str | None = None


class OffsetsHeld(LedgerError):
    """Offsets of the group stayed held by an open transaction longer than a transaction may
    stay open: the coordinator should have aborted it (retriable: a new assignment asks again)."""


class MemberStale(LedgerError):
    """The group coordinator refused a transaction's offsets: this worker's generation is gone
    (it was removed from the group; its partitions belong to another worker now)."""


def group_member(app: Any) -> GroupMember:
    """Faust's consumer's current generation and member id (aiokafka's coordinator, private)."""
    coordinator = app.consumer._thread._ensure_consumer()._coordinator
    return GroupMember(coordinator.generation, coordinator.member_id,
                       coordinator._group_instance_id)


class _TxnOffsetCommitResponse_v3(Response):
    API_KEY = 28
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("topics", CompactArray(
            ("name", CompactString("utf-8")),
            ("partitions", CompactArray(
                ("partition_index", Int32), ("error_code", Int16), ("tags", TaggedFields))),
            ("tags", TaggedFields))),
        ("tags", TaggedFields))


class _TxnOffsetCommitRequest_v3(RequestStruct):
    # clients/src/main/resources/common/message/TxnOffsetCommitRequest.json, version 3.
    FLEXIBLE_VERSION = True
    API_KEY = 28
    API_VERSION = 3
    RESPONSE_TYPE = _TxnOffsetCommitResponse_v3
    SCHEMA = Schema(
        ("transactional_id", CompactString("utf-8")),
        ("group_id", CompactString("utf-8")),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("generation_id", Int32),
        ("member_id", CompactString("utf-8")),
        ("group_instance_id", CompactString("utf-8")),
        ("topics", CompactArray(
            ("name", CompactString("utf-8")),
            ("partitions", CompactArray(
                ("partition_index", Int32),
                ("committed_offset", Int64),
                ("committed_leader_epoch", Int32),
                ("committed_metadata", CompactString("utf-8")),
                ("tags", TaggedFields))),
            ("tags", TaggedFields))),
        ("tags", TaggedFields))


class _TxnOffsetCommitRequestV3(Request[_TxnOffsetCommitRequest_v3]):
    API_KEY = 28

    def __init__(self, fields: tuple[Any, ...]) -> None:
        self._fields = fields

    def build(self, request_struct_class: type[_TxnOffsetCommitRequest_v3]
              ) -> _TxnOffsetCommitRequest_v3:
        return request_struct_class(*self._fields)


def txn_offset_commit_v3(transactional_id: str, group_id: str, producer_id: int,
                         producer_epoch: int, member: GroupMember,
                         offsets: Mapping[Any, Any]) -> _TxnOffsetCommitRequestV3:
    """A TxnOffsetCommit v3 request: offsets (TopicPartition -> OffsetAndMetadata) committed as
    `member`, so the group coordinator refuses them from a generation that is gone."""
    by_topic: dict[str, list[tuple[Any, ...]]] = {}
    for tp, offset in sorted(offsets.items()):
        by_topic.setdefault(tp.topic, []).append(
            (tp.partition, offset.offset, -1, offset.metadata, {}))
    return _TxnOffsetCommitRequestV3((
        transactional_id, group_id, producer_id, producer_epoch, member.generation_id,
        member.member_id, member.group_instance_id,
        [(topic, partitions, {}) for topic, partitions in by_topic.items()], {}))


class _MemberTxnOffsetCommitHandler(TxnOffsetCommitHandler):
    """aiokafka's TxnOffsetCommit handler, sending v3 with the member the commit began with."""

    def __init__(self, sender: Any, offsets: Any, group_id: str, member: GroupMember) -> None:
        super().__init__(sender, offsets, group_id)
        self._member = member

    def create_request(self) -> Any:
        manager = self._sender._txn_manager
        return txn_offset_commit_v3(manager.transactional_id, self._group_id,
                                    manager.producer_id, manager.producer_epoch,
                                    self._member, self._offsets)

    def handle_response(self, resp: Any) -> Any:
        codes = {code for _, partitions, _ in resp.topics for _, code, _ in partitions}
        if codes & _MEMBER_STALE_CODES:
            self._sender._txn_manager.error_transaction(MemberStale(
                f"group {self._group_id} refused the offsets of generation "
                f"{self._member.generation_id} (error codes {sorted(codes)}): this worker was "
                "removed from the group"))
            return None
        if _REBALANCE_IN_PROGRESS in codes:
            return self._default_backoff  # the same generation is asked again
        # Every other answer as aiokafka reads a v0 response.
        return super().handle_response(SimpleNamespace(errors=[
            (topic, [(partition, code) for partition, code, _ in partitions])
            for topic, partitions, _ in resp.topics]))


class _MemberOffsets:
    """Makes one aiokafka producer send its transaction's offsets as TxnOffsetCommit v3.

    aiokafka 0.14 sends TxnOffsetCommit v0 (group id only), which any process can use to commit
    a group's offsets: a worker removed from the group (a zombie) could still commit. Its sender
    builds the request in `_do_txn_offset_commit` (private); this replaces that method on one
    producer's sender with the same steps and a handler that sends v3 with `member`."""

    def __init__(self, producer: Any) -> None:
        self.member: GroupMember | None = None
        sender = producer._sender

        async def do_txn_offset_commit(offsets: Any, group_id: str) -> None:
            if not offsets:
                return
            member = self.member
            if member is None:
                raise InvariantViolation("transaction offsets sent with no group member")
            try:
                node_id = await sender._find_coordinator(CoordinationType.GROUP, group_id)
            except GroupAuthorizationFailedError as exc:
                sender._txn_manager.error_transaction(exc)
                return
            await _MemberTxnOffsetCommitHandler(sender, offsets, group_id, member).do(node_id)

        sender._do_txn_offset_commit = do_txn_offset_commit


async def send_member_offsets(producer: Any, offsets: Mapping[Any, int], group_id: str,
                              member: GroupMember) -> None:
    """producer.send_offsets_to_transaction, as `member` of `group_id` (KIP-447, workaround 13).
    Raises MemberStale when the group has moved on without this worker."""
    if member.generation_id < 0 or not member.member_id:
        # aiokafka resets its generation to -1 and its member id to "" when the coordinator
        # no longer knows it; the coordinator checks nothing for offsets sent that way.
        producer._txn_manager.error_transaction(MemberStale(
            f"not a member of group {group_id} (generation {member.generation_id}): this "
            "worker was removed from the group"))
        raise MemberStale(f"offsets for group {group_id} without a generation")
    member_offsets: _MemberOffsets | None = getattr(producer, "_sardis_member_offsets", None)
    if member_offsets is None:
        member_offsets = _MemberOffsets(producer)
        producer._sardis_member_offsets = member_offsets
    member_offsets.member = member
    await producer.send_offsets_to_transaction(offsets, group_id)


def new_worker_producer(app: Any, transactional_id: str) -> Any:
    """An aiokafka transactional producer with Faust's settings (connection, security, linger,
    batch size, the short retry backoff of workaround 9), for the worker's one transaction."""
    producer = app.producer._new_producer(transactional_id=transactional_id)
    producer._txn_manager.transaction_timeout_ms = WORKER_TRANSACTION_TIMEOUT_MS
    return producer


class _OffsetFetchResponse_v7(Response):
    API_KEY = 9
    API_VERSION = 7
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("topics", CompactArray(
            ("name", CompactString("utf-8")),
            ("partitions", CompactArray(
                ("partition_index", Int32),
                ("committed_offset", Int64),
                ("committed_leader_epoch", Int32),
                ("metadata", CompactString("utf-8")),
                ("error_code", Int16),
                ("tags", TaggedFields))),
            ("tags", TaggedFields))),
        ("error_code", Int16),
        ("tags", TaggedFields))


class _OffsetFetchRequest_v7(RequestStruct):
    # clients/src/main/resources/common/message/OffsetFetchRequest.json, version 7.
    FLEXIBLE_VERSION = True
    API_KEY = 9
    API_VERSION = 7
    RESPONSE_TYPE = _OffsetFetchResponse_v7
    SCHEMA = Schema(
        ("group_id", CompactString("utf-8")),
        ("topics", CompactArray(
            ("name", CompactString("utf-8")),
            ("partition_indexes", CompactArray(Int32)),
            ("tags", TaggedFields))),
        ("require_stable", Boolean),
        ("tags", TaggedFields))


class _OffsetFetchRequestV7(Request[_OffsetFetchRequest_v7]):
    API_KEY = 9

    def __init__(self, group_id: str, partitions: Mapping[str, Sequence[int]]) -> None:
        self._fields: tuple[Any, ...] = (group_id, [(topic, sorted(indexes), {})
                                   for topic, indexes in sorted(partitions.items())], True, {})

    def build(self, request_struct_class: type[_OffsetFetchRequest_v7]) -> _OffsetFetchRequest_v7:
        return request_struct_class(*self._fields)


async def _unstable_partitions(client: Any, group_id: str,
                               partitions: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """One OffsetFetch v7 with require_stable: the partitions whose offsets a transaction holds."""
    node_id = await client.coordinator_lookup(CoordinationType.GROUP, group_id)
    response = await client.send(node_id, _OffsetFetchRequestV7(group_id, partitions))
    codes = {response.error_code} | {code for _, parts, _ in response.topics
                                     for *_, code, _ in parts}
    if codes & _COORDINATOR_RETRY_CODES:  # ask again; the lookup above finds the coordinator
        return {topic: list(indexes) for topic, indexes in partitions.items()}
    unexpected = codes - {0, _UNSTABLE_OFFSET_COMMIT}
    if unexpected:
        raise InvariantViolation(f"OffsetFetch for group {group_id} answered error codes "
                                 f"{sorted(unexpected)}")
    unstable: dict[str, list[int]] = {}
    for topic, parts, _ in response.topics:
        for partition, *_, code, _ in parts:
            if code == _UNSTABLE_OFFSET_COMMIT:
                unstable.setdefault(topic, []).append(partition)
    return unstable


async def wait_offsets_stable(client: Any, group_id: str,
                              partitions: Mapping[str, Sequence[int]]) -> int:
    """Wait until no open transaction holds offsets of `partitions` (workaround 14); returns how
    many times it asked. aiokafka's consumer fetches offsets without require_stable (OffsetFetch
    v3), so it would read an offset older than one a removed worker's open transaction may still
    commit, and tables recovered before that commit would miss its changelog records."""
    deadline_s = time.monotonic() + STABLE_OFFSETS_WAIT_S
    pending = {topic: list(indexes) for topic, indexes in partitions.items() if indexes}
    asked = 0
    while pending:
        pending = await _unstable_partitions(client, group_id, pending)
        asked += 1
        if pending and time.monotonic() > deadline_s:
            raise OffsetsHeld(f"offsets of {pending} still held by an open transaction after "
                              f"{STABLE_OFFSETS_WAIT_S:.0f} s", retriable=True)
        if pending:
            await asyncio.sleep(STABLE_OFFSETS_RETRY_S)
    return asked


class Committer(Protocol):
    """The commit protocol (streams/worker/commit.py), as the transport calls it."""

    async def commit(self, transactions: Mapping[str, Mapping[Any, int]], group_id: str,
                     start_new_transaction: bool) -> None: ...

    async def on_assigned(self, assigned: Any) -> None: ...

    async def stop(self) -> None: ...


class LedgerProducer(AIOKafkaProducer):
    """Faust's producer, with a short retry backoff for its transactional producers."""

    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "retry_backoff_ms": TRANSACTION_RETRY_BACKOFF_MS}


def ledger_transport(committer: Committer, sink: PollSink) -> type[AIOKafkaTransport]:
    """A Transport class whose sends keep their partition and transaction, whose commits are
    the ledger's commit protocol (`committer`), whose rebalances commit first, and whose
    consumer hands whole polls to `sink`."""

    class LedgerTransactionManager(TransactionManager):
        _commit_lock = asyncio.Lock()

        async def send(self, topic: str, key: bytes | None, value: bytes | None,
                       partition: int | None, timestamp: float | None, headers: Any,
                       *, transactional_id: str | None = None) -> Any:
            raise InvariantViolation(f"a record for {topic} sent through Faust, not through "
                                     "the commit protocol (it would never commit)")

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
                except (ProducerFenced, MemberStale) as exc:
                    # As Faust does: another worker owns these partitions now (or another
                    # process took this worker's transactional id).
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
            # Before tables recover (Faust runs them after this): the worker's producer fences
            # its previous incarnation, and no removed worker's transaction holds offsets.
            await committer.on_assigned(assigned)

        async def on_stop(self) -> None:
            """After the consumer's last commit (Faust stops this service after it)."""
            await committer.stop()

    class LedgerTransport(AIOKafkaTransport):
        TransactionManager = LedgerTransactionManager
        Consumer = _ledger_consumer(sink)
        Producer = LedgerProducer

    return LedgerTransport


def transaction_producers(app: Any) -> Mapping[str, Any]:
    """Faust's transactional aiokafka producers by transactional id (a private dict of its
    producer: Faust has no public accessor, and the outbox must send into exactly those)."""
    producers: Mapping[str, Any] = app.producer._transaction_producers
    return producers


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
