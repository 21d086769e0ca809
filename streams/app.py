"""The Faust stream app: decodes commands, calls the pure core, writes tables and produces results."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

import faust
from faust.types import EventT, StreamT

from streams import batches, core, metrics, records
from streams.config import Settings
from streams.errors import CodecError, InvariantViolation
from streams.event_scope import EventScope
from streams.faust_tables import table_items, table_value
from streams.health import lag_readiness, serve
from streams.money import Currency, currency_table
from streams.outbox import OUTBOX_RECORDS_HARD_MAX, Outbox, Value
from streams.quarantine import Position, QuarantineReader
from streams.reconciler import RECONCILE_TICK_INTERVAL_S, Reconciler
from streams.shutdown import arm_stop_deadline
from streams.topics import (
    APP_NAME,
    TABLES,
    LedgerTopic,
    app_topic_settings,
    changelog_topic_name,
    misplaced_reason,
)
from streams.transactions import (
    CONTROL_OFFSETS,
    ledger_transport,
    open_transactions,
    record_control_batches,
    transactional_id_for,
)
from streams.wire import Wire

log = logging.getLogger("sardis.worker")

COMMIT_INTERVAL_S = 0.1  # offsets + transactions; results become visible to readers at commit
PRODUCER_LINGER_MS = 5
# Record batches the outbox builds hold up to this many bytes (Kafka's defaults accept 1 MiB).
PRODUCER_BATCH_SIZE_MAX_BYTES = 512 * 1024
STREAM_BUFFER_MAX = 4096
MAX_POLL_RECORDS = 2000
SESSION_TIMEOUT_S = 10.0
HEARTBEAT_INTERVAL_S = 1.0


GAP_FETCH_TIMEOUT_MS = 50  # per poll; a gap of markers only is passed in one fetch
GAP_FETCH_MAX_WAIT_MS = 5
CATCH_UP_INTERVAL_S = 5.0
# Behind and unchanged for this many checks in a row (60 s) counts as stalled. A busy single agent
# can leave a partition without a turn for many seconds; that is not a stall.
STALL_CHECKS = 12
CATCH_UP_CHUNK_MAX = 500  # commands decided per partition per catch-up tick
CATCH_UP_REQUEST_TIMEOUT_MS = 10_000
STALL_LOG_EVERY_CHECKS = 4
BATCH_TICK_INTERVAL_S = 1.0
BATCH_TIMEOUTS_PER_TICK_MAX = 200  # batches voided per tick: one transaction stays bounded
BATCH_RESEND_AFTER_MS = 30_000  # an unsettled batch's unanswered messages are sent again
BATCH_NO_DEADLINE_MS = 2**62  # posting and voided batches wait for answers, not for a deadline
GAP_READ_TIMEOUT_S = 120.0
EXIT_BROKEN = 70  # EX_SOFTWARE: the worker stopped itself on a bug or a broken invariant
GAP_FETCH_BATCH_MAX = 5000
# A running worker re-reads ledger.internal.quarantine this often (a restarted one reads it before
# its first decision), so a partition it takes over skips what an operator set aside meanwhile.
QUARANTINE_REFRESH_S = 30.0


@dataclass(frozen=True, slots=True)
class Command:
    """One record of ledger.commands, from Faust's stream or read directly to fill a gap."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int

    @classmethod
    def of(cls, message: Any) -> Command:
        # Faust hands timestamps over as float seconds, aiokafka as integer ms. Kafka stores
        # integer ms; round() restores it exactly from Faust's float (error far below 0.5 ms).
        stamp = message.timestamp
        timestamp_ms = stamp if isinstance(stamp, int) else round(stamp * 1000)
        return cls(message.topic, message.partition, message.offset, message.key,
                   message.value if message.value is not None else b"", timestamp_ms)


