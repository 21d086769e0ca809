"""streams/metrics.py: the names it exports are EXPORTED_NAMES (what the dashboard may query),
Prometheus-style with units; the helpers move them."""

from __future__ import annotations

import re
from types import SimpleNamespace

from aiokafka import TopicPartition
from prometheus_client import REGISTRY, generate_latest

from sardis_ledger.streams import metrics


def exported() -> set[str]:
    names = set()
    for line in generate_latest(REGISTRY).decode().splitlines():
        if line.startswith("sardis_"):
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
            if not name.endswith("_created"):
                names.add(name)
    return names


def value(name: str, **labels: str) -> float:
    found = REGISTRY.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_every_metric_is_listed_and_named_with_a_unit_or_total() -> None:
    metrics.decided("committed", "", 0)
    metrics.dead_letter("worker", "truncated")
    metrics.discrepancy("amount_mismatch", "open")
    metrics.lag("worker", "t", 0, 5)
    metrics.TREE_SIZE.labels("0").set(3)
    metrics.sink_wrote("immudb", 1, [SimpleNamespace(reason="bad")], [(0, 3)])
    metrics.READY.labels("worker").set(1)
    assert exported() == metrics.EXPORTED_NAMES
    for name in metrics.EXPORTED_NAMES:
        assert re.search(r"_(total|seconds(_bucket|_count|_sum)?|records|entries|open|pending|"
                         r"ready|block)$", name), name


def test_helpers_move_the_counters() -> None:
    before = value("sardis_commands_decided_total", outcome="rejected", reason="insufficient_funds")
    metrics.decided("rejected", "insufficient_funds", None)
    assert value("sardis_commands_decided_total", outcome="rejected",
                 reason="insufficient_funds") == before + 1
    open_before = value("sardis_discrepancies_open", type="duplicate_entry")
    metrics.discrepancy("duplicate_entry", "open")
    metrics.discrepancy("duplicate_entry", "open")
    metrics.discrepancy("duplicate_entry", "resolved")
    assert value("sardis_discrepancies_open", type="duplicate_entry") == open_before + 1
    metrics.decided("rejected", "x" * 500)
    assert value("sardis_commands_decided_total", outcome="rejected",
                 reason="x" * metrics.LABEL_CHARS_MAX) == 1


def test_lag_tracker_keeps_the_largest_lag_of_every_partition() -> None:
    tracker = metrics.LagTracker("sink-test")
    assert tracker.behind is None
    tracker.set({TopicPartition("a", 0): 10, TopicPartition("a", 1): 3})
    assert tracker.behind == 10
    assert value("sardis_consumer_lag_records", component="sink-test", topic="a", partition="1") == 3
