"""The worker's one transaction against a real broker: offsets as a group member (KIP-447)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.topics import LedgerTopic, create_topics
from sardis_ledger.streams.worker.compat import (
    GroupMember,
    MemberStale,
    send_member_offsets,
    wait_offsets_stable,
)

JOIN_WAIT_S = 30.0


@pytest.fixture
async def topic(settings: Settings) -> str:
    await create_topics(settings)
    return settings.topic(LedgerTopic.COMMANDS)


@pytest.fixture
def group_id(settings: Settings) -> str:
    return settings.topic(f"group-{uuid.uuid4().hex[:6]}")


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(**settings.kafka_connection(),
                                transactional_id=f"test-worker-{uuid.uuid4().hex[:8]}")
    await producer.start()
    yield producer
    await producer.stop()


async def _join(settings: Settings, topic: str, group_id: str) -> tuple[AIOKafkaConsumer, Any]:
    """A consumer that has joined `group_id` and been given partitions, and its member."""
    consumer = AIOKafkaConsumer(topic, **settings.kafka_connection(), group_id=group_id,
                                enable_auto_commit=False, isolation_level="read_committed")
    await consumer.start()
    async with asyncio.timeout(JOIN_WAIT_S):
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=100)
    coordinator = consumer._coordinator
    return consumer, GroupMember(coordinator.generation, coordinator.member_id)


async def _committed(settings: Settings, group_id: str, tp: TopicPartition) -> int | None:
    reader = AIOKafkaConsumer(**settings.kafka_connection(), group_id=group_id,
                              enable_auto_commit=False)
    await reader.start()
    try:
        committed: int | None = await reader.committed(tp)
        return committed
    finally:
        await reader.stop()


async def test_offsets_of_the_current_member_commit(settings: Settings, topic: str, group_id: str,
                                                    producer: AIOKafkaProducer) -> None:
    consumer, member = await _join(settings, topic, group_id)
    tp = TopicPartition(topic, 0)
    try:
        await producer.begin_transaction()
        await send_member_offsets(producer, {tp: OffsetAndMetadata(7, "")}, group_id, member)
        await producer.commit_transaction()
    finally:
        await consumer.stop()
    assert await _committed(settings, group_id, tp) == 7


async def test_offsets_of_a_member_removed_from_the_group_are_refused(
        settings: Settings, topic: str, group_id: str, producer: AIOKafkaProducer) -> None:
    """A zombie: the worker left (here: its consumer stopped), its transaction goes on."""
    consumer, member = await _join(settings, topic, group_id)
    await consumer.stop()  # leaves the group: its member id is unknown from now on
    tp = TopicPartition(topic, 1)
    await producer.begin_transaction()
    await producer.send_and_wait(topic, b"zombie", key=b"k", partition=1)
    with pytest.raises(MemberStale, match="removed from the group"):
        await send_member_offsets(producer, {tp: OffsetAndMetadata(9, "")}, group_id, member)
    await producer.abort_transaction()
    assert await _committed(settings, group_id, tp) is None


async def test_a_new_assignment_waits_for_offsets_an_open_transaction_holds(
        settings: Settings, topic: str, group_id: str, producer: AIOKafkaProducer) -> None:
    consumer, member = await _join(settings, topic, group_id)
    tp = TopicPartition(topic, 2)
    try:
        await producer.begin_transaction()
        await send_member_offsets(producer, {tp: OffsetAndMetadata(11, "")}, group_id, member)
        waiting = asyncio.create_task(
            wait_offsets_stable(producer.client, group_id, {topic: [0, 1, 2, 3]}))
        await asyncio.sleep(1.0)
        assert not waiting.done(), "the offsets of an open transaction were taken as stable"
        await producer.commit_transaction()
        asked = await asyncio.wait_for(waiting, timeout=10)
    finally:
        await consumer.stop()
    assert asked > 1
    assert await _committed(settings, group_id, tp) == 11
    # Nothing pending: one request is enough.
    assert await wait_offsets_stable(producer.client, group_id, {topic: [0, 1, 2, 3]}) == 1


async def test_offsets_without_a_generation_are_never_sent(
        settings: Settings, topic: str, group_id: str, producer: AIOKafkaProducer) -> None:
    """aiokafka's reset member (generation -1, member ""): the coordinator would check nothing."""
    tp = TopicPartition(topic, 3)
    await producer.begin_transaction()
    with pytest.raises(MemberStale, match="without a generation"):
        await send_member_offsets(producer, {tp: OffsetAndMetadata(5, "")}, group_id,
                                  GroupMember(-1, ""))
    await producer.abort_transaction()
    assert await _committed(settings, group_id, tp) is None
