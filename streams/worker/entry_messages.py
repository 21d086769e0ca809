"""The Entry records this worker encoded lately, so a batch's Result copies their bytes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from sardis_ledger.streams import core

# Entries remembered (oldest forgotten first). A batch's Result is built in the event that posts
# its last leg, or soon after on the coordinator's partition: a forgotten entry is encoded again.
ENTRY_MESSAGES_MAX: Final[int] = 4096


class EntryMessages:
    """Encodes Entry records and keeps the bytes of the latest ones by entry id. A kept message
    is used only for an entry equal to the one it was encoded from (same bytes, by construction);
    any other entry is encoded again."""

    def __init__(self, encode: Callable[[core.Entry], bytes],
                 limit: int = ENTRY_MESSAGES_MAX) -> None:
        self._encode = encode
        self._limit = limit
        self._kept: dict[str, tuple[core.Entry, bytes]] = {}

    def encode(self, entry: core.Entry) -> bytes:
        """The entry's Entry record, encoded now and kept."""
        message = self._encode(entry)
        kept = self._kept
        kept.pop(entry.entry_id, None)
        kept[entry.entry_id] = (entry, message)
        if len(kept) > self._limit:
            del kept[next(iter(kept))]
        return message

    def message(self, entry: core.Entry) -> bytes:
        """The entry's Entry record: the kept bytes if it was encoded from an equal entry."""
        kept = self._kept.get(entry.entry_id)
        if kept is not None and kept[0] == entry:
            return kept[1]
        return self._encode(entry)
