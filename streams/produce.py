"""Producer helpers the worker and the sinks share: records appended to whole batches."""

from __future__ import annotations

from typing import Any

from sardis_ledger.streams.errors import InvariantViolation


async def send_batches(producer: Any, topic: str, partition: int,
                        items: list[tuple[bytes | None, bytes]]) -> int:
    """Append `items` to record batches of at most the producer's batch size and queue them.

    Cheaper than send() per record (a future and a partitioner call each). The futures
    send_batch returns are not awaited: a transaction's commit (or the producer's flush) waits
    for every batch and fails if one failed.
    """
    builder = producer.create_batch()
    for key, value in items:
        if builder.append(key=key, value=value, timestamp=None) is None:
            await producer.send_batch(builder, topic, partition=partition)
            builder = producer.create_batch()
            if builder.append(key=key, value=value, timestamp=None) is None:
                # An empty batch accepts any record; refusing one means the builder is broken.
                raise InvariantViolation(f"a record for {topic}:{partition} fits no batch")
    if builder.record_count():
        await producer.send_batch(builder, topic, partition=partition)
    return len(items)
