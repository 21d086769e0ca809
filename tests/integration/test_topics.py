"""`topics check` and the worker's refusals against a real broker: changed retention, compaction
and in-sync replicas are named, and partitions added under the ledger are refused even when
unsafe topics are allowed."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from sardis_ledger.sinks.workload import LedgerWorkload, WorkloadProducer
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.topic_policy import Severity, plan_replication
from sardis_ledger.streams.topics import TopicError, create_topics, ensure_topics, expected_topics
from sardis_ledger.streams.worker_process import READY_MARKER, ChildProcess

CLI_TIMEOUT_S = 120
PARTITIONS_VISIBLE_S = 30.0  # how long added partitions may take to show in metadata


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sardis_ledger.streams.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **settings.as_env()}, timeout=CLI_TIMEOUT_S)


async def alter(settings: Settings, changes: dict[str, dict[str, str]]) -> None:
    """Change topic configs behind the ledger's back, as an operator with kafka-configs.sh would.
    AlterConfigs replaces a topic's whole config: the rest is sent as the ledger set it."""
    shapes = {s.name: s for s in expected_topics(settings, plan_replication(None, 1))}
    admin = AIOKafkaAdminClient(**settings.kafka_connection())
    await admin.start()
    try:
        await admin.alter_configs([
            ConfigResource(ConfigResourceType.TOPIC, settings.topic(name),
                           {**shapes[settings.topic(name)].config, **change})
            for name, change in changes.items()])
    finally:
        await admin.close()


def start_worker(settings: Settings, log_dir: Path, *args: str) -> ChildProcess:
    """A worker with extra arguments; ready (and stopped by the caller) or raises with its log."""
    process = ChildProcess(settings, ["worker", *args, "--loglevel", "info"], READY_MARKER,
                           log_dir=log_dir, name="worker")
    process.start()
    return process


async def test_topics_check_names_what_can_lose_data_and_the_worker_refuses_it(
    settings: Settings, tmp_path: Path
) -> None:
    await create_topics(settings)
    clean = cli(settings, "topics", "check")
    assert clean.returncode == 0 and "every topic as expected" in clean.stdout, clean.stdout
    await alter(settings, {"ledger.entries": {"retention.ms": "86400000"},
                           "ledger.commands": {"cleanup.policy": "compact"},
                           "ledger.results": {"retention.ms": "-1"}})
    check = cli(settings, "topics", "check")
    assert check.returncode == 1
    entries, commands = settings.topic("ledger.entries"), settings.topic("ledger.commands")
    assert (f"{entries}: retention.ms is 86400000, expected -1 (can lose data: records are "
            "deleted sooner)") in check.stdout, check.stdout
    assert f"{commands}: cleanup.policy is compact, expected delete (can lose data" in check.stdout
    assert f"{settings.topic('ledger.results')}: retention.ms is -1, expected 604800000 " \
           "(differs: records are kept longer)" in check.stdout
    assert "3 difference(s), 2 that can lose data" in check.stdout
    refused = cli(settings, "worker")
    assert refused.returncode == 1
    assert "refusing to start the worker on these topics" in refused.stderr
    assert "--allow-unsafe-topics" in refused.stderr and "results" not in refused.stderr
    worker = start_worker(settings, tmp_path, "--allow-unsafe-topics")
    try:
        assert "starting anyway (--allow-unsafe-topics)" in worker.log_path.read_text()
    finally:
        worker.stop()


async def _wait_partition_counts(admin: AIOKafkaAdminClient, names: list[str],
                                 count: int) -> None:
    """Until the brokers' metadata shows the new partitions with leaders: CreatePartitions
    returns before every broker has them (a CI run described 4 right after, and the check then
    found nothing to refuse)."""
    deadline = time.monotonic() + PARTITIONS_VISIBLE_S
    while True:
        described = await admin.describe_topics(names)
        if all(len(t["partitions"]) == count and all(p["leader"] >= 0 for p in t["partitions"])
               for t in described):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"partitions not at {count} after {PARTITIONS_VISIBLE_S} s")
        await asyncio.sleep(0.2)


async def test_partitions_added_under_the_ledger_are_refused_even_when_allowed(
    settings: Settings, tmp_path: Path
) -> None:
    """Adding partitions changes murmur2(account) % N: accounts would move to partitions that
    know nothing of them. Topics grown behind the ledger's back are refused whether or not
    SARDIS_PARTITIONS follows, by count or by the newest entry of each partition."""
    before = dataclasses.replace(settings, partitions=4)
    await create_topics(before)
    workload = LedgerWorkload(before.partitions, 40, seed=13)
    async with WorkloadProducer(before) as producer:
        await producer.send(workload.next(200))
        await producer.flush()
    admin = AIOKafkaAdminClient(**settings.kafka_connection())
    await admin.start()
    try:
        names = [n for n in await admin.list_topics() if n.startswith(settings.topic_prefix)]
        await admin.create_partitions({name: NewPartitions(6) for name in names})
        await _wait_partition_counts(admin, names, 6)
    finally:
        await admin.close()
    counted = await ensure_topics(before, create=False)
    assert {d.severity for d in counted.differences} == {Severity.OWNERSHIP}
    assert any(d.setting == "partitions" and d.actual == "6" for d in counted.differences)
    after = dataclasses.replace(settings, partitions=6)
    report = await ensure_topics(after, create=False, check_entries=True)
    moved = [d for d in report.differences if d.severity is Severity.OWNERSHIP]
    assert moved and all("which partition" in d.actual for d in moved), report.differences
    with pytest.raises(TopicError, match="partitions were added under the ledger"):
        await create_topics(after)
    refused = cli(after, "worker", "--allow-unsafe-topics")
    assert refused.returncode == 1 and "breaks account ownership" in refused.stderr, refused.stderr
    assert "Growing partitions" in refused.stderr
