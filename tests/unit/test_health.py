"""streams/health.py: /healthz, /readyz (200 ready, 503 not, with the last error), /metrics."""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.request

import pytest

from sardis_ledger.streams.health import READY_LAG_RECORDS_MAX, lag_readiness, serve


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize(("started", "behind", "ready", "says"), [
    (False, 0, False, "starting"),
    (True, None, False, "lag not measured yet"),
    (True, READY_LAG_RECORDS_MAX + 1, False, "behind by"),
    (True, READY_LAG_RECORDS_MAX, True, "caught up"),
    (True, 0, True, "caught up"),
])
def test_lag_readiness(started: bool, behind: int | None, ready: bool, says: str) -> None:
    answer, why = lag_readiness(lambda: started, lambda: behind, "sink")()
    assert answer is ready and says in why


def test_endpoint_answers_health_readiness_and_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("SARDIS_METRICS_PORT", str(port))
    health = serve("unit-test")
    state = {"ready": False}
    health.ready_when(lambda: (state["ready"], "waiting for the test"))
    status, body = get(port, "/healthz")
    assert status == 200 and json.loads(body)["alive"] is True
    status, body = get(port, "/readyz")
    assert status == 503 and json.loads(body)["detail"] == "waiting for the test"
    logging.getLogger("sardis.unit").error("the broker went away")
    state["ready"] = True
    status, body = get(port, "/readyz")
    answer = json.loads(body)
    assert status == 200 and answer["ready"] is True
    assert answer["last_error"] == "sardis.unit: the broker went away"
    status, body = get(port, "/metrics")
    assert status == 200 and 'sardis_ready{component="unit-test"} 1.0' in body
    assert get(port, "/other")[0] == 404


def test_a_failing_readiness_check_answers_not_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SARDIS_METRICS_PORT", "0")  # no server: the state object alone
    health = serve("unit-test-2")

    def broken() -> tuple[bool, str]:
        raise RuntimeError("no assignment yet")

    health.ready_when(broken)
    assert health.readiness() == (False, "readiness check failed: RuntimeError('no assignment yet')")
