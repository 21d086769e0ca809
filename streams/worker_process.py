"""`sardis-ledger` child processes (worker, sinks, chain watcher): start, wait ready, stop, kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.errors import LedgerError

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
# A process given SIGTERM ends its open transactions and exits within this; past it, it exits
# anyway (streams/shutdown.py), so a supervisor or a container platform never waits long.
STOP_GRACE_S = 8.0
READY_POLL_S = 0.1
READY_MARKER = "Worker]: Ready"  # Faust's log line once recovery is done and streams run
LOG_TAIL_LINES = 40


class ChildProcess:
    """One `sardis-ledger ARGS…` child with its own log file per start (`name-N.log` in
    `log_dir`); ready once `ready_marker` appears in that log."""

    error: type[LedgerError] = LedgerError

    def __init__(self, settings: Settings, args: Sequence[str], ready_marker: str, *,
                 log_dir: Path | None = None, name: str = "child",
                 env: Mapping[str, str] | None = None,
                 ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        self.settings = settings
        self.args = list(args)
        self.ready_marker = ready_marker
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix=f"sardis-{name}-"))
        self.name = name
        self.env = dict(env or {})
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}-{self.starts}.log"

    def __enter__(self) -> ChildProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, wait_ready: bool = True) -> None:
        self.starts += 1
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sardis_ledger.streams.cli", *self.args],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **self.settings.as_env(), **self.env})
        if wait_ready:
            self.wait_ready()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        """Whether the ready marker is in this start's log; raises if the child exited."""
        if self.ready_marker in self.log_path.read_text(errors="replace"):
            return True
        if self.proc is not None and self.proc.poll() is not None:
            raise self.error(f"{self.name} exited with {self.proc.returncode}; log "
                             f"{self.log_path}:\n{self.tail()}")
        return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise self.error(f"{self.name} not ready after {self.ready_timeout_s:.0f}s; log "
                                 f"{self.log_path}:\n{self.tail()}")
            time.sleep(READY_POLL_S)

    def tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])

    def kill9(self) -> None:
        """SIGKILL, no goodbye: what a crash looks like."""
        if self.proc is not None and self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT_S)

    def terminate(self, timeout_s: float = STOP_TIMEOUT_S) -> tuple[float, int]:
        """SIGTERM and wait: (seconds until the child exited, its exit code). A child still
        running after `timeout_s` is killed with SIGKILL and reported as an error."""
        if self.proc is None or not self.alive():
            raise self.error(f"{self.name} is not running")
        started = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            returncode = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise self.error(f"{self.name} still running {timeout_s:.0f}s after SIGTERM; log "
                             f"{self.log_path}:\n{self.tail()}") from None
        return time.monotonic() - started, returncode

    def stop(self) -> None:
        if self.proc is not None and self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill9()


class WorkerProcess(ChildProcess):
    """`sardis-ledger worker`."""

    def __init__(self, settings: Settings, log_dir: Path | None = None, name: str = "worker",
                 env: Mapping[str, str] | None = None) -> None:
        super().__init__(settings, ["worker", "--loglevel", "info"], READY_MARKER,
                         log_dir=log_dir, name=name, env=env)
