"""What the worker's parts share: the input record, and the small interface plug-ins use."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.money import Currency


@dataclass(frozen=True, slots=True)
class Command:
    """One input record, from Faust's stream or read directly to fill a gap."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int

    @classmethod
    def of(cls, message: Any) -> Command:
        # Faust hands timestamps over as float seconds, aiokafka as integer ms. Kafka stores
        # integer ms; round() restores it exactly from Faust's float (error far below 0.5 ms).
        stamp = message.timestamp
        timestamp_ms = stamp if isinstance(stamp, int) else round(stamp * 1000)
        return cls(message.topic, message.partition, message.offset, message.key,
                   message.value if message.value is not None else b"", timestamp_ms)


class WorkerPort(Protocol):
    """What an agent plugged into the worker (the reconciler) may ask of it: the event's
    effects go through the worker's commit protocol, so they commit with the event's offset."""

    @property
    def settings(self) -> Settings: ...

    @property
    def currencies(self) -> Mapping[str, Currency]: ...

    def owned_partitions(self, topic: str) -> frozenset[int]:
        """The partitions of an input topic this worker owns now."""
        ...

    def put(self, table: Any, key: bytes, value: bytes, partition: int) -> None:
        """Set a table key, its changelog record in the partition's transaction."""
        ...

    def produce(self, topic: str, key: bytes | None, value: bytes, partition: int, *,
                transaction_of: int | None = None) -> None:
        """An encoded record (full topic name) in the transaction of `partition` (or of the
        owned input partition `transaction_of`)."""
        ...

    def encode(self, record_name: str, record: dict[str, Any]) -> bytes:
        """A record in the worker's wire format."""
        ...

    def encode_embedding(self, record_name: str, record: dict[str, Any], field: str,
                         message: bytes | Sequence[bytes]) -> bytes:
        """encode, with `field` (a [null, record] union, or an array of records, left out of
        `record`) holding the record(s) that `message`, already encoded, holds
        (schemas/codec.py)."""
        ...

    def send(self, topic: str, key: bytes, record_name: str, record: dict[str, Any],
             partition: int, *, transaction_of: int | None = None) -> None:
        """A record encoded with the worker's codec (ledger topic name, prefix added)."""
        ...

    async def send_tick(self, topic: str, partition: int, record_name: str,
                        record: dict[str, Any]) -> None:
        """A timer record to an input partition, outside any transaction (idempotent)."""
        ...

    def dead_letter(self, command: Command, reason: str, detail: str, command_id: Any) -> None:
        """Set a record aside on ledger.dlq with its reason."""
        ...
