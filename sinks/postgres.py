"""PostgreSQL sink: ledger topics -> the `ledger` schema, rows and offsets in one transaction."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from sardis_ledger.schemas.codec import AvroCodec
from sardis_ledger.sinks import kafka, rows
from sardis_ledger.sinks.errors import SinkError, SinkUnavailable
from sardis_ledger.sinks.intake import SinkReject, intake
from sardis_ledger.sinks.kafka import ALL_PARTITIONS, Shard
from sardis_ledger.sinks.schema import connect, migrate, quoted
from sardis_ledger.streams import metrics
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.money import Currency, currency_table
from sardis_ledger.streams.topics import LedgerTopic
from sardis_ledger.streams.wire import Wire

BATCH_RECORDS_MAX = 20_000  # records per database transaction
# Records decoded between yields to the event loop, so the COPY of the batch in flight keeps
# streaming to PostgreSQL while the next batch is decoded (about 40 ms of decoding).
BUILD_CHUNK_RECORDS = 1_000
POLL_TIMEOUT_MS = 100  # short: end-to-end lag stays well under a second when traffic is light
RETRY_BACKOFF_INITIAL_S = 0.2
RETRY_BACKOFF_MAX_S = 5.0
LOCK_POLL_S = 1.0
# A standby retries after LOCK_POLL_S times a random factor in [1 - J, 1 + J]: two sinks given
# different, overlapping --shard values each take part of their locks and let go; on one fixed
# period they could keep colliding in step, and the jitter breaks that.
LOCK_POLL_JITTER = 0.5
# Session advisory locks: every sink of a schema holds SINK_LOCK_TEMPLATE shared (replay's swap
# takes it exclusively, so it cannot swap under a running sink) and one exclusive lock per
# partition number it writes, so two sinks never write the same partition, whatever --shard
# each was given; a sink whose partitions are taken waits as a standby.
SINK_LOCK_TEMPLATE = "sardis-ledger:sink:{schema}"
PARTITION_LOCK_TEMPLATE = "sardis-ledger:sink:{schema}:partition:{partition}"
REPORT_EVERY_S = 10.0
READY_MESSAGE = "sink postgres: ready"

# What the sink consumes; ledger.entries must exist, the others are sunk when they exist.
SOURCE_TOPICS: tuple[tuple[LedgerTopic, bool], ...] = (
    (LedgerTopic.ENTRIES, True),
    (LedgerTopic.TREE_HEADS, False),
    (LedgerTopic.RECEIPTS, False),
    (LedgerTopic.ANCHORS, False),
)
# SQLSTATE classes worth a reconnect and retry: connection problems, server shutting down,
# resources, serialization failures. Everything else (constraint violations) is a real fault.
RETRIABLE_SQLSTATE_PREFIXES = ("08", "57P", "53", "40001", "40P01", "58")

log = logging.getLogger("sardis.sinks.postgres")


@dataclass
class Batch:
    """Rows decoded from one poll, plus the next offset of every partition they came from."""

    entries: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    batches: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    tree_heads: dict[tuple[int, int], tuple[Any, ...]] = field(default_factory=dict)
    receipts: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    anchors: list[tuple[Any, ...]] = field(default_factory=list)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    records: int = 0
    # Records that cannot be stored (sinks/intake): set aside with the offsets that pass them.
    rejects: list[SinkReject] = field(default_factory=list)


def build_batch(messages: Mapping[TopicPartition, list[Any]], topic_kinds: Mapping[str, LedgerTopic],
                codec: AvroCodec, currencies: Mapping[str, Currency]) -> Batch:
    """Decode one poll's messages into deduplicated rows (pure apart from logging)."""
    batch = Batch()
    for tp, messages_of_tp in messages.items():
        add_messages(batch, tp, messages_of_tp, topic_kinds, codec, currencies)
    return batch


