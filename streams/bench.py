"""`make bench`: end-to-end throughput and latency (command produced -> result consumed)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from sardis_ledger.schemas.codec import AvroCodec
from sardis_ledger.streams import core
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.errors import ConfigError
from sardis_ledger.streams.money import currency_table, to_major
from sardis_ledger.streams.topics import create_topics, delete_topics_with_prefix
from sardis_ledger.streams.worker_process import WorkerProcess

T = TypeVar("T")
RESULT_WAIT_S = 600.0
PROGRESS_EVERY_S = 2.0
PRODUCE_CHUNK = 2000
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
RECOVERY_WAIT_S = 3600.0  # the recovery scenario waits this long for the restarted worker
CLOSED_LOOP_CLIENTS_DEFAULT = (1, 16)
CLOSED_LOOP_DURATION_S_DEFAULT = 10.0
OPEN_LOOP_RATE_DEFAULT = 1000
OPEN_LOOP_DURATION_S_DEFAULT = 10.0
BATCH_LEGS_DEFAULT = (2,)  # legs per batch in scenario (c); --batch-legs adds sizes
OPEN_LOOP_TICK_S = 0.005  # the open-loop producer sends what is due every 5 ms


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    commands: int
    accounts: int
    batches: bool = False  # batches on ledger.batches instead of PostEntry commands
    legs: int = 2  # legs per batch: one debit, then credits to distinct accounts


@dataclass(frozen=True, slots=True)
class RunFigures:
    rate_per_s: float
    p50_ms: float
    p99_ms: float
    count: int = 0  # commands or batches timed
    worker_cpu_s: float = 0.0  # CPU the worker processes used in the run (warm-up included)
    broker_cpu_s: float = 0.0  # CPU every broker used in the run (0: external brokers)
    worker_rss_growth_bytes: int = 0  # how much the workers' resident memory grew in the run


def _commands(scenario: Scenario, seed: int) -> list[dict[str, object]]:
    """Mostly credits with some debits that fit: every command commits, none is rejected."""
    rng = random.Random(seed)
    decimals = currency_table()["USDC"].decimals
    out: list[dict[str, object]] = []
    for i in range(scenario.commands):
        account = f"bench_{rng.randrange(scenario.accounts):05d}"
        kind = "debit" if i % 4 == 3 else "credit"
        out.append({"command_id": f"bench-{seed}-{i}", "account_id": account, "currency": "USDC",
                    "entry_type": kind, "amount": to_major(1 if kind == "debit" else 5, decimals),
                    "allow_overdraft": True})
    return out


def percentile(sorted_ms: Sequence[float], fraction: float) -> float:
    """The value at `fraction` (0..1) of an ascending list (nearest rank); 0.0 when empty."""
    if not sorted_ms:
        return 0.0
    return sorted_ms[min(len(sorted_ms) - 1, int(len(sorted_ms) * fraction))]


async def closed_loop(settings: Settings, clients: int, accounts: int,
                      duration_s: float) -> RunFigures:
    """`clients` tasks, each posting one command with LedgerClient.create_entry and awaiting its
    result before the next, as API handlers call a ledger; for `duration_s`."""
    from sardis_ledger.streams.client import LedgerClient

    latencies_ms: list[float] = []
    stop_at = time.monotonic() + duration_s

    async def client(index: int, ledger: LedgerClient) -> None:
        rng = random.Random(index)
        sequence = 0
        while time.monotonic() < stop_at:
            account = f"loop_{rng.randrange(accounts):05d}"
            started = time.monotonic()
            await ledger.create_entry(account_id=account, amount="0.10", entry_type="credit",
                                      currency="USDC", command_id=f"loop-{index}-{sequence}")
            latencies_ms.append((time.monotonic() - started) * 1000)
            sequence += 1

    async with LedgerClient(settings) as ledger:
        # One command first: the client's consumer and producer are connected and warm.
        await ledger.create_entry(account_id="loop_warm", amount="0.10", entry_type="credit",
                                  currency="USDC", command_id=f"loop-warm-{time.time_ns()}")
        began = time.monotonic()
        await asyncio.gather(*(client(i, ledger) for i in range(clients)))
        elapsed_s = time.monotonic() - began
    latencies_ms.sort()
    return RunFigures(len(latencies_ms) / elapsed_s, percentile(latencies_ms, 0.50),
                      percentile(latencies_ms, 0.99), count=len(latencies_ms))


async def open_loop(settings: Settings, rate_per_s: int, accounts: int,
                    duration_s: float) -> RunFigures:
    """Commands produced at a fixed rate whatever the ledger does (a schedule, not a reaction),
    each timed from its send to its result being consumed."""
    count = int(rate_per_s * duration_s)
    encoded = _encoded(settings, Scenario("open", count, accounts), seed=int(time.time()))
    results_topic = settings.topic("ledger.results")
    producer, consumer = _clients(settings)
    await producer.start()
    await consumer.start()
    sent_at: dict[str, float] = {}
    latencies_ms: list[float] = []
    try:
        await _results_from_now(consumer, results_topic, settings.partitions)
        reader = asyncio.create_task(_read_latencies(consumer, sent_at, latencies_ms, count))
        began = time.monotonic()
        sent = 0
        while sent < count:
            due = min(count, int((time.monotonic() - began) * rate_per_s) + 1)
            for result_key, topic, key, value in encoded[sent:due]:
                sent_at[result_key] = time.monotonic()
                await producer.send(topic, value, key=key.encode(),
                                    partition=core.partition_for(key, settings.partitions))
            sent = due
            await asyncio.sleep(OPEN_LOOP_TICK_S)
        await producer.flush()
        finished = await reader
    finally:
        await producer.stop()
        await consumer.stop()
    latencies_ms.sort()
    return RunFigures(count / (finished - began), percentile(latencies_ms, 0.50),
                      percentile(latencies_ms, 0.99), count=count)


async def _read_latencies(consumer: AIOKafkaConsumer, sent_at: dict[str, float],
                          latencies_ms: list[float], count: int,
                          progress: Callable[[int], None] | None = None) -> float:
    """Read results until `count` of the sent keys answered (each counted once: its send time
    is taken out of `sent_at`); returns when the last one came."""
    deadline = time.monotonic() + RESULT_WAIT_S
    last_progress = 0.0
    while len(latencies_ms) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count - len(latencies_ms)} results missing after "
                               f"{RESULT_WAIT_S}s")
        batches = await consumer.getmany(timeout_ms=100, max_records=10_000)
        now = time.monotonic()
        for messages in batches.values():
            for message in messages:
                started = sent_at.pop(message.key.decode(), None)
                if started is not None:
                    latencies_ms.append((now - started) * 1000)
        if progress is not None and now - last_progress > PROGRESS_EVERY_S:
            progress(len(latencies_ms))
            last_progress = now
    return time.monotonic()


def _clients(settings: Settings) -> tuple[AIOKafkaProducer, AIOKafkaConsumer]:
    producer = AIOKafkaProducer(**settings.kafka_connection(), acks="all",
                                enable_idempotence=True, linger_ms=5)
    consumer = AIOKafkaConsumer(**settings.kafka_connection(),
                                isolation_level="read_committed", enable_auto_commit=False)
    return producer, consumer


def _progress(label: str, done: int, total: int, started: float) -> None:
    width = 30
    filled = width * done // max(total, 1)
    rate = done / max(time.monotonic() - started, 1e-9)
    sys.stderr.write(f"\r  {label:28s} [{'#' * filled}{'.' * (width - filled)}] "
                     f"{done}/{total} {rate:8.0f}/s")
    sys.stderr.flush()


async def _create_baseline_topic(settings: Settings, topic: str) -> None:
    """One partition, the ledger topics' replication. Created here, not by a first produce:
    a secured broker has auto.create.topics.enable=false."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    from sardis_ledger.streams.topic_policy import plan_replication
    from sardis_ledger.streams.topics import broker_count

    admin = AIOKafkaAdminClient(**settings.kafka_connection())
    await admin.start()
    try:
        plan = plan_replication(settings.replication_factor, await broker_count(admin))
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([NewTopic(topic, 1, plan.replication_factor)])
    finally:
        await admin.close()


