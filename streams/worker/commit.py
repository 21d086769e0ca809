"""The commit protocol: an event's effects all or nothing, committed with its offset in one transaction."""

# One home for how a decision becomes durable. Per event (the worker holds `event_lock`):
#   open_event    -> an EventScope records every table write and every record to produce;
#   put / produce -> table keys are set at once (undoable), records are queued on the scope;
#   close_event   -> the scope hands its records to the outbox (held per input partition), or
#   abandon_event -> the scope undoes its table writes and drops its records.
# Per commit (`commit`, called by Faust's commit through streams/worker/compat.py):
#   1. wait for `event_lock`: no event is half decided, so every transaction holds whole events;
#   2. open the worker's transaction if Faust's stop path ended it (compat, workaround 10);
#      flush the outbox into it: held records of partitions this worker still owns, in decision
#      order, compacted keys only with their last value;
#   3. mark the outbox committing: events decided from now on are only held, never sent into a
#      transaction that is committing; release the lock, so the stream goes on meanwhile;
#   4. send the offsets of every owned partition as this consumer group member (KIP-447: the
#      coordinator refuses them from a generation that is gone), commit, begin the next one;
#   5. unmark. A fenced producer or a refused generation crashes the app in compat.
# One transaction per worker process, not Faust's one per input partition: a commit that
# touched 12 partitions ended 12 transactions, four round trips and a transaction-log write
# each (16 clients over 1,000 accounts: 292 -> 601 cmd/s, broker CPU per command 3.6 -> 0.9 ms).
# Zombie fencing, which Faust's per-partition transactional ids gave, comes from the group
# generation in TxnOffsetCommit v3 (compat, workaround 13) and from each new assignment waiting
# until no open transaction holds the group's offsets before its tables recover (workaround 14).
# The worker's transactional id is stable per worker (SARDIS_WORKER_ID), so a restarted worker
# aborts its previous incarnation's transaction at once.
# When: as soon as the stream is idle (0.5 ms without a decision), or every COMMIT_INTERVAL_S
# while it is busy (`commit_soon`), on Faust's timer as a backstop, and before a rebalance
# (compat). A kill -9 anywhere loses only the open transaction, which Kafka aborts; its offsets
# were never committed, so the records are decided again.

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any, Final

from aiokafka.errors import ProducerFenced

from sardis_ledger.streams.errors import InvariantViolation
from sardis_ledger.streams.worker.compat import (
    MemberStale,
    group_member,
    memory_store,
    new_worker_producer,
    open_transaction,
    send_member_offsets,
    transaction_producers,
    transactional_id_for,
    wait_offsets_stable,
)
from sardis_ledger.streams.worker.event_scope import EventScope
from sardis_ledger.streams.worker.outbox import OUTBOX_RECORDS_HARD_MAX, Outbox, Value

log = logging.getLogger("sardis.worker")

# Names this worker among the group's workers: its transactional id is
# `{app id}-worker-{SARDIS_WORKER_ID}`. Unique among running workers, stable across restarts.
WORKER_ID_ENV: Final[str] = "SARDIS_WORKER_ID"

# When commit_soon commits: once nothing was decided for COMMIT_IDLE_S (the stream has caught up:
# commit at once, for latency), else COMMIT_INTERVAL_S after the first decision not yet committed
# (a busy stream: each commit carries many events, for throughput). Committing after every
# decision under load made commits tiny and their round trips and markers the main cost: a
# burst of 10,000 commands fell from 2,066 to 445 commands/s.
# The idle window is 0.5 ms (a decider between two polls leaves it open). While a commit
# ended one transaction per input partition touched, 0.5 ms made 16 clients over 1,000 accounts
# commit more, smaller commits (413 -> 324 cmd/s), so it was 2 ms when records of more than one
# partition were held; with one transaction per worker, 0.5 ms always gave 567-721 against
# 467-592 cmd/s (three alternating runs) and two-leg batches the same (424 against 437/s).
# A shorter busy interval (25 ms) cut two-leg batches from 437 to 260/s, so it stays 100 ms.
COMMIT_IDLE_S: Final[float] = 0.0005
COMMIT_INTERVAL_S: Final[float] = 0.1
# Faust's own commit timer, only a backstop now.
FAUST_COMMIT_INTERVAL_S: Final[float] = 1.0


