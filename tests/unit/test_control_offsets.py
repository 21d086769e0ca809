"""Unit tests of the transaction-marker offsets (skipping marker gaps) and transactional ids."""

from __future__ import annotations

import pytest

from sardis_ledger.streams.worker.compat import CONTROL_GAP_CHECK_MAX, ControlOffsets, transactional_id_for


@pytest.mark.parametrize(("markers", "gap", "covered"), [
    ([(5, 6)], (5, 6), True),           # one marker between two records
    ([(5, 6), (6, 7)], (5, 7), True),   # two commits in a row
    ([(5, 6)], (5, 7), False),          # offset 6 is not a known marker: maybe a skipped record
    ([], (5, 6), False),                # nothing known: read the gap
    ([(5, 6)], (4, 6), False),
])
def test_a_gap_is_covered_only_when_every_offset_is_a_known_marker(
        markers: list[tuple[int, int]], gap: tuple[int, int], covered: bool) -> None:
    offsets = ControlOffsets()
    for start, end in markers:
        offsets.add("t", 0, start, end)
    assert offsets.covers("t", 0, *gap) is covered


def test_markers_are_per_partition_and_forgotten_once_checked() -> None:
    offsets = ControlOffsets()
    offsets.add("t", 0, 5, 6)
    assert not offsets.covers("t", 1, 5, 6)
    assert not offsets.covers("u", 0, 5, 6)
    assert offsets.covers("t", 0, 5, 6)
    assert not offsets.covers("t", 0, 5, 6)


def test_memory_is_bounded_and_keeps_the_newest() -> None:
    offsets = ControlOffsets(per_partition_max=10)
    for offset in range(100):
        offsets.add("t", 0, offset, offset + 1)
    assert offsets.covers("t", 0, 99, 100)
    assert not offsets.covers("t", 0, 0, 1)


def test_a_long_gap_is_always_read() -> None:
    offsets = ControlOffsets(per_partition_max=10 * CONTROL_GAP_CHECK_MAX)
    offsets.add("t", 0, 0, CONTROL_GAP_CHECK_MAX + 1)
    assert not offsets.covers("t", 0, 0, CONTROL_GAP_CHECK_MAX + 1)


@pytest.mark.parametrize(("app_id", "group", "partition"), [("sardis-ledger", 0, 0),
                                                              ("bench-1.sardis", 3, 11)])
def test_transactional_ids_are_the_ones_faust_gives_its_producers(app_id: str, group: int,
                                                                    partition: int) -> None:
    from types import SimpleNamespace

    from faust.transport.consumer import TransactionManager

    faust_id = TransactionManager.transactional_id_format.format(
        group_id=app_id, tpg=SimpleNamespace(group=group, partition=partition))
    assert transactional_id_for(app_id, group, partition) == faust_id