async def _kafka_baseline(settings: Settings, count: int) -> float:
    """Produce and read back `count` encoded commands on one topic: Kafka + Avro, no ledger."""
    codec = AvroCodec()
    topic = settings.topic("bench.baseline")
    values = [codec.encode("PostEntry", c) for c in _commands(Scenario("b", count, 1000), 99)]
    await _create_baseline_topic(settings, topic)
    producer, consumer = _clients(settings)
    await producer.start()
    await consumer.start()
    try:
        await producer.send_and_wait(topic, b"warm-up", partition=0)
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        start_offset = await consumer.position(tp)
        started = time.monotonic()
        for value in values:
            await producer.send(topic, value, partition=0)
        await producer.flush()
        seen = 0
        while seen < count:
            batch = await consumer.getmany(tp, timeout_ms=500, max_records=5000)
            for message in batch.get(tp, []):
                if message.offset >= start_offset:
                    codec.decode(message.value)
                    seen += 1
        return count / (time.monotonic() - started)
    finally:
        await producer.stop()
        await consumer.stop()


def _batches(scenario: Scenario, seed: int) -> list[dict[str, object]]:
    """Transfers from one random account to `legs - 1` others (overdraft allowed, so every batch
    commits): a debit of the whole, then a credit per payee; the legs sum to zero."""
    rng = random.Random(seed)
    decimals = currency_table()["USDC"].decimals
    out: list[dict[str, object]] = []
    for i in range(scenario.commands):
        payer, *payees = rng.sample(range(scenario.accounts), scenario.legs)
        amount_minor = rng.randint(1, 10_000)
        legs: list[dict[str, object]] = [
            {"account_id": f"bench_{payer:05d}", "currency": "USDC", "entry_type": "debit",
             "amount": to_major(amount_minor * len(payees), decimals), "allow_overdraft": True}]
        legs += [{"account_id": f"bench_{payee:05d}", "currency": "USDC",
                  "entry_type": "credit", "amount": to_major(amount_minor, decimals)}
                 for payee in payees]
        out.append({"batch_id": f"bench-{seed}-{i}", "legs": legs})
    return out


