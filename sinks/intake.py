"""What a sink may store of each record it reads, one decision for both sinks: the record, or its
dead letter.

Only workers write ledger.entries, so a record there that does not decode, is not an Entry, or
is not an entry any worker could have written (entry_problem) means a bug, corruption or a
broken ACL. A sink never skips it silently: it sets it aside on ledger.sink-dlq (a DeadLetter
naming the sink, the reason and the original bytes) in the same commit as its offsets, counts
it, logs it, and goes on. The entry is then missing from the projection, and `verify` names the
gap in that partition's Merkle log (and the PostgreSQL sink's sink_dead_letters rows).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sardis_ledger.schemas.codec import AvroCodec
from sardis_ledger.streams import records
from sardis_ledger.streams.errors import CodecError
from sardis_ledger.streams.money import Currency
from sardis_ledger.streams.topics import LedgerTopic

log = logging.getLogger("sardis.sinks")

# What each source topic carries; anything else there is set aside.
RECORD_NAMES: Mapping[LedgerTopic, str] = {
    LedgerTopic.ENTRIES: "Entry",
    LedgerTopic.TREE_HEADS: "TreeHead",
    LedgerTopic.RECEIPTS: "Receipt",
    LedgerTopic.ANCHORS: "Anchor",
}


@dataclass(frozen=True, slots=True)
class SinkReject:
    """A record a sink cannot store, and why."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    reason: str
    detail: str

    def dead_letter(self, sink: str, failed_at_ms: int) -> dict[str, Any]:
        return records.dead_letter(reason=self.reason, detail=f"{sink} sink: {self.detail}",
                                   topic=self.topic, partition=self.partition, offset=self.offset,
                                   key=self.key, payload=self.value, command_id=None,
                                   failed_at_ms=failed_at_ms)


def intake(kind: LedgerTopic, topic: str, message: Any, codec: AvroCodec,
           currencies: Mapping[str, Currency]) -> tuple[str, dict[str, Any]] | SinkReject:
    """(record name, record) of one consumed message, or the reason a sink cannot store it."""
    value = message.value if message.value is not None else b""

    def reject(reason: str, detail: str) -> SinkReject:
        log.error("setting aside %s[%d]@%d: %s (%s)", topic, message.partition, message.offset,
                  reason, detail)
        return SinkReject(topic, message.partition, message.offset, message.key, bytes(value),
                          reason, detail)

    try:
        name, record = codec.decode(value)
    except CodecError as exc:
        return reject(exc.reason, str(exc))
    expected = RECORD_NAMES[kind]
    if name != expected:
        return reject("unexpected_record", f"a {name} record where {expected} records belong")
    if kind is LedgerTopic.ENTRIES:
        problem = records.entry_problem(record, currencies)
        if problem is not None:
            return reject("invalid_entry", problem)
    return name, record
