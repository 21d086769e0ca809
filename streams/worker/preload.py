"""Changelog preload: a worker reads its tables' changelogs in bulk when it takes partitions, so
Faust's per-record recovery replays only what the preload did not reach (usually nothing).

Why: Faust's recovery hands each changelog record through its queue, an event object and a
per-record bookkeeping pass (~7,500 records/s on this machine: 1,000,000 accounts took 262 s to
recover). One read_committed consumer with large fetches applies records straight into the
memory stores' dicts. Correctness does not depend on the preload finishing: what it applied is
a prefix of each changelog partition, in order, and the store reports the offset of that prefix
as its persisted offset; Faust's recovery then seeks there and replays the rest as before.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, TopicPartition

from sardis_ledger.streams.config import Settings

log = logging.getLogger(__name__)

# One fetch brings up to this much (all partitions) and per partition: big reads are the point.
PRELOAD_FETCH_MAX_BYTES: Final = 64 * 2**20
PRELOAD_PARTITION_FETCH_MAX_BYTES: Final = 8 * 2**20
PRELOAD_POLL_RECORDS_MAX: Final = 50_000
PRELOAD_POLL_TIMEOUT_MS: Final = 500
# After this long (or this many polls in a row that bring nothing) the preload stops where it is
# and Faust's recovery reads the rest: the preload runs inside Faust's rebalance callback, so it
# must not hold a rebalance for ever.
PRELOAD_DEADLINE_S: Final = 240.0
PRELOAD_IDLE_POLLS_MAX: Final = 20
PRELOAD_PROGRESS_INTERVAL_S: Final = 5.0
PRELOAD_REQUEST_TIMEOUT_MS: Final = 30_000
# How long the preload waits for transactions in flight on the partitions it reads to settle
# (their markers written), and how often it looks. A commit's markers take milliseconds. A
# transaction still open after this is most likely a killed worker's, which Kafka aborts after
# its timeout (60 s): its records are not committed, so reading to the last stable offset is
# right, and waiting longer would only delay the failover.
PRELOAD_SETTLE_S: Final = 3.0
PRELOAD_SETTLE_POLL_S: Final = 0.05


@dataclass
class Target:
    """One table's memory store, as the preload sees it."""

    data: MutableMapping[bytes, Any]
    key_partition: MutableMapping[bytes, int]


def apply_records(target: Target, partition: int,
                  records: Iterable[tuple[bytes | None, bytes | None]]) -> int:
    """Apply changelog records (key, value) in order, as Faust's memory store applies a recovery
    batch: a value of None deletes the key. Keys that are None (never written by the worker) are
    skipped. Returns the number of records applied."""
    data, key_partition = target.data, target.key_partition
    applied = 0
    for key, value in records:
        if key is None:
            continue
        if value is None:
            data.pop(key, None)
            key_partition.pop(key, None)
        else:
            data[key] = value
            key_partition[key] = partition
        applied += 1
    return applied


def drop_partitions(target: Target, partitions: Collection[int]) -> int:
    """Remove the keys of `partitions` (about to be read again from the start). Returns how many."""
    stale = [key for key, partition in target.key_partition.items() if partition in partitions]
    for key in stale:
        target.data.pop(key, None)
        target.key_partition.pop(key, None)
    return len(stale)


@dataclass
class PreloadReport:
    """Offsets reached (last offset applied, per changelog partition) and what it took."""

    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    records: int = 0
    complete: bool = True
    seconds: float = 0.0


