"""Sink benchmark: entries/s of each sink on a backlog, and end-to-end lag at a steady rate."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from sinks.immudb import ImmudbSink
from sinks.postgres import PostgresSink
from sinks.process import SinkProcess
from sinks.schema import connect, quoted
from sinks.workload import LedgerWorkload, Produced, WorkloadProducer
from streams.config import Settings
from streams.topics import create_topics, delete_topics_with_prefix

PRODUCE_CHUNK = 5000
DONE_POLL_S = 0.05
RUN_TIMEOUT_S = 900.0
LAG_RATE_PER_S = 2000
LAG_DURATION_S = 10.0
LAG_TICK_S = 0.05
LAG_SETTLE_S = 3.0
ACCOUNTS = 10_000


async def _fresh(settings: Settings, entries: int, seed: int) -> Settings:
    own = dataclasses.replace(settings, topic_prefix=f"bench-sink-{uuid.uuid4().hex[:8]}.")
    await create_topics(own)
    workload = LedgerWorkload(own.partitions, ACCOUNTS, seed, prefix="bench")
    async with WorkloadProducer(own) as producer:
        for start in range(0, entries, PRODUCE_CHUNK):
            await producer.send(workload.next(min(PRODUCE_CHUNK, entries - start)))
        await producer.send(Produced(tree_heads=workload.final_heads()))
        await producer.flush()
    return own


async def _time_until(run: Callable[[asyncio.Event], Coroutine[Any, Any, int]],
                      done: Callable[[], bool]) -> float:
    stop = asyncio.Event()
    started = time.monotonic()
    task = asyncio.create_task(run(stop))
    try:
        while not done():
            if task.done():
                await task  # raises the sink's error
                raise RuntimeError("sink stopped before the backlog was written")
            if time.monotonic() - started > RUN_TIMEOUT_S:
                raise TimeoutError(f"backlog not written after {RUN_TIMEOUT_S:.0f}s")
            await asyncio.sleep(DONE_POLL_S)
        return time.monotonic() - started
    finally:
        stop.set()
        await task


async def _throughput_run(settings: Settings, entries: int, seed: int) -> tuple[float, float]:
    own = await _fresh(settings, entries, seed)
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    try:
        pg = PostgresSink(own, schema)
        pg_s = await _time_until(pg.run, lambda: pg.entries_written >= entries)
        immudb = ImmudbSink(own, directory=Path(tempfile.mkdtemp(prefix="sardis-bench-state-")))
        im_s = await _time_until(immudb.run, lambda: immudb.entries_written >= entries)
        return entries / pg_s, entries / im_s
    finally:
        await _drop(own, schema)


async def _drop(settings: Settings, schema: str) -> None:
    conn = await connect(settings.pg_dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {quoted(schema)} CASCADE")
    finally:
        await conn.close()
    await delete_topics_with_prefix(settings)


async def _lag_run(settings: Settings, seed: int, rate_per_s: int = LAG_RATE_PER_S
                   ) -> dict[str, float]:
    """Both sinks running while entries arrive at `rate_per_s`; lag = written - committed."""
    own = await _fresh(settings, 0, seed)
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    # Each sink in its own process, as deployed (in one process they would share one core).
    env = {"SARDIS_PG_SCHEMA": schema, "SARDIS_STATE_DIR": tempfile.mkdtemp(prefix="sardis-bench-")}
    processes = [SinkProcess(own, kind, env=env) for kind in ("postgres", "immudb")]
    try:
        for process in processes:
            await asyncio.to_thread(process.start)
        await asyncio.sleep(LAG_SETTLE_S)
        workload = LedgerWorkload(own.partitions, ACCOUNTS, seed, prefix="lag", wall_clock=True)
        per_tick = max(1, int(rate_per_s * LAG_TICK_S))
        async with WorkloadProducer(own) as producer:
            started = time.monotonic()
            sent = 0
            while time.monotonic() - started < LAG_DURATION_S:
                await producer.send(workload.next(per_tick))
                sent += per_tick
                await asyncio.sleep(max(0.0, started + sent / rate_per_s - time.monotonic()))
            await producer.flush()
        await _wait_written(own, schema, sent)
        conn = await connect(own.pg_dsn)
        q = quoted(schema)
        try:
            pg = await conn.fetchrow(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) p50, "
                "percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) p99 FROM (SELECT "
                f"extract(epoch FROM sunk_at - committed_at) * 1000 ms FROM {q}.entries) t")
            im = await conn.fetchrow(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) p50, "
                "percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) p99 FROM (SELECT "
                f"extract(epoch FROM r.receipted_at - e.committed_at) * 1000 ms FROM {q}.entries e "
                f"JOIN {q}.receipts r USING (entry_id)) t")
        finally:
            await conn.close()
        return {"pg_p50_ms": pg["p50"], "pg_p99_ms": pg["p99"], "immudb_p50_ms": im["p50"],
                "immudb_p99_ms": im["p99"], "sent": sent, "rate": sent / LAG_DURATION_S,
                "target": rate_per_s}
    finally:
        for process in processes:
            process.stop()
        await _drop(own, schema)


async def _wait_written(settings: Settings, schema: str, sent: int) -> None:
    """Until both sinks wrote every entry sent (a sink behind the rate drains its backlog)."""
    conn = await connect(settings.pg_dsn)
    q = quoted(schema)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while True:
            rows = await conn.fetchval(f"SELECT count(*) FROM {q}.entries")
            receipts = await conn.fetchval(f"SELECT count(*) FROM {q}.receipts")
            if rows >= sent and receipts >= sent:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{rows}/{sent} rows and {receipts}/{sent} receipts after "
                                   f"{RUN_TIMEOUT_S:.0f}s")
            await asyncio.sleep(LAG_SETTLE_S)
    finally:
        await conn.close()


def _print_lag(lag: dict[str, float]) -> None:
    print(f"end-to-end lag, both sinks running, entries produced at {lag['rate']:,.0f}/s for "
          f"{LAG_DURATION_S:.0f}s ({lag['sent']:,.0f} entries; asked {lag['target']:,.0f}/s): "
          f"postgres row p50 {lag['pg_p50_ms']:.0f} ms p99 {lag['pg_p99_ms']:.0f} ms; immudb "
          f"receipt p50 {lag['immudb_p50_ms']:.0f} ms p99 {lag['immudb_p99_ms']:.0f} ms")


def run_sink_bench(*, entries: int = 50_000, runs: int = 3,
                   lag_rates: Sequence[int] = (LAG_RATE_PER_S,)) -> int:
    """`make bench`: print the median entries/s per sink on a backlog, then the lag per rate."""
    settings = Settings.from_env()
    pg_rates: list[float] = []
    im_rates: list[float] = []
    if runs == 0:
        for rate in lag_rates:
            _print_lag(asyncio.run(_lag_run(settings, seed=rate, rate_per_s=rate)))
        return 0
    for run in range(runs):
        pg_rate, im_rate = asyncio.run(_throughput_run(settings, entries, seed=run))
        pg_rates.append(pg_rate)
        im_rates.append(im_rate)
        print(f"run {run + 1}/{runs}: postgres {pg_rate:,.0f} entries/s, immudb {im_rate:,.0f} "
              f"entries/s", file=sys.stderr, flush=True)
    lags = [asyncio.run(_lag_run(settings, seed=runs + rate, rate_per_s=rate)) for rate in lag_rates]
    print(f"sink throughput, {entries:,} entries backlog, median of {runs} runs:")
    print(f"  postgres: {statistics.median(pg_rates):,.0f} entries/s "
          f"(runs {', '.join(f'{r:,.0f}' for r in pg_rates)})")
    print(f"  immudb:   {statistics.median(im_rates):,.0f} entries/s "
          f"(runs {', '.join(f'{r:,.0f}' for r in im_rates)})")
    for lag in lags:
        _print_lag(lag)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sinks.bench",
        description="Sink benchmark. Throughput: a backlog of ENTRIES committed entries on fresh "
        "topics, each sink alone, RUNS times (median printed). Lag: both sinks running as "
        f"separate processes while entries are produced at each --lag-rate for "
        f"{LAG_DURATION_S:.0f} s; lag is the time from an entry's committed_at to its row "
        "(PostgreSQL) and to its verified receipt (immudb), p50 and p99.")
    parser.add_argument("entries", nargs="?", type=int, default=50_000,
                        help="backlog size for the throughput runs (default 50,000)")
    parser.add_argument("runs", nargs="?", type=int, default=3,
                        help="throughput runs (default 3; 0 measures only the lag)")
    parser.add_argument("--lag-rate", type=int, action="append", metavar="ENTRIES_PER_S",
                        help=f"entries/s of a lag run (repeatable; default {LAG_RATE_PER_S:,})")
    args = parser.parse_args(argv)
    return run_sink_bench(entries=args.entries, runs=args.runs,
                          lag_rates=args.lag_rate or [LAG_RATE_PER_S])


if __name__ == "__main__":
    sys.exit(main())