def _encoded(settings: Settings, scenario: Scenario, seed: int) -> list[tuple[str, str, str, bytes]]:
    """(result key, topic, partition key, value) of every message the scenario produces."""
    codec = AvroCodec()
    if scenario.batches:
        return [(str(b["batch_id"]), settings.topic("ledger.batches"), str(b["batch_id"]),
                 codec.encode("SubmitBatch", b)) for b in _batches(scenario, seed)]
    return [(str(c["command_id"]), settings.topic("ledger.commands"), str(c["account_id"]),
             codec.encode("PostEntry", c)) for c in _commands(scenario, seed)]


def _warm_up(settings: Settings) -> list[tuple[str, str, str, bytes]]:
    """One command on an account of each partition: every partition assigned and deciding."""
    codec = AvroCodec()
    decimals = currency_table()["USDC"].decimals
    accounts: dict[int, str] = {}
    index = 0
    while len(accounts) < settings.partitions:
        account = f"warm_{index}"
        accounts.setdefault(core.partition_for(account, settings.partitions), account)
        index += 1
    out = []
    for partition, account in sorted(accounts.items()):
        command_id = f"warm-{partition}"
        out.append((command_id, settings.topic("ledger.commands"), account,
                    codec.encode("PostEntry", {"command_id": command_id, "account_id": account,
                                               "currency": "USDC", "entry_type": "credit",
                                               "amount": to_major(1, decimals)})))
    return out


async def _results_from_now(consumer: AIOKafkaConsumer, topic: str, partitions: int) -> None:
    """Assign every partition of the results topic and position the consumer at its end."""
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    for tp in tps:
        await consumer.position(tp)


async def _run(settings: Settings, scenario: Scenario, seed: int) -> RunFigures:
    return await _produce_and_wait(settings, _encoded(settings, scenario, seed), scenario.name)


