"""The old library's ReconciliationEngine(ledger=, chain_provider=) over the range report."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sardis_ledger.engine import LedgerEngine
from sardis_ledger.sinks.reconcile_report import ReconciliationEngine as RangeReport
from sardis_ledger.sinks.reconcile_report import ReconciliationReport
from sardis_ledger.streams.extras import require


@dataclass(frozen=True, slots=True)
class ChainProvider:
    """The chain to reconcile against. `rpc_url` defaults to SARDIS_CHAIN_RPC; the transfers
    themselves come from the watcher's chain.transfers topic (`sardis-ledger chain watch`)."""

    chain: str
    rpc_url: str | None = None


class ReconciliationEngine:
    """`await ReconciliationEngine(ledger=engine, chain_provider=...).reconcile(start_block=,
    end_block=)` -> report.matched_count, report.discrepancies (each .type, .description)."""

    def __init__(self, ledger: LedgerEngine, chain_provider: ChainProvider, *,
                 pg_schema: str | None = None) -> None:
        require("ReconciliationEngine", "postgres")
        settings = ledger.settings
        if chain_provider.rpc_url is not None:
            settings = dataclasses.replace(settings, chain_rpc=chain_provider.rpc_url)
        self.chain = chain_provider.chain
        self._report = RangeReport(settings, pg_schema=pg_schema)

    async def reconcile(self, *, start_block: int, end_block: int) -> ReconciliationReport:
        return await self._report.reconcile(start_block=start_block, end_block=end_block)
