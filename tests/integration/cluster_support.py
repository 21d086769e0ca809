"""The 3-broker cluster in integration tests: fixtures, broker kills, and how long partitions go unserved."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import statistics
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from infra import kafka_cluster
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.topics import delete_topics_with_prefix
from tests.integration.conftest import TEST_TOPIC_PREFIX

# SARDIS_TEST_KEEP_TOPICS=1 keeps a test's topics on the cluster, to read what a failing
# scenario wrote (delete them afterwards: each partition slows the brokers' next start).
KEEP_TOPICS_ENV = "SARDIS_TEST_KEEP_TOPICS"
POLL_S = 0.2
LEADERS_TIMEOUT_S = 120.0
ISR_TIMEOUT_S = 300.0
# How far after a kill a silence still counts as caused by it.
SILENCE_WINDOW_S = 180.0


@pytest.fixture(scope="session")
def cluster(stack: Settings) -> Iterator[str]:
    """The 3-node cluster's bootstrap list: reused when running (`dev up --brokers 3`), else
    started here and stopped after the session. PostgreSQL and immudb come from `stack`."""
    started = kafka_cluster.up()
    bootstrap = kafka_cluster.bootstrap()
    try:
        if started:
            _delete_stale_test_topics(dataclasses.replace(stack, kafka_bootstrap=bootstrap))
        yield bootstrap
    finally:
        if len(started) == kafka_cluster.CLUSTER_NODES:
            kafka_cluster.down()


def _delete_stale_test_topics(settings: Settings) -> None:
    try:
        asyncio.run(delete_topics_with_prefix(
            dataclasses.replace(settings, topic_prefix=TEST_TOPIC_PREFIX)))
    except Exception as exc:  # hygiene only: the tests do not depend on it
        print(f"[tests] could not delete stale test topics on the cluster: {exc!r}", file=sys.stderr)


@pytest.fixture
def cluster_settings(stack: Settings, cluster: str) -> Iterator[Settings]:
    """Settings on the cluster with a topic prefix of this test's own (topics deleted after,
    with every node back up: a test that kills a node restarts it before it ends)."""
    own = dataclasses.replace(stack, kafka_bootstrap=cluster,
                              topic_prefix=f"{TEST_TOPIC_PREFIX}{uuid.uuid4().hex[:10]}.")
    yield own
    kafka_cluster.up()
    if os.environ.get(KEEP_TOPICS_ENV) == "1":
        print(f"[tests] {KEEP_TOPICS_ENV}=1: keeping the topics {own.topic_prefix}* on the "
              "cluster", file=sys.stderr)
        return
    asyncio.run(delete_topics_with_prefix(own))


async def describe(settings: Settings, topics: list[str]) -> list[dict[str, object]]:
    """The partitions of topics (full names): leader, replicas, isr."""
    admin = AIOKafkaAdminClient(**settings.kafka_connection())
    await admin.start()
    try:
        return [p for t in await admin.describe_topics(topics) for p in t["partitions"]]
    finally:
        await admin.close()


async def leaders(settings: Settings, topic: str) -> dict[int, int]:
    """partition -> leader node (-1: none) of one ledger topic."""
    return {int(p["partition"]): int(p["leader"])  # type: ignore[call-overload]
            for p in await describe(settings, [settings.topic(topic)])}


async def wait_leaders_moved(settings: Settings, topic: str, victim: int, since: float) -> float:
    """Seconds from `since` until no partition of `topic` is led by `victim` or leaderless."""
    deadline = time.monotonic() + LEADERS_TIMEOUT_S
    while True:
        try:
            if all(leader not in (victim, -1)
                   for leader in (await leaders(settings, topic)).values()):
                return time.monotonic() - since
        except Exception:  # a dead broker's metadata answers fail until clients move on
            pass
        assert time.monotonic() < deadline, f"{topic}: leaders did not move off node {victim}"
        await asyncio.sleep(POLL_S)


async def wait_full_isr(settings: Settings, topics: list[str], since: float) -> float:
    """Seconds from `since` until every partition of `topics` (full names) has every replica in
    sync."""
    deadline = time.monotonic() + ISR_TIMEOUT_S
    while True:
        try:
            described = await describe(settings, topics)
            if described and all(len(p["isr"]) == len(p["replicas"]) for p in described):  # type: ignore[arg-type]
                return time.monotonic() - since
        except Exception:  # the restarted node may refuse connections for a moment
            pass
        assert time.monotonic() < deadline, "replicas did not catch up"
        await asyncio.sleep(POLL_S)


@dataclass
class Kill:
    """One SIGKILL and what it cost."""

    what: str  # e.g. "broker 2 (leader of 5/12 ledger.commands partitions)"
    at: float  # monotonic
    leaders_moved_s: float | None = None
    back_in_sync_s: float | None = None  # restart -> every replica in sync again
    ready_s: float | None = None  # kill -> the restarted worker ready (its tables recovered)
    longest_silence_s: float = 0.0  # longest time a partition of ledger.results got nothing
    median_silence_s: float = 0.0

    def __str__(self) -> str:
        parts = [self.what]
        if self.leaders_moved_s is not None:
            parts.append(f"leaders moved in {self.leaders_moved_s:.1f} s")
        parts.append(f"every partition served again within {self.longest_silence_s:.1f} s "
                     f"(median partition {self.median_silence_s:.1f} s)")
        if self.ready_s is not None:
            parts.append(f"restarted worker ready after {self.ready_s:.1f} s")
        if self.back_in_sync_s is not None:
            parts.append(f"restarted node back in sync in {self.back_in_sync_s:.1f} s")
        return "; ".join(parts)


@dataclass
class ArrivalWatcher:
    """Tails a topic (read_committed) and notes when each partition's records arrive, so a kill's
    cost is the longest silence of a partition after it, as a client reading results sees it."""

    settings: Settings
    topic: str
    arrivals: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(**self.settings.kafka_connection(),
                                    isolation_level="read_committed", enable_auto_commit=False)
        await consumer.start()
        try:
            tps = [TopicPartition(self.settings.topic(self.topic), p)
                   for p in range(self.settings.partitions)]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
            while not self.stop.is_set():
                batches = await consumer.getmany(timeout_ms=100, max_records=10_000)
                now = time.monotonic()
                for tp, messages in batches.items():
                    if messages:
                        self.arrivals[tp.partition].append(now)
        finally:
            await consumer.stop()

    async def wait_served_after(self, at: float, timeout_s: float = SILENCE_WINDOW_S) -> None:
        """Until every partition that had traffic has had records arrive after `at`."""
        deadline = time.monotonic() + timeout_s
        while any(times[-1] <= at for times in self.arrivals.values()):
            assert time.monotonic() < deadline, f"partitions unserved for {timeout_s:.0f} s"
            await asyncio.sleep(POLL_S)

    def silences_after(self, at: float, until: float) -> list[float]:
        """Per partition with traffic, the longest gap between arrivals that starts in
        [at, until) (a gap that began before `at` counts from `at`)."""
        out = []
        for times in self.arrivals.values():
            longest = 0.0
            for before, after in itertools.pairwise(times):
                if after > at and before < until:
                    longest = max(longest, after - max(before, at))
            out.append(longest)
        return out

    def measure(self, kills: list[Kill]) -> None:
        """Each kill's silences, up to the next kill (so one long silence is not counted twice)."""
        for kill, following in zip(kills, [*kills[1:], None], strict=True):
            until = following.at if following is not None else kill.at + SILENCE_WINDOW_S
            silences = self.silences_after(kill.at, until)
            kill.longest_silence_s = max(silences, default=0.0)
            kill.median_silence_s = statistics.median(silences) if silences else 0.0
