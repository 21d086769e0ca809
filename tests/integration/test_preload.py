"""The changelog preload against a real broker: it reads what a transaction in flight commits."""

from __future__ import annotations

import asyncio
import time
import uuid

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.worker.preload import PRELOAD_SETTLE_S, ChangelogPreloader, Target

# How long the transaction stays open while the preload waits (well under PRELOAD_SETTLE_S).
OPEN_FOR_S = 0.7


async def test_the_preload_waits_for_a_transaction_in_flight_and_reads_its_records(
        settings: Settings) -> None:
    """A last stable offset read while a transaction is in flight stops short of its records;
    read then, a kept partition's tables would lack the worker's own last commit."""
    topic = settings.topic(f"preload-{uuid.uuid4().hex[:6]}-changelog")
    admin = AIOKafkaAdminClient(**settings.kafka_connection())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(**settings.kafka_connection(),
                                transactional_id=f"test-preload-{uuid.uuid4().hex[:8]}")
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send_and_wait(topic, b"committed", key=b"a", partition=0)
        await producer.begin_transaction()
        await producer.send_and_wait(topic, b"in flight", key=b"b", partition=0)
        target = Target({}, {})
        preloader = ChangelogPreloader(settings)
        preloader.register(topic, target)
        started = time.monotonic()
        preload = asyncio.create_task(preloader.on_rebalance(1, [(topic, 0)]))
        await asyncio.sleep(OPEN_FOR_S)
        assert not preload.done()  # waiting for the transaction to settle
        await producer.commit_transaction()
        await preload
        waited_s = time.monotonic() - started
    finally:
        await producer.stop()
    assert target.data == {b"a": b"committed", b"b": b"in flight"}
    # Both records and both commit markers (offsets 0-3): nothing left for Faust's recovery.
    assert preloader.persisted_offset(topic, 0) == 3
    assert OPEN_FOR_S <= waited_s < PRELOAD_SETTLE_S
