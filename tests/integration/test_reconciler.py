"""The streaming reconciler in a real worker, on real anvil and Kafka: planted differences of every
type emitted once each, a late entry resolving its discrepancy, a reorg, and the match delay."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import statistics
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from sardis_ledger.streams import core
from sardis_ledger.streams.chain.watch import run_watch
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.topics import create_topics
from sardis_ledger.streams.worker.reconciler import backfill_claims
from sardis_ledger.streams.worker_process import WorkerProcess
from tests.integration import chain_support as cs
from tests.integration.support import CrashLoop, RawProducer, read_topic
from tests.integration.test_chain import actors, watch_config
from tests.integration.test_reconcile_report import (
    PLANTED_BOOKINGS,
    Entries,
    log_of,
    planted_transfers,
)

UNITS = 10**6  # the test token has 6 decimals, booked as USDC (6 decimals too)
GRACE_S = 2
GRACE_BLOCKS = 2
TYPES = ("amount_mismatch", "currency_mismatch", "account_mismatch", "missing_on_chain",
         "missing_in_ledger", "duplicate_entry", "status_mismatch")
DELAY_TRANSFERS = 600
DELAY_PAIRS_PER_TX = 100
KILL_TRANSFERS = 2_000
KILL_COUNT = 3


@pytest.fixture
def reconcile_settings(settings: Settings) -> Settings:
    """Few partitions (a faster worker start) and a short grace window."""
    return dataclasses.replace(settings, partitions=3, reconcile_grace_s=GRACE_S,
                               reconcile_grace_blocks=GRACE_BLOCKS)


@pytest.fixture
def worker(reconcile_settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    asyncio.run(create_topics(reconcile_settings))
    process = WorkerProcess(reconcile_settings, tmp_path)
    process.start()
    yield process
    process.stop()


def booking(entry_id: str, entry_type: str, account: str, amount: str, tx_hash: str | None,
            log_index: int | None, currency: str = "USDC") -> dict[str, Any]:
    """A PostEntry that books (or misbooks) one chain transfer; command_id is the entry's tag."""
    return {"command_id": entry_id, "account_id": account, "currency": currency,
            "entry_type": entry_type, "amount": Decimal(amount), "allow_overdraft": True,
            "chain": None if tx_hash is None else "anvil", "chain_tx_hash": tx_hash,
            "chain_log_index": log_index}


async def post_and_wait(settings: Settings, bookings: list[dict[str, Any]]) -> dict[str, str]:
    """Post the commands and wait for their results: command_id -> entry_id."""
    async with RawProducer(settings) as producer:
        for record in bookings:
            await producer.post_entry(record)
        await producer.flush()
    wanted = {b["command_id"] for b in bookings}

    def done(rows: list[Any]) -> bool:
        return wanted <= {r[3]["command_id"] for r in rows}

    rows = await read_topic(settings, "ledger.results", until=done)
    results = {r[3]["command_id"]: r[3] for r in rows if r[3]["command_id"] in wanted}
    assert all(r["status"] == "committed" for r in results.values()), results
    return {command_id: r["entry"]["entry_id"] for command_id, r in results.items()}


def opened(rows: list[Any]) -> list[dict[str, Any]]:
    return [r[3] for r in rows if r[3].get("status") == "open"]


