"""When commit_soon commits: sooner when the commit ends one transaction than when it ends many."""

from __future__ import annotations

import pytest

from sardis_ledger.streams.worker.commit import (
    COMMIT_IDLE_ONE_TRANSACTION_S,
    COMMIT_IDLE_S,
    CommitProtocol,
)


@pytest.mark.parametrize(("held_by", "idle_s"), [
    ([], COMMIT_IDLE_ONE_TRANSACTION_S),
    (["txn-0"], COMMIT_IDLE_ONE_TRANSACTION_S),
    (["txn-0", "txn-0"], COMMIT_IDLE_ONE_TRANSACTION_S),  # two records, one transaction
    (["txn-0", "txn-3"], COMMIT_IDLE_S),
])
def test_the_idle_window_grows_with_the_transactions_a_commit_ends(
        held_by: list[str], idle_s: float) -> None:
    commits = CommitProtocol(app=None, anchor_topic="ledger.commands", worker_id="w")
    for offset, transactional_id in enumerate(held_by):
        commits.outbox.append(transactional_id, None, "ledger.results", 0, b"k", bytes([offset]))
    assert commits.idle_window_s() == idle_s
    assert COMMIT_IDLE_ONE_TRANSACTION_S < COMMIT_IDLE_S