async def _produce_and_wait(settings: Settings, encoded: list[tuple[str, str, str, bytes]],
                            label: str) -> RunFigures:
    results_topic = settings.topic("ledger.results")
    producer, consumer = _clients(settings)
    await producer.start()
    await consumer.start()
    sent_at: dict[str, float] = {}
    latencies_ms: list[float] = []
    try:
        await _results_from_now(consumer, results_topic, settings.partitions)

        started = time.monotonic()

        def progress(done: int) -> None:
            _progress(label, done, len(encoded), started)

        reader = asyncio.create_task(_read_latencies(consumer, sent_at, latencies_ms,
                                                     len(encoded), progress))
        for i, (result_key, topic, key, value) in enumerate(encoded):
            sent_at[result_key] = time.monotonic()
            await producer.send(topic, value, key=key.encode(),
                                partition=core.partition_for(key, settings.partitions))
            if i % PRODUCE_CHUNK == PRODUCE_CHUNK - 1:
                await asyncio.sleep(0)  # let the reader run while producing
        await producer.flush()
        finished = await reader
        _progress(label, len(latencies_ms), len(encoded), started)
        sys.stderr.write("\n")
    finally:
        await producer.stop()
        await consumer.stop()
    latencies_ms.sort()
    return RunFigures(len(encoded) / (finished - started), percentile(latencies_ms, 0.50),
                      percentile(latencies_ms, 0.99), count=len(encoded))


@contextlib.contextmanager
def _worker(settings: Settings, index: int) -> Iterator[WorkerProcess]:
    """A started worker process (not yet ready) with a data directory of its own."""
    datadir = tempfile.mkdtemp(prefix=f"sardis-bench-worker-{index}-")
    process = WorkerProcess(settings, name=f"worker{index}",
                            env={"SARDIS_WORKER_DATADIR": datadir})
    process.start(wait_ready=False)
    try:
        yield process
    finally:
        process.stop()
        shutil.rmtree(datadir, ignore_errors=True)


def _clusters(base: Settings, brokers: Sequence[int]) -> dict[int, Settings]:
    """Settings per cluster size: 1 is the single dev node (or SARDIS_KAFKA_BOOTSTRAP), 3 the
    dev cluster (`dev up --brokers 3`), started here if it is not running."""
    from infra import kafka_cluster

    out: dict[int, Settings] = {}
    for size in brokers:
        if size == 1:
            out[size] = base
        else:
            kafka_cluster.up(size)
            out[size] = dataclasses.replace(base, kafka_bootstrap=kafka_cluster.bootstrap(size))
    return out


def _label(size: int) -> str:
    return f"{size} broker{'s' if size > 1 else ''}"


def _baseline(clusters: dict[int, Settings], runs: int, count: int) -> dict[int, list[float]]:
    """The Kafka+Avro baseline on every cluster, the sizes alternating within each run."""
    rates: dict[int, list[float]] = {size: [] for size in clusters}
    for run in range(runs):
        for size, base in clusters.items():
            settings = dataclasses.replace(
                base, topic_prefix=f"{base.topic_prefix}bench-{int(time.time())}-{run}.")
            try:
                rates[size].append(asyncio.run(_kafka_baseline(settings, count)))
            finally:
                asyncio.run(delete_topics_with_prefix(settings))
    return rates


def _fresh_run(base: Settings, key: str, run: int, workers: int, broker_pids: list[int],
               measure: Callable[[Settings], Coroutine[Any, Any, RunFigures]]) -> RunFigures:
    """One run on fresh topics with fresh worker processes (no state carried between runs), with
    the CPU the workers and brokers used and how much the workers' memory grew while measured."""
    settings = dataclasses.replace(
        base, topic_prefix=f"{base.topic_prefix}bench-{key}-{int(time.time())}-{run}.")
    asyncio.run(create_topics(settings))
    try:
        with contextlib.ExitStack() as stack:
            processes = [stack.enter_context(_worker(settings, i)) for i in range(workers)]
            for process in processes:
                process.wait_ready()
            asyncio.run(_produce_and_wait(settings, _warm_up(settings), "warm-up"))
            worker_pids = [p.proc.pid for p in processes if p.proc is not None]
            workers_before, brokers_before = _cpu_s(worker_pids), _cpu_s(broker_pids)
            rss_before = _rss_bytes(worker_pids)
            figures = asyncio.run(measure(settings))
            return dataclasses.replace(figures, worker_cpu_s=_cpu_s(worker_pids) - workers_before,
                                       broker_cpu_s=_cpu_s(broker_pids) - brokers_before,
                                       worker_rss_growth_bytes=_rss_bytes(worker_pids) - rss_before)
    finally:
        # Also after a failed or interrupted run: every partition left slows Kafka's start.
        asyncio.run(delete_topics_with_prefix(settings))


