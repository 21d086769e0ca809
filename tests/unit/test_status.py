"""`sardis-ledger status`: what counts as a problem, and the table."""

from __future__ import annotations

import pytest

from sardis_ledger.streams.status import ComponentStatus, endpoint_status, format_table


def status(state: str = "ready", lag: int | None = 0, kafka_lag: int | None = None) -> ComponentStatus:
    return ComponentStatus("worker", "http://127.0.0.1:9464", state, "detail", lag, kafka_lag,
                           "sardis.worker: boom")


@pytest.mark.parametrize(("component", "problem"), [
    (status(), None),
    (status(lag=1000), None),
    (status(lag=1001), "worker behind by 1001 records (threshold 1000)"),
    (status(lag=None, kafka_lag=5000), "worker behind by 5000 records (threshold 1000)"),
    (status(state="down"), "worker down: detail"),
    (status(state="not ready"), "worker not ready: detail"),
])
def test_problem(component: ComponentStatus, problem: str | None) -> None:
    assert component.problem(1000) == problem


def test_table_shows_lag_and_last_error() -> None:
    table = format_table([status(lag=1234, kafka_lag=None)])
    assert "1,234" in table and "last error: sardis.worker: boom" in table


def test_a_closed_port_is_down() -> None:
    assert endpoint_status("worker", 1).state == "down"
