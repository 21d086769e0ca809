"""Range report on real anvil, Kafka and PostgreSQL: planted differences of every type, each
reported exactly once, matches counted, nothing outside the block range looked at."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from decimal import Decimal
from typing import Any

import pytest

from sardis_ledger.sinks.postgres import PostgresSink
from sardis_ledger.sinks.reconcile_report import EXIT_DISCREPANCIES, ReconciliationEngine
from sardis_ledger.streams import core
from sardis_ledger.streams.chain.transfers import address_to_topic
from sardis_ledger.streams.chain.watch import run_watch
from sardis_ledger.streams.config import Settings
from tests.integration import chain_support as cs
from tests.integration.support import RawProducer
from tests.integration.test_chain import Actors, actors, watch_config

UNITS = 10**6  # the test token has 6 decimals, booked as USDC (6 decimals too)
CLI_TIMEOUT_S = 120


@pytest.fixture
def report_settings(settings: Settings) -> Settings:
    """Few partitions: the report reads whole topics."""
    return dataclasses.replace(settings, partitions=3)


class Entries:
    """Valid-looking Entry records with unique sequences and leaf indexes, as the worker writes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.records: list[dict[str, Any]] = []
        self.sequences: Counter[tuple[str, str]] = Counter()
        self.leaves: Counter[int] = Counter()

    def add(self, entry_id: str, entry_type: str, account: str, amount: str, tx_hash: str | None,
            log_index: int | None, currency: str = "USDC") -> None:
        partition = core.partition_for(account, self.settings.partitions)
        self.sequences[(account, currency)] += 1
        self.leaves[partition] += 1
        digest = hashlib.sha256(entry_id.encode()).hexdigest()
        self.records.append({
            "entry_id": entry_id, "command_id": f"cmd_{entry_id}", "account_id": account,
            "currency": currency, "entry_type": entry_type, "amount": Decimal(amount),
            "running_balance": Decimal(0), "sequence": self.sequences[(account, currency)],
            "batch_id": None, "batch_size": None, "leg_index": None, "reverses_entry_id": None,
            "reference": None, "metadata": {}, "occurred_at": None,
            "committed_at": int(time.time() * 1000), "partition": partition,
            "leaf_index": self.leaves[partition] - 1, "entry_hash": digest, "merkle_root": digest,
            "chain": None if tx_hash is None else "anvil", "chain_tx_hash": tx_hash,
            "chain_log_index": log_index})

    async def publish_and_sink(self, schema: str) -> None:
        async with RawProducer(self.settings) as producer:
            for record in self.records:
                await producer.send("ledger.entries", "Entry", record, record["account_id"])
            await producer.flush()
        written = await PostgresSink(self.settings, schema, stop_at_end=True).run()
        assert written == len(self.records)


def planted_transfers(a: Actors) -> dict[str, dict[str, Any]]:
    """One transaction per planted case, by name (the watched wallets are acc_1 and acc_2)."""
    w1, w2 = list(a.watched)
    s0, s1 = a.strangers[:2]
    return {
        "in": cs.transfer_tx(a.token, s0, w1, 1_500_000),
        "out": cs.transfer_tx(a.token, w1, s0, 2 * UNITS),
        "both": cs.transfer_tx(a.token, w1, w2, 3 * UNITS),
        "amount": cs.transfer_tx(a.token, s1, w2, 4 * UNITS),
        "currency": cs.transfer_tx(a.token, s1, w2, 5 * UNITS),
        "account": cs.transfer_tx(a.token, s1, w1, 6 * UNITS),
        "missing_in_ledger": cs.transfer_tx(a.token, s0, w2, 7 * UNITS),
        "duplicate": cs.transfer_tx(a.token, s0, w1, 8 * UNITS),
        "unwatched": cs.transfer_tx(a.token, s0, s1, 9 * UNITS),
        "orphaned": cs.transfer_tx(a.token, s1, w1, 10 * UNITS),
    }


# (entry_id, entry_type, account, amount, planted transfer, currency): the bookings of the planted
# transfers, with one difference of each type; "missing_in_ledger" is booked by none of them.
PLANTED_BOOKINGS = [
    ("e_in", "credit", "acc_1", "1.5", "in", "USDC"),
    ("e_out", "debit", "acc_1", "2", "out", "USDC"),
    ("e_both_out", "debit", "acc_1", "3", "both", "USDC"),
    ("e_both_in", "credit", "acc_2", "3", "both", "USDC"),
    ("e_amount", "credit", "acc_2", "4.000001", "amount", "USDC"),
    ("e_currency", "credit", "acc_2", "5", "currency", "USDT"),
    ("e_account", "credit", "acc_2", "6", "account", "USDC"),
    ("e_dup_1", "credit", "acc_1", "8", "duplicate", "USDC"),
    ("e_dup_2", "credit", "acc_1", "8", "duplicate", "USDC"),
    ("e_not_on_chain", "credit", "acc_1", "9", "unwatched", "USDC"),
    ("e_orphaned", "credit", "acc_1", "10", "orphaned", "USDC"),
]


async def log_of(settings: Settings, tx_hash: str) -> tuple[int, int]:
    """(block number, log index) of a one-log transaction."""
    [receipt] = await cs.receipts(settings, [tx_hash])
    [log] = receipt["logs"]
    return int(log["blockNumber"], 16), int(log["logIndex"], 16)