def _cpu_s(pids: Sequence[int]) -> float:
    """User + system CPU seconds the processes used so far (Linux /proc; 0 if unreadable)."""
    total = 0.0
    for pid in pids:
        try:
            # Fields 14 and 15 (utime, stime), counted after the ")" that ends the command name.
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S
    return total


def _rss_bytes(pids: Sequence[int]) -> int:
    """Resident memory of the processes now (Linux /proc; 0 if unreadable)."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024  # kB
    return total


def _broker_pids(size: int) -> list[int]:
    """The dev harness's broker processes for a cluster size ([] for external brokers)."""
    from infra import harness, kafka_cluster

    if size == 1:
        servers = [s for s in harness.servers(Settings()) if s.name == "kafka"]
        servers = [s for s in servers if not harness.external(s)]
    else:
        servers = kafka_cluster.nodes_of(size)
    return [pid for pid in (s.pid() for s in servers) if pid is not None]


def _report(name: str, unit: str, size: int, found: list[RunFigures]) -> str:
    worker_us = statistics.median(f.worker_cpu_s / f.count * 1e6 for f in found)
    broker_us = statistics.median(f.broker_cpu_s / f.count * 1e6 for f in found)
    rss_per = statistics.median(f.worker_rss_growth_bytes / f.count for f in found)
    return (f"  {name:28s} {_label(size):9s} "
            f"{_rate(statistics.median(f.rate_per_s for f in found)):>9s} {unit}"
            f"   p50 {statistics.median(f.p50_ms for f in found):8.1f} ms"
            f"   p99 {statistics.median(f.p99_ms for f in found):8.1f} ms"
            f"   per {unit.split('/')[0]}: worker CPU {worker_us:,.0f} us, broker CPU {broker_us:,.0f} us, "
            f"worker memory {rss_per:,.0f} B"
            f"   runs: {', '.join(_rate(f.rate_per_s) for f in found)}")


def _rate(per_s: float) -> str:
    """Rates below 100/s (closed loops of one client) keep a decimal."""
    return f"{per_s:,.1f}" if per_s < 100 else f"{per_s:,.0f}"


def recovery_run(base: Settings, accounts: int) -> str:
    """One worker books one credit on each of `accounts` accounts; then its resident memory is
    read, it is killed with SIGKILL and a new worker replays the changelogs. Returns the report
    line: memory, and how long the new worker took until it answered a new command."""
    settings = dataclasses.replace(
        base, topic_prefix=f"{base.topic_prefix}bench-recovery-{int(time.time())}.")
    asyncio.run(create_topics(settings))
    codec = AvroCodec()
    decimals = currency_table()["USDC"].decimals
    encoded = [(f"rec-{i}", settings.topic("ledger.commands"), f"rec_{i:07d}",
                codec.encode("PostEntry", {
                    "command_id": f"rec-{i}", "account_id": f"rec_{i:07d}", "currency": "USDC",
                    "entry_type": "credit", "amount": to_major(10, decimals)}))
               for i in range(accounts)]
    try:
        with _worker(settings, 0) as worker:
            worker.wait_ready()
            asyncio.run(_produce_and_wait(settings, _warm_up(settings), "warm-up"))
            figures = asyncio.run(_produce_and_wait(settings, encoded, f"{accounts} accounts"))
            pids = [worker.proc.pid] if worker.proc is not None else []
            rss = _rss_bytes(pids)
            print(f"  recovery: {accounts:,} accounts booked at {figures.rate_per_s:,.0f} cmd/s; "
                  f"worker RSS {rss / 2**20:,.0f} MiB; kill -9 and restart", flush=True)
            worker.kill9()
            started = time.monotonic()
            # A replay of a large history takes longer than a start: wait for it, up to a bound.
            worker.ready_timeout_s = RECOVERY_WAIT_S
            worker.start(wait_ready=False)
            worker.wait_ready()
            ready_s = time.monotonic() - started
            asyncio.run(_produce_and_wait(settings, _warm_up(settings), "after recovery"))
            answered_s = time.monotonic() - started
            rss_after = _rss_bytes([worker.proc.pid] if worker.proc is not None else [])
    finally:
        asyncio.run(delete_topics_with_prefix(settings))
    return (f"  recovery, {accounts:,} accounts (one credit each, {figures.rate_per_s:,.0f} cmd/s): "
            f"worker RSS {rss / 2**20:,.0f} MiB before kill -9, {rss_after / 2**20:,.0f} MiB "
            f"after recovery; ready {ready_s:.1f} s after restart, answering {answered_s:.1f} s")