def add_messages(batch: Batch, tp: TopicPartition, messages: Sequence[Any],
                 topic_kinds: Mapping[str, LedgerTopic], codec: AvroCodec,
                 currencies: Mapping[str, Currency]) -> None:
    """Decode consecutive messages of one partition into `batch` (rows deduplicated)."""
    kind = topic_kinds[tp.topic]
    for message in messages:
        batch.records += 1
        batch.offsets[tp] = message.offset + 1
        taken = intake(kind, tp.topic, message, codec, currencies)
        if isinstance(taken, SinkReject):
            batch.rejects.append(taken)
            continue
        _name, record = taken
        if kind is LedgerTopic.ENTRIES:
            # The worker may re-emit an entry after a crash; entry_id dedupes it.
            if record["entry_id"] not in batch.entries:
                batch.entries[record["entry_id"]] = rows.entry_row(record, currencies)
            batch_row = rows.batch_row(record)
            if batch_row is not None:
                batch.batches.setdefault(batch_row[0], batch_row)
        elif kind is LedgerTopic.TREE_HEADS:
            batch.tree_heads.setdefault((record["partition"], record["tree_size"]),
                                        rows.tree_head_row(record))
        elif kind is LedgerTopic.RECEIPTS:
            batch.receipts.setdefault(record["entry_id"], rows.receipt_row(record))
        else:
            batch.anchors.append(rows.anchor_row(record))


async def build_batch_yielding(messages: Mapping[TopicPartition, list[Any]],
                               topic_kinds: Mapping[str, LedgerTopic], codec: AvroCodec,
                               currencies: Mapping[str, Currency]) -> Batch:
    """build_batch, yielding to the event loop every BUILD_CHUNK_RECORDS records.

    Decoding is CPU work on the event loop; the yields let the previous batch's COPY keep
    feeding PostgreSQL meanwhile, so decoding and the database work overlap.
    """
    batch = Batch()
    for tp, messages_of_tp in messages.items():
        for start in range(0, len(messages_of_tp), BUILD_CHUNK_RECORDS):
            add_messages(batch, tp, messages_of_tp[start:start + BUILD_CHUNK_RECORDS],
                         topic_kinds, codec, currencies)
            await asyncio.sleep(0)
    return batch


def is_retriable(exc: BaseException) -> bool:
    """Whether a database error is worth reconnecting and retrying the same batch."""
    import asyncpg

    # InternalClientError: asyncpg's protocol state after a connection broke mid-COPY; a new
    # connection starts clean.
    if isinstance(exc, (OSError, TimeoutError, asyncpg.InterfaceError, SinkUnavailable,
                        asyncpg.exceptions._base.InternalClientError)):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        return state.startswith(RETRIABLE_SQLSTATE_PREFIXES)
    return False


