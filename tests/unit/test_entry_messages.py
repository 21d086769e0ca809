"""EntryMessages: kept bytes are used only for an equal entry, and the map stays bounded."""

from __future__ import annotations

import dataclasses

from sardis_ledger.streams import core
from sardis_ledger.streams.worker.entry_messages import EntryMessages

ENTRY = core.Entry(entry_id="ent_1", command_id="c", account_id="a", currency="USD",
                   entry_type="credit", amount_minor=1, running_balance_minor=1, sequence=1,
                   committed_at_ms=0, partition=0, leaf_index=0)


def _messages(limit: int = 2) -> tuple[EntryMessages, list[str]]:
    encoded: list[str] = []

    def encode(entry: core.Entry) -> bytes:
        encoded.append(entry.entry_id)
        return f"{entry.entry_id}:{entry.amount_minor}".encode()

    return EntryMessages(encode, limit), encoded


def test_an_entry_encoded_once_is_copied_after() -> None:
    messages, encoded = _messages()
    assert messages.encode(ENTRY) == b"ent_1:1"
    assert messages.message(ENTRY) == b"ent_1:1"
    assert encoded == ["ent_1"]


def test_a_different_entry_with_the_same_id_is_encoded_again() -> None:
    messages, encoded = _messages()
    messages.encode(ENTRY)
    changed = dataclasses.replace(ENTRY, amount_minor=2)
    assert messages.message(changed) == b"ent_1:2"
    assert encoded == ["ent_1", "ent_1"]


def test_the_oldest_entries_are_forgotten_past_the_limit() -> None:
    messages, encoded = _messages(limit=2)
    entries = [dataclasses.replace(ENTRY, entry_id=f"ent_{n}") for n in range(3)]
    for entry in entries:
        messages.encode(entry)
    encoded.clear()
    for entry in entries:
        messages.message(entry)
    assert encoded == ["ent_0"]  # forgotten; ent_1 and ent_2 are kept