def run_bench(*, runs: int, commands: int, accounts: int, hot_commands: int,
              scenarios: Sequence[str], batches: int = 10_000,
              batch_legs: Sequence[int] = BATCH_LEGS_DEFAULT, workers: int = 1,
              brokers: Sequence[int] = (1,),
              clients: Sequence[int] = CLOSED_LOOP_CLIENTS_DEFAULT,
              rate_per_s: int = OPEN_LOOP_RATE_DEFAULT,
              duration_s: float = CLOSED_LOOP_DURATION_S_DEFAULT) -> int:
    from infra import harness

    if "batches" in scenarios and max(batch_legs) > accounts:
        raise ConfigError(f"a {max(batch_legs)}-leg batch needs as many accounts; --accounts "
                          f"is {accounts}")
    harness.up()
    clusters = _clusters(Settings.from_env(), brokers)
    print(f"sardis-ledger bench: {runs} run(s) per scenario, median reported; {workers} worker "
          f"process(es) on {' and '.join(_label(s) for s in clusters)} (alternating within each "
          "run), brokers on the same machine", flush=True)
    for size, rates in _baseline(clusters, runs, min(commands, 50_000)).items():
        print(f"  baseline Kafka+Avro produce->consume, no ledger, {_label(size)}: "
              f"{statistics.median(rates):,.0f} records/s (runs: "
              f"{', '.join(f'{r:,.0f}' for r in rates)})", flush=True)
    plan = _plan(commands=commands, accounts=accounts, hot_commands=hot_commands,
                 batches=batches, batch_legs=batch_legs, clients=clients,
                 rate_per_s=rate_per_s, duration_s=duration_s)
    for key in scenarios:
        if key == "recovery":
            for _run_index in range(runs):
                for base in clusters.values():
                    print(recovery_run(base, accounts), flush=True)
            continue
        for name, unit, measure in plan[key]:
            figures: dict[int, list[RunFigures]] = {size: [] for size in clusters}
            for run in range(runs):
                for size, base in clusters.items():
                    figures[size].append(_fresh_run(base, key, run, workers, _broker_pids(size),
                                                    functools.partial(measure, seed=run)))
            for size, found in figures.items():
                print(_report(name, unit, size, found), flush=True)
    return 0


Measure = Callable[..., Coroutine[Any, Any, RunFigures]]


def _plan(*, commands: int, accounts: int, hot_commands: int, batches: int,
          batch_legs: Sequence[int], clients: Sequence[int], rate_per_s: int,
          duration_s: float) -> dict[str, list[tuple[str, str, Measure]]]:
    """Per scenario key: (report name, unit, measure(settings, seed=run)) for each variant."""
    def _burst(scenario: Scenario) -> tuple[str, str, Measure]:
        return (scenario.name, "batch/s" if scenario.batches else "cmd/s",
                lambda settings, seed: _run(settings, scenario, seed=seed))

    def closed(count: int) -> Measure:
        return lambda settings, seed: closed_loop(settings, count, accounts, duration_s)

    def open_(settings: Settings, seed: int) -> Coroutine[Any, Any, RunFigures]:
        return open_loop(settings, rate_per_s, accounts, duration_s)

    return {
        "spread": [_burst(Scenario(f"(a) {commands} cmds / {accounts} accts", commands,
                                   accounts))],
        "hot": [_burst(Scenario(f"(b) {hot_commands} cmds / 1 account", hot_commands, 1))],
        "batches": [_burst(Scenario(f"(c) {batches} {legs}-leg batches", batches, accounts,
                                    batches=True, legs=legs)) for legs in batch_legs],
        "closed": [(f"closed loop, {count} client(s) / {accounts} accts", "cmd/s", closed(count))
                   for count in clients],
        "open": [(f"open loop, {rate_per_s}/s offered / {accounts} accts", "cmd/s", open_)],
    }
