"""Ingest rate of the chain watcher: transfers/s published while catching up over a block range."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from sardis_ledger.streams.chain.config import WatchConfig
from sardis_ledger.streams.chain.watch import ChainWatcher, KafkaSink, Web3Reader, ensure_state_topic
from sardis_ledger.streams.config import Settings


@dataclass(frozen=True, slots=True)
class IngestFigure:
    transfers: int
    blocks: int
    ranges: int
    startup_s: float  # producer start (transactional init), progress read
    sync_s: float  # eth_getLogs, headers, decoding, Avro, Kafka transactions

    @property
    def transfers_per_s(self) -> float:
        return self.transfers / self.sync_s if self.sync_s > 0 else 0.0

    def __str__(self) -> str:
        return (f"{self.transfers} transfers in {self.blocks} blocks ({self.ranges} ranges) in "
                f"{self.sync_s:.2f}s after {self.startup_s:.2f}s startup: "
                f"{self.transfers_per_s:,.0f} transfers/s")


async def measure_ingest(settings: Settings, config: WatchConfig, start_block: int,
                         end_block: int, watch_id: str = "bench") -> IngestFigure:
    """Run a fresh watcher (its own watch_id, so no stored progress) over start_block..end_block
    once, as `chain watch` does when it catches up after downtime, and time it."""
    from sardis_ledger.streams.topics import create_topics

    fresh = replace(config, watch_id=watch_id, start_block=start_block)
    await create_topics(settings)
    await ensure_state_topic(settings)
    started = time.perf_counter()
    reader = Web3Reader(settings.chain_rpc)
    sink = KafkaSink(settings, fresh.chain or "bench", fresh.watch_id)
    await sink.start()
    try:
        watcher = ChainWatcher(fresh, fresh.chain or "bench", reader, sink)
        await watcher.load()
        ready = time.perf_counter()
        stats = await watcher.sync(until_block=end_block)
        done = time.perf_counter()
    finally:
        await sink.stop()
        await reader.close()
    return IngestFigure(stats.confirmed, end_block - start_block + 1, stats.ranges,
                        ready - started, done - ready)
