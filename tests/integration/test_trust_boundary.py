"""The trust boundary against the real worker on real Kafka: a client with produce rights on the
client topics forges internal records and sends mutated records of every type; none of it moves
money, all of it lands in the DLQ with a reason, and the worker never stops. A bug-path failure
stops the worker naming the record, and `sardis-ledger quarantine` lets the partition go on."""

from __future__ import annotations

import asyncio
import io
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import pytest
from aiokafka import AIOKafkaProducer

from sardis_ledger.schemas.codec import SINGLE_OBJECT_MARKER, AvroCodec, load_schemas
from sardis_ledger.streams import batches, core
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.money import currency_table, to_minor
from sardis_ledger.streams.topics import APP_NAME, LedgerTopic, create_topics
from sardis_ledger.streams.worker_process import WorkerProcess
from tests.hostile import hostile_records, is_valid_client_command
from tests.integration.support import check_merkle_logs, read_topic
from tests.integration.test_ledger_stream import (
    check_entries_match_model,
    committed_entries,
    make_workload,
    reference_model,
    results_for,
)

CURRENCIES = currency_table()
CODEC = AvroCodec()
# Mutated records sent to the client topics (SARDIS_TEST_FUZZ_RECORDS; `make fuzz` sends 100,000).
FUZZ_RECORDS = int(os.environ.get("SARDIS_TEST_FUZZ_RECORDS", "5000"))
INTERNAL_FUZZ_RECORDS = max(500, FUZZ_RECORDS // 10)
FUZZ_ACCOUNT = "fuzz_acc"
FUZZ_BATCH = "fuzz_bat"
ALICE = "acc_alice"


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    asyncio.run(create_topics(settings))
    process = WorkerProcess(settings, tmp_path)
    yield process
    process.stop()


def _unchecked(name: str, record: dict[str, Any]) -> bytes:
    """A message written by fastavro alone, as a hostile producer would (no codec checks)."""
    body = io.BytesIO()
    fastavro.schemaless_writer(body, load_schemas()[f"sardis.ledger.{name}"], record)
    return SINGLE_OBJECT_MARKER + CODEC.fingerprint_of(name) + body.getvalue()


def _forged_client_records(partitions: int) -> list[tuple[str, bytes, str]]:
    """(client topic, value, expected DLQ reason): the attacks of the trust-boundary issue."""
    coordinator = batches.coordinator_partition("forged", partitions)
    mint = {"batch_id": "forged", "leg_index": 0, "batch_size": 1,
            "coordinator_partition": coordinator, "account_id": "mallory", "currency": "USD",
            "entry_type": "credit", "amount": Decimal("1000000"), "sign": 1, "reference": None,
            "metadata": {}, "allow_overdraft": False, "reverses_entry_id": None}
    post = {"batch_id": "forged", "leg_index": 0, "account_id": "mallory", "currency": "USD",
            "action": "post", "coordinator_partition": coordinator}
    report = {"batch_id": "nobody", "leg_index": 0, "kind": "reserved", "reason": None,
              "detail": None, "entry": None}
    huge_currency = {"command_id": "huge", "account_id": "mallory", "currency": "X" * 524_400,
                     "entry_type": "credit", "amount": Decimal("1")}
    return [
        (LedgerTopic.COMMANDS, CODEC.encode("ReserveLeg", mint), "not_a_client_command"),
        (LedgerTopic.COMMANDS, CODEC.encode("SettleLeg", post), "not_a_client_command"),
        (LedgerTopic.COMMANDS, _unchecked("ReserveLeg", {**mint, "leg_index": 2**40}),
         "malformed_body"),
        (LedgerTopic.BATCHES, CODEC.encode("LegReport", report), "not_a_client_command"),
        (LedgerTopic.BATCHES, CODEC.encode("BatchTick", {"partition": 0, "now": 1}),
         "not_a_client_command"),
        (LedgerTopic.COMMANDS, CODEC.encode("PostEntry", huge_currency), "unknown_currency"),
        (LedgerTopic.COMMANDS, b"\x00" * 1_000_000, "unknown_schema_id"),  # Confluent id 0
        (LedgerTopic.COMMANDS, CODEC.encode("PostEntry", {**huge_currency, "currency": "USD",
                                                          "amount": Decimal("-500")}),
         "invalid_amount"),
    ]


# Where each record type is an input (a type elsewhere is only an unknown_command).
INTERNAL_HOME = {"ReserveLeg": LedgerTopic.INTERNAL_COMMANDS,
                 "SettleLeg": LedgerTopic.INTERNAL_COMMANDS,
                 "PostEntry": LedgerTopic.INTERNAL_COMMANDS,
                 "LegReport": LedgerTopic.INTERNAL_COORDINATOR,
                 "BatchTick": LedgerTopic.INTERNAL_COORDINATOR,
                 "SubmitBatch": LedgerTopic.INTERNAL_COORDINATOR,
                 "RollbackBatch": LedgerTopic.INTERNAL_COORDINATOR,
                 "Entry": LedgerTopic.CHAIN_CLAIMS, "ReconcileTick": LedgerTopic.CHAIN_CLAIMS,
                 "ChainTransfer": LedgerTopic.CHAIN_TRANSFERS}


def _rejected_before_any_state(name: str, record: dict[str, Any], partition: int,
                               partitions: int) -> bool:
    """Whether the worker's stateless checks refuse `record` read on `partition` of its home
    topic (records that pass them would be trusted: internal topics are workers' own)."""
    from sardis_ledger.streams import reconcile, records

    def raises(check: Any) -> bool:
        try:
            check()
        except reconcile.ReconcileError:
            return True
        return False

    checks: dict[str, Any] = {
        "ReserveLeg": lambda: batches.parse_reserve(record, CURRENCIES, partitions),
        "SettleLeg": lambda: batches.parse_settle(record, CURRENCIES, partitions),
        "PostEntry": lambda: core.parse_post_entry(record, CURRENCIES),
        "SubmitBatch": lambda: batches.parse_submit_batch(record, CURRENCIES),
        "RollbackBatch": lambda: batches.parse_rollback(record),
        "BatchTick": lambda: batches.parse_tick(record, partition),
        "LegReport": lambda: _report_check(record, partitions),
    }
    if name == "ChainTransfer":
        return raises(lambda: reconcile.transfer_from_wire(record))
    if name == "Entry":
        return records.entry_problem(record, CURRENCIES) is not None
    if name == "ReconcileTick":
        return raises(lambda: reconcile.parse_tick(record, partition))
    outcome = checks[name]()
    return isinstance(outcome, (str, core.Rejection, batches.BatchRejection))


def _report_check(record: dict[str, Any], partitions: int) -> Any:
    from sardis_ledger.streams import records

    if record.get("entry") is None:
        return batches.parse_report(record, None, partitions)
    entry = records.parse_entry(record["entry"], CURRENCIES)
    return entry if isinstance(entry, str) else batches.parse_report(record, entry, partitions)


def _internal_hostile(count: int, partitions: int, rng: random.Random
                      ) -> list[tuple[LedgerTopic, int, bytes]]:
    """Mutated records on the internal topics (an ACL gone wrong), each refused by a check that
    runs before any state is read."""
    out: list[tuple[LedgerTopic, int, bytes]] = []
    for data in hostile_records(count * 4, 6, FUZZ_ACCOUNT, 0, FUZZ_BATCH, CURRENCIES):
        partition = rng.randrange(partitions)
        try:
            name, record = CODEC.decode(data)
        except Exception:
            out.append((rng.choice(list(set(INTERNAL_HOME.values()))), partition, data))
        else:
            if _rejected_before_any_state(name, record, partition, partitions):
                out.append((INTERNAL_HOME[name], partition, data))
        if len(out) == count:
            break
    return out


def _alice_scenario(settings: Settings) -> list[bytes]:
    """Internal-topic forgeries (defence in depth): a hold on alice, a post naming mallory (an
    account of the same partition) for it, then its void. The account answers a coordinator that
    never began the batch."""
    coordinator = batches.coordinator_partition("bat_alice", settings.partitions)
    alice_partition = core.partition_for(ALICE, settings.partitions)
    mallory = next(f"mallory_{i}" for i in range(1000)
                   if core.partition_for(f"mallory_{i}", settings.partitions) == alice_partition)
    reserve = {"batch_id": "bat_alice", "leg_index": 0, "batch_size": 2,
               "coordinator_partition": coordinator, "account_id": ALICE, "currency": "USD",
               "entry_type": "debit", "amount": Decimal("100"), "sign": -1, "reference": None,
               "metadata": {}, "allow_overdraft": True, "reverses_entry_id": None}
    settle = {"batch_id": "bat_alice", "leg_index": 0, "account_id": mallory,
              "currency": "USD", "action": "post", "coordinator_partition": coordinator}
    return [CODEC.encode("ReserveLeg", reserve), CODEC.encode("SettleLeg", settle),
            CODEC.encode("SettleLeg", {**settle, "account_id": ALICE, "action": "void"})]


async def test_a_client_cannot_mint_move_holds_or_stop_the_worker(
        settings: Settings, worker: WorkerProcess) -> None:
    rng = random.Random(17)
    commands, _ = make_workload(seed=4, commands=2000, accounts=40)
    outcomes = reference_model(commands)
    fuzz = hostile_records(FUZZ_RECORDS, 5, FUZZ_ACCOUNT, 0, FUZZ_BATCH, CURRENCIES)
    assert not any(is_valid_client_command(CODEC, d, CURRENCIES) for d in fuzz)
    internal = _internal_hostile(INTERNAL_FUZZ_RECORDS, settings.partitions, rng)
    forged = _forged_client_records(settings.partitions)
    # (sort key, topic, partition, key, value): the client's commands in their order, the
    # hostile records spread among them at random.
    sends: list[tuple[float, str, int, bytes | None, bytes]] = []
    for i, record in enumerate(commands):
        account = record["account_id"]
        sends.append((i / len(commands), LedgerTopic.COMMANDS,
                      core.partition_for(account, settings.partitions), account.encode(),
                      CODEC.encode("PostEntry", record)))
    for value in fuzz:
        sends.append((rng.random(), rng.choice([LedgerTopic.COMMANDS, LedgerTopic.BATCHES]),
                      rng.randrange(settings.partitions), rng.choice([None, b"k", b"\xff"]),
                      value))
    for topic, value, _reason in forged:
        sends.append((rng.random(), topic, rng.randrange(settings.partitions), None, value))
    for topic, partition, value in internal:
        sends.append((rng.random(), topic, partition, None, value))
    sends.sort(key=lambda send: send[0])
    alice_partition = core.partition_for(ALICE, settings.partitions)
    sends += [(2.0, LedgerTopic.INTERNAL_COMMANDS, alice_partition, ALICE.encode(), value)
              for value in _alice_scenario(settings)]
    worker.start()
    producer = AIOKafkaProducer(**settings.kafka_connection(), acks="all",
                                enable_idempotence=True, linger_ms=5,
                                max_request_size=1_100_000)
    await producer.start()
    try:
        for _order, topic, partition, key, value in sends:
            await producer.send(settings.topic(topic), value, key=key, partition=partition)
        await producer.flush()
    finally:
        await producer.stop()

    results = await results_for(settings, set(outcomes), timeout_s=300)
    model_results = Counter((r["command_id"], r["status"], r["reason"]) for r in results
                            if r["command_id"] in outcomes)
    for command_id, outcome in outcomes.items():
        assert (command_id, str(outcome.status),
                None if outcome.reason is None else str(outcome.reason)) in model_results
    entries = await committed_entries(settings, outcomes)
    check_entries_match_model(entries, outcomes)  # no entry but the model's: nothing minted
    heads = [r[3] for r in await read_topic(settings, "ledger.tree-heads", idle_s=3, timeout_s=30)]
    check_merkle_logs(entries, heads)

    expected_dead = len(fuzz) + len(forged) + len(internal) + 3  # alice: mismatch, 2 reports
    dlq = [r[3] for r in await read_topic(
        settings, "ledger.dlq", timeout_s=300, until=lambda rows: len(rows) >= expected_dead)]
    await asyncio.sleep(3)
    dlq = [r[3] for r in await read_topic(settings, "ledger.dlq", idle_s=3, timeout_s=120)]
    assert len(dlq) == expected_dead, Counter(d["reason"] for d in dlq)
    assert all(d["reason"] and d["detail"] for d in dlq)
    reasons = Counter(d["reason"] for d in dlq)
    assert reasons["not_a_client_command"] >= 4 and reasons["settle_mismatch"] == 1
    assert reasons["unknown_batch"] >= 2
    for _topic, value, reason in forged:
        assert any(d["reason"] == reason and d["payload_sha256"] == _sha(value) for d in dlq)
    big = next(d for d in dlq if d["payload_size"] == 1_000_000)
    assert len(big["payload"]) < 1_000_000 and big["payload_sha256"] == _sha(b"\x00" * 1_000_000)

    balances = {raw_key.decode(): record for _p, _o, raw_key, record in await read_topic(
        settings, "ledger.balances", idle_s=3, timeout_s=60)}
    final: dict[str, int] = {}
    for outcome in outcomes.values():
        if outcome.entry is not None:
            account = core.account_key(outcome.entry.account_id, outcome.entry.currency)
            final[account] = max(final.get(account, 0), outcome.entry.sequence)
    assert set(balances) == set(final) | {f"{ALICE}|USD"}
    for key, record in balances.items():
        if key.startswith(ALICE):
            assert record["balance"] == record["available"] == 0, record  # hold released
            continue
        expected = next(o.entry for o in outcomes.values() if o.entry is not None and
                        core.account_key(o.entry.account_id, o.entry.currency) == key
                        and o.entry.sequence == final[key])
        assert to_minor(record["balance"], 6) == expected.running_balance_minor
    assert worker.alive(), worker.tail()
    log = worker.log_path.read_text(errors="replace")
    assert "STOPPED" not in log and "CRITICAL" not in log


def _sha(value: bytes) -> str:
    import hashlib

    return hashlib.sha256(value).hexdigest()


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sardis_ledger.streams.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False,
                          env={**os.environ, **settings.as_env()})