class CommitProtocol:
    """Holds the effects of the event being decided and commits them with their offsets."""

    def __init__(self, app: Any, anchor_topic: str, worker_id: str) -> None:
        self.app = app
        self.anchor_topic = anchor_topic  # the input topic whose partitions own held records
        self.worker_id = worker_id
        self._producer: Any = None
        self._producer_lock = asyncio.Lock()  # one transaction call at a time
        self._stopped = False
        # Held while one event is decided; commits wait for it (step 1).
        self.event_lock = asyncio.Lock()
        # Records decided events produce, held until their transaction commits.
        self.outbox = Outbox()
        self._scope: EventScope | None = None
        self._decided = asyncio.Event()  # set when an event was decided: commit_soon commits
        self._decisions = 0  # events decided since start: commit_soon tells idle from busy
        self._transactional_ids: dict[int, str] = {}

    # -- per event ------------------------------------------------------------------------------

    def open_event(self) -> EventScope:
        if self._scope is not None:
            raise InvariantViolation("an event decided inside another event")
        self._scope = EventScope()
        return self._scope

    def abandon_event(self, scope: EventScope) -> None:
        """The decision raised: undo its table writes, drop its records."""
        scope.rollback()
        self._scope = None

    async def close_event(self, scope: EventScope) -> None:
        """The decision is whole: its records join their transactions' outbox."""
        self._scope = None
        for transactional_id, held in scope.apply().items():
            await self._flush_if_full(transactional_id, held)
        self._decisions += 1
        self._decided.set()

    def put(self, table: Any, key: bytes, value: bytes, partition: int) -> None:
        """Set a table key now and hold its changelog record for the partition's transaction
        (not Faust's buffered `table[key] = value`: streams/worker/compat.py, workaround 4)."""
        store, key_partitions = memory_store(table)
        self._event_scope().write(store, key_partitions, key, value, partition)
        self.hold(partition, table.changelog_topic.get_topic_name(), partition, key, value,
                  latest=True)

    def produce(self, topic: str, key: bytes | None, value: bytes, partition: int, *,
                transaction_of: int | None = None) -> None:
        """Add a record to the open transaction of an input partition (`partition` unless
        `transaction_of` names another one this worker owns).

        Not Faust's topic.send: it costs ~0.5 ms per record here (measured: a no-op exactly-once
        agent reads 3,750 events/s, one topic.send per event drops it to 1,350/s), and the
        event lock already keeps commits between events.
        """
        owner = partition if transaction_of is None else transaction_of
        self.hold(owner, topic, partition, key, value, latest=False)

    def hold(self, owner: int, topic: str, partition: int, key: bytes | None, value: Value, *,
             latest: bool) -> None:
        """Queue a record for the open transaction of `owner`; `latest`: only the last value
        of the key in that transaction is sent (compacted topics and changelogs)."""
        transactional_id, producer = self.transaction_producer(owner)
        scope = self._event_scope()
        if latest:
            if key is None:
                raise InvariantViolation(f"a compacted record for {topic} without a key")
            scope.hold(transactional_id, lambda: self.outbox.put_latest(
                transactional_id, producer, topic, partition, key, value))
        else:
            if not isinstance(value, bytes):
                raise InvariantViolation(f"a lazily encoded record for {topic} that is not "
                                         "compacted")
            scope.hold(transactional_id, lambda: self.outbox.append(
                transactional_id, producer, topic, partition, key, value))

    def transaction_producer(self, partition: int) -> tuple[str, Any]:
        """The transactional id and aiokafka producer Faust keeps for an input partition: held
        records are grouped by it, and it exists only while this worker owns the partition."""
        transactional_id = self._transactional_ids.get(partition)
        if transactional_id is None:
            group = self.app.assignor.group_for_topic(self.anchor_topic)
            transactional_id = self._transactional_ids[partition] = \
                transactional_id_for(self.app.conf.id, group, partition)
        producer = transaction_producers(self.app).get(transactional_id)
        if producer is None:
            # Only the owner of a partition has its producer; deciding without it is a bug.
            raise InvariantViolation(f"no transactional producer {transactional_id}")
        return transactional_id, producer

    @property
    def transactional_id(self) -> str:
        """The worker's one transaction: stable per worker, so a restart fences its
        predecessor (within the app id's prefix, which the worker's ACLs allow)."""
        return f"{self.app.conf.id}-worker-{self.worker_id}"

    def _event_scope(self) -> EventScope:
        if self._scope is None:
            raise InvariantViolation("a table or outbox write outside an event")
        return self._scope

    async def _flush_if_full(self, transactional_id: str, held: int) -> None:
        if held < self.outbox.records_max:
            return
        if self.outbox.committing:
            if held < OUTBOX_RECORDS_HARD_MAX:
                return  # the commit's round trips end soon; no record may join it meanwhile
            await self.outbox.wait_commit_ended()
        producer = await self._open_transaction()
        await self.outbox.flush(transaction_producers(self.app).get, producer, transactional_id)

    # -- the worker's transaction ---------------------------------------------------------------

    async def on_assigned(self, assigned: Any) -> None:
        """A rebalance gave this worker `assigned`, before its tables recover: start the
        worker's producer (its first InitProducerId aborts what a previous incarnation with the
        same id left open), then wait until no open transaction holds offsets of the group's
        input topics (a removed worker's transaction may still commit them; compat 14)."""
        producer = await self._worker_producer()
        partitions = {topic: sorted(await producer.partitions_for(topic))
                      for topic in {tp.topic for tp in assigned}}
        asked = await wait_offsets_stable(producer.client, self.app.conf.id, partitions)
        if asked > 1:
            log.info("waited for another transaction's offsets to settle (%d requests)", asked)

    async def _worker_producer(self) -> Any:
        if self._producer is None:
            producer = new_worker_producer(self.app, self.transactional_id)
            await producer.start()
            self._producer = producer
            log.info("worker transaction %s ready", self.transactional_id)
        return self._producer

    async def _open_transaction(self) -> Any:
        if self._stopped:
            raise InvariantViolation("a transaction after the commit protocol stopped")
        producer = await self._worker_producer()
        await open_transaction(producer, self._producer_lock)
        return producer

    async def stop(self) -> None:
        """Stop the worker's producer; anything left open is aborted by Kafka, its offsets
        never committed."""
        self._stopped = True
        if self._producer is not None:
            await self._producer.stop()

    # -- per commit -----------------------------------------------------------------------------

    async def commit(self, transactions: Mapping[str, Mapping[Any, int]], group_id: str,
                     start_new_transaction: bool) -> None:
        """Steps 1-5 above, for the offsets of each input partition's transaction id."""
        if self._stopped:
            return  # after the last commit: what is decided now is decided again on restart
        offsets = self._owned_offsets(transactions)
        async with self.event_lock:
            producer = await self._open_transaction()
            await self.outbox.flush(transaction_producers(self.app).get, producer)
            self.outbox.commit_started()
        try:
            if offsets:  # a transaction never commits without offsets sent as a member
                await self._commit_offsets(producer, offsets, group_id, start_new_transaction)
        finally:
            self.outbox.commit_ended()

    def _owned_offsets(self, transactions: Mapping[str, Mapping[Any, int]]) -> dict[Any, int]:
        """The offsets of partitions this worker still owns (Faust keeps their producers)."""
        owned = transaction_producers(self.app)
        offsets: dict[Any, int] = {}
        for transactional_id, partition_offsets in transactions.items():
            if transactional_id in owned:
                offsets.update(partition_offsets)
            else:
                log.warning("not committing offsets %s: partition no longer this worker's",
                            dict(partition_offsets))
        return offsets

    async def _commit_offsets(self, producer: Any, offsets: Mapping[Any, int], group_id: str,
                              start_new_transaction: bool) -> None:
        member = group_member(self.app)  # the generation the offsets were decided in
        async with self._producer_lock:
            try:
                await send_member_offsets(producer, offsets, group_id, member)
            except MemberStale:
                await producer.abort_transaction()  # no zombie's records stay pending
                raise
            except ProducerFenced:
                log.error("transaction %s fenced: another process took its id (another worker "
                          "runs with this worker's %s?) or it outlived its timeout",
                          self.transactional_id, WORKER_ID_ENV)
                raise
            await producer.commit_transaction()
            if start_new_transaction:
                await producer.begin_transaction()

    async def commit_soon(self) -> None:
        """Commit what was decided as soon as the stream is idle (COMMIT_IDLE_S without a new
        decision), and at least every COMMIT_INTERVAL_S while it is busy, instead of on Faust's
        timer alone: a decided command's result becomes visible one commit's round trips
        later, and a busy stream still commits many events at a time."""
        consumer: Any = self.app.consumer
        while True:
            await self._decided.wait()
            first_s = time.monotonic()
            seen = self._decisions
            while time.monotonic() - first_s < COMMIT_INTERVAL_S:
                await asyncio.sleep(COMMIT_IDLE_S)
                if self._decisions == seen:
                    break
                seen = self._decisions
            self._decided.clear()
            try:
                await consumer.commit()
            except asyncio.CancelledError:
                raise
            except Exception:  # Faust's timer commits too; a failed early commit is retried
                log.exception("early commit failed; the commit timer retries")
                await asyncio.sleep(COMMIT_INTERVAL_S)
