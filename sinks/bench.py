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
from typing import Any

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient

from sinks.kafka import Shard
from sinks.process import SinkProcess
from sinks.schema import connect, quoted
from sinks.workload import LedgerWorkload, Produced, WorkloadProducer
from streams.config import Settings
from streams.topics import LedgerTopic, create_topics, delete_topics_with_prefix

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


async def _sink_rate(settings: Settings, kind: str, shards: int, env: dict[str, str],
                     written: Callable[[], Coroutine[Any, Any, int]], total: int) -> float:
    """Records/s of `shards` sink processes of a kind on a backlog of `total` records.

    Timed from the first process's ready line (connected, positioned) until every record is
    written, so interpreter start-up is not counted; the processes that become ready later
    only make the figure lower.
    """
    processes = [SinkProcess(settings, kind, env=env, shard=Shard(i, shards))
                 for i in range(shards)]
    try:
        for process in processes:
            await asyncio.to_thread(process.start, False)
        spawned = time.monotonic()
        first_ready: float | None = None
        while True:
            now = time.monotonic()
            for process in processes:
                if not process.alive():
                    raise RuntimeError(f"{process.name} stopped:\n{process.tail()}")
                if first_ready is None and process.ready():
                    first_ready = now
            if first_ready is not None and await written() >= total:
                return total / (time.monotonic() - first_ready)
            if now - spawned > RUN_TIMEOUT_S:
                raise TimeoutError(f"{kind}: backlog not written after {RUN_TIMEOUT_S:.0f}s")
            await asyncio.sleep(DONE_POLL_S)
    finally:
        for process in processes:
            await asyncio.to_thread(process.stop)


async def _throughput_run(settings: Settings, entries: int, seed: int, shards: int
                          ) -> tuple[float, float]:
    """Entries/s of the postgres sinks, then of the immudb sinks, each on the same backlog."""
    own = await _fresh(settings, entries, seed)
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    env = {"SARDIS_PG_SCHEMA": schema, "SARDIS_STATE_DIR": tempfile.mkdtemp(prefix="sardis-bench-")}
    entries_topic = own.topic(LedgerTopic.ENTRIES)
    conn = await connect(own.pg_dsn)
    admin = AIOKafkaAdminClient(bootstrap_servers=own.kafka_bootstrap)
    await admin.start()

    async def pg_written() -> int:
        # sink_offsets moves with each committed transaction; it exists once a sink migrated.
        try:
            return int(await conn.fetchval(
                f"SELECT coalesce(sum(next_offset), 0) FROM {quoted(schema)}.sink_offsets "
                "WHERE topic = $1", entries_topic))
        except asyncpg.UndefinedTableError:
            return 0

    async def immudb_written() -> int:
        # The immudb sinks commit their offsets with the receipts (a Kafka transaction).
        offsets = await admin.list_consumer_group_offsets(f"{own.topic_prefix}sardis-immudb-sink")
        return sum(meta.offset for tp, meta in offsets.items()
                   if tp.topic == entries_topic and meta.offset > 0)

    try:
        pg_rate = await _sink_rate(own, "postgres", shards, env, pg_written, entries)
        im_rate = await _sink_rate(own, "immudb", shards, env, immudb_written, entries)
        return pg_rate, im_rate
    finally:
        await admin.close()
        await conn.close()
        await _drop(own, schema)


async def _drop(settings: Settings, schema: str) -> None:
    conn = await connect(settings.pg_dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {quoted(schema)} CASCADE")
    finally:
        await conn.close()
    await delete_topics_with_prefix(settings)


async def _lag_run(settings: Settings, seed: int, rate_per_s: int = LAG_RATE_PER_S,
                   shards: int = 1) -> dict[str, float]:
    """Both sinks (`shards` processes each) running while entries arrive at `rate_per_s`;
    lag = written - committed."""
    own = await _fresh(settings, 0, seed)
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    # Each sink in its own process, as deployed (in one process they would share one core).
    env = {"SARDIS_PG_SCHEMA": schema, "SARDIS_STATE_DIR": tempfile.mkdtemp(prefix="sardis-bench-")}
    processes = [SinkProcess(own, kind, env=env, shard=Shard(i, shards))
                 for kind in ("postgres", "immudb") for i in range(shards)]
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
                "target": rate_per_s, "shards": shards}
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
    print(f"end-to-end lag, {lag['shards']:.0f} process(es) per sink, entries produced at "
          f"{lag['rate']:,.0f}/s for {LAG_DURATION_S:.0f}s ({lag['sent']:,.0f} entries; asked "
          f"{lag['target']:,.0f}/s): postgres row p50 {lag['pg_p50_ms']:.0f} ms p99 "
          f"{lag['pg_p99_ms']:.0f} ms; immudb receipt p50 {lag['immudb_p50_ms']:.0f} ms p99 "
          f"{lag['immudb_p99_ms']:.0f} ms")


def run_sink_bench(*, entries: int = 50_000, runs: int = 3,
                   lag_rates: Sequence[int] = (LAG_RATE_PER_S,),
                   shard_counts: Sequence[int] = (1,)) -> int:
    """`make bench`: median entries/s per sink on a backlog for each process count (the counts
    alternate within each run, so each is measured next to the others), then the lag per rate
    with the largest count."""
    settings = Settings.from_env()
    rates: dict[tuple[str, int], list[float]] = {}
    for run in range(runs):
        for shards in shard_counts:
            pg_rate, im_rate = asyncio.run(_throughput_run(settings, entries, run, shards))
            rates.setdefault(("postgres", shards), []).append(pg_rate)
            rates.setdefault(("immudb", shards), []).append(im_rate)
            print(f"run {run + 1}/{runs}, {shards} process(es) per sink: postgres "
                  f"{pg_rate:,.0f} entries/s, immudb {im_rate:,.0f} entries/s",
                  file=sys.stderr, flush=True)
    lags = [asyncio.run(_lag_run(settings, seed=runs + rate, rate_per_s=rate,
                                 shards=max(shard_counts))) for rate in lag_rates]
    if runs:
        print(f"sink throughput, {entries:,} entries backlog, median of {runs} runs "
              "(timed from the first sink process ready until every entry is written):")
        for (kind, shards), values in rates.items():
            print(f"  {kind:8} x{shards}: {statistics.median(values):,.0f} entries/s "
                  f"(runs {', '.join(f'{r:,.0f}' for r in values)})")
    for lag in lags:
        _print_lag(lag)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sinks.bench",
        description="Sink benchmark. Throughput: a backlog of ENTRIES committed entries on fresh "
        "topics, written by the postgres sink processes, then by the immudb ones, RUNS times "
        "(median printed) for each --shards count. Lag: both sinks running as separate "
        f"processes while entries are produced at each --lag-rate for {LAG_DURATION_S:.0f} s; "
        "lag is the time from an entry's committed_at to its row (PostgreSQL) and to its "
        "verified receipt (immudb), p50 and p99.")
    parser.add_argument("entries", nargs="?", type=int, default=50_000,
                        help="backlog size for the throughput runs (default 50,000)")
    parser.add_argument("runs", nargs="?", type=int, default=3,
                        help="throughput runs (default 3; 0 measures only the lag)")
    parser.add_argument("--lag-rate", type=int, action="append", metavar="ENTRIES_PER_S",
                        help=f"entries/s of a lag run (repeatable; default {LAG_RATE_PER_S:,})")
    parser.add_argument("--shards", type=int, action="append", metavar="N",
                        help="sink processes per kind, `sink --shard I/N` (repeatable, to "
                        "compare; default 1). The lag runs use the largest")
    args = parser.parse_args(argv)
    return run_sink_bench(entries=args.entries, runs=args.runs,
                          lag_rates=args.lag_rate or [LAG_RATE_PER_S],
                          shard_counts=args.shards or [1])


if __name__ == "__main__":
    sys.exit(main())
