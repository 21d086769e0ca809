"""Batches on real Kafka: all-or-nothing across partitions, holds, timeouts, rollback, kill -9."""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from sardis_ledger.schemas.codec import AvroCodec
from sardis_ledger.streams import core
from sardis_ledger.streams.client import BatchRejected, LedgerClient
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.money import to_minor
from sardis_ledger.streams.topics import create_topics
from sardis_ledger.streams.worker_process import WorkerProcess
from tests.integration.support import RawProducer, check_merkle_logs, read_topic

USDC_DECIMALS = 6
FUNDING = Decimal("1000")


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    asyncio.run(create_topics(settings))
    process = WorkerProcess(settings, tmp_path)
    yield process
    process.stop()


@pytest.fixture
def distributed_worker(settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    """A worker that runs every batch's two-phase protocol over Kafka (SARDIS_LOCAL_BATCHES=0),
    as it does for a batch whose partitions several workers own."""
    asyncio.run(create_topics(settings))
    process = WorkerProcess(replace(settings, local_batches=False), tmp_path)
    yield process
    process.stop()


async def fund(settings: Settings, accounts: list[str], amount: Decimal = FUNDING) -> None:
    async with RawProducer(settings) as producer:
        for account in accounts:
            await producer.post_entry({"command_id": f"fund-{account}", "account_id": account,
                                       "currency": "USDC", "entry_type": "credit", "amount": amount})
        await producer.flush()
    await results(settings, {f"fund-{a}" for a in accounts}, timeout_s=120)


async def results(settings: Settings, keys: set[str], timeout_s: float) -> dict[str, dict[str, Any]]:
    """The first result of each key (duplicates re-emit the same decision)."""
    def complete(rows: list[Any]) -> bool:
        return keys <= {r[3].get("command_id") for r in rows}

    out: dict[str, dict[str, Any]] = {}
    for row in await read_topic(settings, "ledger.results", until=complete, timeout_s=timeout_s):
        out.setdefault(row[3]["command_id"], row[3])
    return out


async def final_balances(settings: Settings) -> dict[str, dict[str, Any]]:
    balances: dict[str, dict[str, Any]] = {}
    for _p, _o, key, record in await read_topic(settings, "ledger.balances", idle_s=3, timeout_s=120):
        balances[key.decode()] = record
    return balances


async def test_batch_commits_across_partitions_rejects_with_failing_leg_and_rolls_back(
    settings: Settings, worker: WorkerProcess
) -> None:
    accounts = ["acc_sender", "acc_receiver", "acc_fee"]
    assert len({core.partition_for(a, settings.partitions) for a in accounts}) > 1
    worker.start()
    await fund(settings, ["acc_sender"])
    async with LedgerClient(settings) as ledger:
        batch = await ledger.create_batch([
            {"account_id": "acc_sender", "amount": "500", "entry_type": "debit"},
            {"account_id": "acc_receiver", "amount": "499.5", "entry_type": "credit"},
            {"account_id": "acc_fee", "amount": "0.5", "entry_type": "credit"},
        ], batch_id="bat_ok")
        assert [(e.account_id, e.amount, e.leg_index, e.batch_size) for e in batch.entries] == [
            ("acc_sender", Decimal("500.000000"), 0, 3), ("acc_receiver", Decimal("499.500000"), 1, 3),
            ("acc_fee", Decimal("0.500000"), 2, 3)]
        again = await ledger.create_batch([
            {"account_id": "acc_sender", "amount": "500", "entry_type": "debit"},
            {"account_id": "acc_receiver", "amount": "499.5", "entry_type": "credit"},
            {"account_id": "acc_fee", "amount": "0.5", "entry_type": "credit"},
        ], batch_id="bat_ok")
        assert again == batch  # idempotent: the original batch, nothing posted twice

        with pytest.raises(BatchRejected) as refused:
            await ledger.create_batch([
                {"account_id": "acc_receiver", "amount": "501", "entry_type": "credit"},
                {"account_id": "acc_sender", "amount": "501", "entry_type": "debit"},
            ], batch_id="bat_overdraft")
        assert (refused.value.reason, refused.value.failed_leg_index) == ("insufficient_funds", 1)
        with pytest.raises(BatchRejected) as unbalanced:
            await ledger.create_batch([{"account_id": "acc_receiver", "amount": "1",
                                        "entry_type": "credit"}], batch_id="bat_unbalanced")
        assert unbalanced.value.reason == "unbalanced"

        sender = await ledger.get_balance("acc_sender")
        assert (sender.balance, sender.available) == (Decimal("500.000000"), Decimal("500.000000"))

        reversal = await ledger.rollback_batch(batch_id="bat_ok", reason="dispute", command_id="rb_1")
        assert [e.reverses_entry_id for e in reversal.entries] == [e.entry_id for e in batch.entries]
        assert {e.entry_type for e in reversal.entries} == {"reversal"}
        retry = await ledger.rollback_batch(batch_id="bat_ok", reason="dispute", command_id="rb_1")
        assert retry == reversal
        with pytest.raises(BatchRejected) as twice:
            await ledger.rollback_batch(batch_id="bat_ok", reason="again", command_id="rb_2")
        assert twice.value.reason == "already_rolled_back"
        with pytest.raises(BatchRejected) as never:
            await ledger.rollback_batch(batch_id="bat_overdraft", command_id="rb_3")
        assert never.value.reason == "batch_not_committed"
        for account, expected in (("acc_sender", "1000"), ("acc_receiver", "0"), ("acc_fee", "0")):
            balance = await ledger.get_balance(account)
            assert balance.balance == balance.available == Decimal(expected)


async def test_timeout_voids_a_batch_and_releases_its_hold(
    settings: Settings, distributed_worker: WorkerProcess
) -> None:
    """A leg that answers too late: the credit leg's partition is held shut by an open
    transaction, so the batch's 300 ms timeout passes first; the coordinator voids the batch and
    the debit hold is released. (A backlog of commands was a race: a faster worker drained it.)"""
    busy = "acc_busy"
    assert core.partition_for(busy, settings.partitions) != \
        core.partition_for("acc_hold", settings.partitions)
    worker = distributed_worker
    worker.start()
    await fund(settings, ["acc_hold"])
    # A read_committed consumer stops at the first offset of an open transaction (the last
    # stable offset): nothing after it on that partition reaches the worker until it ends.
    blocker = AIOKafkaProducer(**settings.kafka_connection(),
                               transactional_id=f"{settings.topic_prefix}test-blocker",
                               transaction_timeout_ms=120_000)
    await blocker.start()
    try:
        await blocker.begin_transaction()
        await blocker.send_and_wait(
            # Reserves reach accounts on ledger.internal.commands: hold that partition shut.
            settings.topic("ledger.internal.commands"),
            AvroCodec().encode("PostEntry", {"command_id": "never-committed", "account_id": busy,
                                             "currency": "USDC", "entry_type": "credit",
                                             "amount": Decimal("1")}),
            key=busy.encode(), partition=core.partition_for(busy, settings.partitions))
        async with LedgerClient(settings) as ledger:
            with pytest.raises(BatchRejected) as timed_out:
                await ledger.create_batch([
                    {"account_id": "acc_hold", "amount": "10", "entry_type": "debit"},
                    {"account_id": busy, "amount": "10", "entry_type": "credit"},
                ], batch_id="bat_slow", timeout_ms=300)
            assert timed_out.value.reason == "timeout"
            await blocker.abort_transaction()
            for _ in range(100):
                held = await ledger.get_balance("acc_hold")
                if held.available == held.balance:
                    break
                await asyncio.sleep(0.5)
            assert held.balance == held.available == FUNDING
    finally:
        await blocker.stop()


def plan_batches(seed: int, count: int, accounts: list[str]) -> list[dict[str, Any]]:
    """Two-leg and multi-leg balanced transfers; about 1 in 10 overdraws its debit leg."""
    rng = random.Random(seed)
    planned = []
    for i in range(count):
        payer, *payees = rng.sample(accounts, rng.choice([2, 2, 3, 4]))
        parts = [Decimal(rng.randint(1, 2000)) / 100 for _ in payees]
        if rng.random() < 0.1:
            parts[0] += FUNDING * 10  # more than the payer can ever have: the batch must fail
        legs = [{"account_id": payer, "currency": "USDC", "entry_type": "debit", "amount": sum(parts)}]
        legs += [{"account_id": p, "currency": "USDC", "entry_type": "credit", "amount": a}
                 for p, a in zip(payees, parts, strict=True)]
        # A long timeout: this workload tests all-or-nothing, not timeouts (tested separately).
        planned.append({"batch_id": f"bat-{seed}-{i}", "legs": legs, "timeout_ms": 600_000})
    return planned


def check_batches_atomic(planned: list[dict[str, Any]], decided: dict[str, dict[str, Any]],
                         entries: list[dict[str, Any]]) -> tuple[int, int]:
    by_batch: dict[str, set[str]] = defaultdict(set)
    for entry in entries:
        if entry["batch_id"] is not None:
            by_batch[entry["batch_id"]].add(entry["entry_id"])
    committed = rejected = 0
    for batch in planned:
        result = decided[batch["batch_id"]]
        if result["status"] == "committed":
            committed += 1
            assert len(result["entries"]) == len(batch["legs"])
            assert by_batch[batch["batch_id"]] == {e["entry_id"] for e in result["entries"]}
        else:
            rejected += 1
            assert batch["batch_id"] not in by_batch, f"{batch['batch_id']} rejected but has entries"
    return committed, rejected


async def wait_no_holds(settings: Settings, timeout_s: float = 120) -> dict[str, dict[str, Any]]:
    """Balances once every account's available equals its posted balance (no hold pending)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        balances = await final_balances(settings)
        pending = {k: v for k, v in balances.items() if v["available"] != v["balance"]}
        if not pending or asyncio.get_running_loop().time() > deadline:
            assert not pending, f"holds still pending: {sorted(pending)[:5]}"
            return balances
        await asyncio.sleep(2)


@pytest.mark.parametrize("local_batches", [True, False], ids=["local", "distributed"])
async def test_kill_9_during_batches_every_batch_all_or_nothing(
    settings: Settings, tmp_path: Path, local_batches: bool
) -> None:
    """Batches decided whole in one event (one worker owns every partition) and batches run
    over Kafka's internal topics (SARDIS_LOCAL_BATCHES=0) survive kill -9 alike."""
    await create_topics(settings)
    worker = WorkerProcess(replace(settings, local_batches=local_batches), tmp_path)
    try:
        await _kill_9_during_batches(settings, worker)
        # One worker owns every partition: a local worker sent no reserve or settle over Kafka.
        internal = await read_topic(settings, "ledger.internal.commands", idle_s=3, timeout_s=120)
        assert (len(internal) == 0) == local_batches, len(internal)
    finally:
        worker.stop()


async def _kill_9_during_batches(settings: Settings, worker: WorkerProcess) -> None:
    accounts = [f"acct-{i}" for i in range(60)]
    planned = plan_batches(seed=5, count=2000, accounts=accounts)
    worker.start()
    await fund(settings, accounts)
    kills = 0
    rng = random.Random(17)

    async def crash_loop() -> None:
        nonlocal kills
        while kills < 3:
            await asyncio.sleep(rng.uniform(3.0, 8.0))
            worker.kill9()
            kills += 1
            await asyncio.to_thread(worker.start)

    crasher = asyncio.create_task(crash_loop())
    async with RawProducer(settings) as producer:
        for i, batch in enumerate(planned):
            await producer.send("ledger.batches", "SubmitBatch", batch, batch["batch_id"])
            if i % 100 == 99:
                await producer.flush()
                await asyncio.sleep(0.5)  # arrive over time, so kills land mid-stream
        await producer.flush()
    await crasher
    decided = await results(settings, {b["batch_id"] for b in planned}, timeout_s=600)
    entries = [r[3] for r in await read_topic(settings, "ledger.entries", idle_s=5, timeout_s=300)]
    committed, rejected = check_batches_atomic(planned, decided, entries)
    assert committed > 1000 and rejected > 100, (committed, rejected)
    for batch in planned:  # the planned overdrafts are exactly the rejected ones
        overdraft = batch["legs"][0]["amount"] > FUNDING * 10
        assert (decided[batch["batch_id"]]["status"] == "rejected") == overdraft
    balances = await wait_no_holds(settings)
    total = sum(to_minor(v["balance"], USDC_DECIMALS) or 0 for v in balances.values())
    # balanced batches move money between accounts; they never make or lose any
    funding_minor = to_minor(FUNDING, USDC_DECIMALS)
    assert funding_minor is not None
    assert total == funding_minor * len(accounts)
    check_merkle_logs(list({e["entry_id"]: e for e in entries}.values()), [])


async def test_rollback_of_500_batches_with_retries_reverses_each_once(
    settings: Settings, worker: WorkerProcess
) -> None:
    accounts = [f"rb-{i}" for i in range(40)]
    planned = [b for b in plan_batches(seed=9, count=560, accounts=accounts)
               if b["legs"][0]["amount"] < FUNDING][:500]
    worker.start()
    await fund(settings, accounts, FUNDING * 100)
    async with RawProducer(settings) as producer:
        for batch in planned:
            await producer.send("ledger.batches", "SubmitBatch", batch, batch["batch_id"])
        await producer.flush()
        decided = await results(settings, {b["batch_id"] for b in planned}, timeout_s=300)
        assert all(r["status"] == "committed" for r in decided.values())
        for attempt in range(2):  # every rollback sent twice: the retry must reverse nothing
            for batch in planned:
                await producer.send("ledger.batches", "RollbackBatch",
                                    {"command_id": f"rb-{batch['batch_id']}", "batch_id": batch["batch_id"],
                                     "reason": f"attempt {attempt}"}, batch["batch_id"])
            await producer.flush()
    rolled = await results(settings, {f"rb-{b['batch_id']}" for b in planned}, timeout_s=300)
    assert all(r["status"] == "committed" for r in rolled.values())
    entries = [r[3] for r in await read_topic(settings, "ledger.entries", idle_s=5, timeout_s=300)]
    reversed_ids = Counter(e["reverses_entry_id"] for e in {e["entry_id"]: e for e in entries}.values()
                           if e["reverses_entry_id"] is not None)
    originals = {e["entry_id"] for r in decided.values() for e in r["entries"]}
    assert set(reversed_ids) == originals and set(reversed_ids.values()) == {1}
    balances = await wait_no_holds(settings)
    for account in accounts:
        assert to_minor(balances[f"{account}|USDC"]["balance"], USDC_DECIMALS) == \
            to_minor(FUNDING * 100, USDC_DECIMALS)
