"""Prometheus metrics of every process (names, units and labels in one place; README lists them)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Final

from prometheus_client import Counter, Gauge, Histogram

# Decision latency: from the command's Kafka timestamp to its decision (queueing included).
DECISION_LATENCY_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                                     30.0, 60.0)
# Lag gauges are refreshed at most this often per process (a position look-up per partition).
LAG_REFRESH_INTERVAL_S: Final = 2.0
# A label value longer than this is cut (reasons come from records; keep series bounded).
LABEL_CHARS_MAX: Final = 64

COMMANDS_DECIDED = Counter(
    "sardis_commands_decided", "Commands decided by the worker, by outcome (committed, rejected, "
    "replayed: a repeated command_id answered from idempotency) and rejection reason",
    ["outcome", "reason"])
DECISION_LATENCY = Histogram(
    "sardis_decision_latency_seconds", "Seconds from a command's Kafka timestamp to its decision",
    buckets=DECISION_LATENCY_BUCKETS_S)
CONSUMER_LAG = Gauge(
    "sardis_consumer_lag_records", "Records of an input partition not yet processed (end offset "
    "minus the process's next offset), per component, topic and partition",
    ["component", "topic", "partition"])
DEAD_LETTERS = Counter(
    "sardis_dead_letters", "Records set aside to a dead-letter topic, by component and reason",
    ["component", "reason"])
DISCREPANCIES_OPEN = Gauge(
    "sardis_discrepancies_open", "Chain reconciliation discrepancies this worker opened and has "
    "not seen resolved, by type", ["type"])
IMMUDB_PROOF_FAILURES = Counter(
    "sardis_immudb_proof_failures", "immudb writes or reads whose inclusion or consistency proof "
    "did not check")
TREE_SIZE = Gauge(
    "sardis_merkle_tree_size_entries", "Entries in a partition's Merkle log at its latest tree head",
    ["partition"])
ANCHORED_TREE_SIZE = Gauge(
    "sardis_anchored_tree_size_entries", "Tree size of a partition's latest anchor on chain",
    ["partition"])
BATCHES_PENDING = Gauge(
    "sardis_batches_pending", "Batches this worker coordinates that are neither posted nor voided")
BATCHES_STARTED = Counter(
    "sardis_batches_started", "Batches this worker started coordinating, by how: one_event (it "
    "owns every partition of the batch: decided whole in one event) or protocol (over the "
    "internal topics)", ["how"])
for _how in ("one_event", "protocol"):
    BATCHES_STARTED.labels(_how)  # both series exist (at 0) before the first batch
SINK_ENTRIES_WRITTEN = Counter(
    "sardis_sink_entries_written", "Entries a sink wrote to its store", ["sink"])
CHAIN_TRANSFERS_PUBLISHED = Counter(
    "sardis_chain_transfers_published", "ERC-20 transfers the chain watcher published")
CHAIN_NEXT_BLOCK = Gauge(
    "sardis_chain_next_block", "The next block the chain watcher will read")
READY = Gauge("sardis_ready", "1 when the process is ready (see /readyz), else 0", ["component"])

# Every metric name a process may export (the dashboard test checks its queries against these).
EXPORTED_NAMES: Final[frozenset[str]] = frozenset({
    "sardis_commands_decided_total", "sardis_decision_latency_seconds_bucket",
    "sardis_decision_latency_seconds_count", "sardis_decision_latency_seconds_sum",
    "sardis_consumer_lag_records", "sardis_dead_letters_total", "sardis_discrepancies_open",
    "sardis_immudb_proof_failures_total", "sardis_merkle_tree_size_entries",
    "sardis_anchored_tree_size_entries", "sardis_batches_pending",
    "sardis_batches_started_total",
    "sardis_sink_entries_written_total", "sardis_chain_transfers_published_total",
    "sardis_chain_next_block", "sardis_ready",
})


def label(value: Any) -> str:
    return str(value)[:LABEL_CHARS_MAX]


def decided(outcome: str, reason: str, command_timestamp_ms: int | None = None) -> None:
    """One decision; its latency when the command's Kafka timestamp is known."""
    COMMANDS_DECIDED.labels(outcome, label(reason)).inc()
    if command_timestamp_ms is not None:
        DECISION_LATENCY.observe(max(0.0, time.time() - command_timestamp_ms / 1000))


def dead_letter(component: str, reason: str) -> None:
    DEAD_LETTERS.labels(component, label(reason)).inc()


def discrepancy(kind: str, status: str) -> None:
    """A discrepancy record the reconciler emitted: open adds one of its type, resolved removes."""
    gauge = DISCREPANCIES_OPEN.labels(label(kind))
    if status == "open":
        gauge.inc()
    elif status == "resolved":
        gauge.dec()


def lag(component: str, topic: str, partition: int, records: int) -> None:
    CONSUMER_LAG.labels(component, topic, str(partition)).set(max(0, records))


class LagTracker:
    """Per-partition consumer lag of an aiokafka consumer, refreshed at most every
    LAG_REFRESH_INTERVAL_S; `behind` is the largest lag last seen (readiness uses it)."""

    def __init__(self, component: str) -> None:
        self.component = component
        self.behind: int | None = None
        self._refreshed_at = 0.0
        self._lags: dict[Any, int] = {}

    async def refresh(self, consumer: Any, tps: Any, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._refreshed_at < LAG_REFRESH_INTERVAL_S:
            return
        self._refreshed_at = now
        lags: dict[Any, int] = {}
        for tp in tps:
            high = consumer.highwater(tp)
            if high is None:
                continue
            lags[tp] = max(0, high - await consumer.position(tp))
        self.set(lags)

    def set(self, lags: Mapping[Any, int]) -> None:
        """Record the lag of these partitions (others keep their last value)."""
        for tp, records in lags.items():
            lag(self.component, tp.topic, tp.partition, records)
        self._lags.update(lags)
        self.behind = max(self._lags.values(), default=0)


def chain_published(transfers: int, next_block: int) -> None:
    CHAIN_TRANSFERS_PUBLISHED.inc(transfers)
    CHAIN_NEXT_BLOCK.set(next_block)


def sink_wrote(sink: str, entries: int, rejects: Any = (), anchors: Any = ()) -> None:
    """A sink's committed batch: entries written, records set aside (by reason), anchors stored
    (rows of sinks.rows.ANCHOR_COLUMNS: partition, tree_size, ...)."""
    SINK_ENTRIES_WRITTEN.labels(sink).inc(entries)
    for reject in rejects:
        dead_letter(f"sink-{sink}", reject.reason)
    for anchor in anchors:
        ANCHORED_TREE_SIZE.labels(str(anchor[0])).set(anchor[1])
