"""Records decided events produce, held per transaction and sent as whole batches before commit.

Why hold them: aiokafka's `send()` costs tens of microseconds per record in this worker (a
future, a metadata wait, a partition check, an accumulator append) and a command writes six or
seven records, three of which (its account state, its partition's log head, its balance) the
next command on the same key overwrites. Every reader of the worker's outputs uses
read_committed, so no record of an open transaction is visible before its commit anyway:
holding records until the commit changes no reader's view, and keeping only the last value of a
compacted key (a table changelog record, a balance) within one transaction changes neither a
table's recovery nor a compacted topic's final value.

Crash safety is unchanged. Records are held per input partition (by the transactional id of
Faust's producer for it, which exists only while this worker owns the partition) and leave the
outbox only into the worker's open transaction; the commit protocol
(streams/worker/commit.py) flushes the outbox under the event lock before it sends any offset,
and a kill -9 loses the outbox together with the open transaction Kafka then aborts. Records
held for a partition that was revoked in a rebalance are dropped: the partition's new owner
decides its events again from its committed offset.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from sardis_ledger.streams.produce import send_batches

log = logging.getLogger(__name__)

# Records one transaction may hold before they are sent early (into the same open transaction):
# bounds the memory a busy partition holds and the work a commit has left to do.
OUTBOX_RECORDS_MAX: Final[int] = 2_000
# While a commit is in flight (no send may join a committing transaction) a transaction may
# exceed OUTBOX_RECORDS_MAX; past this many the deciding event waits for the commit to end.
OUTBOX_RECORDS_HARD_MAX: Final[int] = 20_000

# A record value, or a function that encodes it at flush (only the last one of a key is sent).
Value = bytes | Callable[[], bytes]


@dataclass(slots=True)
class _Held:
    """What one input partition holds: records in decision order, and last values of compacted
    keys."""

    producer: Any  # Faust's producer for the partition: the token of this worker owning it
    appended: dict[tuple[str, int], list[tuple[bytes | None, bytes]]] = field(default_factory=dict)
    latest: dict[tuple[str, int], dict[bytes, Value]] = field(default_factory=dict)
    count: int = 0


class Outbox:
    """Records one worker holds for its transaction, per input partition (by the transactional id
    of Faust's producer for it)."""

    def __init__(self, *, records_max: int = OUTBOX_RECORDS_MAX) -> None:
        self._held: dict[str, _Held] = {}
        self.records_max = records_max
        # Set while no commit's round trips run; a deciding event that must flush waits for it
        # (no record may join a transaction between its offsets and its end).
        self._not_committing = asyncio.Event()
        self._not_committing.set()

    @property
    def committing(self) -> bool:
        return not self._not_committing.is_set()

    def commit_started(self) -> None:
        self._not_committing.clear()

    def commit_ended(self) -> None:
        self._not_committing.set()

    async def wait_commit_ended(self) -> None:
        await self._not_committing.wait()

    def _slot(self, transactional_id: str, producer: Any) -> _Held:
        held = self._held.get(transactional_id)
        if held is None or held.producer is not producer:
            if held is not None:
                self._drop(transactional_id, held, "its producer was replaced")
            held = self._held[transactional_id] = _Held(producer)
        return held

    def append(self, transactional_id: str, producer: Any, topic: str, partition: int,
               key: bytes | None, value: bytes) -> int:
        """Hold one record; returns how many records the transaction now holds."""
        held = self._slot(transactional_id, producer)
        held.appended.setdefault((topic, partition), []).append((key, value))
        held.count += 1
        return held.count

    def put_latest(self, transactional_id: str, producer: Any, topic: str, partition: int,
                   key: bytes, value: Value) -> int:
        """Hold the value of a compacted key, replacing one the transaction already holds."""
        held = self._slot(transactional_id, producer)
        values = held.latest.setdefault((topic, partition), {})
        if key not in values:
            held.count += 1
        values[key] = value
        return held.count

    def held_count(self) -> int:
        return sum(held.count for held in self._held.values())

    async def flush(self, current_producer: Callable[[str], Any], into: Any,
                    transactional_id: str | None = None) -> int:
        """Send what one input partition (or every one) holds into the worker's open
        transaction (`into`, an aiokafka producer).

        `current_producer` maps a partition's transactional id to the producer Faust now keeps
        for it (None once the partition was revoked: what it held is dropped). Returns the
        number of records sent.
        """
        ids = list(self._held) if transactional_id is None else [transactional_id]
        sent = 0
        for tid in ids:
            held = self._held.pop(tid, None)
            if held is None or held.count == 0:
                continue
            if current_producer(tid) is not held.producer:
                self._drop(tid, held, "its producer was stopped or replaced")
                continue
            sent += await _send_held(held, into)
        return sent

    @staticmethod
    def _drop(transactional_id: str, held: _Held, why: str) -> None:
        log.warning("dropping %s record(s) held for partition transaction %s: %s (its offsets "
                    "were never committed; its owner decides them again)", held.count,
                    transactional_id, why)


async def _send_held(held: _Held, producer: Any) -> int:
    sent = 0
    for (topic, partition), items in held.appended.items():
        sent += await send_batches(producer, topic, partition, items)
    for (topic, partition), values in held.latest.items():
        items = [(key, value if isinstance(value, bytes) else value())
                 for key, value in values.items()]
        sent += await send_batches(producer, topic, partition, items)
    return sent
