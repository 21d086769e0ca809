"""The ledger stream against real Kafka: workload vs a reference model, DLQ, Merkle logs, crashes."""

from __future__ import annotations

import asyncio
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from sardis_ledger.schemas.codec import SINGLE_OBJECT_MARKER
from sardis_ledger.streams import core, merkle, records
from sardis_ledger.streams.client import LedgerClient, LedgerRejected
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.money import currency_table, to_major, to_minor
from sardis_ledger.streams.topics import create_topics
from sardis_ledger.streams.worker_process import WorkerProcess
from tests.integration.support import CrashLoop, RawProducer, check_merkle_logs, read_topic

CURRENCIES = currency_table()
USDC = CURRENCIES["USDC"]


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    asyncio.run(create_topics(settings))
    process = WorkerProcess(settings, tmp_path)
    yield process
    process.stop()


# ------------------------------------------------------------------ workload and reference model


def make_workload(seed: int, commands: int, accounts: int) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Commands (5% duplicates, 5% overdrafts) in production order, plus malformed payloads."""
    rng = random.Random(seed)
    balances: defaultdict[str, int] = defaultdict(int)
    out: list[dict[str, Any]] = []
    sent: list[dict[str, Any]] = []
    for i in range(commands):
        if sent and rng.random() < 0.05:
            out.append(dict(rng.choice(sent)))  # exact duplicate, any time later
            continue
        account = f"acc_{rng.randrange(accounts):04d}"
        roll = rng.random()
        if roll < 0.05:
            kind, amount_minor = "debit", balances[account] + rng.randint(1, 10**6)  # overdraft
        elif roll < 0.45 and balances[account] > 0:
            kind = rng.choice(["debit", "fee"])
            amount_minor = rng.randint(1, balances[account])
            balances[account] -= amount_minor
        else:
            kind = rng.choice(["credit", "credit", "refund", "adjustment"])
            amount_minor = rng.randint(1, 10**9)
            balances[account] += amount_minor
        record = {"command_id": f"cmd-{seed}-{i}", "account_id": account, "currency": "USDC",
                  "entry_type": kind, "amount": to_major(amount_minor, USDC.decimals),
                  "reference": f"ref-{i}", "metadata": {"n": str(i)}}
        out.append(record)
        sent.append(record)
    return out, []


def reference_model(commands: list[dict[str, Any]]) -> dict[str, core.Outcome]:
    """What the ledger must decide, computed with the pure core in per-account order."""
    states: dict[str, core.AccountState] = defaultdict(core.AccountState)
    outcomes: dict[str, core.Outcome] = {}
    for record in commands:
        parsed = core.parse_post_entry(record, CURRENCIES)
        if isinstance(parsed, core.Rejection):
            if parsed.command_id is not None:
                outcomes.setdefault(parsed.command_id, core.Outcome(
                    parsed.command_id, core.Status.REJECTED, parsed.reason, parsed.detail))
            continue
        if parsed.command_id in outcomes:
            continue
        decision = core.decide_post_entry(states[parsed.account_key], merkle.MerkleFrontier(),
                                          parsed, partition=0, now_ms=0)
        states[parsed.account_key] = decision.state
        outcomes[parsed.command_id] = decision.outcome
    return outcomes


def malformed_payloads(codec_fingerprint: bytes) -> list[tuple[bytes, str]]:
    """(payload, expected DLQ reason) for every kind of bad input."""
    rng = random.Random(7)
    return [
        (b"", "empty_payload"),
        (b"{\"json\": true}", "bad_marker"),
        (SINGLE_OBJECT_MARKER + b"\x01\x02", "truncated"),
        (SINGLE_OBJECT_MARKER + bytes(8) + b"\x02ab", "unknown_fingerprint"),
        (SINGLE_OBJECT_MARKER + codec_fingerprint + b"\xff" * 5, "malformed_body"),
        *[(bytes(rng.randrange(256) for _ in range(40)), "bad_marker") for _ in range(20)],
    ]


# ------------------------------------------------------------------ checks shared by the tests


def check_entries_match_model(entries: list[dict[str, Any]], outcomes: dict[str, core.Outcome]) -> None:
    unique: dict[str, dict[str, Any]] = {}
    for entry in entries:
        previous = unique.setdefault(entry["entry_id"], entry)
        assert previous == entry, f"two different entries share entry_id {entry['entry_id']}"
    committed = {o.entry.entry_id: o.entry for o in outcomes.values() if o.entry is not None}
    assert set(unique) == set(committed), "entries differ from the reference model"
    seen_sequences: dict[tuple[str, str], set[int]] = defaultdict(set)
    for entry_id, wire in unique.items():
        expected = committed[entry_id]
        got = records.entry_from_wire(wire, CURRENCIES)
        assert (got.account_id, got.sequence, got.amount_minor, got.running_balance_minor,
                got.entry_type, got.command_id) == (
            expected.account_id, expected.sequence, expected.amount_minor,
            expected.running_balance_minor, expected.entry_type, expected.command_id)
        key = (got.account_id, got.currency)
        assert got.sequence not in seen_sequences[key], f"duplicate sequence {key} {got.sequence}"
        seen_sequences[key].add(got.sequence)
    for key, sequences in seen_sequences.items():
        assert sequences == set(range(1, len(sequences) + 1)), f"gap in sequences of {key}"


async def results_for(settings: Settings, command_ids: set[str], timeout_s: float) -> list[dict[str, Any]]:
    def complete(rows: list[Any]) -> bool:
        return command_ids <= {r[3].get("command_id") for r in rows}

    return [r[3] for r in await read_topic(settings, "ledger.results", until=complete,
                                           timeout_s=timeout_s)]


async def committed_entries(settings: Settings, outcomes: dict[str, core.Outcome],
                            timeout_s: float = 120) -> list[dict[str, Any]]:
    """ledger.entries read until it holds as many distinct entry_ids as the model committed."""
    committed = sum(o.entry is not None for o in outcomes.values())
    rows = await read_topic(settings, "ledger.entries", timeout_s=timeout_s,
                            until=lambda rows: len({r[3]["entry_id"] for r in rows}) >= committed)
    return [r[3] for r in rows]


def check_results(results: list[dict[str, Any]], outcomes: dict[str, core.Outcome]) -> None:
    distinct: dict[str, set[tuple[Any, ...]]] = defaultdict(set)
    for result in results:
        entry_id = result["entry"]["entry_id"] if result["entry"] else None
        distinct[result["command_id"]].add((result["status"], result["reason"], entry_id))
    assert set(distinct) == set(outcomes)
    for command_id, outcome in outcomes.items():
        expected = (str(outcome.status), None if outcome.reason is None else str(outcome.reason),
                    outcome.entry.entry_id if outcome.entry else None)
        assert distinct[command_id] == {expected}, command_id


# ------------------------------------------------------------------ tests


async def test_workload_matches_reference_model_and_bad_input_goes_to_dlq(
    settings: Settings, worker: WorkerProcess
) -> None:
    commands, _ = make_workload(seed=1, commands=10_000, accounts=100)
    # A valid frame whose PostEntry is invalid: DLQ and a rejected result with the reason.
    invalid = [{"command_id": f"bad-amount-{i}", "account_id": "acc_0001", "currency": "USDC",
                "entry_type": "credit", "amount": Decimal("0.0000001")} for i in range(5)]
    invalid.append({"command_id": "bad-currency", "account_id": "acc_0002", "currency": "XXX",
                    "entry_type": "credit", "amount": Decimal("1")})
    worker.start()
    async with RawProducer(settings) as producer:
        malformed = malformed_payloads(producer.codec.fingerprint_of("PostEntry"))
        rng = random.Random(3)
        bad_at = {rng.randrange(len(commands)): item for item in malformed + [(r, None) for r in invalid]}
        for i, record in enumerate(commands):
            if i in bad_at:
                payload, _reason = bad_at[i]
                if isinstance(payload, dict):
                    await producer.post_entry(payload)
                else:
                    await producer.raw(payload, b"garbage", rng.randrange(settings.partitions))
            await producer.post_entry(record)
        await producer.flush()
    outcomes = reference_model(commands + invalid)
    assert sum(o.status == core.Status.REJECTED for o in outcomes.values()) > 400
    results = await results_for(settings, set(outcomes), timeout_s=300)
    check_results(results, outcomes)

    entries = await committed_entries(settings, outcomes)
    check_entries_match_model(entries, outcomes)
    heads = [r[3] for r in await read_topic(settings, "ledger.tree-heads", idle_s=3, timeout_s=30)]
    check_merkle_logs(entries, heads)

    dlq = [r[3] for r in await read_topic(settings, "ledger.dlq", idle_s=3, timeout_s=60)]
    expected_reasons = Counter([reason for _p, reason in malformed if reason]
                               + ["invalid_amount"] * 5 + ["unknown_currency"])
    assert Counter(d["reason"] for d in dlq) == expected_reasons
    assert {d["payload"] for d in dlq if d["reason"] == "bad_marker"} >= \
        {p for p, reason in malformed if reason == "bad_marker"}
    assert all(d["source_topic"] == settings.topic("ledger.commands") for d in dlq)


async def test_client_create_entry_balance_and_rejections(settings: Settings, worker: WorkerProcess) -> None:
    worker.start()
    async with LedgerClient(settings) as ledger:
        credit = await ledger.create_entry(account_id="acc_123", amount=Decimal("500.00"),
                                           entry_type="credit", currency="USD",
                                           reference="deposit_789", metadata={"source": "bank"},
                                           command_id="deposit-1")
        debit = await ledger.create_entry(account_id="acc_123", amount="100.00",
                                          entry_type="debit", currency="USD")
        again = await ledger.create_entry(account_id="acc_123", amount=Decimal("500.00"),
                                          entry_type="credit", currency="USD",
                                          reference="deposit_789", metadata={"source": "bank"},
                                          command_id="deposit-1")
        with pytest.raises(LedgerRejected) as overdraft:
            await ledger.create_entry(account_id="acc_123", amount="1000", entry_type="debit",
                                      currency="USD")
        with pytest.raises(LedgerRejected) as conflict:
            await ledger.create_entry(account_id="acc_123", amount="1", entry_type="credit",
                                      currency="USD", command_id="deposit-1")
        with pytest.raises(LedgerRejected) as stale:
            await ledger.create_entry(account_id="acc_123", amount="1", entry_type="debit",
                                      currency="USD", expected_sequence=1)
        fenced = await ledger.create_entry(account_id="acc_123", amount="1", entry_type="debit",
                                           currency="USD", expected_sequence=2)
        balance = await ledger.get_balance("acc_123", currency="USD")
    assert (credit.running_balance, debit.running_balance) == (Decimal("500.00"), Decimal("400.00"))
    assert str(debit.running_balance) == "400.00"
    assert again == credit  # same entry, not a second one
    assert overdraft.value.reason == "insufficient_funds"
    assert conflict.value.reason == "idempotency_conflict"
    assert stale.value.reason == "sequence_conflict"
    assert fenced.sequence == 3 and fenced.running_balance == Decimal("399.00")
    assert (balance.balance, balance.available, balance.sequence) == (Decimal("399.00"), Decimal("399.00"), 3)
    assert len(credit.merkle_root) == 64 and credit.entry_hash != debit.entry_hash


@pytest.mark.slow
async def test_kill_9_during_stream_loses_and_doubles_nothing(
    settings: Settings, worker: WorkerProcess
) -> None:
    commands, _ = make_workload(seed=2, commands=20_000, accounts=200)
    outcomes = reference_model(commands)
    worker.start()
    crash = CrashLoop(worker, random.Random(11), (2.0, 6.0), kills_max=4)
    crasher = asyncio.create_task(crash.run())
    async with RawProducer(settings) as producer:
        await producer.post_entries_paced(commands, chunk=500, pause_s=0.25)
    await crasher
    assert crash.kills >= 3
    results = await results_for(settings, set(outcomes), timeout_s=600)
    check_results(results, outcomes)
    # The last restart read its tables back in bulk (compat workaround 12), all of them.
    preloads = re.findall(r"changelog preload: (\d+) records from \d+ partitions in [\d.]+ s(.*)",
                          worker.log_path.read_text())
    assert preloads and int(preloads[-1][0]) > 0 and "incomplete" not in preloads[-1][1]
    entries = await committed_entries(settings, outcomes)
    check_entries_match_model(entries, outcomes)
    check_merkle_logs(entries, [])
    balances: dict[str, dict[str, Any]] = {}
    for _p, _o, key, record in await read_topic(settings, "ledger.balances", idle_s=3, timeout_s=60):
        balances[key.decode()] = record
    final: dict[str, tuple[int, int]] = {}
    for outcome in outcomes.values():
        if outcome.entry is not None:
            key = core.account_key(outcome.entry.account_id, outcome.entry.currency)
            if outcome.entry.sequence > final.get(key, (0, 0))[0]:
                final[key] = (outcome.entry.sequence, outcome.entry.running_balance_minor)
    assert set(balances) == set(final)
    for key, (sequence, balance_minor) in final.items():
        assert balances[key]["sequence"] == sequence
        assert to_minor(balances[key]["balance"], USDC.decimals) == balance_minor
