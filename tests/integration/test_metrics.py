"""/metrics, /healthz and /readyz of the worker and both sinks: the documented names move."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from sardis_ledger.sinks.process import SinkProcess
from sardis_ledger.streams.chain.watch import READY_MARKER as WATCH_READY_MARKER
from sardis_ledger.streams.client import BatchRejected, LedgerClient, LedgerRejected
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.topics import create_topics
from sardis_ledger.streams.worker_process import ChildProcess, WorkerProcess
from tests.integration.support import RawProducer

SCRAPE_TIMEOUT_S = 5.0
READY_WAIT_S = 90.0


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: all bound at once, so the kernel cannot hand one out twice
    (one port after another, it did: two processes then shared one endpoint and the test read
    the postgres sink's metrics for the immudb sink's)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


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
    names = ("worker", "postgres", "immudb", "watch")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    env = {"SARDIS_PG_SCHEMA": pg_schema, "SARDIS_STATE_DIR": str(state_dir)}
    worker = WorkerProcess(settings, tmp_path, env={"SARDIS_METRICS_PORT": str(ports["worker"])})
    sinks = {kind: SinkProcess(settings, kind, tmp_path,
                               {**env, "SARDIS_METRICS_PORT": str(ports[kind])})
             for kind in ("postgres", "immudb")}
    watcher = ChildProcess(settings, ["chain", "watch", "--token", f"0x{'ab' * 20}=USDC:6",
                                      "--wallet", f"0x{'cd' * 20}=acc_m", "--confirmations", "0",
                                      "--chunk-blocks", "50"], WATCH_READY_MARKER,
                           log_dir=tmp_path, name="chain-watch",
                           env={"SARDIS_METRICS_PORT": str(ports["watch"])})
    try:
        await asyncio.to_thread(watcher.start)
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
            with contextlib.suppress(BatchRejected):  # decided either way; counted as pending first
                await ledger.create_batch([
                    {"account_id": "acc_m0", "amount": "1", "entry_type": "debit", "currency": "USD"},
                    {"account_id": "acc_m1", "amount": "1", "entry_type": "credit", "currency": "USD"}])
        async with RawProducer(settings) as producer:  # bad input: a dead letter with its reason
            await producer.raw(b"\xc3\x01 not a command", b"acc_m0", 0)
            await producer.flush()
        deadline = time.monotonic() + READY_WAIT_S
        while sample(get(ports["worker"], "/metrics")[1], "sardis_dead_letters_total",
                     component="worker") < 1:
            assert time.monotonic() < deadline, "the dead letter was not counted"
            await asyncio.sleep(0.5)
        metrics = get(ports["worker"], "/metrics")[1]
        assert sample(metrics, "sardis_commands_decided_total", outcome="committed") == 20
        assert sample(metrics, "sardis_commands_decided_total", outcome="replayed") == 1
        assert sample(metrics, "sardis_commands_decided_total", outcome="rejected",
                      reason="insufficient_funds") == 1
        assert sample(metrics, "sardis_decision_latency_seconds_count") == 22
        assert sample(metrics, "sardis_merkle_tree_size_entries") >= 1
        assert sample(metrics, "sardis_ready", component="worker") == 1
        assert "sardis_batches_pending " in metrics
        assert sample(metrics, "sardis_commands_decided_total") >= 22
        text = get(ports["watch"], "/metrics")[1]
        assert sample(text, "sardis_chain_next_block") > 0
        assert sample(text, "sardis_ready", component="chain-watch") == 1
        deadline = time.monotonic() + READY_WAIT_S
        for kind in ("postgres", "immudb"):
            port = ports[kind]
            while sample(get(port, "/metrics")[1], "sardis_sink_entries_written_total", sink=kind) < 20:
                assert time.monotonic() < deadline, f"sink {kind} wrote fewer than 20 entries"
                await asyncio.sleep(0.5)
            text = get(port, "/metrics")[1]
            assert "sardis_consumer_lag_records{" in text, kind
            assert sample(text, "sardis_ready", component=f"sink-{kind}") == 1
    finally:
        for process in (worker, watcher, *sinks.values()):
            process.stop()
