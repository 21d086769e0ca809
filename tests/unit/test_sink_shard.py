"""Sink shards: parsing `--shard I/N`, and that N shards split any partition set exactly."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from sardis_ledger.sinks.errors import SinkError
from sardis_ledger.sinks.kafka import ALL_PARTITIONS, SHARDS_MAX, Shard


@pytest.mark.parametrize(("text", "expected"), [
    ("0/1", Shard(0, 1)), ("1/2", Shard(1, 2)), (" 3 / 4 ", Shard(3, 4)),
    (f"0/{SHARDS_MAX}", Shard(0, SHARDS_MAX)),
])
def test_parse_accepts(text: str, expected: Shard) -> None:
    assert Shard.parse(text) == expected


@pytest.mark.parametrize("text", ["", "1", "2/2", "-1/2", "0/0", "a/b", "1/2/3", "0.5/2",
                                  f"0/{SHARDS_MAX + 1}"])
def test_parse_refuses_with_a_clear_error(text: str) -> None:
    with pytest.raises(SinkError) as refused:
        Shard.parse(text)
    assert not refused.value.retriable
    assert "shard" in str(refused.value)


def test_names_of_the_single_sink_do_not_change() -> None:
    # The transactional id of a lone immudb sink stays what it was before shards existed.
    assert (ALL_PARTITIONS.suffix, str(ALL_PARTITIONS)) == ("", "0/1")
    assert (Shard(1, 3).suffix, str(Shard(1, 3))) == ("-1of3", "1/3")


@given(count=st.integers(1, SHARDS_MAX), partitions=st.integers(1, 256))
def test_shards_split_every_topic_exactly(count: int, partitions: int) -> None:
    tps = [TopicPartition(topic, p) for topic in ("ledger.entries", "ledger.receipts")
           for p in range(partitions)]
    owned = [Shard(i, count).select(tps) for i in range(count)]
    assert sorted(tp for part in owned for tp in part) == sorted(tps)  # each exactly once
    for part in owned:  # and a shard takes the same partition numbers of every topic
        numbers = {t: {tp.partition for tp in part if tp.topic == t} for t in
                   ("ledger.entries", "ledger.receipts")}
        assert numbers["ledger.entries"] == numbers["ledger.receipts"]

