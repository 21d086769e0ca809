"""Unit tests of the worker's outbox: held records, last values, batches, dropped transactions."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch
from hypothesis import given, settings
from hypothesis import strategies as st

from sardis_ledger.streams.worker.outbox import Outbox

BATCH_SIZE_BYTES = 1024


class RecordingProducer:
    """Stands in for aiokafka's producer: real record batches, kept instead of sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, list[tuple[bytes | None, bytes]]]] = []

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(BATCH_SIZE_BYTES, 0, is_transactional=True)

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> Any:
        records = DefaultRecordBatch(bytes(batch._build()))
        self.sent.append((topic, partition, [(r.key, r.value) for r in records]))

    def records(self, topic: str, partition: int) -> list[tuple[bytes | None, bytes]]:
        return [item for t, p, items in self.sent if (t, p) == (topic, partition) for item in items]


async def test_appended_records_keep_their_order_and_last_values_win() -> None:
    producer = RecordingProducer()
    outbox = Outbox()
    for i in range(5):
        outbox.append("tx-0", producer, "entries", 0, b"acc", f"entry-{i}".encode())
        outbox.put_latest("tx-0", producer, "accounts-changelog", 0, b"acc", f"state-{i}".encode())
    outbox.put_latest("tx-0", producer, "balances", 0, b"acc|USDC", lambda: b"encoded-late")
    assert outbox.held_count() == 7  # five records, one last value per compacted key

    sent = await outbox.flush({"tx-0": producer}.get, producer)

    assert sent == 7
    assert producer.records("entries", 0) == [(b"acc", f"entry-{i}".encode()) for i in range(5)]
    assert producer.records("accounts-changelog", 0) == [(b"acc", b"state-4")]
    assert producer.records("balances", 0) == [(b"acc|USDC", b"encoded-late")]
    assert outbox.held_count() == 0
    assert await outbox.flush({"tx-0": producer}.get, producer) == 0  # nothing is sent twice


async def test_records_beyond_one_batch_are_split_across_batches() -> None:
    producer = RecordingProducer()
    outbox = Outbox()
    values = [bytes([i]) * 200 for i in range(20)]  # ~4 KiB: several 1 KiB batches
    for value in values:
        outbox.append("tx-1", producer, "results", 3, None, value)
    await outbox.flush({"tx-1": producer}.get, producer)
    assert len(producer.sent) > 1
    assert [value for _key, value in producer.records("results", 3)] == values


async def test_a_record_larger_than_a_batch_still_goes_alone() -> None:
    producer = RecordingProducer()
    outbox = Outbox()
    big = b"x" * (BATCH_SIZE_BYTES * 3)
    outbox.append("tx-1", producer, "results", 0, b"k", b"small")
    outbox.append("tx-1", producer, "results", 0, b"k", big)
    await outbox.flush({"tx-1": producer}.get, producer)
    assert producer.records("results", 0) == [(b"k", b"small"), (b"k", big)]


async def test_records_of_a_replaced_or_stopped_producer_are_dropped() -> None:
    old, new = RecordingProducer(), RecordingProducer()
    outbox = Outbox()
    outbox.append("tx-2", old, "entries", 2, b"a", b"decided-before-rebalance")
    # Faust replaced tx-2's producer (rebalance): records decided before it are not this
    # worker's to commit any more.
    outbox.append("tx-2", new, "entries", 2, b"a", b"decided-after")
    outbox.append("tx-3", old, "entries", 3, b"b", b"revoked")
    sent = await outbox.flush({"tx-2": new}.get, new)  # tx-3 no longer has a producer
    assert sent == 1
    assert new.records("entries", 2) == [(b"a", b"decided-after")]
    assert old.sent == []


async def test_every_partition_is_sent_into_the_one_worker_transaction() -> None:
    a, b, worker = RecordingProducer(), RecordingProducer(), RecordingProducer()
    outbox = Outbox()
    outbox.append("tx-a", a, "entries", 0, b"k", b"1")
    outbox.append("tx-b", b, "entries", 1, b"k", b"2")
    assert await outbox.flush({"tx-a": a, "tx-b": b}.get, worker) == 2
    assert worker.records("entries", 0) == [(b"k", b"1")]
    assert worker.records("entries", 1) == [(b"k", b"2")]
    assert a.sent == [] and b.sent == []  # Faust's per-partition producers only mark ownership


async def test_flush_of_one_transaction_leaves_the_others_held() -> None:
    a, b = RecordingProducer(), RecordingProducer()
    outbox = Outbox()
    outbox.append("tx-a", a, "entries", 0, b"k", b"1")
    outbox.append("tx-b", b, "entries", 1, b"k", b"2")
    assert await outbox.flush({"tx-a": a, "tx-b": b}.get, a, "tx-a") == 1
    assert outbox.held_count() == 1
    assert b.sent == []


def test_commit_state_is_visible() -> None:
    outbox = Outbox()
    assert not outbox.committing
    outbox.commit_started()
    assert outbox.committing
    outbox.commit_ended()
    assert not outbox.committing


operations = st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 5)), max_size=60)


@settings(max_examples=60, deadline=None)
@given(operations)
def test_property_flush_sends_every_record_and_the_last_value_of_every_key(
        ops: list[tuple[bool, int, int]]) -> None:
    import asyncio

    producer = RecordingProducer()
    outbox = Outbox()
    appended: list[tuple[bytes | None, bytes]] = []
    latest: dict[bytes, bytes] = {}
    for n, (is_latest, key, value) in enumerate(ops):
        k, v = f"k{key}".encode(), f"v{value}-{n}".encode()
        if is_latest:
            outbox.put_latest("tx", producer, "table", 0, k, v)
            latest[k] = v
        else:
            outbox.append("tx", producer, "out", 0, k, v)
            appended.append((k, v))
    sent = asyncio.run(outbox.flush({"tx": producer}.get, producer))
    assert sent == len(appended) + len(latest)
    assert producer.records("out", 0) == appended
    assert dict(producer.records("table", 0)) == latest
    assert len(producer.records("table", 0)) == len(latest)


@pytest.mark.parametrize("count", [0, 1])
async def test_empty_transactions_send_nothing(count: int) -> None:
    producer = RecordingProducer()
    outbox = Outbox()
    for _ in range(count):
        outbox.append("tx", producer, "out", 0, None, b"v")
    assert await outbox.flush({"tx": producer}.get, producer) == count
    assert len(producer.sent) == count
