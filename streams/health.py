"""Each process's HTTP endpoint: /metrics (Prometheus text), /healthz (alive), /readyz (ready)."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sardis_ledger.streams import metrics
from sardis_ledger.streams.config import metrics_endpoint

log = logging.getLogger("sardis.health")

# A process is ready only while its inputs are at most this many records behind.
READY_LAG_RECORDS_MAX: Final[int] = 1000
# The chain watcher is ready while at most this many confirmed blocks are unpublished.
READY_BLOCKS_BEHIND_MAX: Final[int] = 100
ERROR_TEXT_CHARS_MAX: Final[int] = 300


class Health:
    """What /healthz and /readyz answer: set from the process's event loop, read from the HTTP
    thread (plain attribute writes; a reader sees the last whole value)."""

    def __init__(self, component: str) -> None:
        self.component = component
        self.started_at = time.time()
        self.detail = "starting"
        self.last_error = ""
        self.last_error_at: float | None = None
        self._ready_check: Callable[[], tuple[bool, str]] = lambda: (False, self.detail)

    def ready_when(self, check: Callable[[], tuple[bool, str]]) -> None:
        """`check()` -> (ready, why): called on every /readyz."""
        self._ready_check = check

    def readiness(self) -> tuple[bool, str]:
        try:
            ready, why = self._ready_check()
        except Exception as exc:  # a readiness probe must answer, never raise
            ready, why = False, f"readiness check failed: {exc!r}"
        metrics.READY.labels(self.component).set(1 if ready else 0)
        return ready, why

    def state(self) -> dict[str, Any]:
        ready, why = self.readiness()
        return {"component": self.component, "ready": ready, "detail": why,
                "uptime_s": round(time.time() - self.started_at, 1),
                "last_error": self.last_error, "last_error_at": self.last_error_at}


def lag_readiness(started: Callable[[], bool], behind: Callable[[], int | None], what: str,
                  unit: str = "records", limit: int = READY_LAG_RECORDS_MAX
                  ) -> Callable[[], tuple[bool, str]]:
    """Ready once `started()` and the largest input lag is known and within `limit`."""
    def check() -> tuple[bool, str]:
        if not started():
            return False, f"{what} starting"
        lag = behind()
        if lag is None:
            return False, f"{what} running, lag not measured yet"
        if lag > limit:
            return False, f"{what} behind by {lag} {unit} (ready at <= {limit})"
        return True, f"{what} caught up (lag {lag} {unit})"
    return check


class _LastError(logging.Handler):
    """Keeps the newest ERROR or worse log message as the process's last error."""

    def __init__(self, health: Health) -> None:
        super().__init__(logging.ERROR)
        self.health = health

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a broken log call must not break logging
            text = str(record.msg)
        self.health.last_error = f"{record.name}: {text}"[:ERROR_TEXT_CHARS_MAX]
        self.health.last_error_at = record.created


def _handler(health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                health.readiness()  # keeps sardis_ready current
                self._reply(200, generate_latest(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._reply(200, json.dumps({"component": health.component, "alive": True,
                                             "pid": os.getpid()}).encode())
            elif path == "/readyz":
                state = health.state()
                self._reply(200 if state["ready"] else 503, json.dumps(state).encode())
            else:
                self._reply(404, b'{"error": "not found: /metrics, /healthz, /readyz"}')

        def _reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
            return

    return Handler


def serve(component: str, kind: str | None = None) -> Health:
    """Start the endpoint of this process (a daemon thread) at SARDIS_METRICS_HOST:PORT (the
    kind's default port; 0 turns it off). A port already taken is logged, not fatal: the
    process's work matters more than its endpoint, and a probe on that port then fails."""
    health = Health(component)
    logging.getLogger().addHandler(_LastError(health))
    host, port = metrics_endpoint(kind or component)
    if port == 0:
        return health
    try:
        server = ThreadingHTTPServer((host, port), _handler(health))
    except OSError as exc:
        log.warning("metrics and health endpoint not started: %s:%d: %s", host, port, exc)
        return health
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="sardis-health", daemon=True).start()
    print(f"{component}: metrics on http://{host}:{port}/metrics, health on /healthz and /readyz",
          file=sys.stderr, flush=True)
    return health