async def test_range_report_flags_each_planted_difference_once(
        report_settings: Settings, pg_schema: str, snapshot: Any) -> None:
    settings = report_settings
    a = await actors(settings)
    w1 = next(iter(a.watched))  # acc_1
    s0, s1 = a.strangers[:2]
    await cs.wait_pool_empty(settings)  # every mint mined: none may land in the range
    mint_block = await cs.block_number(settings)
    txs = planted_transfers(a)
    hashes = dict(zip(txs, await cs.send_all(settings, list(txs.values())), strict=True))
    await cs.receipts(settings, list(hashes.values()))
    first_block = mint_block + 1
    placed = {name: await log_of(settings, h) for name, h in hashes.items()}
    logs = {name: log_index for name, (_, log_index) in placed.items()}
    assert first_block <= min(block for block, _ in placed.values())
    config = watch_config(a)
    await run_watch(settings, config, once=True)
    # A reorg orphans the last block (the booked "orphaned" transfer) for an unwatched one.
    await cs.rpc(settings.chain_rpc, "anvil_reorg",
                 [1, [[cs.transfer_tx(a.token, s0, s1, 11), 0]]])
    stats = await run_watch(settings, config, once=True)
    assert stats.reorgs == 1 and stats.removed == 1
    last_block = await cs.block_number(settings)

    book = Entries(settings)
    for entry_id, entry_type, account, amount, name, currency in PLANTED_BOOKINGS:
        book.add(entry_id, entry_type, account, amount, hashes[name], logs[name], currency)
    book.add("e_off_chain", "credit", "acc_1", "100", None, None)  # no chain reference
    # A wrong booking of a transfer before the range is not this report's business.
    mint_of_w1 = await cs.rpc(settings.chain_rpc, "eth_getLogs", [{
        "fromBlock": hex(a.start_block), "toBlock": hex(mint_block), "address": a.token.address,
        "topics": [None, "0x" + "00" * 32, address_to_topic(w1)]}])
    book.add("e_before_range", "credit", "acc_1", "1", mint_of_w1[0]["transactionHash"],
             int(mint_of_w1[0]["logIndex"], 16))
    await book.publish_and_sink(pg_schema)

    engine = ReconciliationEngine(settings, pg_schema=pg_schema)
    report = await engine.reconcile(start_block=first_block, end_block=last_block)

    by_type = Counter(d.type for d in report.discrepancies)
    assert by_type == Counter({t: 1 for t in (
        "amount_mismatch", "currency_mismatch", "account_mismatch", "missing_on_chain",
        "missing_in_ledger", "duplicate_entry", "status_mismatch")}), report.discrepancies
    found = {d.type: d for d in report.discrepancies}
    assert (found["amount_mismatch"].entry_id, found["amount_mismatch"].expected,
            found["amount_mismatch"].actual) == ("e_amount", "4", "4.000001")
    assert (found["currency_mismatch"].expected, found["currency_mismatch"].actual) == \
        ("USDC", "USDT")
    assert found["account_mismatch"].entry_id == "e_account"
    assert found["missing_on_chain"].entry_id == "e_not_on_chain"
    assert found["missing_in_ledger"].tx_hash == hashes["missing_in_ledger"]
    assert found["missing_in_ledger"].entry_id is None
    assert (found["duplicate_entry"].entry_id, found["duplicate_entry"].expected) == \
        ("e_dup_2", "e_dup_1")
    assert (found["status_mismatch"].entry_id, found["status_mismatch"].actual) == \
        ("e_orphaned", "removed")
    for d in report.discrepancies:
        assert d.description and d.status == "open" and len(d.discrepancy_id) == 64
    # in, out, both sides of the two-wallet transfer, the first of the duplicates.
    assert report.matched_count == 5
    assert {m.entry_id for m in report.matches} == {"e_in", "e_out", "e_both_out", "e_both_in",
                                                    "e_dup_1"}

    # Ids are deterministic: the same range again gives the same discrepancies.
    again = await engine.reconcile(start_block=first_block, end_block=last_block)
    assert [d.discrepancy_id for d in again.discrepancies] == \
        [d.discrepancy_id for d in report.discrepancies]
    # A range of only the matched transfers is clean.
    clean_end = max(placed[name][0] for name in ("in", "out", "both"))
    assert clean_end < min(placed[name][0] for name in placed if name not in ("in", "out", "both"))
    clean = await engine.reconcile(start_block=first_block, end_block=clean_end)
    assert (clean.matched_count, clean.discrepancies) == (4, [])

    # The CLI: the same report as JSON, exit code 1 for discrepancies, 0 for a clean range.
    env = {**os.environ, **settings.as_env(), "SARDIS_PG_SCHEMA": pg_schema}
    command = [sys.executable, "-m", "sardis_ledger.streams.cli", "reconcile", "--json"]
    done = subprocess.run([*command, "--start-block", str(first_block), "--end-block",
                           str(last_block)], env=env, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, check=False)
    assert done.returncode == EXIT_DISCREPANCIES, done.stderr
    printed = json.loads(done.stdout)
    assert printed["matched_count"] == 5
    assert sorted(d["type"] for d in printed["discrepancies"]) == sorted(by_type)
    done = subprocess.run([*command, "--start-block", str(first_block), "--end-block",
                           str(clean_end)], env=env, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr
