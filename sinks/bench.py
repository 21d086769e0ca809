"""Sink benchmark: entries/s of each sink on a backlog, and end-to-end lag at a steady rate."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from sardis_ledger.schemas.codec import AvroCodec
from sardis_ledger.sinks.immudb import group_id_for
from sardis_ledger.sinks.kafka import Shard
from sardis_ledger.sinks.process import SinkProcess
from sardis_ledger.sinks.schema import connect, quoted
from sardis_ledger.sinks.workload import LedgerWorkload, Produced, WorkloadProducer
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.produce import send_batches
from sardis_ledger.streams.topics import LedgerTopic, create_topics, delete_topics_with_prefix

PRODUCE_CHUNK = 5000
DONE_POLL_S = 0.05
RUN_TIMEOUT_S = 900.0
LAG_RATE_PER_S = 2000
LAG_DURATION_S = 10.0
LAG_TICK_S = 0.05
LAG_POLL_S = 0.02
ACCOUNTS = 10_000
SINK_KINDS = ("postgres", "immudb")


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


async def _postgres_positions(conn: Any, schema: str, topic: str) -> dict[int, int]:
    """partition -> next offset the postgres sinks committed (sink_offsets moves with each
    committed transaction; the table exists once a sink has migrated the schema)."""
    try:
        rows = await conn.fetch(f"SELECT partition, next_offset FROM {quoted(schema)}.sink_offsets "
                                "WHERE topic = $1", topic)
    except asyncpg.UndefinedTableError:
        return {}
    return {row["partition"]: row["next_offset"] for row in rows}


async def _immudb_positions(admin: AIOKafkaAdminClient, settings: Settings,
                            topic: str) -> dict[int, int]:
    """partition -> next offset the immudb sinks committed (with the receipts, in a Kafka
    transaction)."""
    offsets = await admin.list_consumer_group_offsets(group_id_for(settings))
    return {tp.partition: meta.offset for tp, meta in offsets.items()
            if tp.topic == topic and meta.offset >= 0}


@contextlib.asynccontextmanager
async def _sink_env(settings: Settings) -> AsyncIterator[tuple[str, dict[str, str]]]:
    """A fresh PostgreSQL schema and immudb state directory for the sink processes; on exit
    both are removed, with the settings' topics."""
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    state_dir = tempfile.mkdtemp(prefix="sardis-bench-")
    try:
        yield schema, {"SARDIS_PG_SCHEMA": schema, "SARDIS_STATE_DIR": state_dir}
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
        await _drop(settings, schema)


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
    entries_topic = own.topic(LedgerTopic.ENTRIES)
    async with _sink_env(own) as (schema, env):
        conn = await connect(own.pg_dsn)
        admin = AIOKafkaAdminClient(**own.kafka_connection())
        await admin.start()

        async def pg_written() -> int:
            return sum((await _postgres_positions(conn, schema, entries_topic)).values())

        async def immudb_written() -> int:
            return sum((await _immudb_positions(admin, own, entries_topic)).values())

        try:
            pg_rate = await _sink_rate(own, "postgres", shards, env, pg_written, entries)
            im_rate = await _sink_rate(own, "immudb", shards, env, immudb_written, entries)
            return pg_rate, im_rate
        finally:
            await admin.close()
            await conn.close()


async def _drop(settings: Settings, schema: str) -> None:
    conn = await connect(settings.pg_dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {quoted(schema)} CASCADE")
    finally:
        await conn.close()
    await delete_topics_with_prefix(settings)


def visibility_lags_ms(sent_at: Sequence[Sequence[float]],
                       samples: Sequence[Sequence[tuple[float, int]]]) -> list[float]:
    """Per record, ms from its send to the first sample whose next offset is past it.

    `sent_at[p][o]` is when offset o of partition p was sent (a fresh topic without
    transactions numbers records 0, 1, 2 ...); `samples[p]` is (time, next offset) as polled,
    in time order. Records never seen as written are left out (the caller checks the count).
    """
    lags: list[float] = []
    for sent, polled in zip(sent_at, samples, strict=True):
        position = 0
        for seen_at, next_offset in polled:
            while position < min(next_offset, len(sent)):
                lags.append((seen_at - sent[position]) * 1000)
                position += 1
    return lags


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def _lag_run(settings: Settings, seed: int, rate_per_s: int = LAG_RATE_PER_S,
                   shards: int = 1, kinds: Sequence[str] = SINK_KINDS) -> dict[str, Any]:
    """Both sinks (`shards` processes each) running while entries arrive at `rate_per_s`.

    The entries are generated and encoded before the clock starts (generating them costs more
    CPU than sinking them), then sent in record batches every LAG_TICK_S. An entry's lag runs
    from its send until the postgres sinks' committed `sink_offsets` (visible rows) and the
    immudb sinks' committed group offsets (published, verified receipts) are past it, polled
    every LAG_POLL_S.
    """
    own = await _fresh(settings, 0, seed)
    async with _sink_env(own) as (schema, env):
        return await _lag_measure(own, schema, env, seed, rate_per_s, shards, kinds)


async def _lag_measure(own: Settings, schema: str, env: dict[str, str], seed: int,
                       rate_per_s: int, shards: int, kinds: Sequence[str]) -> dict[str, Any]:
    # Each sink in its own process, as deployed (in one process they would share one core).
    processes = [SinkProcess(own, kind, env=env, shard=Shard(i, shards))
                 for kind in kinds for i in range(shards)]
    entries_topic = own.topic(LedgerTopic.ENTRIES)
    total = int(rate_per_s * LAG_DURATION_S)
    workload = LedgerWorkload(own.partitions, ACCOUNTS, seed, prefix="lag")
    codec = AvroCodec()
    planned: list[tuple[int, bytes, bytes]] = []
    while len(planned) < total:
        for record in workload.next(min(PRODUCE_CHUNK, total - len(planned))).entries:
            planned.append((record["partition"], record["account_id"].encode(),
                            codec.encode("Entry", record)))
    sent_at: list[list[float]] = [[] for _ in range(own.partitions)]
    samples: dict[str, list[list[tuple[float, int]]]] = {
        kind: [[] for _ in range(own.partitions)] for kind in kinds}
    conn = await connect(own.pg_dsn)
    admin = AIOKafkaAdminClient(**own.kafka_connection())
    producer = AIOKafkaProducer(**own.kafka_connection(), acks="all",
                                enable_idempotence=True, linger_ms=0)
    sending = True

    async def poll() -> None:
        while True:
            for kind, by_partition in samples.items():
                positions = (await _postgres_positions(conn, schema, entries_topic)
                             if kind == "postgres" else
                             await _immudb_positions(admin, own, entries_topic))
                now = time.monotonic()
                for partition, next_offset in positions.items():
                    by_partition[partition].append((now, next_offset))
            if not sending and all(
                    sum(polled[-1][1] if polled else 0 for polled in by_partition) >= total
                    for by_partition in samples.values()):
                return
            await asyncio.sleep(LAG_POLL_S)

    try:
        await admin.start()
        await producer.start()
        for process in processes:
            await asyncio.to_thread(process.start)
        poller = asyncio.create_task(poll())
        started = time.monotonic()
        done = 0
        while done < total:
            due = min(total, int((time.monotonic() - started) * rate_per_s) + 1)
            due_by_partition: dict[int, list[tuple[bytes | None, bytes]]] = {}
            for partition, key, value in planned[done:due]:
                due_by_partition.setdefault(partition, []).append((key, value))
            for partition, items in due_by_partition.items():
                sent_at[partition].extend([time.monotonic()] * len(items))
                await send_batches(producer, entries_topic, partition, items)
            done = due
            await asyncio.sleep(LAG_TICK_S)  # the next tick sends whatever fell due meanwhile
        sent_s = time.monotonic() - started
        await producer.flush()
        sending = False
        await asyncio.wait_for(poller, RUN_TIMEOUT_S)
        result: dict[str, Any] = {"sent": total, "rate": total / sent_s, "target": rate_per_s,
                                  "shards": shards, "kinds": kinds}
        for kind, by_partition in samples.items():
            lags = visibility_lags_ms(sent_at, by_partition)
            if len(lags) != total:
                raise RuntimeError(f"{kind}: {len(lags)} of {total} entries seen written")
            result[f"{kind}_p50_ms"] = _percentile(lags, 0.5)
            result[f"{kind}_p99_ms"] = _percentile(lags, 0.99)
        return result
    finally:
        for process in processes:
            await asyncio.to_thread(process.stop)
        await producer.stop()
        await admin.close()
        await conn.close()


def _print_lag(lag: dict[str, Any]) -> None:
    what = {"postgres": "postgres rows visible", "immudb": "immudb receipts committed"}
    figures = "; ".join(f"{what[kind]} p50 {lag[f'{kind}_p50_ms']:.0f} ms p99 "
                        f"{lag[f'{kind}_p99_ms']:.0f} ms" for kind in lag["kinds"])
    print(f"end-to-end lag, {' and '.join(lag['kinds'])} sinks, {lag['shards']} process(es) "
          f"each, entries produced at {lag['rate']:,.0f}/s for {LAG_DURATION_S:.0f}s "
          f"({lag['sent']:,} entries; asked {lag['target']:,}/s): {figures}")


def run_sink_bench(*, entries: int = 50_000, runs: int = 3,
                   lag_rates: Sequence[int] = (LAG_RATE_PER_S,),
                   shard_counts: Sequence[int] = (1,),
                   lag_kinds: Sequence[str] = SINK_KINDS) -> int:
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
                                 shards=max(shard_counts), kinds=lag_kinds))
            for rate in lag_rates]
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
        "(median printed) for each --shards count. Lag: the sinks (--lag-sinks) running as "
        "separate processes while entries, generated and encoded beforehand, are sent at each "
        f"--lag-rate for {LAG_DURATION_S:.0f} s in record batches; an entry's lag is the time "
        "from its send until the sink's committed offsets pass it (its row is visible in "
        "PostgreSQL; its verified receipt is committed to Kafka), p50 and p99.")
    parser.add_argument("entries", nargs="?", type=int, default=50_000,
                        help="backlog size for the throughput runs (default 50,000)")
    parser.add_argument("runs", nargs="?", type=int, default=3,
                        help="throughput runs (default 3; 0 measures only the lag)")
    parser.add_argument("--lag-rate", type=int, action="append", metavar="ENTRIES_PER_S",
                        help=f"entries/s of a lag run (repeatable; default {LAG_RATE_PER_S:,})")
    parser.add_argument("--shards", type=int, action="append", metavar="N",
                        help="sink processes per kind, `sink --shard I/N` (repeatable, to "
                        "compare; default 1). The lag runs use the largest")
    parser.add_argument("--lag-sinks", choices=["both", *SINK_KINDS], default="both",
                        help="which sinks run during the lag runs (default both; one alone "
                        "shows its lag when it has the machine to itself)")
    args = parser.parse_args(argv)
    return run_sink_bench(entries=args.entries, runs=args.runs,
                          lag_rates=args.lag_rate or [LAG_RATE_PER_S],
                          shard_counts=args.shards or [1],
                          lag_kinds=SINK_KINDS if args.lag_sinks == "both" else [args.lag_sinks])


if __name__ == "__main__":
    sys.exit(main())
