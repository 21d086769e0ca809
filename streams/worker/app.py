"""The Faust stream app: decodes commands, calls the pure core, writes tables and produces results."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import faust
from faust.types import StreamT

from sardis_ledger.streams import batches, core, metrics, records
from sardis_ledger.streams.config import Settings, worker_id
from sardis_ledger.streams.errors import CodecError, InvariantViolation
from sardis_ledger.streams.health import lag_readiness, serve
from sardis_ledger.streams.money import Currency, currency_table
from sardis_ledger.streams.quarantine import Position, QuarantineReader
from sardis_ledger.streams.topics import (
    APP_NAME,
    TABLES,
    LedgerTopic,
    app_topic_settings,
    changelog_topic_name,
    misplaced_reason,
)
from sardis_ledger.streams.wire import Wire
from sardis_ledger.streams.worker.accounts import AccountPartition, AccountTables
from sardis_ledger.streams.worker.commit import FAUST_COMMIT_INTERVAL_S, CommitProtocol
from sardis_ledger.streams.worker.compat import (
    CONTROL_OFFSETS,
    StoppingWorker,
    ledger_transport,
    record_control_batches,
    table_value,
    use_preloaded_store,
)
from sardis_ledger.streams.worker.coordinator import BATCH_TICK_INTERVAL_S, Coordinator
from sardis_ledger.streams.worker.entry_messages import EntryMessages
from sardis_ledger.streams.worker.local import LOCAL_OFFSET, LocalDelivery
from sardis_ledger.streams.worker.polls import PollQueue
from sardis_ledger.streams.worker.ports import Command
from sardis_ledger.streams.worker.preload import ChangelogPreloader
from sardis_ledger.streams.worker.reconciler import RECONCILE_TICK_INTERVAL_S, Reconciler

log = logging.getLogger("sardis.worker")

# Linger 0 took ~2 ms off a lone closed-loop command's p50 (8.6 against 11.4 ms), but two-leg
# batches fell from 256 to 168/s (six runs each, alternating); 1 ms behaved as 5 ms. Kept at 5.
PRODUCER_LINGER_MS = 5
# Record batches the outbox builds hold up to this many bytes (Kafka's defaults accept 1 MiB).
PRODUCER_BATCH_SIZE_MAX_BYTES = 512 * 1024
STREAM_BUFFER_MAX = 4096
MAX_POLL_RECORDS = 2000
SESSION_TIMEOUT_S = 10.0
HEARTBEAT_INTERVAL_S = 1.0
TABLE_STANDBY_REPLICAS = 0
# Records decided under one hold of the event lock: a commit waits at most this many decisions,
# and at most DECIDE_CHUNK_S of deciding (plus the record in hand). One record can be a whole
# batch decided in its event (streams/worker/local.py), ~1 ms for two legs and ~30 ms for 64,
# so 32 records could hold the lock for a second.
DECIDE_CHUNK_MAX = 32
DECIDE_CHUNK_S = 0.010
# Held by a running worker in its data directory: the id derived from the directory is its own.
WORKER_ID_LOCK_FILE = ".worker-id.lock"


GAP_FETCH_TIMEOUT_MS = 50  # per poll; a gap of markers only is passed in one fetch
GAP_FETCH_MAX_WAIT_MS = 5
CATCH_UP_INTERVAL_S = 5.0
# Behind and unchanged for this many checks in a row (60 s) counts as stalled. A busy single agent
# can leave a partition without a turn for many seconds; that is not a stall.
STALL_CHECKS = 12
CATCH_UP_CHUNK_MAX = 500  # commands decided per partition per catch-up tick
CATCH_UP_REQUEST_TIMEOUT_MS = 10_000
STALL_LOG_EVERY_CHECKS = 4
GAP_READ_TIMEOUT_S = 120.0
EXIT_BROKEN = 70  # EX_SOFTWARE: the worker stopped itself on a bug or a broken invariant
GAP_FETCH_BATCH_MAX = 5000
# A running worker re-reads ledger.internal.quarantine this often (a restarted one reads it before
# its first decision), so a partition it takes over skips what an operator set aside meanwhile.
QUARANTINE_REFRESH_S = 30.0


class LedgerWorker:
    """Owns the Faust app, its tables and its agents (one per process, any number of processes)."""

    def __init__(self, settings: Settings, currencies: Mapping[str, Currency] | None = None) -> None:
        self.settings = settings
        self.currencies = dict(currencies) if currencies is not None else currency_table()
        # Reads both framings, writes SARDIS_WIRE_FORMAT; schema ids via the registry (streams/wire).
        self.wire = Wire(settings)
        self.codec = self.wire.codec
        datadir = os.environ.get("SARDIS_WORKER_DATADIR",
                                 str(Path(tempfile.gettempdir()) / "sardis-ledger-worker"))
        self.app = faust.App(
            settings.topic(APP_NAME),
            datadir=datadir,
            broker=f"kafka://{settings.kafka_bootstrap}",
            broker_credentials=settings.kafka_security.faust_credentials(),
            store="memory://",
            processing_guarantee="exactly_once",
            topic_partitions=settings.partitions,
            **app_topic_settings(settings),
            topic_allow_declare=True,
            broker_commit_interval=FAUST_COMMIT_INTERVAL_S,
            producer_linger_ms=PRODUCER_LINGER_MS,
            producer_max_batch_size=PRODUCER_BATCH_SIZE_MAX_BYTES,
            stream_buffer_maxsize=STREAM_BUFFER_MAX,
            broker_max_poll_records=MAX_POLL_RECORDS,
            consumer_auto_offset_reset="earliest",
            # Raw bytes everywhere. Faust decodes changelog records during recovery with the app's
            # default serializers, not the table's schema; with the JSON default every record
            # failed to decode and Faust dropped it with a warning: all table state lost on
            # restart (found by the kill -9 test).
            key_serializer="raw",
            value_serializer="raw",
            # A killed worker keeps its partitions until its session expires; keep that short so
            # a restarted worker takes over in seconds, not a minute.
            broker_session_timeout=SESSION_TIMEOUT_S,
            broker_heartbeat_interval=HEARTBEAT_INTERVAL_S,
            web_enabled=False,
            # No standby copies. Faust's default (1) has every worker also read the changelogs
            # of partitions another worker owns, but the memory store drops the keys of every
            # partition it does not own actively when a recovery ends, and a partition turning
            # active is replayed from the start anyway: standbys cost reading (broker and worker
            # CPU, memory until the next recovery) and shorten no failover.
            table_standby_replicas=TABLE_STANDBY_REPLICAS,
        )
        record_control_batches()
        # Every effect of an event, and every commit, go through the commit protocol.
        self.commits = CommitProtocol(self.app, settings.topic(LedgerTopic.COMMANDS),
                                      self._worker_id(datadir))
        # Every table's store reads its changelog in bulk on a rebalance (compat workaround 12).
        self.preloader = ChangelogPreloader(settings)
        # Faust's fetcher hands each poll here whole; _decide_polls decides it (compat 16).
        self.polls = PollQueue()
        transport = ledger_transport(self.commits, self.polls)
        self.app.transport = transport(self.app.conf.broker_consumer, self.app)
        raw: dict[str, Any] = {"key_type": bytes, "value_type": bytes,
                               "key_serializer": "raw", "value_serializer": "raw"}
        # Only the input is a Faust topic: outputs go straight to the transactional producer.
        # The account side reads client commands and the internal commands (reserves, settles,
        # forwarded commands); the coordinator reads client batches and the internal coordinator
        # topic (leg reports, ticks, forwarded batches). Every input topic has as many partitions
        # as ledger.commands, so Faust's assignor puts them in one co-partitioned group:
        # partition p of each goes to the same worker and shares its transactional producer (a
        # coordinator's reserve to another partition joins that transaction).
        commands_topic = self.app.topic(settings.topic(LedgerTopic.COMMANDS),
                                        settings.topic(LedgerTopic.INTERNAL_COMMANDS),
                                        partitions=settings.partitions, internal=False, **raw)
        batches_topic = self.app.topic(settings.topic(LedgerTopic.BATCHES),
                                       settings.topic(LedgerTopic.INTERNAL_COORDINATOR),
                                       partitions=settings.partitions, internal=False, **raw)
        table_options: dict[str, Any] = {"partitions": settings.partitions, "default": None,
                                         "schema": faust.Schema(**raw)}
        # account_id|currency -> AccountState; command_id -> CommandRecord; partition -> LogHead.
        # _put writes each changelog record to the deciding command's partition, so the tables
        # are co-partitioned with ledger.commands.
        accounts, commands, logs, holds, batch_state, joins = TABLES
        self.accounts = self._raw_table(accounts, table_options)
        self.commands = self._raw_table(commands, table_options)
        self.logs = self._raw_table(logs, table_options)
        # batch_id#leg_index -> Hold (account side, co-partitioned with ledger.commands)
        self.holds = self._raw_table(holds, table_options)
        # b:batch_id -> BatchHeader, l:batch_id#i -> LegRecord, o:partition -> next offset
        # (coordinator side, co-partitioned with ledger.batches)
        self.batch_state = self._raw_table(batch_state, table_options)
        self.commands_topic = settings.topic(LedgerTopic.COMMANDS)
        self.batches_topic = settings.topic(LedgerTopic.BATCHES)
        self.internal_commands_topic = settings.topic(LedgerTopic.INTERNAL_COMMANDS)
        self.coordinator_topic = settings.topic(LedgerTopic.INTERNAL_COORDINATOR)
        # full topic name -> the ledger topic it is (prefix removed), for the input rules
        self.topic_kinds = {settings.topic(t): t for t in LedgerTopic}
        self._subscribe(commands_topic, "ledger")
        self._subscribe(batches_topic, "batches")
        # tx_hash:log_index -> the join of a chain transfer and the entries that claim it
        # (co-partitioned with chain.transfers and ledger.internal.chain-claims, so with ledger.commands)
        self.reconciler = Reconciler(self, self._raw_table(joins, table_options))
        self._subscribe(self.app.topic(*self.reconciler.topics, partitions=settings.partitions,
                                       internal=False, **raw), "reconciler")
        self.app.timer(RECONCILE_TICK_INTERVAL_S, name="reconcile-ticks")(self.reconciler.ticks)
        # A batch whose partitions this worker all owns is decided whole in one event.
        self.local = LocalDelivery(settings, enabled=settings.local_batches,
                                   owned_partitions=self.owned_partitions,
                                   flow_active=self._flow_active,
                                   encode=self.codec.encode, read_form=self.codec.read_form)
        entry_messages = EntryMessages(self._encode_entry)
        self.coordinator = Coordinator(self, self.batch_state, entry_messages, self.local)
        self.account_partition = AccountPartition(
            self, self.commits, AccountTables(self.accounts, self.commands, self.logs, self.holds),
            self._claim, entry_messages)
        self.local.route(LedgerTopic.INTERNAL_COMMANDS, self.account_partition.record)
        self.local.route(LedgerTopic.INTERNAL_COORDINATOR, self.coordinator.record)
        self.app.timer(BATCH_TICK_INTERVAL_S, name="batch-ticks")(self.coordinator.ticks)
        self._tick_producer: Any = None
        # One long-lived consumer reads gaps: most gaps are a transaction marker or two
        # (coordinators write ledger.commands and accounts write ledger.batches in transactions),
        # and starting a consumer per gap cost about a second each.
        self._gap_consumer: Any = None
        self._owned_generation: int | None = None  # owned_partitions' cache, per generation
        self._owned: dict[str, frozenset[int]] = {}
        self.app.timer(CATCH_UP_INTERVAL_S, name="catch-up")(self._catch_up)
        self.app.task(self.commits.commit_soon)
        self.app.task(self._decide_polls)
        worker = self

        class OwnClients(faust.Service):
            """Stops the worker's own Kafka clients with the app (else aiokafka warns at exit)."""

            async def on_stop(self) -> None:
                await worker.close_clients()

        self.app.service(OwnClients)
        # partition -> (next_command_offset at the previous catch-up check, checks unchanged)
        self._last_seen_offsets: dict[tuple[str, int], tuple[int, int]] = {}
        # input partitions the timer feeds until they are current
        self._catching_up: set[tuple[str, int]] = set()
        # Records an operator set aside (streams/quarantine); read before the first decision.
        self.quarantine = QuarantineReader(settings)
        self._quarantined: set[Position] | None = None
        self._quarantine_refresh_at = 0.0
        self.dead_letters: dict[str, int] = {}  # DLQ records by reason, since start
        self.lag = metrics.LagTracker("worker")  # input lag per partition, from the catch-up check

    def _worker_id(self, datadir: str) -> str:
        """SARDIS_WORKER_ID, else one derived from this host and data directory. Two workers
        sharing a data directory would share that id and fence each other's transactions without
        end, so the directory is locked while the worker runs; a second worker finding it locked
        adds its process id (its restarts then wait out a dead predecessor's transaction)."""
        derived = worker_id(os.environ, socket.gethostname(), datadir)
        if "SARDIS_WORKER_ID" in os.environ:
            return derived
        Path(datadir).mkdir(parents=True, exist_ok=True)
        self._datadir_lock = open(Path(datadir) / WORKER_ID_LOCK_FILE, "a")  # noqa: SIM115
        try:
            fcntl.flock(self._datadir_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("data directory %s is another worker's: set SARDIS_WORKER_DATADIR or "
                        "SARDIS_WORKER_ID per worker; this one runs as %s-%d", datadir, derived,
                        os.getpid())
            return f"{derived}-{os.getpid()}"
        return derived

    def _flow_active(self) -> bool:
        """False from the moment a rebalance begins until the worker decides again."""
        consumer: Any = self.app.consumer
        return bool(consumer.flow_active)

    def owned_partitions(self, topic: str) -> frozenset[int]:
        """The partitions of an input topic this worker owns now, kept per consumer group
        generation: Faust's assigned_actives() builds a set of every assigned partition on each
        call (~9% of the worker's CPU in two-leg batch bursts, two calls a batch). The assignor
        takes a new assignment before the generation it belongs to is set, so an entry kept for
        a generation never holds an older assignment."""
        generation = self.app.consumer_generation_id
        if generation != self._owned_generation:
            self._owned_generation, self._owned = generation, {}
        owned = self._owned.get(topic)
        if owned is None:
            owned = self._owned[topic] = frozenset(
                tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == topic)
        return owned

    async def close_clients(self) -> None:
        """Stop the tick producer, the gap, chain-head and quarantine consumers (best effort)."""
        for client in (self._tick_producer, self._gap_consumer):
            if client is not None:
                try:
                    await client.stop()
                except Exception:  # stopping anyway; a failing close must not hide the exit
                    log.exception("closing %s", type(client).__name__)
        self._tick_producer = self._gap_consumer = None
        await self.reconciler.chain_head.close()
        await self.quarantine.close()

    def _raw_table(self, name: str, options: dict[str, Any]) -> Any:
        # Faust picks table serializers from the key/value *type* and falls back to JSON, ignoring
        # the schema, and builds the changelog topic from them at construction. So the changelog
        # topic is given explicitly (raw, compacted) and the table's serializers are set to raw.
        raw: dict[str, Any] = {"key_type": bytes, "value_type": bytes,
                               "key_serializer": "raw", "value_serializer": "raw"}
        # As Faust's own changelog topics: acks=False, or Faust waits for a stream to consume and
        # acknowledge them (no agent does; it then reports stalled partitions and commits late).
        changelog = self.app.topic(changelog_topic_name(self.settings, name),
                                   partitions=self.settings.partitions, compacting=True,
                                   deleting=False, internal=True, acks=False, **raw)
        table: Any = self.app.Table(name, changelog_topic=changelog, **options)
        table.key_serializer = "raw"
        table.value_serializer = "raw"
        use_preloaded_store(table, self.preloader)
        return table

    def _subscribe(self, channel: Any, name: str) -> None:
        """An agent on `channel`'s input topics, whose records reach the decider in polls."""
        self.app.agent(channel, name=name)(self._subscribed)
        self.polls.topics |= frozenset(channel.topics)

    async def _subscribed(self, stream: StreamT[bytes]) -> None:
        """The agents' body. Agents subscribe Faust's consumer to the input topics (its assignor
        keeps them co-partitioned with the tables), but records reach the worker a poll at a
        time (`_decide_polls`, compat workaround 16), never through a stream. An event here
        would be acked by Faust without a decision: stop."""
        async for event in stream.events():
            message = event.message
            log.critical("%s:%s@%s was delivered through a Faust stream, not a poll; exiting "
                         "so that it is not committed undecided", message.topic,
                         message.partition, message.offset)
            logging.shutdown()
            os._exit(EXIT_BROKEN)

    async def _decide_polls(self) -> None:
        """The worker's decider: every poll's records, in offset order per partition."""
        while True:
            records, generation = await self.polls.get()
            await self._decide_poll(records, generation)

    async def _decide_poll(self, records: Mapping[Any, Sequence[Any]], generation: int) -> None:
        """Decide a poll's records in chunks (DECIDE_CHUNK_MAX, DECIDE_CHUNK_S) under the event
        lock (a commit waits at most a chunk), marking each chunk's offsets done for Faust's
        commit. A rebalance that began meanwhile ends the poll: what is left is fetched again
        from the committed offsets, or read as a gap, by the partitions' owners."""
        consumer: Any = self.app.consumer
        for tp, batch in records.items():
            start = 0
            while start < len(batch):
                if not consumer.flow_active or self.app.consumer_generation_id != generation:
                    return
                async with self.commits.event_lock:
                    first = self._next_offset(tp.topic, tp.partition)
                    start = await self._decide_chunk(batch, start)
                    self._acknowledge(tp.topic, tp.partition,
                                      self._next_offset(tp.topic, tp.partition), first=first)
                await asyncio.sleep(0)  # the commit task, timers and rebalances get their turn

    async def _decide_chunk(self, batch: Sequence[Any], start: int) -> int:
        """Decide records of one partition from `start`: at most DECIDE_CHUNK_MAX, and none
        begun after DECIDE_CHUNK_S. Returns the index of the first record left."""
        deadline_s = time.monotonic() + DECIDE_CHUNK_S
        end = min(len(batch), start + DECIDE_CHUNK_MAX)
        index = start
        while index < end:
            await self._handle_or_stop(Command.of(batch[index]))
            index += 1
            if time.monotonic() >= deadline_s:
                break
        return index

    async def _handle_or_stop(self, command: Command) -> None:
        try:
            await self.handle(command)
        except Exception as exc:
            # Not a decision (those stop in _decide_one): reading a gap failed. Deciding later
            # records without it would break per-account order, so stop too.
            log.critical("handling %s:%s@%s failed before its decision; exiting so the open "
                         "transaction aborts", command.topic, command.partition, command.offset,
                         exc_info=exc)
            logging.shutdown()
            os._exit(EXIT_BROKEN)

    def _fail_stop(self, command: Command, exc: BaseException) -> NoReturn:
        """Deciding `command` raised: a bug or corrupt state, never bad input (that is rejected
        as data before any state changes). Its writes were rolled back; exit at once, as kill -9
        would, so Kafka aborts the partition's open transaction (a graceful stop, or Faust
        restarting the agent, could commit it). The log names the record and what to do."""
        position = Position(command.topic, command.partition, command.offset)
        log.critical(
            "STOPPED on %s: deciding it raised %s: %s. This is a bug or corrupt state, not bad "
            "input; nothing of this record is committed and the partition stays where it was. "
            "A restarted worker meets the same record. After investigating, `sardis-ledger "
            "quarantine %s` sets it aside (to ledger.dlq) so the partition can go on.",
            position, type(exc).__name__, exc, position, exc_info=exc)
        logging.shutdown()
        os._exit(EXIT_BROKEN)

    async def _decide_one(self, command: Command) -> None:
        """Decide one input record with all-or-nothing writes (streams/event_scope); a decision
        that raises stops the worker naming the record (_fail_stop)."""
        positions = self._quarantined
        if positions is None:
            positions = await self._quarantine_positions()
        quarantined = bool(positions) and \
            Position(command.topic, command.partition, command.offset) in positions
        scope = self.commits.open_event()
        try:
            if quarantined:
                await self._skip_quarantined(command)
            else:
                await self._dispatch(command)
        except Exception as exc:
            self.commits.abandon_event(scope)
            self._fail_stop(command, exc)
        await self.commits.close_event(scope)

    async def _quarantine_positions(self, refresh: bool = False) -> set[Position]:
        if self._quarantined is None or refresh:
            self._quarantined = await self.quarantine.refresh()
            self._quarantine_refresh_at = time.monotonic() + QUARANTINE_REFRESH_S
        return self._quarantined

    async def _catch_up(self) -> None:
        """Keep every owned partition deciding and committing, whatever Faust's consumer does.

        Two stalls were seen after kill -9 restarts (faust-streaming 0.15.3):
        1. Faust started a partition past its committed offset. It commits only a run of acked
           offsets that starts at the committed one, so that partition never committed again:
           its transaction stayed open and readers saw none of its results. `_acknowledge`
           marks every decided offset as acked, so the commit can always move up to
           next_command_offset (the decisions are in committed transactions or the open one).
        2. A partition whose committed end is ahead of next_command_offset gets no delivery for
           STALL_CHECKS checks: its commands are read straight from Kafka and decided here in
           bounded chunks, tick after tick until it is current. Anything Faust delivers later is
           below next_command_offset and only replays.
        A failing check is logged and retried at the next tick: the timer must never die.
        """
        try:
            await self._check_partitions()
            if time.monotonic() >= self._quarantine_refresh_at:
                await self._quarantine_positions(refresh=True)
        except asyncio.CancelledError:
            raise
        except Exception:  # a dead timer would hide the next stall
            log.exception("catch-up check failed; retrying in %.0f s", CATCH_UP_INTERVAL_S)

    async def _check_partitions(self) -> None:
        for topic in (self.commands_topic, self.internal_commands_topic, self.batches_topic,
                      self.coordinator_topic, *self.reconciler.topics):
            await self._check_topic(topic)

    async def _check_topic(self, topic: str) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        owned = sorted(self.owned_partitions(topic))
        if not owned:
            return
        for partition in owned:
            self._acknowledge(topic, partition, self._next_offset(topic, partition))
        consumer = AIOKafkaConsumer(**self.settings.kafka_connection(),
                                    isolation_level="read_committed", enable_auto_commit=False,
                                    request_timeout_ms=CATCH_UP_REQUEST_TIMEOUT_MS)
        await consumer.start()
        try:
            ends = await consumer.end_offsets([TopicPartition(topic, p) for p in owned])
        finally:
            await consumer.stop()
        for partition in owned:
            end = ends[TopicPartition(topic, partition)]
            done = self._next_offset(topic, partition)
            key = (topic, partition)
            previous, unchanged = self._last_seen_offsets.get(key, (-1, 0))
            unchanged = unchanged + 1 if previous == done and done < end else 0
            self._last_seen_offsets[key] = (done, unchanged)
            self.lag.set({TopicPartition(topic, partition): end - done})
            if done >= end:
                self._catching_up.discard(key)
            elif unchanged >= STALL_CHECKS:
                self._catching_up.add(key)
            elif unchanged and unchanged % STALL_LOG_EVERY_CHECKS == 0:
                log.info("%s:%s: at offset %s of %s, unchanged for %s checks", topic, partition,
                         done, end, unchanged)
            if key not in self._catching_up:
                continue
            async with self.commits.event_lock:
                start = self._next_offset(topic, partition)
                self._check_state_current(topic, partition, start)
                # A bounded chunk per tick: one transaction must stay far below its timeout.
                stop = min(end, start + CATCH_UP_CHUNK_MAX)
                log.warning("%s:%s: no progress at offset %s of %s; deciding [%s, %s) from Kafka",
                            topic, partition, start, end, start, stop)
                for command in await self._read_gap(topic, partition, start, stop):
                    await self._decide_one(command)
                # Offsets of [start, stop) that held no record were transaction markers.
                await self._advance_alone(topic, partition, stop)
                self._acknowledge(topic, partition, stop)
            self._last_seen_offsets[key] = (stop, 0)

    def _check_state_current(self, topic: str, partition: int, next_offset: int) -> None:
        """Refuse to decide from tables that are behind the committed input offset.

        The group's committed offset of an input partition commits in the same transaction as
        the table records of every decision below it. Tables that say fewer records were decided
        were not fully recovered; deciding those records again would book them twice (a new
        entry at a leaf index already used). Crashing makes the worker recover again instead.
        """
        from aiokafka import TopicPartition

        consumer: Any = self.app.consumer
        committed = consumer._committed_offset.get(TopicPartition(topic, partition))
        if committed is not None and next_offset < committed:
            raise InvariantViolation(
                f"{topic}:{partition}: tables record decisions up to offset {next_offset}, but "
                f"offset {committed} is committed: table recovery is incomplete; not deciding "
                "again")

    def _acknowledge(self, topic: str, partition: int, next_offset: int,
                     first: int | None = None) -> None:
        """Tell Faust's consumer that every offset of `partition` below next_offset is done
        (from its committed offset, or from `first` while none is committed).

        Faust commits the longest run of acked offsets that starts at its committed offset. Offsets
        decided without Faust delivering them (gap fill, catch-up) would otherwise never be acked
        and hold back every later commit of the partition. Only decided offsets are added, so a
        commit can never pass a command whose effects are not in its transaction or an earlier
        one. Synchronous: no other task runs between reading and updating Faust's bookkeeping.
        """
        from aiokafka import TopicPartition

        consumer: Any = self.app.consumer
        # aiokafka's type, not Faust's TP (equal and same hash): a key created here reaches
        # aiokafka's send_offsets_to_transaction, which accepts only TopicPartition.
        tp = TopicPartition(topic, partition)
        committed = consumer._committed_offset.get(tp)
        if committed is None:
            committed = first
        if committed is None or committed >= next_offset:
            return
        acked_index = consumer._acked_index[tp]
        acked = consumer._acked[tp]
        missing = [offset for offset in range(committed, next_offset) if offset not in acked_index]
        if missing:
            acked_index.update(missing)
            acked.extend(missing)
            acked.sort()

    async def _advance_to(self, topic: str, partition: int, next_offset: int) -> None:
        """Record that every record of an input partition below next_offset is decided (never
        moves backwards), in the event's scope."""
        if next_offset <= self._next_offset(topic, partition):
            return
        if topic == self.commands_topic:
            log_key = str(partition).encode()
            log_head = records.log_from_bytes(table_value(self.logs, log_key))
            self.commits.put(self.logs, log_key, records.log_to_bytes(
                replace(log_head, next_command_offset=next_offset)), partition)
        elif topic in self.reconciler.topics:
            await self.reconciler.advance_to(topic, partition, next_offset)
        else:
            table, key = self._offset_slot(topic, partition)
            self.commits.put(table, key, records.offset_to_bytes(next_offset), partition)

    async def _advance_alone(self, topic: str, partition: int, next_offset: int) -> None:
        """_advance_to as an event of its own (markers at the end of a catch-up chunk)."""
        scope = self.commits.open_event()
        try:
            await self._advance_to(topic, partition, next_offset)
        except BaseException:
            self.commits.abandon_event(scope)
            raise
        await self.commits.close_event(scope)

    def _offset_slot(self, topic: str, partition: int) -> tuple[Any, bytes]:
        """Table and key of the next undecided offset of an input partition other than
        ledger.commands (whose offset is in its log head) and the reconciler's topics."""
        if topic == self.batches_topic:
            return self.batch_state, f"o:{partition}".encode()
        if topic == self.coordinator_topic:
            return self.batch_state, f"o:{topic}:{partition}".encode()
        if topic == self.internal_commands_topic:
            return self.logs, f"o:{topic}:{partition}".encode()
        raise InvariantViolation(f"{topic} is not an input of this worker")

    def _next_offset(self, topic: str, partition: int) -> int:
        """Offset of the next record of an input partition that no decision has recorded yet."""
        if topic == self.commands_topic:
            return records.log_next_command_offset(table_value(self.logs, str(partition).encode()))
        if topic in self.reconciler.topics:
            return self.reconciler.next_offset(topic, partition)
        table, key = self._offset_slot(topic, partition)
        return records.offset_from_bytes(table_value(table, key))

    # ------------------------------------------------------------------ per command

    async def handle(self, message: Command) -> None:
        """Decide one delivered record, after any records the consumer skipped before it."""
        partition: int = message.partition
        next_offset = self._next_offset(message.topic, partition)
        if message.offset > next_offset:
            # Kafka delivered past records that no decision recorded. Usually transaction markers
            # (no record); but Faust was seen to start a partition past its committed offset, to
            # commit offsets whose effects were lost, and to skip records mid-session (a crash
            # test lost six results when only the first delivery was checked). A gap of markers
            # the consumer itself parsed (CONTROL_OFFSETS) is skipped; every other gap is read,
            # and its records are decided first, in order.
            self._check_state_current(message.topic, partition, next_offset)
            if not CONTROL_OFFSETS.covers(message.topic, partition, next_offset, message.offset):
                for skipped in await self._read_gap(message.topic, partition, next_offset,
                                                    message.offset):
                    await self._decide_one(skipped)
            self._acknowledge(message.topic, partition, message.offset)
        await self._decide_one(message)

    async def _dispatch(self, command: Command) -> None:
        """Decode a record, check it may be on its topic, decide it; then record its offset
        (unless the decision recorded it in the same write, as a PostEntry's log head does)."""
        recorded = False
        try:
            name, record = await self.wire.decode(command.value)
        except CodecError as exc:
            self.dead_letter(command, exc.reason, str(exc), None)
        else:
            misplaced = misplaced_reason(self.topic_kinds[command.topic], name)
            if misplaced is not None:
                self.dead_letter(command, misplaced,
                                        f"a {name} record is not an input of {command.topic}",
                                        record.get("command_id") or record.get("batch_id"))
            elif command.topic in (self.commands_topic, self.internal_commands_topic):
                recorded = await self.account_partition.record(command, name, record)
            elif command.topic in self.reconciler.topics:
                await self.reconciler.process(command, name, record)
            else:
                await self.coordinator.record(command, name, record)
        if not recorded:
            await self._advance_to(command.topic, command.partition, command.offset + 1)

    async def _skip_quarantined(self, command: Command) -> None:
        """A record an operator set aside: no decision; a client command gets a rejection."""
        log.warning("skipping quarantined record %s:%s:%s", command.topic, command.partition,
                    command.offset)
        try:
            name, record = await self.wire.decode(command.value)
        except CodecError:
            name, record = "", {}
        detail = "set aside by an operator (sardis-ledger quarantine); see ledger.dlq"
        command_id, batch_id = record.get("command_id"), record.get("batch_id")
        if name == "PostEntry" and core.valid_id(command_id):
            await self.account_partition.result(core.Outcome(command_id, core.Status.REJECTED,
                                            core.Reason.QUARANTINED, detail), command.partition)
        elif name in ("SubmitBatch", "RollbackBatch") and batches.valid_batch_id(batch_id):
            key = command_id if name == "RollbackBatch" and core.valid_id(command_id) else batch_id
            await self.coordinator.batch_result(batches.BatchOutcome(key, batch_id, False,
                                                          core.Reason.QUARANTINED, detail),
                                     command.partition)
        await self._advance_to(command.topic, command.partition, command.offset + 1)

    async def send_tick(self, topic: str, partition: int, record_name: str,
                         record: dict[str, Any]) -> None:
        """Produce a timer's tick to an input partition, outside any transaction: it is an input
        that the partition's owner decides like any other record."""
        if self._tick_producer is None:
            from aiokafka import AIOKafkaProducer

            self._tick_producer = AIOKafkaProducer(
                **self.settings.kafka_connection(), enable_idempotence=True)
            await self._tick_producer.start()
        await self._tick_producer.send_and_wait(topic, self.codec.encode(record_name, record),
                                                key=str(partition).encode(), partition=partition)

    async def _read_gap(self, topic: str, partition: int, start: int, end: int) -> list[Command]:
        """The committed records of one input partition in [start, end), straight from Kafka."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        tp = TopicPartition(topic, partition)
        if self._gap_consumer is None:
            # fetch_max_wait_ms: a fetch left waiting at the end of the previous gap's partition
            # would hold the next gap's fetch back for aiokafka's default 500 ms.
            consumer = AIOKafkaConsumer(**self.settings.kafka_connection(),
                                        isolation_level="read_committed", enable_auto_commit=False,
                                        fetch_max_wait_ms=GAP_FETCH_MAX_WAIT_MS)
            await consumer.start()
            self._gap_consumer = consumer
        consumer = self._gap_consumer
        found: list[Command] = []
        deadline = time.monotonic() + GAP_READ_TIMEOUT_S
        consumer.assign([tp])
        consumer.seek(tp, start)
        while await consumer.position(tp) < end:
            if time.monotonic() > deadline:
                # Deciding later commands without these would break per-account order: stop.
                raise InvariantViolation(f"could not read {tp} offsets [{start}, {end}) "
                                         f"within {GAP_READ_TIMEOUT_S}s")
            batch = await consumer.getmany(tp, timeout_ms=GAP_FETCH_TIMEOUT_MS,
                                           max_records=GAP_FETCH_BATCH_MAX)
            found.extend(Command.of(m) for m in batch.get(tp, []) if start <= m.offset < end)
        # Paused until the next gap: an assigned partition is fetched again and again (every
        # GAP_FETCH_MAX_WAIT_MS) on the worker's event loop.
        consumer.pause(tp)
        if found:
            log.warning("%s: read %s record(s) in offsets [%s, %s) from Kafka that the consumer "
                        "did not deliver", tp, len(found), start, end)
        return found

    # ------------------------------------------------------------------ outputs (all to `partition`)
    # Every output goes to the partition of the command that caused it: Faust's exactly-once
    # producer for that partition then carries outputs, table changelogs and the source offset in
    # one transaction, and ledger.entries partition p is written by p's owner alone (its Merkle log).

    async def _claim(self, entry: core.Entry, value: bytes, partition: int) -> None:
        await self.reconciler.claim(entry, value, partition)

    def encode(self, record_name: str, record: dict[str, Any]) -> bytes:
        return self.codec.encode(record_name, record)

    def encode_embedding(self, record_name: str, record: dict[str, Any], field: str,
                         message: bytes | Sequence[bytes]) -> bytes:
        return self.codec.encode_embedding(record_name, record, field, message)

    def put(self, table: Any, key: bytes, value: bytes, partition: int) -> None:
        self.commits.put(table, key, value, partition)

    def produce(self, topic: str, key: bytes | None, value: bytes, partition: int, *,
                transaction_of: int | None = None) -> None:
        self.commits.produce(topic, key, value, partition, transaction_of=transaction_of)

    def send(self, topic: str, key: bytes, record_name: str, record: dict[str, Any],
             partition: int, *, transaction_of: int | None = None) -> None:
        if self.local.takes(topic):
            self.local.hold(topic, key, record_name, record, partition)
            return
        value = self.codec.encode(record_name, record)
        self.commits.produce(self.settings.topic(topic), key, value, partition,
                            transaction_of=transaction_of)

    def dead_letter(self, command: Command, reason: str, detail: str, command_id: Any) -> None:
        """Set a record aside with its reason: it has no other effect. Counted by reason."""
        self.dead_letters[str(reason)] = self.dead_letters.get(str(reason), 0) + 1
        metrics.dead_letter("worker", reason)
        log.warning("dead letter %s:%s@%s: %s (%s)", command.topic, command.partition,
                    command.offset, reason, core.bounded(detail))
        self.send(LedgerTopic.DLQ, (command.key or b"")[:records.DLQ_KEY_BYTES_MAX],
                         "DeadLetter",
                         records.dead_letter(reason=str(reason), detail=detail, topic=command.topic,
                                             partition=command.partition, offset=command.offset,
                                             key=command.key, payload=self._payload(command),
                                             command_id=command_id,
                                             failed_at_ms=command.timestamp_ms),
                         command.partition)

    def _encode_entry(self, entry: core.Entry) -> bytes:
        return self.codec.encode("Entry", records.entry_to_wire(entry,
                                                                self.currencies[entry.currency]))

    def _payload(self, command: Command) -> bytes:
        """A record's bytes; a message decided in its batch's event has none until asked."""
        if command.offset == LOCAL_OFFSET:
            return self.local.payload(command)
        return command.value


def run_worker(settings: Settings, loglevel: str = "warn") -> None:
    """Run one worker process until it is stopped (SIGTERM/SIGINT); blocks."""
    from sardis_ledger.streams.topics import WORKER_TOPICS

    worker = LedgerWorker(settings)
    tables: Any = worker.app.tables
    serve("worker").ready_when(lag_readiness(tables.recovery.completed.is_set,
                                             lambda: worker.lag.behind, "worker"))
    # Confluent framing: schema ids registered (BACKWARD checked) before anything is encoded.
    asyncio.run(worker.wire.start(WORKER_TOPICS))
    StoppingWorker(worker.app, loglevel=loglevel, quiet=True).execute_from_commandline()
