"""sardis-ledger 1.x's README, call for call, against the real stack (worker and both sinks).

Each block below is an example of the old README (../shared/seed-README.md) as written there;
the only additions are the assertions, funding the batch's sender (the stream ledger refuses an
overdraft the old example relied on) and the lock conflict the old library would have blocked on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from sardis_ledger import (
    ChainProvider,
    ConcurrencyError,
    Entry,
    HybridConfig,
    ImmutableConfig,
    LedgerEngine,
    LedgerEntryType,
    LockManager,
    ReconciliationEngine,
    VerificationStatus,
    create_audit_trail,
    create_hybrid_ledger,
)
from sardis_ledger.sinks.process import SinkProcess
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.topics import create_topics
from sardis_ledger.streams.worker_process import WorkerProcess

FULL_RECEIPT_TIMEOUT_S = 30.0  # until a tree head covers the entry (one per second of traffic)


@pytest.fixture
def old_readme_stack(settings: Settings, pg_schema: str, tmp_path: Path,
                     monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """A worker and both sinks on this test's topics and schema; the SARDIS_* environment the
    old examples read their settings from (they name no Kafka, prefix or schema)."""
    asyncio.run(create_topics(settings))
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    env = {"SARDIS_PG_SCHEMA": pg_schema, "SARDIS_STATE_DIR": str(state_dir)}
    for name, value in {**settings.as_env(), **env}.items():
        monkeypatch.setenv(name, value)
    processes = [WorkerProcess(settings, tmp_path)] + [
        SinkProcess(settings, kind, tmp_path, env) for kind in ("postgres", "immudb")]
    try:
        for process in processes:
            process.start()
        yield settings
    finally:
        for process in processes:
            process.stop()


async def test_old_readme_examples_call_for_call(old_readme_stack: Settings) -> None:
    """Each README section in its order; later sections use what earlier ones made."""
    database_url = old_readme_stack.pg_dsn
    engine, entry = await _quick_start_and_operations(database_url)
    await _batch_processing(engine)
    locking = await _row_level_locking(engine)
    await _reconciliation(engine)
    await _audit_trail(entry)
    ledger = await _hybrid_ledger(database_url)
    for each in (engine, locking, ledger):
        await each.close()


async def _quick_start_and_operations(database_url: str) -> tuple[LedgerEngine, Entry]:
    # --- Quick Start
    engine = LedgerEngine(database_url=database_url)
    entry = await engine.create_entry(
        account_id="acc_123",
        amount=Decimal("100.50"),
        entry_type=LedgerEntryType.CREDIT,
        reference="payment_456",
    )
    assert entry.entry_id.startswith("ent_")
    assert entry.running_balance == Decimal("100.50")
    assert len(entry.merkle_root) == 64

    # --- Ledger Operations
    credit = await engine.create_entry(
        account_id="acc_123",
        amount=Decimal("500.00"),
        entry_type=LedgerEntryType.CREDIT,
        reference="deposit_789",
        metadata={"source": "bank_transfer"},
    )
    debit = await engine.create_entry(
        account_id="acc_123",
        amount=Decimal("100.00"),
        entry_type=LedgerEntryType.DEBIT,
        reference="withdrawal_012",
    )
    balance = await engine.get_balance("acc_123")
    assert credit.metadata == {"source": "bank_transfer"}
    assert (debit.sequence, debit.running_balance) == (3, Decimal("500.50"))
    assert balance == Decimal("500.50")
    return engine, entry


async def _batch_processing(engine: LedgerEngine) -> None:
    # --- Batch Processing (the sender is funded first: overdrafts are refused)
    await engine.create_entry(account_id="acc_sender", amount=Decimal("500.00"),
                              entry_type=LedgerEntryType.CREDIT)
    batch = await engine.create_batch([
        {
            "account_id": "acc_sender",
            "amount": "500.00",
            "entry_type": "debit",
            "reference": "transfer_123",
        },
        {
            "account_id": "acc_receiver",
            "amount": "500.00",
            "entry_type": "credit",
            "reference": "transfer_123",
        },
    ])
    assert len(batch.entries) == 2
    assert [e.batch_id for e in batch.entries] == [batch.batch_id] * 2
    assert await engine.get_balance("acc_receiver") == Decimal("500.00")
    reversal = await engine.rollback_batch(
        batch_id=batch.batch_id,
        reason="Customer requested refund",
    )
    assert {e.reverses_entry_id for e in reversal.entries} == {e.entry_id for e in batch.entries}
    assert await engine.get_balance("acc_receiver") == Decimal("0.000000")
    assert await engine.get_balance("acc_sender") == Decimal("500.00")


async def _row_level_locking(engine: LedgerEngine) -> LedgerEngine:
    # --- Row-Level Locking, now optimistic
    lock_manager = LockManager()
    locking = LedgerEngine(lock_manager=lock_manager)
    amount = Decimal("50.00")
    async with locking.lock_account("acc_123"):
        balance = await locking.get_balance("acc_123")
        if balance >= amount:
            await locking.create_entry(
                account_id="acc_123",
                amount=amount,
                entry_type=LedgerEntryType.DEBIT,
            )
            # Several entries in one block: each advances the sequence the next must find.
            await locking.create_entry(account_id="acc_123", amount=amount,
                                       entry_type=LedgerEntryType.DEBIT)
    assert await engine.get_balance("acc_123") == Decimal("400.50")
    # A concurrent change inside the block: the block's entry is refused, not posted.
    with pytest.raises(ConcurrencyError) as conflict:
        async with locking.lock_account("acc_123"):
            balance = await locking.get_balance("acc_123")
            await engine.create_entry(account_id="acc_123", amount=Decimal("1.00"),
                                      entry_type=LedgerEntryType.CREDIT)  # another writer
            if balance >= amount:
                await locking.create_entry(account_id="acc_123", amount=amount,
                                           entry_type=LedgerEntryType.DEBIT)
    assert conflict.value.expected_sequence == 5
    assert await engine.get_balance("acc_123") == Decimal("401.50")  # the debit never posted
    return locking


async def _reconciliation(engine: LedgerEngine) -> None:
    # --- Blockchain Reconciliation (no chain transfers on this test's topics: nothing to match)
    reconciler = ReconciliationEngine(
        ledger=engine,
        chain_provider=ChainProvider(chain="base"),
    )
    report = await reconciler.reconcile(
        start_block=1000000,
        end_block=1001000,
    )
    assert (report.matched_count, len(report.discrepancies)) == (0, 0)


async def _audit_trail(entry: Entry) -> None:
    # --- Immutable Audit Trail (with immudb)
    audit = create_audit_trail(
        config=ImmutableConfig(
            host="localhost",
            port=3322,
            database="sardis_audit",
        )
    )
    receipt = await audit.write(
        entry_id=entry.entry_id,
        data=entry.to_dict(),
    )
    assert receipt.verified and receipt.merkle_proof["tx_id"] == receipt.tx_id > 0
    verification = await audit.verify(entry.entry_id)
    assert verification.status == VerificationStatus.VERIFIED
    assert (await audit.verify(entry.entry_id, entry.to_dict())).status == VerificationStatus.VERIFIED
    assert (await audit.verify(entry.entry_id, {**entry.to_dict(), "amount": "1"})).status \
        == VerificationStatus.MISMATCH
    assert (await audit.verify("ent_never_written")).status == VerificationStatus.NOT_FOUND
    again = await audit.write(entry_id=entry.entry_id, data=entry.to_dict())
    assert again.tx_id == receipt.tx_id  # write-once: the same data is not stored twice
    await audit.close()


async def _hybrid_ledger(database_url: str) -> LedgerEngine:
    # --- Hybrid Ledger (PostgreSQL + immudb): returns once both sinks hold the entry
    ledger = create_hybrid_ledger(
        config=HybridConfig(
            postgres_url=database_url,
            immudb_host="localhost",
            immudb_port=3322,
        )
    )
    entry = await ledger.create_entry(
        account_id="acc_123",
        amount=Decimal("100.00"),
        entry_type=LedgerEntryType.CREDIT,
    )
    assert entry.receipt is not None
    assert entry.receipt.pg_id == entry.entry_id
    assert entry.receipt.immudb_tx > 0 and entry.receipt.verified
    deadline = time.monotonic() + FULL_RECEIPT_TIMEOUT_S
    while not (full := await ledger.verify_receipt(entry.entry_id))["verified"]:
        assert time.monotonic() < deadline, f"the hybrid receipt never verified: {full}"
        await asyncio.sleep(0.5)
    assert full["immudb"]["receipt"]["immudb_tx"] == entry.receipt.immudb_tx
    return ledger
