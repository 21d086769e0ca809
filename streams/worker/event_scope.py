"""One event's writes to tables and the outbox: applied whole when its decision ends, undone on error.

A decision writes several table keys (account state, command record, log head, hold, batch
state, input offset) and holds several records (result, entry, balance, messages to other
partitions). If anything raises half-way, none of it may stay behind: a later commit of the
partition's transaction would otherwise publish part of an event, with its offset. So table
writes are applied at once (later reads of the same event see them) and remembered with the
value they replaced; records are queued here and reach the outbox only when the event ends
well. `rollback` restores every table key and drops the queued records.

Nothing here knows Faust: a table is anything with the memory store's `data` mapping and its
`_key_partition` bookkeeping (see LedgerWorker._put).
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Final

from sardis_ledger.streams.errors import InvariantViolation

_MISSING: Final = object()

# A queued outbox operation: holds its record and returns how many records its transaction
# now holds.
HoldRecord = Callable[[], int]


@dataclass(slots=True)
class _Undo:
    store: MutableMapping[bytes, Any]
    partitions: MutableMapping[bytes, int]
    key: bytes
    value: Any
    partition: Any


@dataclass(slots=True)
class EventScope:
    """The writes of the event being decided."""

    _undo: dict[tuple[int, bytes], _Undo] = field(default_factory=dict)
    _records: list[tuple[str, HoldRecord]] = field(default_factory=list)
    closed: bool = False

    def write(self, store: MutableMapping[bytes, Any], partitions: MutableMapping[bytes, int],
              key: bytes, value: bytes, partition: int) -> None:
        """Set a table key now, remembering what it held before this event."""
        self._check_open()
        slot = (id(store), key)
        if slot not in self._undo:
            self._undo[slot] = _Undo(store, partitions, key, store.get(key, _MISSING),
                                     partitions.get(key, _MISSING))
        store[key] = value
        partitions[key] = partition

    def hold(self, transactional_id: str, record: HoldRecord) -> None:
        """Queue a record for the outbox of `transactional_id` until the event ends well."""
        self._check_open()
        self._records.append((transactional_id, record))

    def apply(self) -> dict[str, int]:
        """The event ended well: hand its records to the outbox. Returns, per transactional
        id, how many records that transaction holds now."""
        self._check_open()
        self.closed = True
        held: dict[str, int] = {}
        for transactional_id, record in self._records:
            held[transactional_id] = record()
        return held

    def rollback(self) -> None:
        """The event failed: every table key gets its earlier value back, no record is held."""
        if self.closed:
            return
        self.closed = True
        for undo in reversed(list(self._undo.values())):
            _restore(undo.store, undo.key, undo.value)
            _restore(undo.partitions, undo.key, undo.partition)
        self._records.clear()

    def _check_open(self) -> None:
        if self.closed:
            raise InvariantViolation("a write after its event's scope closed")


def _restore(mapping: MutableMapping[bytes, Any], key: bytes, value: Any) -> None:
    if value is _MISSING:
        mapping.pop(key, None)
    else:
        mapping[key] = value