class LedgerWorker:
    """Owns the Faust app, its tables and its agents (one per process, any number of processes)."""

    def __init__(self, settings: Settings, currencies: Mapping[str, Currency] | None = None) -> None:
        self.settings = settings
        self.currencies = dict(currencies) if currencies is not None else currency_table()
        # Reads both framings, writes SARDIS_WIRE_FORMAT; schema ids via the registry (streams/wire).
        self.wire = Wire(settings)
        self.codec = self.wire.codec
        self.app = faust.App(
            settings.topic(APP_NAME),
            datadir=os.environ.get("SARDIS_WORKER_DATADIR",
                                   str(Path(tempfile.gettempdir()) / "sardis-ledger-worker")),
            broker=f"kafka://{settings.kafka_bootstrap}",
            store="memory://",
            processing_guarantee="exactly_once",
            topic_partitions=settings.partitions,
            **app_topic_settings(settings),
            topic_allow_declare=True,
            broker_commit_interval=COMMIT_INTERVAL_S,
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
        )
        # Held while one event is decided; transaction commits wait for it (streams/transactions).
        self.event_lock = asyncio.Lock()
        record_control_batches()
        # Records decided events produce, held until their transaction commits (streams/outbox).
        self.outbox = Outbox()
        self._transactional_ids: dict[int, str] = {}
        transport = ledger_transport(settings.topic(LedgerTopic.COMMANDS), self.event_lock,
                                     self.outbox)
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
        self.app.agent(commands_topic, name="ledger")(self._agent)
        self.app.agent(batches_topic, name="batches")(self._agent)
        # tx_hash:log_index -> the join of a chain transfer and the entries that claim it
        # (co-partitioned with chain.transfers and ledger.internal.chain-claims, so with ledger.commands)
        self.reconciler = Reconciler(self, self._raw_table(joins, table_options))
        self.app.agent(self.app.topic(*self.reconciler.topics, partitions=settings.partitions,
                                      internal=False, **raw), name="reconciler")(self._agent)
        self.app.timer(RECONCILE_TICK_INTERVAL_S, name="reconcile-ticks")(self.reconciler.ticks)
        self.app.timer(BATCH_TICK_INTERVAL_S, name="batch-ticks")(self._batch_ticks)
        # partition of ledger.batches -> {batch_id: deadline_ms} of batches still reserving
        self._open_batches: dict[int, dict[str, int]] = {}
        self._open_batches_for: frozenset[int] | None = None  # owned partitions it was built for
        self._tick_producer: Any = None
        # One long-lived consumer reads gaps: most gaps are a transaction marker or two
        # (coordinators write ledger.commands and accounts write ledger.batches in transactions),
        # and starting a consumer per gap cost about a second each.
        self._gap_consumer: Any = None
        self._last_tick_ms: dict[int, int] = {}
        self._resend_at_ms: dict[str, int] = {}  # batch_id -> when to send its messages again
        self.app.timer(CATCH_UP_INTERVAL_S, name="catch-up")(self._catch_up)
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
        # The writes of the event being decided (streams/event_scope), and that event.
        self._scope: EventScope | None = None
        # Records an operator set aside (streams/quarantine); read before the first decision.
        self.quarantine = QuarantineReader(settings)
        self._quarantined: set[Position] | None = None
        self._quarantine_refresh_at = 0.0
        self.dead_letters: dict[str, int] = {}  # DLQ records by reason, since start
        self.lag = metrics.LagTracker("worker")  # input lag per partition, from the catch-up check

    def owned_partitions(self, topic: str) -> frozenset[int]:
        """The partitions of an input topic this worker owns now."""
        return frozenset(tp.partition for tp in self.app.assignor.assigned_actives()
                         if tp.topic == topic)

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
        return table

    async def _agent(self, stream: StreamT[bytes]) -> None:
        async for event in stream.events():
            async with self.event_lock:
                try:
                    await self.handle(event)
                except Exception as exc:
                    # Not a decision (those stop in _decide_one): reading a gap failed. Deciding
                    # later records without it would break per-account order, so stop too.
                    message = event.message
                    log.critical("handling %s:%s@%s failed before its decision; exiting so the "
                                 "open transactions abort", message.topic, message.partition,
                                 message.offset, exc_info=exc)
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
        if self._scope is not None:
            raise InvariantViolation("an event decided inside another event")
        scope = self._scope = EventScope()
        try:
            if quarantined:
                await self._skip_quarantined(command)
            else:
                await self._dispatch(command)
        except Exception as exc:
            scope.rollback()
            self._fail_stop(command, exc)
        finally:
            self._scope = None
        for transactional_id, held in scope.apply().items():
            await self._flush_if_full(transactional_id, held)

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
        consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap,
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
            async with self.event_lock:
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

    def _acknowledge(self, topic: str, partition: int, next_offset: int) -> None:
        """Tell Faust's consumer that every offset of `partition` below next_offset is done.

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
            await self._put(self.logs, log_key, records.log_to_bytes(
                replace(log_head, next_command_offset=next_offset)), partition)
        elif topic in self.reconciler.topics:
            await self.reconciler.advance_to(topic, partition, next_offset)
        else:
            table, key = self._offset_slot(topic, partition)
            await self._put(table, key, records.offset_to_bytes(next_offset), partition)

    async def _advance_alone(self, topic: str, partition: int, next_offset: int) -> None:
        """_advance_to as an event of its own (markers at the end of a catch-up chunk)."""
        scope = self._scope = EventScope()
        try:
            await self._advance_to(topic, partition, next_offset)
        except BaseException:
            scope.rollback()
            raise
        finally:
            self._scope = None
        for transactional_id, held in scope.apply().items():
            await self._flush_if_full(transactional_id, held)

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

    async def handle(self, event: EventT) -> None:
        """Decide one delivered record, after any records the consumer skipped before it."""
        message = event.message
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
        await self._decide_one(Command.of(message))

    async def _dispatch(self, command: Command) -> None:
        """Decode a record, check it may be on its topic, decide it; then record its offset
        (unless the decision recorded it in the same write, as a PostEntry's log head does)."""
        recorded = False
        try:
            name, record = await self.wire.decode(command.value)
        except CodecError as exc:
            await self._dead_letter(command, exc.reason, str(exc), None)
        else:
            misplaced = misplaced_reason(self.topic_kinds[command.topic], name)
            if misplaced is not None:
                await self._dead_letter(command, misplaced,
                                        f"a {name} record is not an input of {command.topic}",
                                        record.get("command_id") or record.get("batch_id"))
            elif command.topic in (self.commands_topic, self.internal_commands_topic):
                recorded = await self._account_record(command, name, record)
            elif command.topic in self.reconciler.topics:
                await self.reconciler.process(command, name, record)
            else:
                await self._coordinator_record(command, name, record)
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
            await self._result(core.Outcome(command_id, core.Status.REJECTED,
                                            core.Reason.QUARANTINED, detail), command.partition)
        elif name in ("SubmitBatch", "RollbackBatch") and batches.valid_batch_id(batch_id):
            key = command_id if name == "RollbackBatch" and core.valid_id(command_id) else batch_id
            await self._batch_result(batches.BatchOutcome(key, batch_id, False,
                                                          core.Reason.QUARANTINED, detail),
                                     command.partition)
        await self._advance_to(command.topic, command.partition, command.offset + 1)

    async def _rejected(self, command: Command, rejection: core.Rejection | batches.BatchRejection,
                        command_id: str | None = None) -> None:
        """Dead-letter a record that must have no effect, with its reason."""
        await self._dead_letter(command, rejection.reason, rejection.detail, command_id)

    async def _account_record(self, command: Command, name: str, record: dict[str, Any]) -> bool:
        """ledger.commands (PostEntry) and ledger.internal.commands (also reserves, settles).
        True when the decision recorded the record's offset itself."""
        partition = command.partition
        internal = command.topic == self.internal_commands_topic
        if name == "PostEntry":
            parsed = core.parse_post_entry(record, self.currencies)
            if isinstance(parsed, core.Rejection):
                await self._rejected(command, parsed, parsed.command_id)
                if parsed.command_id is not None:
                    await self._result(core.Outcome(parsed.command_id, core.Status.REJECTED,
                                                    parsed.reason, parsed.detail), partition)
            elif await self._owned(command, parsed.account_id, forward=not internal):
                return await self._decide(parsed, command)
            return False
        parser = batches.parse_reserve if name == "ReserveLeg" else batches.parse_settle
        message = parser(record, self.currencies, self.settings.partitions)
        if isinstance(message, batches.BatchRejection):
            await self._rejected(command, message)
        elif not await self._owned(command, message.leg.account_id if isinstance(
                message, batches.Reserve) else message.account_id, forward=False):
            return False
        elif isinstance(message, batches.Reserve):
            await self._reserve(message, command)
        else:
            await self._settle(message, command)
        return False

    async def _owned(self, command: Command, account_id: str, *, forward: bool) -> bool:
        """Whether this partition owns the account. A client command on another partition (a
        producer with another partitioner put it there) is forwarded to its owner over
        ledger.internal.commands; an internal record there is dead-lettered (workers send
        internal records to the owner, so it was not sent by one)."""
        owner = core.partition_for(account_id, self.settings.partitions)
        if owner == command.partition:
            return True
        if forward:
            await self._produce(self.internal_commands_topic, account_id.encode(), command.value,
                                owner, transaction_of=command.partition)
        else:
            await self._dead_letter(command, core.Reason.WRONG_PARTITION,
                                    f"account {core.shown(account_id)} is owned by partition "
                                    f"{owner}", None)
        return False

    # ------------------------------------------------------------------ batches: account side

    async def _reserve(self, message: batches.Reserve, command: Command) -> None:
        partition = command.partition
        account_key = core.account_key(message.leg.account_id, message.leg.currency).encode()
        hold_key = message.hold_key.encode()
        state = records.state_from_bytes(table_value(self.accounts, account_key))
        step = batches.reserve(state, records.hold_from_bytes(table_value(self.holds, hold_key)), message)
        if isinstance(step, batches.BatchRejection):
            await self._rejected(command, step)
            return
        if step.changed:
            await self._put(self.holds, hold_key, records.hold_to_bytes(step.hold), partition)
            if step.state != state:
                await self._put(self.accounts, account_key, records.state_to_bytes(step.state),
                                partition)
                await self._balance_of(message.leg.account_id, message.leg.currency, step.state,
                                       partition)
        if step.report is not None:
            await self._report(step.report, message.coordinator_partition, partition)

    async def _settle(self, message: batches.Settle, command: Command) -> None:
        partition = command.partition
        account_key = core.account_key(message.account_id, message.currency).encode()
        hold_key = message.hold_key.encode()
        state = records.state_from_bytes(table_value(self.accounts, account_key))
        hold = records.hold_from_bytes(table_value(self.holds, hold_key))
        log_key = str(partition).encode()
        log_head = records.log_from_bytes(table_value(self.logs, log_key))
        if message.action is batches.SettleAction.VOID:
            step = batches.void(state, hold, message)
        else:
            step = batches.post(state, log_head.frontier, hold, message, partition=partition,
                                now_ms=command.timestamp_ms)
        if isinstance(step, batches.BatchRejection):
            await self._rejected(command, step)
            return
        if step.changed:
            await self._put(self.holds, hold_key, records.hold_to_bytes(step.hold), partition)
            if step.state != state:
                await self._put(self.accounts, account_key, records.state_to_bytes(step.state),
                                partition)
                await self._balance_of(message.account_id, message.currency, step.state,
                                       partition)
        if step.changed and step.frontier is not None:
            log_head = replace(log_head, frontier=step.frontier)
            if core.tree_head_due(log_head, command.timestamp_ms):
                await self._tree_head(partition, log_head, command.timestamp_ms)
                log_head = replace(log_head, head_tree_size=log_head.frontier.tree_size,
                                   head_published_at_ms=command.timestamp_ms)
            await self._put(self.logs, log_key, records.log_to_bytes(log_head), partition)
        if step.entry is not None:
            # Re-emitted when the post is repeated, as for PostEntry: consumers dedupe by entry_id.
            await self._entry(step.entry, partition)
        if step.report is not None:
            await self._report(step.report, message.coordinator_partition, partition)

    async def _report(self, report: batches.LegReport, coordinator_partition: int,
                      partition: int) -> None:
        await self._send(LedgerTopic.INTERNAL_COORDINATOR, report.batch_id.encode(), "LegReport",
                         records.report_to_wire(report, self.currencies), coordinator_partition,
                         transaction_of=partition)

    # ------------------------------------------------------------------ batches: coordinator

    async def _coordinator_record(self, command: Command, name: str,
                                  record: dict[str, Any]) -> None:
        """ledger.batches (SubmitBatch, RollbackBatch) and ledger.internal.coordinator (also
        leg reports and ticks)."""
        partition = command.partition
        if name == "SubmitBatch":
            await self._submit_batch(command, record, partition)
        elif name == "RollbackBatch":
            await self._rollback_batch(command, record, partition)
        elif name == "LegReport":
            await self._leg_report(command, record)
        else:
            now_ms = batches.parse_tick(record, partition)
            if isinstance(now_ms, batches.BatchRejection):
                await self._rejected(command, now_ms)
            else:
                await self._batch_tick(partition, now_ms)

    async def _coordinates(self, command: Command, batch_id: str) -> bool:
        """Whether this partition coordinates the batch (batches.coordinator_partition); a
        client's batch on another partition is forwarded there over ledger.internal.coordinator,
        an internal record there is dead-lettered."""
        owner = batches.coordinator_partition(batch_id, self.settings.partitions)
        if owner == command.partition:
            return True
        if command.topic == self.batches_topic:
            await self._produce(self.coordinator_topic, batch_id.encode(), command.value, owner,
                                transaction_of=command.partition)
        else:
            await self._dead_letter(command, core.Reason.WRONG_PARTITION,
                                    f"batch {core.shown(batch_id)} is coordinated by partition "
                                    f"{owner}", None)
        return False

    def _header(self, batch_id: str) -> batches.BatchHeader | None:
        return records.header_from_bytes(table_value(self.batch_state, f"b:{batch_id}".encode()))

    def _legs(self, header: batches.BatchHeader) -> list[batches.LegRecord]:
        out: list[batches.LegRecord] = []
        for index in range(header.leg_count):
            data = table_value(self.batch_state, f"l:{batches.hold_key(header.batch_id, index)}".encode())
            if data is None:
                raise InvariantViolation(f"batch {header.batch_id} has no leg {index}")
            out.append(records.leg_record_from_bytes(data))
        return out

    async def _put_header(self, header: batches.BatchHeader, partition: int) -> None:
        await self._put(self.batch_state, f"b:{header.batch_id}".encode(),
                        records.header_to_bytes(header), partition)
        self._track(header, partition)

    def _track(self, header: batches.BatchHeader, partition: int) -> None:
        """Keep the in-memory index of unsettled batches (for timeouts and resends) current."""
        open_batches = self._open_batches.setdefault(partition, {})
        if batches.settled(header):
            open_batches.pop(header.batch_id, None)
            self._resend_at_ms.pop(header.batch_id, None)
        else:
            deadline = header.deadline_ms if header.status is batches.BatchStatus.RESERVING \
                else BATCH_NO_DEADLINE_MS
            open_batches[header.batch_id] = deadline
            self._resend_at_ms.setdefault(header.batch_id,
                                          time.time_ns() // 1_000_000 + BATCH_RESEND_AFTER_MS)

    async def _put_leg(self, batch_id: str, index: int, leg: batches.LegRecord, partition: int) -> None:
        await self._put(self.batch_state, f"l:{batches.hold_key(batch_id, index)}".encode(),
                        records.leg_record_to_bytes(leg), partition)

    async def _apply(self, step: batches.Step, partition: int) -> None:
        """Write a coordinator step's state, then send its messages and result."""
        for header in (step.header, *step.extra_headers):
            if header is not None:
                await self._put_header(header, partition)
        if step.header is not None:
            for index, leg in step.legs.items():
                await self._put_leg(step.header.batch_id, index, leg, partition)
        for reserve in step.reserves:
            await self._send(LedgerTopic.INTERNAL_COMMANDS, reserve.leg.account_id.encode(),
                             "ReserveLeg",
                             records.reserve_to_wire(reserve),
                             core.partition_for(reserve.leg.account_id, self.settings.partitions),
                             transaction_of=partition)
        for settle in step.settles:
            await self._send(LedgerTopic.INTERNAL_COMMANDS, settle.account_id.encode(),
                             "SettleLeg",
                             records.settle_to_wire(settle),
                             core.partition_for(settle.account_id, self.settings.partitions),
                             transaction_of=partition)
        if step.outcome is not None:
            await self._batch_result(step.outcome, partition)

    async def _batch_result(self, outcome: batches.BatchOutcome, partition: int) -> None:
        await self._send(LedgerTopic.RESULTS, outcome.result_key.encode(), "Result",
                         records.batch_outcome_to_wire(outcome, self.currencies), partition)

    async def _submit_batch(self, command: Command, record: dict[str, Any], partition: int) -> None:
        parsed = batches.parse_submit_batch(record, self.currencies)
        if isinstance(parsed, batches.BatchRejection):
            await self._dead_letter(command, parsed.reason, parsed.detail, parsed.batch_id)
            if parsed.batch_id is not None:
                await self._batch_result(batches.BatchOutcome(
                    parsed.batch_id, parsed.batch_id, False, parsed.reason, parsed.detail,
                    parsed.leg_index), partition)
            return
        if not await self._coordinates(command, parsed.batch_id):
            return
        existing = self._header(parsed.batch_id)
        # The timeout runs from when the coordinator starts the batch, not from when it was
        # produced: a backlog (or a restart) must not void every queued batch at once. The
        # deadline is stored with the batch, so a replay does not move it.
        step = batches.submit(existing, parsed, coordinator_partition=partition,
                              now_ms=max(command.timestamp_ms, time.time_ns() // 1_000_000))
        if existing is not None and step.outcome is None:
            outcome = batches.decided_outcome(existing, self._legs(existing))
            if outcome is not None:
                await self._batch_result(outcome, partition)
            return
        await self._apply(step, partition)

    async def _rollback_batch(self, command: Command, record: dict[str, Any], partition: int) -> None:
        parsed = batches.parse_rollback(record)
        if isinstance(parsed, batches.BatchRejection):
            await self._dead_letter(command, parsed.reason, parsed.detail, parsed.batch_id)
            if parsed.batch_id is not None:
                await self._batch_result(batches.BatchOutcome(
                    parsed.batch_id, core.bounded(str(record.get("batch_id")),
                                                  core.ID_LENGTH_MAX), False, parsed.reason,
                    parsed.detail), partition)
            return
        if not await self._coordinates(command, parsed.batch_id):
            return
        original = self._header(parsed.batch_id)
        compensation = self._header(batches.compensation_batch_id(parsed.batch_id, parsed.command_id))
        if compensation is not None:
            outcome = batches.decided_outcome(compensation, self._legs(compensation))
            if outcome is not None:
                await self._batch_result(outcome, partition)
            return
        legs = self._legs(original) if original is not None \
            and original.status is batches.BatchStatus.COMMITTED else []
        await self._apply(batches.rollback(original, legs, parsed, None,
                                           coordinator_partition=partition,
                                           now_ms=max(command.timestamp_ms,
                                                      time.time_ns() // 1_000_000)), partition)

    async def _leg_report(self, command: Command, record: dict[str, Any]) -> None:
        """An account's answer for one leg: validated, matched with the leg this coordinator
        sent, then counted."""
        partition = command.partition
        entry: core.Entry | None = None
        if record.get("entry") is not None:
            parsed_entry = records.parse_entry(record["entry"], self.currencies)
            if isinstance(parsed_entry, str):
                await self._dead_letter(command, core.Reason.INVALID_FIELD,
                                        f"entry: {parsed_entry}", None)
                return
            entry = parsed_entry
        report = batches.parse_report(record, entry, self.settings.partitions)
        if isinstance(report, batches.BatchRejection):
            await self._rejected(command, report)
            return
        if not await self._coordinates(command, report.batch_id):
            return
        header = self._header(report.batch_id)
        leg_data = None if header is None or report.leg_index >= header.leg_count else \
            table_value(self.batch_state, f"l:{batches.hold_key(report.batch_id, report.leg_index)}".encode())
        if header is not None and report.leg_index < header.leg_count and leg_data is None:
            raise InvariantViolation(f"batch {report.batch_id} has no leg {report.leg_index}")
        leg = None if leg_data is None else records.leg_record_from_bytes(leg_data)
        mismatch = batches.check_report(header, leg, report)
        if mismatch is not None or header is None or leg is None:
            await self._rejected(command, mismatch or batches.BatchRejection(
                core.Reason.UNKNOWN_BATCH, "no such leg"))
            return
        counted = batches.record_report(header, leg, report)
        if counted is None:
            return  # a duplicate, or an answer after the batch was decided
        header, leg = counted
        await self._put_leg(header.batch_id, report.leg_index, leg, partition)
        if batches.all_answered(header):
            await self._decide_batch(header, partition, timed_out=False)
        elif batches.all_posted(header):
            header = replace(header, status=batches.BatchStatus.COMMITTED)
            await self._put_header(header, partition)
            await self._batch_result(batches.committed_outcome(header, self._legs(header)), partition)
        else:
            await self._put_header(header, partition)

    async def _decide_batch(self, header: batches.BatchHeader, partition: int, *,
                            timed_out: bool) -> None:
        step = batches.decide(header, self._legs(header), coordinator_partition=partition,
                              timed_out=timed_out)
        await self._apply(step, partition)
        decided = step.header
        if decided is not None and decided.original_batch_id is not None:
            original = self._header(decided.original_batch_id)
            freed = None if original is None else batches.after_compensation(original, decided)
            if freed is not None:
                await self._put_header(freed, partition)

    def _due(self, partition: int, now_ms: int) -> list[str]:
        return sorted(batch_id for batch_id, deadline in self._open_batches.get(partition, {}).items()
                      if deadline <= now_ms or self._resend_at_ms.get(batch_id, 0) <= now_ms)

    async def _batch_tick(self, partition: int, now_ms: int) -> None:
        """Void the batches of this partition whose timeout is over and send again what unsettled
        batches have waited on for BATCH_RESEND_AFTER_MS (time from the tick)."""
        self._rebuild_open_batches()
        metrics.BATCHES_PENDING.set(sum(map(len, self._open_batches.values())))
        for batch_id in self._due(partition, now_ms)[:BATCH_TIMEOUTS_PER_TICK_MAX]:
            header = self._header(batch_id)
            if header is None or batches.settled(header):
                continue
            if batches.timed_out(header, now_ms):
                log.warning("batch %s timed out (%s of %s legs answered)", batch_id,
                            header.votes_yes + header.votes_no, header.leg_count)
                await self._decide_batch(header, partition, timed_out=True)
            elif self._resend_at_ms.get(batch_id, 0) <= now_ms:
                step = batches.resend(header, self._legs(header), coordinator_partition=partition)
                log.warning("batch %s (%s): sending %s unanswered message(s) again", batch_id,
                            header.status, len(step.reserves) + len(step.settles))
                await self._apply(step, partition)
                self._resend_at_ms[batch_id] = now_ms + BATCH_RESEND_AFTER_MS

    def _rebuild_open_batches(self) -> None:
        """After a (re)assignment, find the reserving batches of owned partitions in the table."""
        owned = self.owned_partitions(self.batches_topic)
        if owned == self._open_batches_for:
            return
        rebuilt: dict[int, dict[str, int]] = {p: {} for p in owned}
        for partition, _key, value in table_items(self.batch_state, b"b:", owned):
            header = records.header_from_bytes(value)
            if header is not None and not batches.settled(header):
                rebuilt[partition][header.batch_id] = \
                    header.deadline_ms if header.status is batches.BatchStatus.RESERVING \
                    else BATCH_NO_DEADLINE_MS
                # After a restart the backlog usually answers them: wait before resending.
                self._resend_at_ms.setdefault(
                    header.batch_id, time.time_ns() // 1_000_000 + BATCH_RESEND_AFTER_MS)
        self._open_batches = rebuilt
        self._open_batches_for = owned

    async def _batch_ticks(self) -> None:
        """Send a BatchTick to each owned partition of ledger.batches that has a batch past its
        deadline. The coordinator voids them when it reads the tick: timeouts are decided inside
        an event (its offset commits with them) and replay with the tick's own time."""
        try:
            self._rebuild_open_batches()
            now_ms = time.time_ns() // 1_000_000
            for partition in list(self._open_batches):
                if not self._due(partition, now_ms):
                    continue
                if now_ms - self._last_tick_ms.get(partition, 0) < BATCH_TICK_INTERVAL_S * 1000:
                    continue
                await self._send_tick(self.coordinator_topic, partition, "BatchTick",
                                      {"partition": partition, "now": now_ms})
                self._last_tick_ms[partition] = now_ms
        except asyncio.CancelledError:
            raise
        except Exception:  # a dead timer would leave holds pending forever
            log.exception("batch tick failed; retrying in %.0f s", BATCH_TICK_INTERVAL_S)

    async def _send_tick(self, topic: str, partition: int, record_name: str,
                         record: dict[str, Any]) -> None:
        """Produce a timer's tick to an input partition, outside any transaction: it is an input
        that the partition's owner decides like any other record."""
        if self._tick_producer is None:
            from aiokafka import AIOKafkaProducer

            self._tick_producer = AIOKafkaProducer(
                bootstrap_servers=self.settings.kafka_bootstrap, enable_idempotence=True)
            await self._tick_producer.start()
        await self._tick_producer.send_and_wait(topic, self.codec.encode(record_name, record),
                                                key=str(partition).encode(), partition=partition)

    async def _put(self, table: Any, key: bytes, value: bytes, partition: int) -> None:
        """Set a table key now and hold its changelog record for the partition's transaction.

        Faust's own `table[key] = value` queues the changelog record in a producer buffer that a
        background task drains: a commit can then carry an event's offset without its table
        state, and flushing that buffer at commit blocks commits while the stream is busy. The
        outbox instead hands the key's last value to the open transaction of `partition` before
        that transaction's offsets (streams/outbox, streams/transactions). The write goes
        through the event's scope, so an event that fails leaves the table as it was.
        """
        # The memory store's dict and its bookkeeping of which partition a key belongs to (used
        # to drop keys of revoked partitions after a rebalance), as its changelog recovery sets.
        store = table.data
        self._event_scope().write(store.data, store._key_partition, key, value, partition)
        self._hold(partition, table.changelog_topic.get_topic_name(), partition, key, value,
                   latest=True)

    def _event_scope(self) -> EventScope:
        if self._scope is None:
            raise InvariantViolation("a table or outbox write outside an event")
        return self._scope

    def _hold(self, owner: int, topic: str, partition: int, key: bytes | None, value: Value, *,
              latest: bool) -> None:
        """Queue a record for the open transaction of `owner` (via the event's scope)."""
        transactional_id, producer = self._transaction_producer(owner)
        if latest:
            if key is None:
                raise InvariantViolation(f"a compacted record for {topic} without a key")
            self._event_scope().hold(transactional_id, lambda: self.outbox.put_latest(
                transactional_id, producer, topic, partition, key, value))
        else:
            if not isinstance(value, bytes):
                raise InvariantViolation(f"a lazily encoded record for {topic} that is not "
                                         "compacted")
            self._event_scope().hold(transactional_id, lambda: self.outbox.append(
                transactional_id, producer, topic, partition, key, value))

    async def _read_gap(self, topic: str, partition: int, start: int, end: int) -> list[Command]:
        """The committed records of one input partition in [start, end), straight from Kafka."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        tp = TopicPartition(topic, partition)
        if self._gap_consumer is None:
            # fetch_max_wait_ms: a fetch left waiting at the end of the previous gap's partition
            # would hold the next gap's fetch back for aiokafka's default 500 ms.
            consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap,
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

    async def _decide(self, command: core.PostEntry, source: Command) -> bool:
        """Decide a PostEntry; True when its log-head write recorded the source offset too."""
        partition, now_ms = source.partition, source.timestamp_ms
        command_key = command.command_id.encode()
        seen = table_value(self.commands, command_key)
        if seen is not None:
            record = records.record_from_bytes(seen)
            outcome = core.replay(record, core.payload_digest(command))
            metrics.decided("replayed", outcome.reason or "", source.timestamp_ms)
            if outcome is record.outcome and outcome.entry is not None:
                # Re-emit: if a crash lost the first emission despite exactly-once, this restores
                # it; consumers dedupe by entry_id, so a second copy is harmless.
                await self._entry(outcome.entry, partition)
            await self._result(outcome, partition)
            return False
        account_key = command.account_key.encode()
        log_key = str(partition).encode()
        state = records.state_from_bytes(table_value(self.accounts, account_key))
        log_head = records.log_from_bytes(table_value(self.logs, log_key))
        decision = core.decide_post_entry(state, log_head.frontier, command,
                                          partition=partition, now_ms=now_ms)
        await self._put(self.commands, command_key, records.record_to_bytes(decision.record),
                        partition)
        entry = decision.outcome.entry
        next_offset = log_head.next_command_offset
        if source.topic == self.commands_topic:
            # One log-head write per command: Merkle frontier, tree-head state, next offset.
            next_offset = max(next_offset, source.offset + 1)
        if entry is not None:
            await self._put(self.accounts, account_key, records.state_to_bytes(decision.state),
                            partition)
            log_head = core.LogHead(decision.frontier, log_head.head_tree_size,
                                    log_head.head_published_at_ms, next_offset)
            if core.tree_head_due(log_head, now_ms):
                await self._tree_head(partition, log_head, now_ms)
                log_head = core.LogHead(log_head.frontier, log_head.frontier.tree_size, now_ms,
                                        next_offset)
            await self._entry(entry, partition)
            await self._balance(command, decision.state, partition)
        else:
            log_head = core.LogHead(log_head.frontier, log_head.head_tree_size,
                                    log_head.head_published_at_ms, next_offset)
        if entry is not None or source.topic == self.commands_topic:
            await self._put(self.logs, log_key, records.log_to_bytes(log_head), partition)
        await self._result(decision.outcome, partition)
        metrics.decided(decision.outcome.status, decision.outcome.reason or "", now_ms)
        return source.topic == self.commands_topic

    # ------------------------------------------------------------------ outputs (all to `partition`)
    # Every output goes to the partition of the command that caused it: Faust's exactly-once
    # producer for that partition then carries outputs, table changelogs and the source offset in
    # one transaction, and ledger.entries partition p is written by p's owner alone (its Merkle log).

    async def _send(self, topic: str, key: bytes, record_name: str, record: dict[str, Any],
                    partition: int, *, transaction_of: int | None = None) -> None:
        value = self.codec.encode(record_name, record)
        await self._produce(self.settings.topic(topic), key, value, partition,
                            transaction_of=transaction_of)

    async def _produce(self, topic: str, key: bytes | None, value: bytes, partition: int, *,
                       transaction_of: int | None = None) -> None:
        """Add a record to the open transaction of a ledger.commands partition (held in the
        outbox until that transaction's commit, or until it holds OUTBOX_RECORDS_MAX).

        Not Faust's topic.send: it costs ~0.5 ms per record here (measured: a no-op exactly-once
        agent reads 3,750 events/s, one topic.send per event drops it to 1,350/s), and the
        event lock already keeps commits between events.
        """
        owner = partition if transaction_of is None else transaction_of
        self._hold(owner, topic, partition, key, value, latest=False)

    async def _flush_if_full(self, transactional_id: str, held: int) -> None:
        if held < self.outbox.records_max:
            return
        if self.outbox.committing:
            if held < OUTBOX_RECORDS_HARD_MAX:
                return  # the commit's round trips end soon; no record may join it meanwhile
            await self.outbox.wait_commit_ended()
        app: Any = self.app
        await open_transactions(app.producer, [transactional_id])
        await self.outbox.flush(app.producer._transaction_producers.get, transactional_id)

    def _transaction_producer(self, partition: int) -> tuple[str, Any]:
        """The transactional id and aiokafka producer Faust keeps for a partition's transaction."""
        app: Any = self.app
        transactional_id = self._transactional_ids.get(partition)
        if transactional_id is None:
            group = app.assignor.group_for_topic(self.settings.topic(LedgerTopic.COMMANDS))
            transactional_id = self._transactional_ids[partition] = \
                transactional_id_for(app.conf.id, group, partition)
        producer = app.producer._transaction_producers.get(transactional_id)
        if producer is None:
            # Only the owner of a partition has its producer; deciding without it is a bug.
            raise InvariantViolation(f"no transactional producer {transactional_id}")
        return transactional_id, producer

    async def _entry(self, entry: core.Entry, partition: int) -> None:
        value = self.codec.encode("Entry", records.entry_to_wire(entry,
                                                                 self.currencies[entry.currency]))
        await self._produce(self.settings.topic(LedgerTopic.ENTRIES), entry.account_id.encode(),
                            value, partition)
        await self.reconciler.claim(entry, value, partition)

    async def _result(self, outcome: core.Outcome, partition: int) -> None:
        await self._send(LedgerTopic.RESULTS, outcome.command_id.encode(), "Result",
                         records.outcome_to_wire(outcome, self.currencies), partition)

    async def _balance(self, command: core.PostEntry, state: core.AccountState, partition: int) -> None:
        await self._balance_of(command.account_id, command.currency, state, partition)

    async def _balance_of(self, account_id: str, currency: str, state: core.AccountState,
                          partition: int) -> None:
        """Hold the account's balance; within one transaction only the last one is encoded and
        sent (ledger.balances is compacted, and read_committed readers see only the last)."""
        key = core.account_key(account_id, currency).encode()
        table = self.currencies[currency]

        def encode() -> bytes:
            return self.codec.encode("Balance", records.balance_to_wire(account_id, table, state))

        self._hold(partition, self.settings.topic(LedgerTopic.BALANCES), partition, key, encode,
                   latest=True)

    async def _tree_head(self, partition: int, log_head: core.LogHead, now_ms: int) -> None:
        metrics.TREE_SIZE.labels(str(partition)).set(log_head.frontier.tree_size)
        await self._send(LedgerTopic.TREE_HEADS, str(partition).encode(), "TreeHead",
                         records.tree_head_to_wire(partition, log_head.frontier, now_ms), partition)

    async def _dead_letter(self, command: Command, reason: str, detail: str,
                           command_id: Any) -> None:
        """Set a record aside with its reason: it has no other effect. Counted by reason."""
        self.dead_letters[str(reason)] = self.dead_letters.get(str(reason), 0) + 1
        metrics.dead_letter("worker", reason)
        log.warning("dead letter %s:%s@%s: %s (%s)", command.topic, command.partition,
                    command.offset, reason, core.bounded(detail))
        await self._send(LedgerTopic.DLQ, (command.key or b"")[:records.DLQ_KEY_BYTES_MAX],
                         "DeadLetter",
                         records.dead_letter(reason=str(reason), detail=detail, topic=command.topic,
                                             partition=command.partition, offset=command.offset,
                                             key=command.key, payload=command.value,
                                             command_id=command_id,
                                             failed_at_ms=command.timestamp_ms),
                         command.partition)


class StoppingWorker(faust.Worker):
    """Faust's worker, whose stop on a signal is bounded (streams/shutdown.py)."""

    def _schedule_shutdown(self, signal: Any) -> None:
        arm_stop_deadline("worker")
        super()._schedule_shutdown(signal)


def run_worker(settings: Settings, loglevel: str = "warn") -> None:
    """Run one worker process until it is stopped (SIGTERM/SIGINT); blocks."""
    from streams.topics import WORKER_TOPICS

    worker = LedgerWorker(settings)
    tables: Any = worker.app.tables
    serve("worker").ready_when(lag_readiness(tables.recovery.completed.is_set,
                                             lambda: worker.lag.behind, "worker"))
    # Confluent framing: schema ids registered (BACKWARD checked) before anything is encoded.
    asyncio.run(worker.wire.start(WORKER_TOPICS))
    StoppingWorker(worker.app, loglevel=loglevel, quiet=True).execute_from_commandline()
