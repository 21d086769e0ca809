"""The ledger worker: a thin Faust shell (agents, tables, commit protocol) around the pure core."""

from __future__ import annotations

from sardis_ledger.streams.worker.app import LedgerWorker, run_worker

__all__ = ["LedgerWorker", "run_worker"]
