"""An event's writes are all or nothing: applied whole, or undone with no record held."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sardis_ledger.streams.errors import InvariantViolation
from sardis_ledger.streams.worker.event_scope import EventScope


def test_rollback_restores_every_key_and_holds_nothing() -> None:
    store = {b"a": b"1", b"b": b"2"}
    partitions = {b"a": 0, b"b": 1}
    held: list[str] = []

    def hold() -> int:
        held.append("record")
        return 1

    scope = EventScope()
    scope.write(store, partitions, b"a", b"changed", 0)
    scope.write(store, partitions, b"a", b"changed again", 0)
    scope.write(store, partitions, b"new", b"3", 5)
    scope.hold("tx-0", hold)
    assert store[b"a"] == b"changed again"  # the event's later reads see its writes
    scope.rollback()
    assert store == {b"a": b"1", b"b": b"2"}
    assert partitions == {b"a": 0, b"b": 1}
    assert held == []


def test_apply_hands_records_over_in_order_and_reports_what_each_transaction_holds() -> None:
    held: list[str] = []

    def holder(name: str, count: int) -> Callable[[], int]:
        def hold() -> int:
            held.append(name)
            return count

        return hold

    scope = EventScope()
    scope.write({}, {}, b"k", b"v", 0)
    scope.hold("tx-0", holder("first", 1))
    scope.hold("tx-1", holder("second", 7))
    scope.hold("tx-0", holder("third", 2))
    assert scope.apply() == {"tx-0": 2, "tx-1": 7}
    assert held == ["first", "second", "third"]
    scope.rollback()  # after apply: nothing left to undo
    with pytest.raises(InvariantViolation):
        scope.write({}, {}, b"k", b"v", 0)
    with pytest.raises(InvariantViolation):
        scope.hold("tx-0", lambda: 0)


@given(before=st.dictionaries(st.binary(max_size=3), st.binary(max_size=3), max_size=8),
       writes=st.lists(st.tuples(st.binary(max_size=3), st.binary(max_size=3)), max_size=20))
def test_any_writes_then_rollback_leave_the_table_as_it_was(
        before: dict[bytes, bytes], writes: list[tuple[bytes, bytes]]) -> None:
    store = dict(before)
    partitions = dict.fromkeys(before, 3)
    scope = EventScope()
    for key, value in writes:
        scope.write(store, partitions, key, value, 9)
    scope.rollback()
    assert store == before
    assert partitions == dict.fromkeys(before, 3)
