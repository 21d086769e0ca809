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
from typing import Any

import faust
from faust.types import EventT, StreamT

from schemas.codec import AvroCodec
from streams import core, records
from streams.config import Settings
from streams.errors import CodecError, InvariantViolation
from streams.money import Currency, currency_table
from streams.topics import APP_NAME, TABLES, LedgerTopic, changelog_topic_name
from streams.transactions import ledger_transport

log = logging.getLogger("sardis.worker")

COMMIT_INTERVAL_S = 0.1  # offsets + transactions; results become visible to readers at commit
PRODUCER_LINGER_MS = 5
STREAM_BUFFER_MAX = 4096
MAX_POLL_RECORDS = 2000
SESSION_TIMEOUT_S = 10.0
HEARTBEAT_INTERVAL_S = 1.0


GAP_FETCH_TIMEOUT_MS = 1000
CATCH_UP_INTERVAL_S = 5.0
# Behind and unchanged for this many checks in a row (60 s) counts as stalled. A busy single agent
# can leave a partition without a turn for many seconds; that is not a stall.
STALL_CHECKS = 12
CATCH_UP_CHUNK_MAX = 500  # commands decided per partition per catch-up tick
GAP_READ_TIMEOUT_S = 120.0
GAP_FETCH_BATCH_MAX = 5000


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
    """Owns the Faust app, its tables and its one agent (one per process, any number of processes)."""

    def __init__(self, settings: Settings, currencies: Mapping[str, Currency] | None = None) -> None:
        self.settings = settings
        self.currencies = dict(currencies) if currencies is not None else currency_table()
        self.codec = AvroCodec()
        self.app = faust.App(
            settings.topic(APP_NAME),
            datadir=os.environ.get("SARDIS_WORKER_DATADIR",
                                   str(Path(tempfile.gettempdir()) / "sardis-ledger-worker")),
            broker=f"kafka://{settings.kafka_bootstrap}",
            store="memory://",
            processing_guarantee="exactly_once",
            topic_partitions=settings.partitions,
            topic_replication_factor=1,
            topic_allow_declare=True,
            broker_commit_interval=COMMIT_INTERVAL_S,
            producer_linger_ms=PRODUCER_LINGER_MS,
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
        transport = ledger_transport(settings.topic(LedgerTopic.COMMANDS), self.event_lock)
        self.app.transport = transport(self.app.conf.broker_consumer, self.app)
        raw: dict[str, Any] = {"key_type": bytes, "value_type": bytes,
                               "key_serializer": "raw", "value_serializer": "raw"}
        # Only the input is a Faust topic: outputs go straight to the transactional producer.
        commands_topic = self.app.topic(settings.topic(LedgerTopic.COMMANDS),
                                        partitions=settings.partitions, internal=False, **raw)
        table_options: dict[str, Any] = {"partitions": settings.partitions, "default": None,
                                         "schema": faust.Schema(**raw)}
        # account_id|currency -> AccountState; command_id -> CommandRecord; partition -> LogHead.
        # _put writes each changelog record to the deciding command's partition, so the tables
        # are co-partitioned with ledger.commands.
        accounts, commands, logs = TABLES
        self.accounts = self._raw_table(accounts, table_options)
        self.commands = self._raw_table(commands, table_options)
        self.logs = self._raw_table(logs, table_options)
        self.app.agent(commands_topic, name="ledger")(self._agent)
        self.app.timer(CATCH_UP_INTERVAL_S, name="catch-up")(self._catch_up)
        # partition -> (next_command_offset at the previous catch-up check, checks unchanged)
        self._last_seen_offsets: dict[int, tuple[int, int]] = {}
        self._catching_up: set[int] = set()  # partitions the timer feeds until they are current

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
                await self.handle(event)

    async def _catch_up(self) -> None:
        """Decide commands of owned partitions that Faust stopped delivering.

        After kill -9 restarts, Faust was seen to start a partition past its committed offset
        and then stall it (it never commits offsets it did not deliver). A partition whose
        committed end is ahead of the ledger's next_command_offset, with no progress for
        STALL_CHECKS checks, is read straight from Kafka and decided here in bounded chunks under
        the event lock, tick after tick until it is current. Anything Faust delivers later is
        below next_command_offset and only replays.
        """
        from aiokafka import AIOKafkaConsumer, TopicPartition

        topic = self.settings.topic(LedgerTopic.COMMANDS)
        owned = sorted(tp.partition for tp in self.app.assignor.assigned_actives()
                       if tp.topic == topic)
        if not owned:
            return
        consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap,
                                    isolation_level="read_committed", enable_auto_commit=False)
        await consumer.start()
        try:
            ends = await consumer.end_offsets([TopicPartition(topic, p) for p in owned])
        finally:
            await consumer.stop()
        for partition in owned:
            end = ends[TopicPartition(topic, partition)]
            log_head = records.log_from_bytes(self.logs.get(str(partition).encode()))
            done = log_head.next_command_offset
            previous, unchanged = self._last_seen_offsets.get(partition, (-1, 0))
            unchanged = unchanged + 1 if previous == done and done < end else 0
            self._last_seen_offsets[partition] = (done, unchanged)
            if done >= end:
                self._catching_up.discard(partition)
            elif unchanged >= STALL_CHECKS:
                self._catching_up.add(partition)
            if partition not in self._catching_up:
                continue
            async with self.event_lock:
                log_head = records.log_from_bytes(self.logs.get(str(partition).encode()))
                start = log_head.next_command_offset
                # A bounded chunk per tick: one transaction must stay far below its timeout.
                stop = min(end, start + CATCH_UP_CHUNK_MAX)
                log.warning("partition %s: no progress at offset %s of %s; deciding [%s, %s) "
                            "from Kafka", partition, start, end, start, stop)
                for command in await self._read_gap(partition, start, stop):
                    await self._process(command)
            self._last_seen_offsets[partition] = (stop, 0)

    # ------------------------------------------------------------------ per command

    async def handle(self, event: EventT) -> None:
        """Decide one delivered command, after any commands the consumer skipped before it."""
        message = event.message
        partition: int = message.partition
        next_offset = records.log_next_command_offset(self.logs.get(str(partition).encode()))
        if message.offset > next_offset:
            # Kafka delivered past commands that no decision recorded: Faust committed offsets
            # whose effects were lost (seen after kill -9). Decide the gap first, in order.
            for skipped in await self._read_gap(partition, next_offset, message.offset):
                await self._process(skipped)
        await self._process(Command.of(message))

    async def _process(self, command: Command) -> None:
        partition = command.partition
        try:
            name, record = self.codec.decode(command.value)
        except CodecError as exc:
            await self._dead_letter(command, exc.reason, str(exc), None)
        else:
            if name != "PostEntry":
                await self._dead_letter(command, core.Reason.UNKNOWN_COMMAND,
                                        f"{name} is not a command of ledger.commands",
                                        record.get("command_id"))
            else:
                parsed = core.parse_post_entry(record, self.currencies)
                if isinstance(parsed, core.Rejection):
                    await self._dead_letter(command, parsed.reason, parsed.detail, parsed.command_id)
                    if parsed.command_id is not None:
                        await self._result(core.Outcome(parsed.command_id, core.Status.REJECTED,
                                                        parsed.reason, parsed.detail), partition)
                elif (owner := core.partition_for(parsed.account_id, self.settings.partitions)) \
                        != partition:
                    # A producer with another partitioner put it here; only the owner decides it.
                    await self._produce(self.settings.topic(LedgerTopic.COMMANDS),
                                        parsed.account_id.encode(), command.value, owner,
                                        transaction_of=partition)
                else:
                    await self._decide(parsed, partition, command.timestamp_ms, command.offset)
                    return
        await self._advance(partition, command.offset)

    async def _advance(self, partition: int, offset: int) -> None:
        """Record that every command up to `offset` is decided (never moves backwards)."""
        log_key = str(partition).encode()
        log_head = records.log_from_bytes(self.logs.get(log_key))
        if offset + 1 > log_head.next_command_offset:
            await self._put(self.logs, log_key, records.log_to_bytes(
                replace(log_head, next_command_offset=offset + 1)), partition)

    async def _put(self, table: Any, key: bytes, value: bytes, partition: int) -> None:
        """Set a table key and send its changelog record now, inside the partition's transaction.

        Faust's own `table[key] = value` queues the changelog record in a producer buffer that a
        background task drains: a commit can then carry an event's offset without its table
        state, and flushing that buffer at commit blocks commits while the stream is busy. An
        awaited send joins the open transaction of `partition` immediately instead.
        """
        table.data[key] = value
        # The memory store's own bookkeeping of which partition a key belongs to (used to drop
        # keys of revoked partitions after a rebalance), as its changelog recovery would set it.
        table.data._key_partition[key] = partition
        await self._produce(table.changelog_topic.get_topic_name(), key, value, partition)

    async def _read_gap(self, partition: int, start: int, end: int) -> list[Command]:
        """The committed commands of one partition in [start, end), straight from Kafka."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        tp = TopicPartition(self.settings.topic(LedgerTopic.COMMANDS), partition)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap,
                                    isolation_level="read_committed", enable_auto_commit=False)
        found: list[Command] = []
        deadline = time.monotonic() + GAP_READ_TIMEOUT_S
        await consumer.start()
        try:
            consumer.assign([tp])
            consumer.seek(tp, start)
            while await consumer.position(tp) < end:
                if time.monotonic() > deadline:
                    # Deciding later commands without these would break per-account order: stop.
                    raise InvariantViolation(f"could not read {tp} offsets [{start}, {end}) "
                                             f"within {GAP_READ_TIMEOUT_S}s")
                batch = await consumer.getmany(tp, timeout_ms=GAP_FETCH_TIMEOUT_MS,
                                               max_records=GAP_FETCH_BATCH_MAX)
                found.extend(Command.of(m) for m in batch.get(tp, []) if m.offset < end)
        finally:
            await consumer.stop()
        log.warning("partition %s: read %s command(s) in offsets [%s, %s) from Kafka that the "
                    "consumer did not deliver", partition, len(found), start, end)
        return found

    async def _decide(self, command: core.PostEntry, partition: int, now_ms: int,
                      offset: int) -> None:
        command_key = command.command_id.encode()
        seen = self.commands.get(command_key)
        if seen is not None:
            record = records.record_from_bytes(seen)
            outcome = core.replay(record, core.payload_digest(command))
            if outcome is record.outcome and outcome.entry is not None:
                # Re-emit: if a crash lost the first emission despite exactly-once, this restores
                # it; consumers dedupe by entry_id, so a second copy is harmless.
                await self._entry(outcome.entry, partition)
            await self._result(outcome, partition)
            await self._advance(partition, offset)
            return
        account_key = command.account_key.encode()
        log_key = str(partition).encode()
        state = records.state_from_bytes(self.accounts.get(account_key))
        log_head = records.log_from_bytes(self.logs.get(log_key))
        decision = core.decide_post_entry(state, log_head.frontier, command,
                                          partition=partition, now_ms=now_ms)
        await self._put(self.commands, command_key, records.record_to_bytes(decision.record),
                        partition)
        entry = decision.outcome.entry
        log_head = replace(log_head, next_command_offset=max(log_head.next_command_offset,
                                                             offset + 1))
        if entry is not None:
            await self._put(self.accounts, account_key, records.state_to_bytes(decision.state),
                            partition)
            log_head = replace(log_head, frontier=decision.frontier)
            if core.tree_head_due(log_head, now_ms):
                await self._tree_head(partition, log_head, now_ms)
                log_head = replace(log_head, head_tree_size=log_head.frontier.tree_size,
                                   head_published_at_ms=now_ms)
            await self._entry(entry, partition)
            await self._balance(command, decision.state, partition)
        # One log-head write per command: Merkle frontier, tree-head state and the next offset.
        await self._put(self.logs, log_key, records.log_to_bytes(log_head), partition)
        await self._result(decision.outcome, partition)

    # ------------------------------------------------------------------ outputs (all to `partition`)
    # Every output goes to the partition of the command that caused it: Faust's exactly-once
    # producer for that partition then carries outputs, table changelogs and the source offset in
    # one transaction, and ledger.entries partition p is written by p's owner alone (its Merkle log).

    async def _send(self, topic: str, key: bytes, record_name: str, record: dict[str, Any],
                    partition: int) -> None:
        value = self.codec.encode(record_name, record)
        await self._produce(self.settings.topic(topic), key, value, partition)

    async def _produce(self, topic: str, key: bytes | None, value: bytes, partition: int, *,
                       transaction_of: int | None = None) -> None:
        """Append a record to the open transaction of a ledger.commands partition.

        Straight to the aiokafka transactional producer Faust keeps for that partition: Faust's
        topic.send costs ~0.5 ms per record here (measured: a no-op exactly-once agent reads
        3,750 events/s, one topic.send per event drops it to 1,350/s), and the event lock
        already keeps commits between events. The returned future is not awaited: the
        transaction's commit waits for every record it holds.
        """
        owner = partition if transaction_of is None else transaction_of
        producer = self._transaction_producer(owner)
        await producer.send(topic, value, key=key, partition=partition)

    def _transaction_producer(self, partition: int) -> Any:
        app: Any = self.app
        group = app.assignor.group_for_topic(self.settings.topic(LedgerTopic.COMMANDS))
        transactional_id = f"{app.conf.id}-{group}-{partition}"
        producer = app.producer._transaction_producers.get(transactional_id)
        if producer is None:
            # Only the owner of a partition has its producer; deciding without it is a bug.
            raise InvariantViolation(f"no transactional producer {transactional_id}")
        return producer

    async def _entry(self, entry: core.Entry, partition: int) -> None:
        await self._send(LedgerTopic.ENTRIES, entry.account_id.encode(), "Entry",
                         records.entry_to_wire(entry, self.currencies[entry.currency]), partition)

    async def _result(self, outcome: core.Outcome, partition: int) -> None:
        await self._send(LedgerTopic.RESULTS, outcome.command_id.encode(), "Result",
                         records.outcome_to_wire(outcome, self.currencies), partition)

    async def _balance(self, command: core.PostEntry, state: core.AccountState, partition: int) -> None:
        await self._send(LedgerTopic.BALANCES, command.account_key.encode(), "Balance",
                         records.balance_to_wire(command.account_id,
                                                 self.currencies[command.currency], state),
                         partition)

    async def _tree_head(self, partition: int, log_head: core.LogHead, now_ms: int) -> None:
        await self._send(LedgerTopic.TREE_HEADS, str(partition).encode(), "TreeHead",
                         records.tree_head_to_wire(partition, log_head.frontier, now_ms), partition)

    async def _dead_letter(self, command: Command, reason: str, detail: str,
                           command_id: str | None) -> None:
        log.warning("dead letter %s:%s@%s: %s (%s)", command.topic, command.partition,
                    command.offset, reason, detail)
        await self._send(LedgerTopic.DLQ, command.key or b"", "DeadLetter",
                         records.dead_letter(reason=str(reason), detail=detail, topic=command.topic,
                                             partition=command.partition, offset=command.offset,
                                             key=command.key, payload=command.value,
                                             command_id=command_id,
                                             failed_at_ms=command.timestamp_ms),
                         command.partition)


def run_worker(settings: Settings, loglevel: str = "warn") -> None:
    """Run one worker process until it is stopped (SIGTERM/SIGINT); blocks."""
    worker = LedgerWorker(settings)
    faust.Worker(worker.app, loglevel=loglevel, quiet=True).execute_from_commandline()