class ChangelogPreloader:
    """Reads every changelog partition a worker owns after a rebalance into its tables' memory
    stores, once per rebalance (every table's store asks; the first ask reads for all of them in
    one consumer)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._targets: dict[str, Target] = {}
        self._generation: int | None = None
        self._offsets: dict[tuple[str, int], int] = {}
        self._lock = asyncio.Lock()

    def register(self, topic: str, target: Target) -> None:
        self._targets[topic] = target

    def persisted_offset(self, topic: str, partition: int) -> int | None:
        """The last offset the preload applied for a partition it read in this rebalance, or None
        (then Faust's recovery reads the partition from its start)."""
        return self._offsets.get((topic, partition))

    async def on_rebalance(self, generation_id: int, actives: Iterable[tuple[str, int]]) -> None:
        """Read the changelog partitions that are active here now, kept ones included.

        Faust's rebalances revoke everything, so its recovery replays a kept partition's
        changelog from the start too, one event at a time, and then waits two idle 5 s polls
        before it takes the transaction marker that ends every changelog for read (recovery
        took >= 10 s after every rebalance: tests/integration/test_rebalance.py). Read again
        here, a kept partition's state is its committed changelog, whatever the worker decided
        before the rebalance, and Faust's recovery has nothing left to read."""
        async with self._lock:
            if generation_id == self._generation:
                return
            self._generation = generation_id
            owned = {(topic, partition) for topic, partition in actives if topic in self._targets}
            self._offsets = {}
            if not owned:
                return
            for topic, target in self._targets.items():
                partitions = {p for t, p in owned if t == topic}
                if partitions:  # dropping scans every key of the table
                    drop_partitions(target, partitions)
            report = await self._read(sorted(owned))
            self._offsets = report.offsets
            log.info("changelog preload: %d records from %d partitions in %.1f s%s", report.records,
                     len(owned), report.seconds, "" if report.complete else
                     " (incomplete: Faust's recovery reads the rest)")

    async def _read(self, wanted: list[tuple[str, int]]) -> PreloadReport:
        report = PreloadReport()
        started = time.monotonic()
        consumer = AIOKafkaConsumer(**self._settings.kafka_connection(),
                                    isolation_level="read_committed",
                                    enable_auto_commit=False, auto_offset_reset="earliest",
                                    fetch_max_bytes=PRELOAD_FETCH_MAX_BYTES,
                                    max_partition_fetch_bytes=PRELOAD_PARTITION_FETCH_MAX_BYTES,
                                    request_timeout_ms=PRELOAD_REQUEST_TIMEOUT_MS)
        # Only lists high watermarks (read_uncommitted ends), for _settled_ends.
        watermarks = AIOKafkaConsumer(**self._settings.kafka_connection(),
                                      isolation_level="read_uncommitted",
                                      enable_auto_commit=False,
                                      request_timeout_ms=PRELOAD_REQUEST_TIMEOUT_MS)
        try:
            await consumer.start()
            await watermarks.start()
            tps = [TopicPartition(t, p) for t, p in wanted]
            # Assigned first: an unassigned consumer's end_offsets waited ~0.6 s each for the
            # topics' metadata (preloads took 1.2 s instead of 0.1 s).
            consumer.assign(tps)
            watermarks.assign(tps)
            await self._read_with(consumer, tps, await _settled_ends(consumer, watermarks, tps),
                                  report)
        except Exception:  # an accelerator only: Faust's recovery reads whatever is left
            report.complete = False
            log.warning("changelog preload stopped early; Faust's recovery reads the rest",
                        exc_info=True)
        finally:
            for client in (consumer, watermarks):
                try:
                    await client.stop()
                except Exception:  # closing a failed consumer must not hide the preload's result
                    log.warning("closing a changelog preload consumer", exc_info=True)
        report.seconds = time.monotonic() - started
        return report

    async def _read_with(self, consumer: AIOKafkaConsumer, tps: list[TopicPartition],
                         ends: dict[TopicPartition, int], report: PreloadReport) -> None:
        starts = await consumer.beginning_offsets(tps)
        remaining = {tp for tp in tps if (ends.get(tp) or 0) > (starts.get(tp) or 0)}
        total = sum(ends[tp] - starts[tp] for tp in remaining)
        await consumer.seek_to_beginning(*remaining)
        deadline = time.monotonic() + PRELOAD_DEADLINE_S
        next_progress = time.monotonic() + PRELOAD_PROGRESS_INTERVAL_S
        idle_polls = 0
        while remaining:
            if time.monotonic() > deadline or idle_polls >= PRELOAD_IDLE_POLLS_MAX:
                report.complete = False
                return
            batches = await consumer.getmany(*remaining, timeout_ms=PRELOAD_POLL_TIMEOUT_MS,
                                             max_records=PRELOAD_POLL_RECORDS_MAX)
            idle_polls = 0 if batches else idle_polls + 1
            for tp, records in batches.items():
                report.records += apply_records(self._targets[tp.topic], tp.partition,
                                                ((r.key, r.value) for r in records))
                report.offsets[(tp.topic, tp.partition)] = records[-1].offset
            for tp in list(remaining):
                position = await consumer.position(tp)
                if position >= ends[tp]:
                    # Past the last stable offset: trailing transaction markers included, so the
                    # offset matches the high water Faust computes and it replays nothing.
                    report.offsets[(tp.topic, tp.partition)] = position - 1
                    remaining.discard(tp)
                    consumer.pause(tp)
            if time.monotonic() >= next_progress:
                next_progress = time.monotonic() + PRELOAD_PROGRESS_INTERVAL_S
                log.info("changelog preload: %d of about %d records", report.records, total)


async def _settled_ends(stable: AIOKafkaConsumer, watermarks: AIOKafkaConsumer,
                        tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    """The partitions' last stable offsets once no transaction is in flight on them (the last
    stable offset equals the high watermark), waiting at most PRELOAD_SETTLE_S.

    Why: a transaction's markers are written after its EndTxn returns, and on a cluster a
    changelog's marker can land after the group's offsets are stable. A last stable offset read
    before it stops short of that commit's records: the worker's own commit at the rebalance's
    start, or the previous owner's last one. The tables would lack them. Reading the stable ends
    before the watermarks errs towards waiting: a marker landing in between makes one more
    round."""
    deadline = time.monotonic() + PRELOAD_SETTLE_S
    while True:
        ends = await stable.end_offsets(tps)  # read_committed: the last stable offsets
        highs = await watermarks.end_offsets(tps)
        unsettled = sorted(f"{tp.topic}:{tp.partition}" for tp in tps if ends[tp] < highs[tp])
        if not unsettled:
            return dict(ends)
        if time.monotonic() >= deadline:
            log.warning("changelog preload: a transaction is still open on %s after %.0f s; "
                        "reading to the last stable offsets, as Faust's recovery would",
                        ", ".join(unsettled[:5]), PRELOAD_SETTLE_S)
            return dict(ends)
        await asyncio.sleep(PRELOAD_SETTLE_POLL_S)