async def test_each_planted_difference_is_emitted_once_and_a_late_entry_resolves(
        reconcile_settings: Settings, snapshot: Any, worker: WorkerProcess) -> None:
    settings = reconcile_settings
    a = await actors(settings)
    s0, s1 = a.strangers[:2]
    await cs.wait_pool_empty(settings)  # every mint mined: the watcher starts after them
    first_block = await cs.block_number(settings) + 1
    txs = planted_transfers(a)
    hashes = dict(zip(txs, await cs.send_all(settings, list(txs.values())), strict=True))
    await cs.receipts(settings, list(hashes.values()))
    logs = {name: (await log_of(settings, h))[1] for name, h in hashes.items()}
    config = watch_config(a, start_block=first_block)
    await run_watch(settings, config, once=True)
    # A reorg orphans the last block (the "orphaned" transfer) for an unwatched transfer.
    await cs.rpc(settings.chain_rpc, "anvil_reorg",
                 [1, [[cs.transfer_tx(a.token, s0, s1, 11), 0]]])
    stats = await run_watch(settings, config, once=True)
    assert stats.reorgs == 1 and stats.removed == 1

    bookings = [booking(entry_id, entry_type, account, amount, hashes[name], logs[name], currency)
                for entry_id, entry_type, account, amount, name, currency in PLANTED_BOOKINGS]
    # Mixed case: the reconciler keys by the lowercase hash, as the watcher publishes it.
    orphaned = next(b for b in bookings if b["command_id"] == "e_orphaned")
    orphaned["chain_tx_hash"] = "0x" + orphaned["chain_tx_hash"][2:].upper()
    bookings.append(booking("e_off_chain", "credit", "acc_1", "100", None, None))  # off chain
    entry_ids = await post_and_wait(settings, bookings)
    # Garbage on chain.transfers goes to the dead-letter topic; the reconciler goes on.
    producer = AIOKafkaProducer(**settings.kafka_connection())
    await producer.start()
    try:
        await producer.send_and_wait(settings.topic("chain.transfers"), b"not avro",
                                     key=b"0xbad", partition=0)
    finally:
        await producer.stop()
    # The grace window: GRACE_S of time and GRACE_BLOCKS blocks past what each side saw.
    await asyncio.sleep(GRACE_S)
    await cs.mine(settings, GRACE_BLOCKS + 1)
    await run_watch(settings, config, once=True)

    def all_types(rows: list[Any]) -> bool:
        return set(TYPES) <= {d["type"] for d in opened(rows)}

    await read_topic(settings, "ledger.discrepancies", until=all_types, timeout_s=60)
    # Then nothing more: wait out several more ticks.
    rows = await read_topic(settings, "ledger.discrepancies", idle_s=3 * GRACE_S)
    found_open = opened(rows)
    assert Counter(d["type"] for d in found_open) == Counter(TYPES), found_open
    assert all(d["status"] == "open" for d in (r[3] for r in rows)), rows
    found = {d["type"]: d for d in found_open}
    assert (found["amount_mismatch"].get("entry_id"), found["amount_mismatch"]["expected"],
            found["amount_mismatch"]["actual"]) == (entry_ids["e_amount"], "4", "4.000001")
    assert (found["currency_mismatch"]["expected"], found["currency_mismatch"]["actual"]) == \
        ("USDC", "USDT")
    assert found["account_mismatch"]["entry_id"] == entry_ids["e_account"]
    assert found["missing_on_chain"]["entry_id"] == entry_ids["e_not_on_chain"]
    assert (found["missing_in_ledger"]["tx_hash"], found["missing_in_ledger"]["entry_id"]) == \
        (hashes["missing_in_ledger"], None)
    assert (found["duplicate_entry"]["entry_id"], found["duplicate_entry"]["expected"]) == \
        (entry_ids["e_dup_2"], entry_ids["e_dup_1"])
    assert (found["status_mismatch"]["entry_id"], found["status_mismatch"]["actual"]) == \
        (entry_ids["e_orphaned"], "removed")
    assert found["status_mismatch"]["severity"] == "critical"
    for d in found_open:
        assert d["description"] and len(d["discrepancy_id"]) == 64
    for row in rows:  # keyed by tx hash, so one transfer's records stay in order
        assert row[2] == row[3]["tx_hash"].encode()
    matches = await read_topic(settings, "ledger.reconciliations", idle_s=2.0)
    matched = {r[3]["entry_id"] for r in matches if r[3]["status"] == "matched"}
    assert matched == {entry_ids[e] for e in ("e_in", "e_out", "e_both_out", "e_both_in",
                                              "e_dup_1")}
    assert len(matches) == len(matched)
    dead = await read_topic(settings, "ledger.dlq", idle_s=2.0)
    assert [r[3]["source_topic"] for r in dead] == [settings.topic("chain.transfers")], dead
    assert dead[0][3]["reason"] and dead[0][3]["payload"] == b"not avro"

    # The late entry: its missing_in_ledger is resolved (same id) and it matches.
    late = await post_and_wait(settings, [booking("e_late", "credit", "acc_2", "7",
                                                  hashes["missing_in_ledger"],
                                                  logs["missing_in_ledger"])])

    def resolved(rows: list[Any]) -> bool:
        return any(r[3]["status"] == "resolved" for r in rows)

    rows = await read_topic(settings, "ledger.discrepancies", until=resolved, timeout_s=60)
    [fixed] = [r[3] for r in rows if r[3]["status"] == "resolved"]
    assert (fixed["type"], fixed["discrepancy_id"]) == \
        ("missing_in_ledger", found["missing_in_ledger"]["discrepancy_id"])
    matches = await read_topic(settings, "ledger.reconciliations",
                               until=lambda rows: len(rows) > len(matched), timeout_s=60)
    assert {r[3]["entry_id"] for r in matches} == matched | {late["e_late"]}
    assert worker.alive()


