"""Helpers for integration tests: raw command producers and topic readers."""

from __future__ import annotations

import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas.codec import AvroCodec
from streams import core
from streams.config import Settings
from streams.errors import CodecError

FETCH_MAX = 5000


class RawProducer:
    """Produces already-encoded values to ledger.commands at the owner partition (or a given one)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.codec = AvroCodec()
        self.producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap,
                                         enable_idempotence=True, acks="all", linger_ms=5)

    async def __aenter__(self) -> RawProducer:
        await self.producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.stop()

    async def post_entry(self, record: dict[str, Any]) -> None:
        account_id = record["account_id"]
        await self.raw(self.codec.encode("PostEntry", record), account_id.encode(),
                       core.partition_for(account_id, self.settings.partitions))

    async def raw(self, value: bytes, key: bytes, partition: int) -> None:
        await self.producer.send(self.settings.topic("ledger.commands"), value, key=key,
                                 partition=partition)

    async def flush(self) -> None:
        await self.producer.flush()


Row = tuple[int, int, Any, dict[str, Any]]  # partition, offset, key, decoded record


async def read_topic(settings: Settings, name: str, *, until: Any = None,
                     timeout_s: float = 120.0, idle_s: float | None = None) -> list[Row]:
    """All committed records of a topic as (partition, offset, key, decoded record), in order.

    Stops when `until(records)` is true, after `idle_s` without a new record, or at the timeout
    (then raises TimeoutError, so a test never passes on a partial read).
    """
    codec = AvroCodec()
    topic = settings.topic(name)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                                isolation_level="read_committed", enable_auto_commit=False)
    await consumer.start()
    out: list[Row] = []
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        last_new = time.monotonic()
        while True:
            if until is not None and until(out):
                return out
            if idle_s is not None and time.monotonic() - last_new > idle_s:
                return out
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic}: {len(out)} records after {timeout_s}s")
            batches = await consumer.getmany(timeout_ms=300, max_records=FETCH_MAX)
            for tp, messages in batches.items():
                for message in messages:
                    try:
                        decoded = codec.decode(message.value)[1]
                    except CodecError as exc:
                        decoded = {"__undecodable__": str(exc)}
                    out.append((tp.partition, message.offset, message.key, decoded))
                    last_new = time.monotonic()
    finally:
        await consumer.stop()


