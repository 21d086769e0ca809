"""Faust transport whose exactly-once sends keep their partition and their transaction.

Faust's TransactionManager.send (faust-streaming 0.15.3) asks the *consumer's* metadata for the
destination partition. The consumer knows only the topics it subscribes to, so for a sink topic
(ledger.entries, ledger.results, ...) it gets None: the explicit partition is dropped (the record
lands wherever the key hashes) and the record bypasses the transaction. Every ledger output is
co-partitioned with ledger.commands, so here a send to partition p of any topic goes through the
transactional producer of ledger.commands partition p: outputs, table changelogs and the source
offset commit or abort together.

Second gap: table writes (`table[k] = v`) queue their changelog records in Faust's producer
buffer, which a background task drains; TransactionManager.commit does not drain it first. A
commit could therefore include an event's offset and outputs but not its changelog records, and a
kill -9 right after lost table state for committed commands (seen in the crash test: a later
duplicate was decided again against stale state). commit() here flushes the buffer into the open
transactions first, so table state can run ahead of committed offsets (replays are idempotent)
but never behind them.
"""

from __future__ import annotations

from typing import Any

from faust.transport.consumer import TransactionManager
from faust.transport.drivers.aiokafka import Transport as AIOKafkaTransport

from streams.errors import InvariantViolation


def ledger_transport(anchor_topic: str) -> type[AIOKafkaTransport]:
    """A Transport class whose transactions are anchored on `anchor_topic`'s partitions."""

    class LedgerTransactionManager(TransactionManager):
        async def send(self, topic: str, key: bytes | None, value: bytes | None,
                       partition: int | None, timestamp: float | None, headers: Any,
                       *, transactional_id: str | None = None) -> Any:
            target = partition if partition is not None else \
                self.consumer.key_partition(topic, key, None)
            if target is None:
                raise InvariantViolation(f"exactly-once send to {topic} with no partition")
            assignor = self.app.assignor
            try:
                group = assignor.group_for_topic(topic)
            except KeyError:
                group = assignor.group_for_topic(anchor_topic)
            return await self.producer.send(
                topic, key, value, target, timestamp, headers,
                transactional_id=f"{self.app.conf.id}-{group}-{target}")

        async def commit(self, offsets: Any, start_new_transaction: bool = True) -> bool:
            await self.producer.flush()
            return bool(await super().commit(offsets, start_new_transaction=start_new_transaction))

    class LedgerTransport(AIOKafkaTransport):
        TransactionManager = LedgerTransactionManager

    return LedgerTransport