async def test_a_bug_path_failure_stops_the_worker_naming_the_record_and_quarantine_goes_on(
        settings: Settings, worker: WorkerProcess) -> None:
    """Corrupt state (an accounts changelog record no worker writes) makes deciding one command
    raise: the worker exits 70 naming it; `quarantine` sets it aside; a restarted worker decides
    everything after it, and nothing is lost or doubled."""
    victim = "acc_victim"
    partition = core.partition_for(victim, settings.partitions)
    others = [f"acc_o{i}" for i in range(200)
              if core.partition_for(f"acc_o{i}", settings.partitions) == partition][:3]
    producer = AIOKafkaProducer(**settings.kafka_connection(), acks="all",
                                enable_idempotence=True)
    await producer.start()
    try:
        # State no worker could have written: an account record of a future format.
        await producer.send_and_wait(
            f"{settings.topic(APP_NAME)}-accounts-changelog", b"[99,0,0,0,0]",
            key=core.account_key(victim, "USDC").encode(), partition=partition)
        worker.start()

        def post(command_id: str, account: str) -> bytes:
            return CODEC.encode("PostEntry", {"command_id": command_id, "account_id": account,
                                              "currency": "USDC", "entry_type": "credit",
                                              "amount": Decimal("1")})

        before = [post(f"before-{a}", a) for a in others]
        after = [post(f"after-{a}", a) for a in others]
        for value in [*before, post("poison", victim), *after]:
            await producer.send(settings.topic(LedgerTopic.COMMANDS), value, partition=partition)
        await producer.flush()
    finally:
        await producer.stop()
    deadline = time.monotonic() + 120
    while worker.alive() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert not worker.alive() and worker.proc is not None and worker.proc.returncode == 70
    log = worker.log_path.read_text(errors="replace")
    position = f"{settings.topic(LedgerTopic.COMMANDS)}:{partition}:{len(before)}"
    assert f"STOPPED on {position}" in log and "InvariantViolation" in log
    assert f"sardis-ledger quarantine {position}" in log

    done = _cli(settings, "quarantine", position, "--note", "corrupt account state")
    assert done.returncode == 0 and "quarantined" in done.stdout, done.stderr
    again = _cli(settings, "quarantine", position)
    assert again.returncode == 0 and "already quarantined" in again.stdout, again.stderr
    missing = _cli(settings, "quarantine", f"{settings.topic(LedgerTopic.COMMANDS)}:{partition}:999")
    assert missing.returncode == 1 and "ends at offset" in missing.stderr

    worker.start()
    ids = {f"before-{a}" for a in others} | {f"after-{a}" for a in others} | {"poison"}
    results = {r["command_id"]: r for r in await results_for(settings, ids, timeout_s=120)}
    assert results["poison"]["status"] == "rejected" and results["poison"]["reason"] == "quarantined"
    assert all(results[i]["status"] == "committed" for i in ids - {"poison"})
    entries = [r[3] for r in await read_topic(settings, "ledger.entries", idle_s=3, timeout_s=60)]
    assert sorted(e["command_id"] for e in {e["entry_id"]: e for e in entries}.values()) == \
        sorted(ids - {"poison"})
    check_merkle_logs(entries, [])
    dlq = [r[3] for r in await read_topic(settings, "ledger.dlq", idle_s=3, timeout_s=60)]
    assert [(d["reason"], d["source_offset"], d["command_id"]) for d in dlq] == \
        [("quarantined", len(before), "poison")]
    assert worker.alive()