async def test_match_delay_from_chain_publication(
        reconcile_settings: Settings, snapshot: Any, worker: WorkerProcess) -> None:
    """Entries booked first, then the watcher publishes the transfers: each matches once, and
    the delay from a transfer's record on chain.transfers to its match is printed."""
    settings = reconcile_settings
    config, bookings = await many_transfers(settings, DELAY_TRANSFERS)
    await post_and_wait(settings, bookings)
    await run_watch(settings, config, once=True)
    match_stamps: list[int] = []
    matches = await read_topic(settings, "ledger.reconciliations", timestamps_ms=match_stamps,
                               until=lambda rows: len(rows) >= DELAY_TRANSFERS, timeout_s=120)
    transfer_stamps: list[int] = []
    transfers = await read_topic(settings, "chain.transfers", timestamps_ms=transfer_stamps,
                                 until=lambda rows: len(rows) >= DELAY_TRANSFERS)
    published = {(r[3]["tx_hash"], r[3]["log_index"]): stamp
                 for r, stamp in zip(transfers, transfer_stamps, strict=True)}
    delays_ms = sorted(stamp - published[(r[3]["tx_hash"], r[3]["log_index"])]
                       for r, stamp in zip(matches, match_stamps, strict=True))
    assert len(delays_ms) == DELAY_TRANSFERS and {r[3]["status"] for r in matches} == {"matched"}
    assert not await read_topic(settings, "ledger.discrepancies", idle_s=2 * GRACE_S)
    p99 = delays_ms[min(len(delays_ms) - 1, len(delays_ms) * 99 // 100)]
    print(f"\nreconciler match delay over {len(delays_ms)} transfers: "
          f"p50 {statistics.median(delays_ms):.0f} ms, p99 {p99} ms, max {delays_ms[-1]} ms")


async def many_transfers(settings: Settings, count: int) -> tuple[Any, list[dict[str, Any]]]:
    """`count` transfers out of acc_1's wallet (DELAY_PAIRS_PER_TX per transaction), all mined,
    and the bookings that match them exactly."""
    a = await actors(settings)
    w1 = next(iter(a.watched))
    await cs.wait_pool_empty(settings)
    first_block = await cs.block_number(settings) + 1
    txs = [cs.transfer_many_tx(a.token, w1, [(a.strangers[j % len(a.strangers)],
                                              1000 + k * DELAY_PAIRS_PER_TX + j)
                                             for j in range(DELAY_PAIRS_PER_TX)])
           for k in range(count // DELAY_PAIRS_PER_TX)]
    hashes = await cs.send_all(settings, txs)
    bookings = []
    for k, receipt in enumerate(await cs.receipts(settings, hashes)):
        for j, log in enumerate(receipt["logs"]):
            bookings.append(booking(f"e_{k}_{j}", "debit", "acc_1",
                                    _major(1000 + k * DELAY_PAIRS_PER_TX + j),
                                    receipt["transactionHash"], int(log["logIndex"], 16)))
    assert len(bookings) == count
    return watch_config(a, start_block=first_block), bookings


@pytest.mark.slow
async def test_kill_9_during_reconciliation_matches_each_transfer_once(
        settings: Settings, snapshot: Any, tmp_path: Path) -> None:
    """Bookings and transfers stream in while the worker is killed with kill -9 and restarted:
    every transfer is matched exactly once and nothing is flagged (default grace windows)."""
    settings = dataclasses.replace(settings, partitions=3)
    config, bookings = await many_transfers(settings, KILL_TRANSFERS)
    await create_topics(settings)
    worker = WorkerProcess(settings, tmp_path)
    await asyncio.to_thread(worker.start)
    crash = CrashLoop(worker, random.Random(21), (1.0, 4.0), kills_max=KILL_COUNT)
    try:
        crasher = asyncio.create_task(crash.run())
        watcher = asyncio.create_task(run_watch(settings, config, once=True))
        async with RawProducer(settings) as producer:
            await producer.post_entries_paced(bookings, chunk=200, pause_s=0.5)
        await watcher
        await crasher
        matches = await read_topic(settings, "ledger.reconciliations", timeout_s=300,
                                   until=lambda rows: len(rows) >= KILL_TRANSFERS)
        matches = await read_topic(settings, "ledger.reconciliations", idle_s=3.0)
    finally:
        worker.stop()
    ids = Counter(r[3]["reconciliation_id"] for r in matches)
    assert len(ids) == KILL_TRANSFERS and max(ids.values()) == 1, ids.most_common(3)
    assert {r[3]["status"] for r in matches} == {"matched"}
    assert not await read_topic(settings, "ledger.discrepancies", idle_s=2.0)
    assert crash.kills == KILL_COUNT


def _major(minor: int) -> str:
    """Minor units of the 6-decimal test token as an exact major-unit string."""
    return f"{minor // UNITS}.{minor % UNITS:06d}"


async def test_backfill_claims_rekeys_old_chain_entries(settings: Settings) -> None:
    """Entries booked before the reconciler existed reach ledger.internal.chain-claims by tx hash."""
    settings = dataclasses.replace(settings, partitions=3)
    await create_topics(settings)
    book = Entries(settings)
    hashes = [f"0x{i:064x}" for i in range(1, 41)]
    for i, tx_hash in enumerate(hashes):
        book.add(f"e_old_{i}", "credit", f"acc_{i % 5}", "1", tx_hash.upper().replace("0X", "0x")
                 if i % 2 else tx_hash, i % 3)
    book.add("e_off_chain", "credit", "acc_1", "2", None, None)
    async with RawProducer(settings) as producer:
        for record in book.records:
            await producer.send("ledger.entries", "Entry", record, record["account_id"])
        await producer.flush()
    read, produced = await backfill_claims(settings)
    assert (read, produced) == (len(hashes) + 1, len(hashes))
    claims = await read_topic(settings, "ledger.internal.chain-claims", idle_s=2.0)
    assert sorted(r[3]["entry_id"] for r in claims) == sorted(f"e_old_{i}" for i in range(40))
    for partition, _offset, key, record in claims:
        assert key == record["chain_tx_hash"].lower().encode()
        assert partition == core.partition_for(key.decode(), settings.partitions)
