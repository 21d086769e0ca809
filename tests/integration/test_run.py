"""`sardis-ledger run`: a child killed with SIGKILL is restarted and nothing is lost; SIGTERM stops all."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

from sardis_ledger.streams.client import LedgerClient
from sardis_ledger.streams.config import Settings
from tests.integration.test_metrics import get, sample, wait_ready

STOP_WITHIN_S = 10.0
RESTART_WAIT_S = 120.0
SINK_WAIT_S = 120.0


def free_port_run(count: int) -> int:
    """A base port with `count` free ports from it (random, so parallel sessions do not meet)."""
    rng = random.Random()
    for _ in range(100):
        base = rng.randrange(20_000, 40_000)
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise AssertionError("no free port range")


async def post(settings: Settings, prefix: str, count: int) -> None:
    async with LedgerClient(settings) as ledger:
        for i in range(count):
            await ledger.create_entry(account_id=f"acc_run{i % 5}", amount="1.25", entry_type="credit",
                                      currency="USD", command_id=f"{prefix}-{i}")


def run_status(env: dict[str, str], base: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sardis_ledger.streams.cli", "status", "--metrics-port-base",
                           str(base)], capture_output=True, text=True, env=env, timeout=60)


async def entries_in_postgres(settings: Settings, schema: str) -> int:
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        return int(await conn.fetchval(f'SELECT count(*) FROM "{schema}".entries'))
    finally:
        await conn.close()


async def test_run_restarts_a_killed_child_loses_nothing_and_stops_on_sigterm(
        settings: Settings, pg_schema: str, tmp_path: Path) -> None:
    base = free_port_run(3)
    ports = {"worker": base, "postgres": base + 1, "immudb": base + 2}
    out = (tmp_path / "run.out").open("wb")
    env = {**os.environ, **settings.as_env(), "SARDIS_STATE_DIR": str(tmp_path / "state")}
    run = subprocess.Popen([sys.executable, "-m", "sardis_ledger.streams.cli", "run", "--view", "plain",
                            "--metrics-port-base", str(base), "--schema", pg_schema,
                            "--log-dir", str(tmp_path / "logs")],
                           stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        for port in ports.values():
            await wait_ready(port)
        await post(settings, "before", 30)
        killed = json.loads(get(ports["worker"], "/healthz")[1])["pid"]
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + RESTART_WAIT_S
        while True:
            status, body = await asyncio.to_thread(get, ports["worker"], "/healthz")
            if status == 200 and json.loads(body)["pid"] != killed:
                break
            assert time.monotonic() < deadline, "the killed worker was not restarted"
            await asyncio.sleep(0.5)
        await wait_ready(ports["worker"])
        await post(settings, "after", 30)
        deadline = time.monotonic() + SINK_WAIT_S
        while await entries_in_postgres(settings, pg_schema) < 60 or sample(
                get(ports["immudb"], "/metrics")[1], "sardis_sink_entries_written_total") < 60:
            assert time.monotonic() < deadline, "the sinks did not write all 60 entries"
            await asyncio.sleep(0.5)
        assert await entries_in_postgres(settings, pg_schema) == 60
        healthy = run_status(env, base)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert healthy.stdout.count(" ready ") == 3, healthy.stdout
        started = time.monotonic()
        os.killpg(run.pid, signal.SIGTERM)
        returncode = run.wait(timeout=STOP_WITHIN_S + 10)
        elapsed_s = time.monotonic() - started
        output = (tmp_path / "run.out").read_text(errors="replace")
        print(f"run stopped in {elapsed_s:.1f} s")
        assert returncode == 0, output[-3000:]
        assert elapsed_s <= STOP_WITHIN_S, output[-3000:]
        assert f"worker exited with {-signal.SIGKILL}" in output, output[-3000:]
        assert "[worker]" in output and "[sink-postgres]" in output
        down = run_status(env, base)
        assert down.returncode == 1 and "worker down" in down.stderr, down.stdout + down.stderr
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        out.close()

