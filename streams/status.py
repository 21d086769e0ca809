"""`sardis-ledger status`: every component's state, lag and last error, from Kafka and its endpoint."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.supervisor import SCRAPE_TIMEOUT_S, child_specs, sum_samples
from sardis_ledger.streams.topics import APP_NAME, LedgerTopic

LAG_MAX_DEFAULT: Final = 1000
KAFKA_REQUEST_TIMEOUT_MS: Final = 10_000
# Input topics each consumer group commits offsets of (the postgres sink keeps its offsets in
# PostgreSQL, so its lag comes from its endpoint only).
WORKER_INPUTS: Final = (LedgerTopic.COMMANDS, LedgerTopic.INTERNAL_COMMANDS, LedgerTopic.BATCHES,
                        LedgerTopic.INTERNAL_COORDINATOR)
IMMUDB_SINK_INPUTS: Final = (LedgerTopic.ENTRIES,)


@dataclass(frozen=True, slots=True)
class ComponentStatus:
    name: str
    address: str
    state: str  # down | ready | not ready
    detail: str
    lag_records: int | None  # from the endpoint
    kafka_lag_records: int | None  # from the group's committed offsets, where it has a group
    last_error: str

    def problem(self, lag_max: int) -> str | None:
        """Why this component counts as unhealthy, or None."""
        if self.state != "ready":
            return f"{self.name} {self.state}: {self.detail}"
        behind = max(self.lag_records or 0, self.kafka_lag_records or 0)
        if behind > lag_max:
            return f"{self.name} behind by {behind} records (threshold {lag_max})"
        return None


def endpoint_status(name: str, port: int, host: str = "127.0.0.1") -> ComponentStatus:
    base = f"http://{host}:{port}"
    try:
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=SCRAPE_TIMEOUT_S) as reply:
                ready: dict[str, Any] = json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            ready = json.loads(exc.read())
        with urllib.request.urlopen(f"{base}/metrics", timeout=SCRAPE_TIMEOUT_S) as reply:
            sums = sum_samples(reply.read().decode())
    except (OSError, ValueError) as exc:
        return ComponentStatus(name, base, "down", f"no answer ({exc})", None, None, "")
    lag = sums.get("sardis_consumer_lag_records")
    return ComponentStatus(name, base, "ready" if ready.get("ready") is True else "not ready",
                           str(ready.get("detail", "")), None if lag is None else int(lag), None,
                           str(ready.get("last_error") or ""))


async def group_lag(settings: Settings, group_id: str, topics: Sequence[str]) -> int | None:
    """Records between a consumer group's committed offsets and the ends (read_committed) of
    `topics`; None when the group has committed nothing."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**settings.kafka_connection(),
                                request_timeout_ms=KAFKA_REQUEST_TIMEOUT_MS)
    consumer = AIOKafkaConsumer(**settings.kafka_connection(),
                                isolation_level="read_committed", enable_auto_commit=False,
                                request_timeout_ms=KAFKA_REQUEST_TIMEOUT_MS)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group_id)
        wanted = {settings.topic(topic) for topic in topics}
        tps = [tp for tp in committed if tp.topic in wanted]
        if not tps:
            return None
        ends: Mapping[TopicPartition, int] = await consumer.end_offsets(tps)
        return sum(max(0, ends[tp] - committed[tp].offset) for tp in tps)
    finally:
        await consumer.stop()
        await admin.close()


async def ledger_status(settings: Settings, port_base: int, with_watcher: bool,
                        host: str = "127.0.0.1") -> list[ComponentStatus]:
    import asyncio
    from dataclasses import replace

    from sardis_ledger.sinks.immudb import group_id_for

    specs = child_specs("watch" if with_watcher else None, port_base)
    statuses = await asyncio.gather(*(asyncio.to_thread(endpoint_status, spec.name, spec.port, host)
                                      for spec in specs))
    groups = {"worker": (settings.topic(APP_NAME), WORKER_INPUTS),
              "sink-immudb": (group_id_for(settings), IMMUDB_SINK_INPUTS)}
    result = []
    for status in statuses:
        if status.name in groups:
            group_id, topics = groups[status.name]
            status = replace(status, kafka_lag_records=await group_lag(settings, group_id, topics))
        result.append(status)
    return result


def format_table(statuses: Sequence[ComponentStatus]) -> str:
    def number(value: int | None) -> str:
        return "-" if value is None else f"{value:,}"

    rows = [f"{'component':14s} {'state':10s} {'lag':>9s} {'kafka lag':>10s}  {'endpoint':24s} "
            "detail / last error"]
    for s in statuses:
        detail = s.detail + (f" | last error: {s.last_error}" if s.last_error else "")
        rows.append(f"{s.name:14s} {s.state:10s} {number(s.lag_records):>9s} "
                    f"{number(s.kafka_lag_records):>10s}  {s.address:24s} {detail}")
    return "\n".join(rows)


def as_json(statuses: Sequence[ComponentStatus]) -> str:
    return json.dumps([asdict(s) for s in statuses])
