"""The ledger on a 3-broker cluster: a broker, the leader of most command partitions, the active
controller or a worker killed with SIGKILL while commands and batches stream in; afterwards
nothing is lost or doubled, balances equal a reference model, no hold is pending, the Merkle logs
are intact, both sinks hold every entry once and `verify` passes."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import pytest

from infra import kafka_cluster
from sardis_ledger.sinks.process import SinkProcess
from sardis_ledger.streams import core
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.money import to_minor
from sardis_ledger.streams.topics import TOPICS, changelog_topics, create_topics
from sardis_ledger.streams.worker_process import WorkerProcess
from tests.integration.cluster_support import (
    ArrivalWatcher,
    Kill,
    cluster,
    cluster_settings,
    leaders,
    wait_full_isr,
    wait_leaders_moved,
)
from tests.integration.support import RawProducer, check_merkle_logs, read_topic
from tests.integration.test_batches import (
    FUNDING,
    USDC_DECIMALS,
    check_batches_atomic,
    fund,
    plan_batches,
    wait_no_holds,
)
from tests.integration.test_ledger_stream import (
    check_entries_match_model,
    check_results,
    make_workload,
    reference_model,
    results_for,
)
from tests.integration.test_sinks import check_exactly_once, wait_caught_up
from tests.integration.test_topics import cli, start_worker

__all__ = ["cluster", "cluster_settings"]  # fixtures, imported for pytest
T = TypeVar("T")

# SARDIS_TEST_CLUSTER_SCENARIOS=all (`make test-cluster`) runs every scenario; CI runs the
# shortest. A comma list picks some.
SCENARIOS_ENV = "SARDIS_TEST_CLUSTER_SCENARIOS"
ALL_SCENARIOS = ("broker", "commands-leader", "controller", "workers")
# The workers scenario guards rebalances of the worker's poll hand-off (it found changelog
# records sent to the decider); ~4 min.
CI_SCENARIOS = ("broker", "workers")
COMMANDS = 20_000
COMMAND_ACCOUNTS = 200
BATCHES = 2_000
BATCH_ACCOUNTS = 60
COMMAND_CHUNK, BATCH_CHUNK = 250, 50
# 20,000 commands and 2,000 batches arrive over about a minute; over about three while workers
# are killed one after the other (each kill waits for the previous one's recovery).
STREAM_PAUSES_S = {"commands": 0.75, "batches": 1.5}
SLOW_STREAM_PAUSES_S = {"commands": 2.0, "batches": 4.0}
KILL_AFTER_S = 15.0  # into the stream
NODE_DOWN_S = 15.0  # a killed broker stays down this long before its restart
WORKERS = 3
WORKER_KILLS = 3
WORKER_KILL_PAUSE_S = (3.0, 10.0)  # after the previous kill's partitions are served again
RESULTS_TIMEOUT_S = 900.0
WORKER_CHECK_S = 1.0


def _scenarios() -> list[str]:
    raw = os.environ.get(SCENARIOS_ENV, ",".join(CI_SCENARIOS))
    chosen = list(ALL_SCENARIOS) if raw == "all" else [s.strip() for s in raw.split(",") if s.strip()]
    unknown = set(chosen) - set(ALL_SCENARIOS)
    if unknown:
        raise ValueError(f"{SCENARIOS_ENV}: unknown {sorted(unknown)}; use all or {ALL_SCENARIOS}")
    return chosen


class Ledger:
    """The processes under test: workers sharing the partitions, and one process of each sink."""

    def __init__(self, settings: Settings, pg_schema: str, state_dir: Path, root: Path,
                 workers: int) -> None:
        self.workers = []
        for i in range(workers):
            (root / f"worker-{i + 1}").mkdir(parents=True)
            self.workers.append(WorkerProcess(
                settings, root / f"worker-{i + 1}", name=f"worker{i + 1}",
                env={"SARDIS_WORKER_DATADIR": str(root / f"worker-{i + 1}" / "data")}))
        env = {"SARDIS_PG_SCHEMA": pg_schema, "SARDIS_STATE_DIR": str(state_dir)}
        self.sinks: dict[str, SinkProcess] = {}
        for kind in ("postgres", "immudb"):
            (root / kind).mkdir()
            self.sinks[kind] = SinkProcess(settings, kind, root / kind, env)

    def start(self) -> None:
        for worker in self.workers:
            worker.start(wait_ready=False)
        for worker in self.workers:
            worker.wait_ready()
        for sink in self.sinks.values():
            sink.start()

    def stop(self) -> None:
        for process in [*self.workers, *self.sinks.values()]:
            process.stop()


# ------------------------------------------------------------------ disturbances


def _all_topics(settings: Settings) -> list[str]:
    return [settings.topic(t.name) for t in TOPICS] + changelog_topics(settings)


async def _kill_broker(settings: Settings, victim: int, what: str) -> Kill:
    """SIGKILL one node, wait until its partitions have other leaders, restart it after
    NODE_DOWN_S and wait until every replica is back in sync."""
    kill = Kill(what, time.monotonic())
    await asyncio.to_thread(kafka_cluster.kill9, victim)
    kill.leaders_moved_s = await wait_leaders_moved(settings, "ledger.commands", victim, kill.at)
    await asyncio.sleep(max(0.0, NODE_DOWN_S - (time.monotonic() - kill.at)))
    restarted = time.monotonic()
    await asyncio.to_thread(kafka_cluster.start, victim)
    kill.back_in_sync_s = await wait_full_isr(settings, _all_topics(settings), restarted)
    return kill


async def _disturb(scenario: str, settings: Settings, ledger: Ledger, rng: random.Random,
                   watcher: ArrivalWatcher) -> list[Kill]:
    await asyncio.sleep(KILL_AFTER_S)
    if scenario == "workers":
        return await _kill_workers(ledger, rng, watcher)
    if scenario == "broker":
        victim = rng.choice(list(kafka_cluster.node_ids()))
        what = f"broker {victim}"
    elif scenario == "commands-leader":
        led = Counter((await leaders(settings, "ledger.commands")).values())
        victim, count = led.most_common(1)[0]
        what = f"broker {victim}, leader of {count}/{settings.partitions} ledger.commands partitions"
    else:
        victim = (await kafka_cluster.describe_quorum(settings.kafka_bootstrap)).leader_id
        what = f"broker {victim}, the active controller"
    return [await _kill_broker(settings, victim, what)]


async def _kill_workers(ledger: Ledger, rng: random.Random, watcher: ArrivalWatcher) -> list[Kill]:
    """A random one of the workers, killed and started again at once (as a supervisor would),
    WORKER_KILLS times at random moments, each once the previous one's partitions are served
    again (so each kill's cost is its own)."""
    kills = []
    for n in range(WORKER_KILLS):
        if n:
            await asyncio.sleep(rng.uniform(*WORKER_KILL_PAUSE_S))
        index = rng.randrange(len(ledger.workers))
        victim = ledger.workers[index]
        kill = Kill(f"worker {index + 1} of {len(ledger.workers)}", time.monotonic())
        kills.append(kill)
        victim.kill9()
        await asyncio.to_thread(victim.start, False)
        await asyncio.to_thread(victim.wait_ready)
        kill.ready_s = time.monotonic() - kill.at
        await watcher.wait_served_after(time.monotonic())
    return kills


# ------------------------------------------------------------------ workload


async def _stream_commands(settings: Settings, commands: list[dict[str, Any]],
                           pause_s: float) -> None:
    async with RawProducer(settings) as producer:
        await producer.post_entries_paced(commands, chunk=COMMAND_CHUNK, pause_s=pause_s)


async def _stream_batches(settings: Settings, planned: list[dict[str, Any]],
                          pause_s: float) -> None:
    async with RawProducer(settings) as producer:
        for i, batch in enumerate(planned):
            await producer.send("ledger.batches", "SubmitBatch", batch, batch["batch_id"])
            if i % BATCH_CHUNK == BATCH_CHUNK - 1:
                await producer.flush()
                await asyncio.sleep(pause_s)
        await producer.flush()


# ------------------------------------------------------------------ invariants


async def _while_workers_live(ledger: Ledger, check: Awaitable[T]) -> T:
    """Await a check, failing at once (with the worker's log) if a worker exits meanwhile: a
    worker that stopped on a broken invariant would otherwise show as a 15-minute timeout."""
    task = asyncio.ensure_future(check)
    while not task.done():
        for worker in ledger.workers:
            if not worker.alive():
                task.cancel()
                raise AssertionError(f"{worker.name} exited:\n{worker.tail()}")
        await asyncio.wait({task}, timeout=WORKER_CHECK_S)
    return task.result()


async def _check_decisions(settings: Settings, outcomes: dict[str, core.Outcome],
                           planned: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every command decided as the reference model decides it; every batch all or nothing, and
    rejected exactly when planned to overdraw. Returns the first result of each batch."""
    batch_ids = {b["batch_id"] for b in planned}
    results = await results_for(settings, set(outcomes) | batch_ids, timeout_s=RESULTS_TIMEOUT_S)
    check_results([r for r in results if r["command_id"] in outcomes], outcomes)
    decided: dict[str, dict[str, Any]] = {}
    for result in results:
        if result["command_id"] in batch_ids:
            decided.setdefault(result["command_id"], result)
    for batch in planned:
        overdraft = batch["legs"][0]["amount"] > FUNDING * 10
        assert (decided[batch["batch_id"]]["status"] == "rejected") == overdraft, batch["batch_id"]
    return decided


async def _check_entries(settings: Settings, outcomes: dict[str, core.Outcome],
                         planned: list[dict[str, Any]], decided: dict[str, dict[str, Any]],
                         funded: int) -> list[dict[str, Any]]:
    """Exactly the entries the model and the committed batches make, each once, sequences
    without gaps, Merkle logs intact. Returns them (one per entry id)."""
    expected = (sum(o.entry is not None for o in outcomes.values()) + funded
                + sum(len(b["legs"]) for b in planned
                      if decided[b["batch_id"]]["status"] == "committed"))
    rows = await read_topic(settings, "ledger.entries", timeout_s=RESULTS_TIMEOUT_S,
                            until=lambda rows: len({r[3]["entry_id"] for r in rows}) >= expected)
    unique: dict[str, dict[str, Any]] = {}
    for _p, _o, _k, entry in rows:
        assert unique.setdefault(entry["entry_id"], entry) == entry, "two entries, one id"
    assert len(unique) == expected
    entries = list(unique.values())
    check_entries_match_model([e for e in entries if e["account_id"].startswith("acc_")], outcomes)
    check_batches_atomic(planned, decided, entries)
    sequences: dict[tuple[str, str], list[int]] = defaultdict(list)
    for entry in entries:
        sequences[(entry["account_id"], entry["currency"])].append(entry["sequence"])
    for key, found in sequences.items():
        assert sorted(found) == list(range(1, len(found) + 1)), f"sequences of {key}"
    heads = [r[3] for r in await read_topic(settings, "ledger.tree-heads", idle_s=3, timeout_s=60)]
    check_merkle_logs(entries, heads)
    return entries


async def _check_balances(settings: Settings, outcomes: dict[str, core.Outcome],
                          planned: list[dict[str, Any]], decided: dict[str, dict[str, Any]],
                          accounts: list[str]) -> None:
    """No hold pending; every balance equals the reference model's (commands) or funding plus
    the committed legs (batches)."""
    balances = await wait_no_holds(settings, timeout_s=300)
    final: dict[str, tuple[int, int]] = {}
    for outcome in outcomes.values():
        if outcome.entry is not None:
            key = core.account_key(outcome.entry.account_id, outcome.entry.currency)
            if outcome.entry.sequence > final.get(key, (0, 0))[0]:
                final[key] = (outcome.entry.sequence, outcome.entry.running_balance_minor)
    for key, (sequence, balance_minor) in final.items():
        assert (balances[key]["sequence"],
                to_minor(balances[key]["balance"], USDC_DECIMALS)) == (sequence, balance_minor), key
    expected: dict[str, Decimal] = {account: FUNDING for account in accounts}
    for batch in planned:
        if decided[batch["batch_id"]]["status"] == "committed":
            for leg in batch["legs"]:
                sign = -1 if leg["entry_type"] == "debit" else 1
                expected[leg["account_id"]] += sign * leg["amount"]
    for account, amount in expected.items():
        assert to_minor(balances[f"{account}|USDC"]["balance"], USDC_DECIMALS) == \
            to_minor(amount, USDC_DECIMALS), account


# ------------------------------------------------------------------ the tests


async def test_one_replica_on_the_cluster_is_named_and_the_worker_refuses_it_unless_allowed(
    cluster_settings: Settings, tmp_path: Path
) -> None:
    """Topics made with replication factor 1 (as every version before this one made them) on
    a 3-broker cluster: `topics check` names each, the worker refuses them, and refuses
    SARDIS_REPLICATION_FACTOR=1 itself, unless --allow-unsafe-topics."""
    settings = cluster_settings
    one_replica = dataclasses.replace(settings, replication_factor=1)
    await create_topics(one_replica)
    check = cli(settings, "topics", "check")
    assert check.returncode == 1
    commands = settings.topic("ledger.commands")
    assert (f"{commands}: replication factor is 1, expected 3 (can lose data: losing 1 "
            "broker(s) loses its committed records)") in check.stdout, check.stdout
    assert f"{commands}: min.insync.replicas is 1, expected 2 (can lose data" in check.stdout
    refused = cli(settings, "worker")
    assert refused.returncode == 1 and "refusing to start the worker" in refused.stderr
    asked = cli(one_replica, "worker")
    assert asked.returncode == 1
    assert "replication factor 1 on a cluster of 3 brokers" in asked.stderr, asked.stderr
    worker = await asyncio.to_thread(start_worker, settings, tmp_path, "--allow-unsafe-topics")
    worker.stop()


@pytest.mark.slow
@pytest.mark.parametrize("scenario", _scenarios())
async def test_kill_on_the_cluster_mid_stream_loses_and_doubles_nothing(
    scenario: str, cluster_settings: Settings, pg_schema: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = cluster_settings
    await create_topics(settings)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    ledger = Ledger(settings, pg_schema, state_dir, tmp_path / "processes",
                    WORKERS if scenario == "workers" else 1)
    rng = random.Random(f"{scenario}-13")
    commands, _ = make_workload(seed=13, commands=COMMANDS, accounts=COMMAND_ACCOUNTS)
    outcomes = reference_model(commands)
    accounts = [f"acct-{i}" for i in range(BATCH_ACCOUNTS)]
    planned = plan_batches(seed=13, count=BATCHES, accounts=accounts)
    watcher = ArrivalWatcher(settings, "ledger.results")
    try:
        await asyncio.to_thread(ledger.start)
        await fund(settings, accounts)
        watching = asyncio.create_task(watcher.run())
        started = time.monotonic()
        pauses_s = SLOW_STREAM_PAUSES_S if scenario == "workers" else STREAM_PAUSES_S
        producing = asyncio.gather(_stream_commands(settings, commands, pauses_s["commands"]),
                                   _stream_batches(settings, planned, pauses_s["batches"]))
        kills = await _disturb(scenario, settings, ledger, rng, watcher)
        await producing
        streamed_s = time.monotonic() - started
        decided = await _while_workers_live(ledger, _check_decisions(settings, outcomes, planned))
        entries = await _while_workers_live(ledger, _check_entries(
            settings, outcomes, planned, decided, len(accounts)))
        watcher.stop.set()
        await watching
        await _check_balances(settings, outcomes, planned, decided, accounts)
        await wait_caught_up(settings, pg_schema, len(entries), ledger.sinks)
        await check_exactly_once(settings, pg_schema, entries, state_dir)
        took_s = time.monotonic() - started
    finally:
        watcher.stop.set()
        await asyncio.to_thread(ledger.stop)
        await asyncio.to_thread(kafka_cluster.up)  # every node back, whatever happened
    watcher.measure(kills)
    with capsys.disabled():
        print(f"\n[cluster {scenario}] {COMMANDS} commands + {BATCHES} batches streamed in "
              f"{streamed_s:.0f} s, all checked {took_s:.0f} s after the start; "
              f"{len(entries)} entries")
        for kill in kills:
            print(f"[cluster {scenario}] kill -9 {kill}")
    assert len(kills) == (WORKER_KILLS if scenario == "workers" else 1)
