"""Direct reads of the worker's Faust tables (memory store), where Faust's own API costs too much."""

# The worker writes table keys straight into the memory store (LedgerWorker._put, so the
# changelog record joins the deciding event's transaction) and reads them back the same way.
# Faust's `table.get(key)` walks a chain of mapping methods (~2.5 us a read, several reads per
# command); the store keeps its dict in `.data` and its key -> partition bookkeeping in
# `._key_partition` (faust-streaming 0.15.3, faust/stores/memory.py).

from __future__ import annotations

from collections.abc import Container, Iterator
from typing import Any


def table_value(table: Any, key: bytes) -> bytes | None:
    """A table key's value, read from the memory store's dict (the store _put writes): Faust's
    Table.get runs a chain of mapping methods (~2.5 us a read, several reads per command)."""
    value: bytes | None = table.data.data.get(key)
    return value


def table_items(table: Any, prefix: bytes, partitions: Container[int]
                ) -> Iterator[tuple[int, bytes, bytes]]:
    """(partition, key, value) of a table's keys that start with `prefix` and belong to one of
    `partitions` (the memory store's own key -> partition bookkeeping, which _put keeps)."""
    data: Any = table.data
    for key, value in list(data.items()):
        partition = data._key_partition.get(key)
        if partition in partitions and key.startswith(prefix):
            yield partition, key, value
