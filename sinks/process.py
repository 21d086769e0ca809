"""A `sardis-ledger sink postgres|immudb` child process: start, wait until ready, stop, kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from sinks.errors import SinkError
from sinks.immudb import READY_MESSAGE as IMMUDB_READY
from sinks.postgres import READY_MESSAGE as POSTGRES_READY
from streams.config import Settings

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 40
READY_MESSAGES = {"postgres": POSTGRES_READY, "immudb": IMMUDB_READY}


class SinkProcess:
    """One sink child with its own log file per start (`sink-KIND-N.log` in `log_dir`)."""

    def __init__(self, settings: Settings, kind: str, log_dir: Path | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        if kind not in READY_MESSAGES:
            raise SinkError(f"unknown sink {kind!r}; use one of {', '.join(READY_MESSAGES)}")
        self.settings = settings
        self.kind = kind
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix=f"sardis-sink-{kind}-"))
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"sink-{self.kind}-{self.starts}.log"

    def __enter__(self) -> SinkProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, wait_ready: bool = True) -> None:
        self.starts += 1
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streams.cli", "sink", self.kind, "--loglevel", "info"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **self.settings.as_env(), **self.env})
        if wait_ready:
            self.wait_ready()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while READY_MESSAGES[self.kind] not in self.log_path.read_text(errors="replace"):
            if self.proc is not None and self.proc.poll() is not None:
                raise SinkError(f"sink {self.kind} exited with {self.proc.returncode}; log "
                                f"{self.log_path}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise SinkError(f"sink {self.kind} not ready after {READY_TIMEOUT_S:.0f}s; log "
                                f"{self.log_path}:\n{self.tail()}")
            time.sleep(0.1)

    def tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])

    def kill9(self) -> None:
        """SIGKILL, no goodbye: what a crash looks like."""
        if self.alive():
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill9()
