"""Records an operator set aside after a worker stopped on them, and the set a worker skips.

A worker stops (exit 70) when deciding a record raises: that is a bug or corrupt state, never
bad input, which is rejected as data. Its partition cannot go on past that record until someone
looks. `sardis-ledger quarantine TOPIC:PARTITION:OFFSET` then moves that one record aside: in
one Kafka transaction it writes a DeadLetter (reason `quarantined`) to ledger.dlq and the same
record to the compacted ledger.internal.quarantine topic, keyed TOPIC:PARTITION:OFFSET. A worker
reads that topic before it decides anything and again on every catch-up check, and skips a
quarantined record instead of deciding it (answering a readable client command with a rejected
result). Running the command twice changes nothing the second time.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from sardis_ledger.schemas.codec import AvroCodec
from sardis_ledger.streams import core, records
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.errors import CodecError, LedgerError
from sardis_ledger.streams.topics import LedgerTopic
from sardis_ledger.streams.wire import Wire

QUARANTINE_READ_TIMEOUT_S = 60.0
QUARANTINE_FETCH_TIMEOUT_MS = 200
QUARANTINE_FETCH_RECORDS_MAX = 1000
QUARANTINE_NOTE_LENGTH_MAX = 256
REQUEST_TIMEOUT_MS = 30_000


class QuarantineError(LedgerError):
    """A record could not be quarantined (no such record, Kafka unreachable)."""


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """One record of one input topic: the full topic name (prefix included), partition, offset."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"

    @classmethod
    def parse(cls, text: str) -> Position:
        """TOPIC:PARTITION:OFFSET (Kafka topic names cannot hold ':')."""
        topic, sep1, rest = text.partition(":")
        partition, sep2, offset = rest.partition(":")
        if not (topic and sep1 and sep2 and partition.isdigit() and offset.isdigit()):
            raise QuarantineError(f"{text!r} is not TOPIC:PARTITION:OFFSET, e.g. "
                                  "ledger.commands:3:1200")
        return cls(topic, int(partition), int(offset))


class QuarantineReader:
    """The quarantined positions, read incrementally from ledger.internal.quarantine."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topic(LedgerTopic.QUARANTINE)
        self.positions: set[Position] = set()

    async def refresh(self) -> set[Position]:
        """Read every quarantine record committed so far; returns all positions known.

        A consumer only for the read: a consumer left assigned keeps fetching (every
        fetch_max_wait_ms) on the worker's event loop. The topic is compacted and small, so each
        refresh reads it from the start.
        """
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(**self.settings.kafka_connection(),
                                    isolation_level="read_committed", enable_auto_commit=False,
                                    fetch_max_wait_ms=10, request_timeout_ms=REQUEST_TIMEOUT_MS)
        await consumer.start()
        try:
            if self.topic not in await consumer.topics():
                return self.positions  # no quarantine topic yet: nothing was quarantined
            # Every ledger topic has SARDIS_PARTITIONS partitions (topics create checks it).
            tps = [TopicPartition(self.topic, p) for p in range(self.settings.partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            deadline = time.monotonic() + QUARANTINE_READ_TIMEOUT_S
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                if time.monotonic() > deadline:
                    raise QuarantineError(f"could not read {self.topic} to its end within "
                                          f"{QUARANTINE_READ_TIMEOUT_S:.0f}s", retriable=True)
                batch = await consumer.getmany(timeout_ms=QUARANTINE_FETCH_TIMEOUT_MS,
                                               max_records=QUARANTINE_FETCH_RECORDS_MAX)
                for messages in batch.values():
                    for message in messages:
                        if message.key:
                            self.positions.add(Position.parse(message.key.decode()))
            return self.positions
        finally:
            await consumer.stop()

    async def close(self) -> None:
        """Nothing stays open between refreshes (kept for the worker's uniform shutdown)."""


async def _read_record(settings: Settings, position: Position) -> Any:
    """The committed record at `position`, or QuarantineError."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(**settings.kafka_connection(),
                                isolation_level="read_committed", enable_auto_commit=False,
                                request_timeout_ms=REQUEST_TIMEOUT_MS)
    await consumer.start()
    try:
        tp = TopicPartition(position.topic, position.partition)
        if position.topic not in await consumer.topics():
            raise QuarantineError(f"there is no topic {position.topic}")
        if position.partition >= settings.partitions:
            raise QuarantineError(f"{position.topic} has no partition {position.partition} "
                                  f"(SARDIS_PARTITIONS is {settings.partitions})")
        end = (await consumer.end_offsets([tp]))[tp]
        if position.offset >= end:
            raise QuarantineError(f"{position}: the partition ends at offset {end}")
        consumer.assign([tp])
        consumer.seek(tp, position.offset)
        deadline = time.monotonic() + QUARANTINE_READ_TIMEOUT_S
        while await consumer.position(tp) <= position.offset:
            if time.monotonic() > deadline:
                raise QuarantineError(f"could not read {position} within "
                                      f"{QUARANTINE_READ_TIMEOUT_S:.0f}s", retriable=True)
            batch = await consumer.getmany(tp, timeout_ms=QUARANTINE_FETCH_TIMEOUT_MS)
            for message in batch.get(tp, []):
                if message.offset == position.offset:
                    return message
        raise QuarantineError(f"{position} holds no committed record (a transaction marker or "
                              "an aborted record): there is nothing to set aside")
    finally:
        await consumer.stop()


def _command_id(codec: AvroCodec, value: bytes | None) -> str | None:
    try:
        _, record = codec.decode(value)
    except CodecError:
        return None
    command_id = record.get("command_id") or record.get("batch_id")
    return command_id if core.valid_id(command_id) else None


async def quarantine(settings: Settings, position: Position, note: str) -> str:
    """Set the record at `position` aside (idempotently); returns what was done, for people."""
    from aiokafka import AIOKafkaProducer

    reader = QuarantineReader(settings)
    try:
        if position in await reader.refresh():
            return f"{position} is already quarantined; nothing to do"
    finally:
        await reader.close()
    message = await _read_record(settings, position)
    wire = Wire(settings)
    await wire.start((LedgerTopic.DLQ, LedgerTopic.QUARANTINE))
    codec = wire.codec
    value = message.value or b""
    await wire.learn([value])  # the record's Confluent schema id, for its command_id
    dead = codec.encode("DeadLetter", records.dead_letter(
        reason=core.Reason.QUARANTINED, detail=core.bounded(note or "set aside by an operator"),
        topic=position.topic, partition=position.partition, offset=position.offset,
        key=message.key, payload=value, command_id=_command_id(codec, value),
        failed_at_ms=time.time_ns() // 1_000_000))
    producer = AIOKafkaProducer(**settings.kafka_connection(),
                                transactional_id=f"{settings.topic_prefix}sardis-quarantine",
                                request_timeout_ms=REQUEST_TIMEOUT_MS)
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send(settings.topic(LedgerTopic.DLQ), dead, key=message.key,
                                partition=position.partition)
            await producer.send(settings.topic(LedgerTopic.QUARANTINE), dead,
                                key=str(position).encode(),
                                partition=core.partition_for(str(position), settings.partitions))
    finally:
        await producer.stop()
    return (f"{position} quarantined: a DeadLetter (reason quarantined) is on "
            f"{settings.topic(LedgerTopic.DLQ)}; a worker skips the record when it meets it "
            "(restart a stopped worker)")


def run_quarantine(settings: Settings, text: str, note: str) -> str:
    return asyncio.run(quarantine(settings, Position.parse(text), note[:QUARANTINE_NOTE_LENGTH_MAX]))
