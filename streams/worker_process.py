"""A `sardis-ledger worker` child process: start, wait until ready, stop, or kill -9 (tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from streams.config import Settings
from streams.errors import LedgerError

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
READY_MARKER = "Worker]: Ready"  # Faust's log line once recovery is done and streams run
LOG_TAIL_LINES = 40


class WorkerProcess:
    """One worker child with its own log file per start (`name-N.log` in `log_dir`)."""

    def __init__(self, settings: Settings, log_dir: Path | None = None, name: str = "worker") -> None:
        self.settings = settings
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="sardis-worker-"))
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}-{self.starts}.log"

    def __enter__(self) -> WorkerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, wait_ready: bool = True) -> None:
        self.starts += 1
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streams.cli", "worker", "--loglevel", "info"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **self.settings.as_env()})
        if wait_ready:
            self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while READY_MARKER not in self.log_path.read_text(errors="replace"):
            if self.proc is not None and self.proc.poll() is not None:
                raise LedgerError(f"worker exited with {self.proc.returncode}; log "
                                  f"{self.log_path}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise LedgerError(f"worker not ready after {READY_TIMEOUT_S:.0f}s; log "
                                  f"{self.log_path}:\n{self.tail()}")
            time.sleep(0.2)

    def tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])

    def kill9(self) -> None:
        """SIGKILL, no goodbye: what a crash looks like."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill9()
