"""Rebalances under a steady closed loop: no command waits for a stall check, none is lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from sardis_ledger.streams.client import LedgerClient
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.topics import create_topics
from sardis_ledger.streams.worker_process import WorkerProcess

# Closed-loop clients, each on its own account: each awaits a result before it sends again, so
# a command left undecided by a rebalance holds its client back until something decides it.
CLIENTS = 6
# A second worker joins and leaves this many times (each is two rebalances).
JOINS = 3
# How long the second worker stays, and how long the first works alone between its visits.
STAY_S = 8.0
# No command may wait this long (measured: at most 1.7 s). Two defects made commands wait across
# a rebalance: a poll that crossed it was dropped, so its partitions waited for the stall check
# (STALL_CHECKS x CATCH_UP_INTERVAL_S = 60 s); and Faust's recovery of kept partitions waited
# two idle 5 s polls for each changelog's last transaction marker (>= 10 s a rebalance).
COMMAND_WAIT_MAX_S = 10.0
# The clients' own timeout, far above COMMAND_WAIT_MAX_S, so a stall is measured, not raised.
CLIENT_TIMEOUT_S = 180.0


@pytest.fixture
def workers(settings: Settings, tmp_path: Path) -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    asyncio.run(create_topics(settings))
    first = WorkerProcess(settings, tmp_path, name="worker-a")
    second = WorkerProcess(settings, tmp_path, name="worker-b")
    yield first, second
    second.stop()
    first.stop()


async def _client_loop(client: LedgerClient, account: str, stop: asyncio.Event,
                       waits_s: list[float]) -> int:
    """Credit 0.01 to `account` again and again; returns how many were committed."""
    committed = 0
    while not stop.is_set():
        started = time.monotonic()
        await client.create_entry(account_id=account, amount=Decimal("0.01"),
                                  entry_type="credit")
        waits_s.append(time.monotonic() - started)
        committed += 1
    return committed


async def test_rebalances_leave_no_command_waiting(
        settings: Settings, workers: tuple[WorkerProcess, WorkerProcess]) -> None:
    first, second = workers
    await asyncio.to_thread(first.start)
    stop = asyncio.Event()
    waits_s: list[list[float]] = [[] for _ in range(CLIENTS)]
    async with LedgerClient(settings, result_timeout_s=CLIENT_TIMEOUT_S) as client:
        accounts = [f"rebal_{n}" for n in range(CLIENTS)]
        loops = [asyncio.create_task(_client_loop(client, account, stop, waits_s[n]))
                 for n, account in enumerate(accounts)]
        for _ in range(JOINS):
            await asyncio.sleep(STAY_S)
            await asyncio.to_thread(second.start)
            await asyncio.sleep(STAY_S)
            await asyncio.to_thread(second.terminate)
        await asyncio.sleep(STAY_S)
        stop.set()
        counts = await asyncio.gather(*loops)
        balances = [await client.get_balance(account, "USDC") for account in accounts]
    longest_s = max(max(w) for w in waits_s)
    assert min(counts) > 0
    # Exact: every committed credit is in its account's balance once, no more, no less.
    assert [b.balance for b in balances] == [Decimal("0.01") * count for count in counts]
    assert longest_s < COMMAND_WAIT_MAX_S, (
        f"a command waited {longest_s:.1f} s across a rebalance; longest per client "
        f"{[round(max(w), 1) for w in waits_s]} (logs: {first.log_dir})")
