"""A `sardis-ledger sink postgres|immudb` child process: start, wait until ready, stop, kill -9."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from sardis_ledger.sinks.errors import SinkError
from sardis_ledger.sinks.immudb import READY_MESSAGE as IMMUDB_READY
from sardis_ledger.sinks.kafka import ALL_PARTITIONS, Shard
from sardis_ledger.sinks.postgres import READY_MESSAGE as POSTGRES_READY
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.worker_process import ChildProcess

READY_TIMEOUT_S = 60.0
READY_MESSAGES = {"postgres": POSTGRES_READY, "immudb": IMMUDB_READY}


class SinkProcess(ChildProcess):
    """`sardis-ledger sink KIND` (log files `sink-KIND-N.log` in `log_dir`)."""

    error = SinkError

    def __init__(self, settings: Settings, kind: str, log_dir: Path | None = None,
                 env: Mapping[str, str] | None = None, shard: Shard = ALL_PARTITIONS) -> None:
        if kind not in READY_MESSAGES:
            raise SinkError(f"unknown sink {kind!r}; use one of {', '.join(READY_MESSAGES)}")
        self.kind = kind
        super().__init__(settings, ["sink", kind, "--loglevel", "info", "--shard", str(shard)],
                         READY_MESSAGES[kind], log_dir=log_dir, name=f"sink-{kind}{shard.suffix}",
                         env=env,
                         ready_timeout_s=READY_TIMEOUT_S)
