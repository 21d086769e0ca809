"""open_transaction: a commit or send finds its transaction open, whatever ended it before."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.producer.transaction_manager import TransactionState

from sardis_ledger.streams.errors import InvariantViolation
from sardis_ledger.streams.worker.compat import open_transaction


class FakeManager:
    def __init__(self, state: TransactionState) -> None:
        self.state = state
        self.transactional_id = "app-0-3"

    def is_in_transaction(self) -> bool:
        return self.state == TransactionState.IN_TRANSACTION


class FakeProducer:
    """aiokafka's producer as open_transaction sees it: a transaction manager and begin."""

    def __init__(self, state: TransactionState) -> None:
        self._txn_manager = FakeManager(state)
        self.begun = 0

    async def begin_transaction(self) -> None:
        self.begun += 1
        self._txn_manager.state = TransactionState.IN_TRANSACTION


@pytest.mark.parametrize(("state", "begun"), [
    (TransactionState.IN_TRANSACTION, 0),  # already open: nothing to do
    (TransactionState.READY, 1),           # ended by Faust's stop path or a failed begin: open it
])
async def test_open_transaction_begins_only_when_ready(state: TransactionState, begun: int) -> None:
    producer = FakeProducer(state)
    await open_transaction(producer, asyncio.Lock())
    assert producer.begun == begun
    assert producer._txn_manager.is_in_transaction()


@pytest.mark.parametrize("state", [TransactionState.ABORTABLE_ERROR, TransactionState.FATAL_ERROR,
                                   TransactionState.COMMITTING_TRANSACTION,
                                   TransactionState.UNINITIALIZED])
async def test_open_transaction_refuses_any_other_state(state: TransactionState) -> None:
    producer = FakeProducer(state)
    with pytest.raises(InvariantViolation, match=state.name):
        await open_transaction(producer, asyncio.Lock())
    assert producer.begun == 0
