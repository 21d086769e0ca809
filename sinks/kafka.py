"""Kafka plumbing shared by the sinks: a read_committed consumer of ledger topics, positions, lag."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from sardis_ledger.sinks.errors import SinkError, SinkUnavailable
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.core import EPOCH, ONE_MS

METADATA_TIMEOUT_S = 30.0
METADATA_RETRY_S = 0.2
REQUEST_TIMEOUT_MS = 30_000
FETCH_MAX_BYTES = 64 * 1024 * 1024
PARTITION_FETCH_MAX_BYTES = 4 * 1024 * 1024
SHARDS_MAX = 64  # more sink processes than this is a typo, not a deployment

log = logging.getLogger("sardis.sinks")


@dataclass(frozen=True, slots=True)
class Shard:
    """One of `count` sink processes of a kind: it takes partition p of every source topic
    when p % count == index. Partitions are the unit of order, so shards never share one."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.count <= SHARDS_MAX or not 0 <= self.index < self.count:
            raise SinkError(f"shard {self.index}/{self.count}: need 0 <= I < N <= {SHARDS_MAX}",
                            retriable=False)

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`I/N` as `--shard` takes it."""
        index, sep, count = text.partition("/")
        if not sep or not index.strip().isdigit() or not count.strip().isdigit():
            raise SinkError(f"--shard {text!r}: expected I/N, e.g. 0/2", retriable=False)
        return cls(int(index), int(count))

    def owns(self, partition: int) -> bool:
        return partition % self.count == self.index

    def select(self, tps: Sequence[TopicPartition]) -> list[TopicPartition]:
        return [tp for tp in tps if self.owns(tp.partition)]

    @property
    def suffix(self) -> str:
        """Appended to per-process names (transactional ids); empty for the single sink."""
        return "" if self.count == 1 else f"-{self.index}of{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


ALL_PARTITIONS = Shard()


def consumer(settings: Settings, *, group_id: str | None = None) -> AIOKafkaConsumer:
    """A read_committed consumer for manual assignment (positions come from the sink's store)."""
    return AIOKafkaConsumer(
        **settings.kafka_connection(), group_id=group_id,
        isolation_level="read_committed", enable_auto_commit=False, auto_offset_reset="earliest",
        request_timeout_ms=REQUEST_TIMEOUT_MS, fetch_max_bytes=FETCH_MAX_BYTES,
        max_partition_fetch_bytes=PARTITION_FETCH_MAX_BYTES)


async def partitions_of(client: AIOKafkaConsumer, topic: str, *, required: bool = True,
                        timeout_s: float = METADATA_TIMEOUT_S) -> list[TopicPartition]:
    """The topic's partitions; [] for a missing optional topic, SinkError for a required one."""
    deadline = time.monotonic() + timeout_s
    while True:
        partitions = client.partitions_for_topic(topic)
        if partitions:
            return [TopicPartition(topic, p) for p in sorted(partitions)]
        if time.monotonic() > deadline:
            if required:
                raise SinkError(f"topic {topic} does not exist: run `sardis-ledger topics create`")
            log.warning("topic %s does not exist; not consuming it", topic)
            return []
        try:
            await client._client.force_metadata_update()
        except KafkaError as exc:
            raise SinkUnavailable(f"Kafka metadata for {topic}: {exc!r}") from exc
        await asyncio.sleep(METADATA_RETRY_S)


def parse_from_offsets(values: Iterable[str]) -> dict[int, int]:
    """`P:O` strings (as `consume --from-offset` takes them) as {partition: offset}."""
    offsets: dict[int, int] = {}
    for value in values:
        partition, sep, offset = value.partition(":")
        if not sep or not partition.isdigit() or not offset.isdigit():
            raise SinkError(f"--from-offset {value!r}: use PARTITION:OFFSET, e.g. 3:1200")
        offsets[int(partition)] = int(offset)
    return offsets


def parse_time(value: str) -> datetime:
    """An ISO-8601 time; a time without a zone is UTC."""
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise SinkError(f"{value!r} is not an ISO-8601 time such as 2026-01-31T12:00:00Z") from exc
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


async def start_offsets(client: AIOKafkaConsumer, tps: list[TopicPartition], *,
                        from_offset: Mapping[int, int] | None = None,
                        from_time: datetime | None = None) -> dict[TopicPartition, int]:
    """Where a replay starts: given offsets (others at the beginning), a time, or the beginning."""
    beginnings = await client.beginning_offsets(tps)
    if from_time is not None:
        at_ms = (from_time - EPOCH) // ONE_MS
        found = await client.offsets_for_times({tp: at_ms for tp in tps})
        ends = await client.end_offsets(tps)
        return {tp: (hit.offset if (hit := found.get(tp)) is not None else ends[tp]) for tp in tps}
    offsets = dict(from_offset or {})
    return {tp: max(offsets.get(tp.partition, beginnings[tp]), beginnings[tp]) for tp in tps}


def lag(client: AIOKafkaConsumer, positions: Mapping[TopicPartition, int]) -> int:
    """Records between each position and the partition's last known high watermark."""
    total = 0
    for tp, position in positions.items():
        high = client.highwater(tp)
        if high is not None:
            total += max(0, high - position)
    return total


def kafka_error(what: str, exc: KafkaError) -> SinkError:
    return SinkError(f"{what}: {exc!r}", retriable=bool(getattr(exc, "retriable", False)))


def record_time(value: Any) -> datetime:
    """A timestamp-millis field as an aware datetime (records decode it as one already)."""
    if isinstance(value, datetime):
        return value
    return EPOCH + timedelta(milliseconds=int(value))
