"""Helpers for integration tests: raw command producers and topic readers."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from sardis_ledger.schemas.codec import AvroCodec
from sardis_ledger.streams import canonical, core, merkle, records
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.errors import CodecError
from sardis_ledger.streams.money import currency_table
from sardis_ledger.streams.worker_process import ChildProcess

FETCH_MAX = 5000
CURRENCIES = currency_table()


class RawProducer:
    """Produces already-encoded values to ledger.commands at the owner partition (or a given one)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.codec = AvroCodec()
        self.producer = AIOKafkaProducer(**settings.kafka_connection(),
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

    async def post_entries_paced(self, records: list[dict[str, Any]], chunk: int,
                                 pause_s: float) -> None:
        """Post commands in chunks with a pause after each: they stream in over time, so a crash
        loop's kills land mid-stream."""
        for i, record in enumerate(records):
            await self.post_entry(record)
            if i % chunk == chunk - 1:
                await self.flush()
                await asyncio.sleep(pause_s)
        await self.flush()

    async def raw(self, value: bytes, key: bytes, partition: int) -> None:
        await self.producer.send(self.settings.topic("ledger.commands"), value, key=key,
                                 partition=partition)

    async def send(self, topic: str, record_name: str, record: dict[str, Any], key: str) -> None:
        """Encode and produce any record to any ledger topic, at the key's default partition."""
        await self.producer.send(self.settings.topic(topic), self.codec.encode(record_name, record),
                                 key=key.encode(),
                                 partition=core.partition_for(key, self.settings.partitions))

    async def flush(self) -> None:
        await self.producer.flush()


Row = tuple[int, int, Any, dict[str, Any]]  # partition, offset, key, decoded record


async def read_topic(settings: Settings, name: str, *, until: Any = None,
                     timeout_s: float = 120.0, idle_s: float | None = None,
                     timestamps_ms: list[int] | None = None) -> list[Row]:
    """All committed records of a topic as (partition, offset, key, decoded record), in order.

    Stops when `until(records)` is true, after `idle_s` without a new record, or at the timeout
    (then raises TimeoutError, so a test never passes on a partial read). `timestamps_ms`, when
    given, receives each record's Kafka timestamp, index for index.
    """
    codec = AvroCodec()
    topic = settings.topic(name)
    consumer = AIOKafkaConsumer(**settings.kafka_connection(),
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
                    if timestamps_ms is not None:
                        timestamps_ms.append(message.timestamp)
                    last_new = time.monotonic()
    finally:
        await consumer.stop()


def check_merkle_logs(entries: list[dict[str, Any]], tree_heads: list[dict[str, Any]]) -> None:
    """Each partition of ledger.entries is an RFC 6962 log: recompute hashes, roots, tree heads."""
    per_partition: dict[int, dict[int, core.Entry]] = defaultdict(dict)
    for wire in entries:
        entry = records.entry_from_wire(wire, CURRENCIES)
        existing = per_partition[entry.partition].get(entry.leaf_index)
        assert existing is None or existing == entry, "two entries at one leaf index"
        per_partition[entry.partition][entry.leaf_index] = entry
    roots: dict[int, list[bytes]] = {}
    for partition, leaves in per_partition.items():
        assert sorted(leaves) == list(range(len(leaves))), f"gap in leaf indexes of {partition}"
        frontier = merkle.MerkleFrontier()
        roots[partition] = []
        for index in range(len(leaves)):
            entry = leaves[index]
            data = canonical.entry_bytes(entry)
            assert canonical.entry_hash(data) == entry.entry_hash
            frontier = frontier.append(merkle.leaf_hash(data))
            assert frontier.root() == entry.merkle_root
            roots[partition].append(entry.merkle_root)
    for head in tree_heads:
        size = head["tree_size"]
        assert roots[head["partition"]][size - 1].hex() == head["root_hash"]


class CrashLoop:
    """Kills a child process with kill -9 after a random pause and starts it again, over and
    over, until `stop` is set or it has killed it `kills_max` times."""

    def __init__(self, process: ChildProcess, rng: random.Random, pause_s: tuple[float, float],
                 kills_max: int | None = None) -> None:
        self.process = process
        self.rng = rng
        self.pause_s = pause_s
        self.kills_max = kills_max
        self.kills = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        while not self.stop.is_set() and (self.kills_max is None or self.kills < self.kills_max):
            await asyncio.sleep(self.rng.uniform(*self.pause_s))
            self.process.kill9()
            self.kills += 1
            await asyncio.to_thread(self.process.start)
