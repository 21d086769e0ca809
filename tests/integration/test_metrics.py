"""/metrics, /healthz and /readyz of the worker and both sinks: the documented names move."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from sinks.process import SinkProcess
from streams.client import LedgerClient, LedgerRejected
from streams.config import Settings
from streams.topics import create_topics
from streams.worker_process import WorkerProcess

SCRAPE_TIMEOUT_S = 5.0
READY_WAIT_S = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=SCRAPE_TIMEOUT_S) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:  # not listening (yet, or any more)
        return 0, ""


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels` (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if match and all(f'{key}="{value}"' in (match.group(1) or "") for key, value in labels.items()):
            total += float(match.group(2))
    return total


async def wait_ready(port: int) -> dict[str, object]:
    deadline = time.monotonic() + READY_WAIT_S
    while True:
        status, body = await asyncio.to_thread(get, port, "/readyz")
        if status == 200:
            return dict(json.loads(body))
        if time.monotonic() > deadline:
            raise AssertionError(f"not ready on {port} after {READY_WAIT_S:.0f}s: {body}")
        await asyncio.sleep(0.5)


async def test_each_process_serves_metrics_health_and_readiness_that_move(
        settings: Settings, pg_schema: str, tmp_path: Path) -> None:
    await create_topics(settings)
    ports = {name: free_port() for name in ("worker", "postgres", "immudb")}
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    env = {"SARDIS_PG_SCHEMA": pg_schema, "SARDIS_STATE_DIR": str(state_dir)}
    worker = WorkerProcess(settings, tmp_path, env={"SARDIS_METRICS_PORT": str(ports["worker"])})
    sinks = {kind: SinkProcess(settings, kind, tmp_path,
                               {**env, "SARDIS_METRICS_PORT": str(ports[kind])})
             for kind in ("postgres", "immudb")}
    try:
        await asyncio.to_thread(worker.start)
        for sink in sinks.values():
            await asyncio.to_thread(sink.start)
        for name, port in ports.items():
            assert get(port, "/healthz")[0] == 200, name
            assert (await wait_ready(port))["ready"] is True, name
            assert get(port, "/nowhere")[0] == 404
        async with LedgerClient(settings) as ledger:
            for i in range(20):
                await ledger.create_entry(account_id=f"acc_m{i % 4}", amount="5", entry_type="credit",
                                          currency="USD", command_id=f"m-{i}")
            await ledger.create_entry(account_id="acc_m0", amount="5", entry_type="credit",
                                      currency="USD", command_id="m-0")  # answered again
            try:
                await ledger.create_entry(account_id="acc_m1", amount="1000", entry_type="debit",
                                          currency="USD")
            except LedgerRejected as exc:
                assert exc.reason == "insufficient_funds"
        metrics = get(ports["worker"], "/metrics")[1]
        assert sample(metrics, "sardis_commands_decided_total", outcome="committed") == 20
        assert sample(metrics, "sardis_commands_decided_total", outcome="replayed") == 1
        assert sample(metrics, "sardis_commands_decided_total", outcome="rejected",
                      reason="insufficient_funds") == 1
        assert sample(metrics, "sardis_decision_latency_seconds_count") == 22
        assert sample(metrics, "sardis_merkle_tree_size_entries") >= 1
        assert sample(metrics, "sardis_ready", component="worker") == 1
        deadline = time.monotonic() + READY_WAIT_S
        for kind, port in ports.items():
            if kind == "worker":
                continue
            while sample(get(port, "/metrics")[1], "sardis_sink_entries_written_total", sink=kind) < 20:
                assert time.monotonic() < deadline, f"sink {kind} wrote fewer than 20 entries"
                await asyncio.sleep(0.5)
            text = get(port, "/metrics")[1]
            assert "sardis_consumer_lag_records{" in text, kind
            assert sample(text, "sardis_ready", component=f"sink-{kind}") == 1
    finally:
        for process in (worker, *sinks.values()):
            process.stop()