class PostgresSink:
    """Copies ledger topics into one schema, exactly once.

    Each transaction holds a batch's rows and the next offset of every partition they came
    from (`sink_offsets`); on start and after any database error the consumer seeks to those
    stored offsets, so a crash at any moment neither loses nor repeats a row. One sink per
    schema writes at a time (a session advisory lock); a second one waits as a standby.
    """

    def __init__(self, settings: Settings, schema: str, *,
                 currencies: Mapping[str, Currency] | None = None,
                 start: Callable[[AIOKafkaConsumer, list[TopicPartition]],
                                 Any] | None = None,
                 stop_at_end: bool = False,
                 progress: Callable[[int, int], None] | None = None,
                 shard: Shard = ALL_PARTITIONS) -> None:
        self.settings = settings
        self.shard = shard
        self.schema = schema
        self.q = quoted(schema)
        self.currencies = dict(currencies) if currencies is not None else currency_table()
        # Reads both framings, writes SARDIS_WIRE_FORMAT (streams/wire.py).
        self.wire = Wire(settings)
        self.codec = self.wire.codec
        self.start = start  # replay: where to start when the schema has no offsets yet
        self.stop_at_end = stop_at_end  # replay: stop once every partition reached its end
        self.progress = progress
        self.conn: Any = None
        self.consumer: AIOKafkaConsumer | None = None
        self.tps: list[TopicPartition] = []
        self.topic_kinds: dict[str, LedgerTopic] = {}
        self.positions: dict[TopicPartition, int] = {}
        self.entries_written = 0
        self.records_done = 0
        self.rejected = 0  # records set aside (sinks/intake), since start
        self.lag = metrics.LagTracker("sink-postgres")  # per partition, for /metrics and /readyz
        self.ready = False
        self._dlq_producer: Any = None

    # ------------------------------------------------------------------ database

    async def _connect(self) -> None:
        """Connect, migrate, take the schema's sink lock, prepare the staging table."""
        await self._close_db()
        conn = await connect(self.settings.pg_dsn)
        try:
            await migrate(conn, self.schema)
            waiting_logged = False
            while not await self._lock_partitions(conn):
                if not waiting_logged:
                    log.warning("another postgres sink writes some of partitions %s of schema "
                                "%s; waiting as standby", self._partition_numbers(), self.schema)
                    waiting_logged = True
                await asyncio.sleep(LOCK_POLL_S * random.uniform(1 - LOCK_POLL_JITTER,
                                                                 1 + LOCK_POLL_JITTER))
            await conn.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS entries_stage "
                f"(LIKE {self.q}.entries INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
        except BaseException:
            with contextlib.suppress(Exception):
                conn.terminate()
            raise
        self.conn = conn

    def _partition_numbers(self) -> list[int]:
        return sorted({tp.partition for tp in self.tps})

    async def _lock_partitions(self, conn: Any) -> bool:
        """Take the schema's shared lock and every partition lock, or none of them."""
        keys = [PARTITION_LOCK_TEMPLATE.format(schema=self.schema, partition=p)
                for p in self._partition_numbers()]
        shared = await conn.fetchval("SELECT pg_try_advisory_lock_shared(hashtextextended($1, 0))",
                                     SINK_LOCK_TEMPLATE.format(schema=self.schema))
        taken = await conn.fetchval(
            "SELECT count(*) FROM unnest($1::text[]) k "
            "WHERE pg_try_advisory_lock(hashtextextended(k, 0))", keys)
        if shared and taken == len(keys):
            return True
        await conn.execute("SELECT pg_advisory_unlock_all()")
        return False

    async def _close_db(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.terminate()
            self.conn = None

    async def stored_offsets(self) -> dict[TopicPartition, int]:
        result: dict[TopicPartition, int] = {}
        for row in await self.conn.fetch(f"SELECT topic, partition, next_offset FROM {self.q}.sink_offsets"):
            result[TopicPartition(row["topic"], row["partition"])] = row["next_offset"]
        return result

    async def write(self, batch: Batch) -> int:
        """One transaction: every row of the batch and the offsets after it. Returns entries added."""
        q = self.q
        conn = self.conn
        added = 0
        async with conn.transaction():
            if batch.entries:
                added = await self._write_entries(list(batch.entries.values()))
            if batch.rejects:
                await conn.executemany(
                    f"INSERT INTO {q}.sink_dead_letters (source_topic, source_partition, "
                    "source_offset, reason, detail, payload_size, payload_sha256) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                    [_reject_row(reject) for reject in batch.rejects])
            if batch.batches:
                await conn.executemany(
                    f"INSERT INTO {q}.batches ({', '.join(rows.BATCH_COLUMNS)}) "
                    "VALUES ($1, $2, $3, $4) ON CONFLICT (batch_id) DO NOTHING",
                    list(batch.batches.values()))
            if batch.tree_heads:
                await conn.execute(
                    f"INSERT INTO {q}.tree_heads ({', '.join(rows.TREE_HEAD_COLUMNS)}) "
                    "SELECT * FROM unnest($1::integer[], $2::bigint[], $3::text[], $4::timestamptz[]) "
                    "ON CONFLICT (partition, tree_size) DO NOTHING",
                    *_columns(batch.tree_heads.values(), len(rows.TREE_HEAD_COLUMNS)))
            if batch.receipts:
                await conn.execute(
                    f"INSERT INTO {q}.receipts ({', '.join(rows.RECEIPT_COLUMNS)}) "
                    "SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::boolean[], "
                    "$5::timestamptz[]) ON CONFLICT (entry_id) DO NOTHING",
                    *_columns(batch.receipts.values(), len(rows.RECEIPT_COLUMNS)))
            if batch.anchors:
                await conn.executemany(
                    f"INSERT INTO {q}.anchors ({', '.join(rows.ANCHOR_COLUMNS)}) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING", batch.anchors)
            if batch.offsets:
                await conn.execute(
                    f"INSERT INTO {q}.sink_offsets (topic, partition, next_offset) "
                    "SELECT * FROM unnest($1::text[], $2::integer[], $3::bigint[]) "
                    "ON CONFLICT (topic, partition) DO UPDATE "
                    "SET next_offset = EXCLUDED.next_offset, updated_at = now()",
                    [tp.topic for tp in batch.offsets], [tp.partition for tp in batch.offsets],
                    list(batch.offsets.values()))
        return added

    async def _write_entries(self, entry_rows: list[tuple[Any, ...]]) -> int:
        """Entry rows into `entries` inside the caller's transaction; returns how many were new.

        Almost always none of the rows is stored yet, so they are COPied straight into the
        table, under a savepoint. Only when that hits a unique violation (the worker re-emitted
        an entry after a crash) does the batch go the slower way: COPY into the stage table,
        then INSERT ... ON CONFLICT (entry_id) DO NOTHING, which skips the stored ones. A
        conflict on anything else than entry_id fails there too, as it always did.
        """
        import asyncpg

        conn = self.conn
        try:
            async with conn.transaction():
                status = await conn.copy_records_to_table(
                    "entries", schema_name=self.schema, records=entry_rows,
                    columns=rows.ENTRY_COLUMNS)
            return int(status.rsplit(" ", 1)[-1])
        except asyncpg.UniqueViolationError:
            log.info("some of %d entries are stored already; inserting the others",
                     len(entry_rows))
        await conn.copy_records_to_table("entries_stage", records=entry_rows,
                                         columns=rows.ENTRY_COLUMNS)
        columns = ", ".join(rows.ENTRY_COLUMNS)
        status = await conn.execute(
            f"INSERT INTO {self.q}.entries ({columns}) SELECT {columns} FROM entries_stage "
            "ON CONFLICT (entry_id) DO NOTHING")
        return int(status.rsplit(" ", 1)[-1])

    # ------------------------------------------------------------------ Kafka

    async def _open_consumer(self) -> None:
        self.consumer = kafka.consumer(self.settings)
        try:
            await self.consumer.start()
        except KafkaError as exc:
            raise kafka.kafka_error("starting the Kafka consumer", exc) from exc
        for topic_name, required in SOURCE_TOPICS:
            topic = self.settings.topic(topic_name)
            found = await kafka.partitions_of(self.consumer, topic, required=required,
                                              timeout_s=kafka.METADATA_TIMEOUT_S if required else 2.0)
            mine = self.shard.select(found)
            if required and not mine:
                raise SinkError(f"shard {self.shard} owns no partition of {topic} "
                                f"({len(found)} partitions)", retriable=False)
            self.tps += mine
            self.topic_kinds[topic] = topic_name
        self.consumer.assign(self.tps)

    async def _seek_to_stored(self) -> None:
        """Position every partition at its stored next offset (replay: at its start offset)."""
        assert self.consumer is not None
        stored = await self.stored_offsets()
        starts: Mapping[TopicPartition, int] = {}
        if not stored and self.start is not None:
            starts = await self.start(self.consumer, self.tps)
        beginnings = await self.consumer.beginning_offsets(self.tps)
        for tp in self.tps:
            offset = stored.get(tp, starts.get(tp, beginnings[tp]))
            self.consumer.seek(tp, offset)
            self.positions[tp] = offset

    # ------------------------------------------------------------------ the loop

    async def run(self, stop: asyncio.Event | None = None) -> int:
        """Sink until `stop` is set (or, for a replay, until the end). Returns entries written."""
        stop = stop or asyncio.Event()
        await self.wire.start((LedgerTopic.SINK_DLQ,))
        await self._open_consumer()
        assert self.consumer is not None
        try:
            await self._reconnect(stop)
            ends: dict[TopicPartition, int] = {}
            if self.stop_at_end:
                ends = await self.consumer.end_offsets(self.tps)
            total = sum(max(0, ends[tp] - self.positions[tp]) for tp in ends)
            print(READY_MESSAGE, flush=True)
            self.ready = True
            log.info("%s: consuming %d partitions (shard %s) into schema %s", READY_MESSAGE,
                     len(self.tps), self.shard, self.schema)
            last_report = time.monotonic()
            written_at_report = 0
            # The previous batch's transaction, in flight while the next poll is decoded: the
            # database and the decoding overlap, and transactions still commit one at a time,
            # in order, each with exactly the offsets of its own rows.
            in_flight: asyncio.Task[bool] | None = None
            try:
                while not stop.is_set():
                    at_end = self.stop_at_end and await self._reached(ends)
                    if at_end and in_flight is None:
                        break
                    messages: Mapping[TopicPartition, list[Any]] = {}
                    if not at_end:
                        try:
                            messages = await self.consumer.getmany(timeout_ms=POLL_TIMEOUT_MS,
                                                                   max_records=BATCH_RECORDS_MAX)
                        except KafkaError as exc:
                            log.warning("Kafka fetch failed (%r); retrying", exc)
                            await asyncio.sleep(RETRY_BACKOFF_INITIAL_S)
                    batch = None
                    if messages:
                        # Confluent schema ids not seen yet: fetched (waiting for the registry)
                        await self.wire.learn_retrying(
                            [m.value for batch_of_tp in messages.values() for m in batch_of_tp], stop)
                        batch = await build_batch_yielding(messages, self.topic_kinds, self.codec,
                                                           self.currencies)
                    if in_flight is not None:
                        written = await in_flight
                        in_flight = None
                        if not written:
                            # Back to the stored offsets: the poll decoded meanwhile is dropped
                            # and fetched again, after whatever the failed batch did or did not
                            # commit.
                            await self._reconnect(stop)
                            continue
                    if batch is not None:
                        in_flight = asyncio.create_task(self._write_batch(batch, total))
                    await self.lag.refresh(self.consumer, self.tps)
                    now = time.monotonic()
                    if now - last_report >= REPORT_EVERY_S:
                        rate = (self.entries_written - written_at_report) / (now - last_report)
                        positions = {tp: await self.consumer.position(tp) for tp in self.tps}
                        log.info("sink postgres: %d entries written (%.0f/s), lag %d records, "
                                 "%d set aside", self.entries_written, rate,
                                 kafka.lag(self.consumer, positions), self.rejected)
                        last_report, written_at_report = now, self.entries_written
                if in_flight is not None:
                    # Stopping: let the last transaction finish (or fail: the next start resumes
                    # from the stored offsets either way).
                    await in_flight
            finally:
                if in_flight is not None and not in_flight.done():
                    in_flight.cancel()
                    with contextlib.suppress(BaseException):
                        await in_flight
        finally:
            await self._close_db()
            with contextlib.suppress(Exception):
                await self.consumer.stop()
            if self._dlq_producer is not None:
                with contextlib.suppress(Exception):
                    await self._dlq_producer.stop()
        return self.entries_written

    async def _reached(self, ends: Mapping[TopicPartition, int]) -> bool:
        assert self.consumer is not None
        for tp, end in ends.items():
            if await self.consumer.position(tp) < end:
                return False
        return True

    async def _write_batch(self, batch: Batch, total: int) -> bool:
        """Write a batch; False after a database error that a reconnect can cure.

        The caller then reconnects and resumes from the stored offsets: when the error hit
        during COMMIT nobody knows whether the batch committed; the stored offsets say, so the
        batch is never written twice and never lost.
        """
        try:
            await self._publish_rejects(batch.rejects)
            added = await self.write(batch)
        except Exception as exc:
            if not is_retriable(exc) and not self.conn.is_closed():
                raise SinkError(f"writing to PostgreSQL schema {self.schema}: {exc!r}") from exc
            log.warning("PostgreSQL write failed (%r); reconnecting and resuming from the "
                        "stored offsets", exc)
            return False
        self.entries_written += added
        self.rejected += len(batch.rejects)
        metrics.sink_wrote("postgres", added, batch.rejects, batch.anchors)
        self.positions.update(batch.offsets)
        self.records_done += batch.records
        if self.progress is not None and total:
            self.progress(min(self.records_done, total), total)
        return True

    async def _publish_rejects(self, rejects: Sequence[SinkReject]) -> None:
        """Put the batch's set-aside records on ledger.sink-dlq before its transaction commits
        (a crash in between repeats them, keyed by their source position: harmless)."""
        if not rejects:
            return
        from aiokafka import AIOKafkaProducer

        try:
            if self._dlq_producer is None:
                producer = AIOKafkaProducer(**self.settings.kafka_connection(),
                                            enable_idempotence=True, acks="all")
                await producer.start()
                self._dlq_producer = producer
            now_ms = time.time_ns() // 1_000_000
            for reject in rejects:
                await self._dlq_producer.send_and_wait(
                    self.settings.topic(LedgerTopic.SINK_DLQ),
                    self.codec.encode("DeadLetter", reject.dead_letter("postgres", now_ms)),
                    key=f"{reject.topic}:{reject.partition}:{reject.offset}".encode())
        except KafkaError as exc:
            raise SinkUnavailable(f"publishing to {LedgerTopic.SINK_DLQ}: {exc!r}") from exc

    async def _reconnect(self, stop: asyncio.Event) -> None:
        """Connect with backoff until it works, then seek to the stored offsets."""
        delay = RETRY_BACKOFF_INITIAL_S
        while not stop.is_set():
            try:
                await self._connect()
                await self._seek_to_stored()
                return
            except Exception as exc:
                if not is_retriable(exc):
                    raise
                log.warning("PostgreSQL unavailable (%r); sink is behind, retrying in %.1fs",
                            exc, delay)
                await self._close_db()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_BACKOFF_MAX_S)


def _reject_row(reject: SinkReject) -> tuple[Any, ...]:
    dead = reject.dead_letter("postgres", 0)
    return (reject.topic, reject.partition, reject.offset, dead["reason"], dead["detail"],
            dead["payload_size"], dead["payload_sha256"])


def _columns(values: Any, width: int) -> list[list[Any]]:
    """Rows as per-column lists, for INSERT ... SELECT FROM unnest(...)."""
    columns: list[list[Any]] = [[] for _ in range(width)]
    for row in values:
        for i, value in enumerate(row):
            columns[i].append(value)
    return columns


async def run_postgres_sink(settings: Settings, schema: str,
                            shard: Shard = ALL_PARTITIONS) -> int:
    """`sardis-ledger sink postgres`: run until SIGTERM/SIGINT."""
    from sardis_ledger.streams.health import lag_readiness, serve
    from sardis_ledger.streams.shutdown import stop_on_signals

    stop = stop_on_signals("sink postgres")
    sink = PostgresSink(settings, schema, shard=shard)
    serve("sink-postgres").ready_when(
        lag_readiness(lambda: sink.ready, lambda: sink.lag.behind, "sink postgres"))
    return await sink.run(stop)
