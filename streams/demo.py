"""`make demo`: the stack, a ledger worker, a scripted workload, balances and Merkle roots."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from decimal import Decimal

from sardis_ledger.streams import canonical, records
from sardis_ledger.streams.client import LedgerClient, LedgerEntry, LedgerRejected
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.money import currency_table
from sardis_ledger.streams.topics import create_topics
from sardis_ledger.streams.worker_process import WorkerProcess


def _say(text: str = "") -> None:
    print(text, flush=True)


def _row(label: str, entry: LedgerEntry) -> None:
    _say(f"  {label:34s} {entry.entry_type:7s} {entry.amount:>10f} {entry.currency}  "
         f"balance {entry.running_balance:>10f}  seq {entry.sequence}  "
         f"root {entry.merkle_root[:16]}…")


async def _workload(settings: Settings) -> list[LedgerEntry]:
    committed: list[LedgerEntry] = []
    async with LedgerClient(settings) as ledger:
        async def post(label: str, **kwargs: object) -> None:
            try:
                entry = await ledger.create_entry(**kwargs)  # type: ignore[arg-type]
            except LedgerRejected as exc:
                _say(f"  {label:34s} REJECTED {exc.reason}: {exc.detail}")
                return
            committed.append(entry)
            _row(label, entry)

        _say("Posting entries (each call produces a command and awaits its result):")
        await post("credit acc_alice 500.00 USD", account_id="acc_alice", amount=Decimal("500.00"),
                   entry_type="credit", currency="USD", reference="deposit_789",
                   metadata={"source": "bank_transfer"}, command_id="demo-deposit-1")
        await post("debit acc_alice 120.25 USD", account_id="acc_alice", amount="120.25",
                   entry_type="debit", currency="USD", reference="withdrawal_012")
        await post("fee acc_alice 0.75 USD", account_id="acc_alice", amount="0.75",
                   entry_type="fee", currency="USD")
        await post("credit acc_bob 1000.000001 USDC", account_id="acc_bob",
                   amount="1000.000001", entry_type="credit", currency="USDC")
        await post("credit acc_bob 1 wei (1e-18 ETH)", account_id="acc_bob",
                   amount="0.000000000000000001", entry_type="credit", currency="ETH")
        await post("overdraft: debit acc_alice 10000 USD", account_id="acc_alice",
                   amount="10000", entry_type="debit", currency="USD")
        await post("duplicate of demo-deposit-1", account_id="acc_alice",
                   amount=Decimal("500.00"), entry_type="credit", currency="USD",
                   reference="deposit_789", metadata={"source": "bank_transfer"},
                   command_id="demo-deposit-1")
        await post("stale expected_sequence=1", account_id="acc_alice", amount="1",
                   entry_type="debit", currency="USD", expected_sequence=1)
        await post("expected_sequence=3 (current)", account_id="acc_alice", amount="1",
                   entry_type="debit", currency="USD", expected_sequence=3)
        await post("too many decimals 1.001 USD", account_id="acc_alice", amount="1.001",
                   entry_type="credit", currency="USD")

        _say("\nBalances (from the compacted ledger.balances topic):")
        for account, currency in (("acc_alice", "USD"), ("acc_bob", "USDC"), ("acc_bob", "ETH")):
            balance = await ledger.get_balance(account, currency)
            _say(f"  {account:10s} {currency:5s} posted {balance.balance:>24f}  "
                 f"available {balance.available:>24f}  seq {balance.sequence}")
    return committed


def _merkle_check(committed: list[LedgerEntry]) -> None:
    _say("\nTamper evidence (recomputed here from the returned entries):")
    currencies = currency_table()
    for entry in committed:
        core_entry = records.entry_from_wire({
            **dataclasses.asdict(entry),
            "amount": entry.amount, "running_balance": entry.running_balance,
            "committed_at": entry.committed_at, "metadata": dict(entry.metadata or {}),
        }, currencies)
        ok = canonical.entry_hash(canonical.entry_bytes(core_entry)).hex() == entry.entry_hash
        _say(f"  {entry.entry_id}  partition {entry.partition} leaf {entry.leaf_index}  "
             f"entry_hash {'verified' if ok else 'MISMATCH'}")
    latest: dict[int, LedgerEntry] = {}
    for entry in committed:
        if entry.leaf_index >= latest.get(entry.partition, entry).leaf_index:
            latest[entry.partition] = entry
    _say("\nMerkle roots per partition (RFC 6962 log over ledger.entries):")
    for partition, entry in sorted(latest.items()):
        _say(f"  partition {partition:2d}: size {entry.leaf_index + 1}  root {entry.merkle_root}")


def run_demo() -> int:
    from infra import harness

    _say("Starting the dev stack (provisions on first run)…")
    harness.up()
    base = Settings.from_env()
    settings = dataclasses.replace(base, topic_prefix=f"{base.topic_prefix}demo-{int(time.time())}.")
    _say(f"Topics under prefix {settings.topic_prefix!r}; creating them and starting a worker…")
    asyncio.run(create_topics(settings))
    started = time.monotonic()
    with WorkerProcess(settings) as worker:
        _say(f"Worker ready in {time.monotonic() - started:.1f}s (log: {worker.log_path})\n")
        committed = asyncio.run(_workload(settings))
        _merkle_check(committed)
    _say("\nWorker stopped. Replay everything with:\n"
         f"  SARDIS_TOPIC_PREFIX={settings.topic_prefix} sardis-ledger consume ledger.entries "
         "--from-beginning --timeout 3")
    return 0
