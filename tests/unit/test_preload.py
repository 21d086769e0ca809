"""Changelog preload: records applied as Faust's memory store applies them, and each changelog
partition read once when it becomes this worker's, never again while it stays."""

from __future__ import annotations

import asyncio

import pytest

from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.worker.preload import (
    ChangelogPreloader,
    PreloadReport,
    Target,
    apply_records,
    drop_partitions,
)


def _target() -> Target:
    return Target({}, {})


@pytest.mark.parametrize(("records", "data"), [
    ([(b"a", b"1")], {b"a": b"1"}),
    ([(b"a", b"1"), (b"a", b"2")], {b"a": b"2"}),  # the last value of a key wins
    ([(b"a", b"1"), (b"a", None)], {}),  # a tombstone deletes
    ([(b"a", None), (b"a", b"3")], {b"a": b"3"}),  # written again after its delete
    ([(None, b"x"), (b"b", b"")], {b"b": b""}),  # no key: skipped; empty value: kept
])
def test_records_apply_in_order(records: list[tuple[bytes | None, bytes | None]],
                                data: dict[bytes, bytes]) -> None:
    target = _target()
    apply_records(target, 4, records)
    assert target.data == data
    assert target.key_partition == dict.fromkeys(data, 4)


def test_dropping_partitions_removes_only_their_keys() -> None:
    target = _target()
    apply_records(target, 1, [(b"one", b"1")])
    apply_records(target, 2, [(b"two", b"2")])
    assert drop_partitions(target, {1, 3}) == 1
    assert target.data == {b"two": b"2"} and target.key_partition == {b"two": 2}


class _Recorded(ChangelogPreloader):
    """The preloader with its Kafka read replaced by a script (the ownership logic is pure)."""

    def __init__(self) -> None:
        super().__init__(Settings())
        self.reads: list[list[tuple[str, int]]] = []

    async def _read(self, wanted: list[tuple[str, int]]) -> PreloadReport:
        self.reads.append(wanted)
        for topic, partition in wanted:
            apply_records(self._targets[topic], partition, [(f"{topic}{partition}".encode(), b"v")])
        return PreloadReport(offsets={tp: 9 for tp in wanted}, records=len(wanted))


def test_every_owned_partition_is_read_once_per_rebalance_kept_ones_included() -> None:
    preloader = _Recorded()
    accounts, holds = _target(), _target()
    preloader.register("accounts-changelog", accounts)
    preloader.register("holds-changelog", holds)

    async def scenario() -> None:
        await preloader.on_rebalance(1, [("accounts-changelog", 0), ("holds-changelog", 0),
                                         ("ledger.commands", 0)])
        # Every table's store asks in the same rebalance: one read for all of them.
        await preloader.on_rebalance(1, [("accounts-changelog", 0), ("holds-changelog", 0)])
        assert preloader.reads == [[("accounts-changelog", 0), ("holds-changelog", 0)]]
        assert preloader.persisted_offset("accounts-changelog", 0) == 9
        assert preloader.persisted_offset("ledger.commands", 0) is None

        # Partition 1 arrives, 0 stays: both are read (Faust would replay 0 from its start),
        # and 0's keys are dropped first, so what it holds is its committed changelog only.
        accounts.data[b"uncommitted"], accounts.key_partition[b"uncommitted"] = b"x", 0
        await preloader.on_rebalance(2, [("accounts-changelog", 0), ("accounts-changelog", 1)])
        assert preloader.reads[-1] == [("accounts-changelog", 0), ("accounts-changelog", 1)]
        assert preloader.persisted_offset("accounts-changelog", 0) == 9
        assert preloader.persisted_offset("accounts-changelog", 1) == 9
        assert b"uncommitted" not in accounts.data
        assert accounts.data[b"accounts-changelog0"] == b"v"

        # 0 leaves: a partition no longer owned is not read, and reports no offset.
        await preloader.on_rebalance(3, [("accounts-changelog", 1)])
        assert preloader.reads[-1] == [("accounts-changelog", 1)]
        assert preloader.persisted_offset("accounts-changelog", 0) is None

    asyncio.run(scenario())
