"""The pure parts of `sardis-ledger run`: child specs, restart backoff, metric sums, the table."""

from __future__ import annotations

import io

import pytest

from sardis_ledger.streams.supervisor import (
    ANSI_ESCAPE,
    RESTART_BACKOFF_MAX_S,
    Child,
    Supervisor,
    child_specs,
    restart_delay_s,
    sum_samples,
)


@pytest.mark.parametrize(("failures", "delay_s"), [(0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0),
                                                    (6, RESTART_BACKOFF_MAX_S), (50, RESTART_BACKOFF_MAX_S)])
def test_restart_backoff_doubles_to_a_cap(failures: int, delay_s: float) -> None:
    assert restart_delay_s(failures) == delay_s


def test_child_specs_without_and_with_a_watch_config() -> None:
    names = [spec.name for spec in child_specs(None, 9000)]
    assert names == ["worker", "sink-postgres", "sink-immudb"]
    specs = child_specs("watch.json", 9000, schema="s1")
    assert [(spec.name, spec.port) for spec in specs] == [
        ("worker", 9000), ("sink-postgres", 9001), ("sink-immudb", 9002), ("chain-watch", 9003)]
    assert specs[1].args == ("sink", "postgres", "--schema", "s1")
    assert specs[3].args == ("chain", "watch", "--config", "watch.json")


def test_sum_samples_adds_labels_and_skips_comments_and_junk() -> None:
    text = ("# HELP x\n# TYPE x counter\n"
            'sardis_consumer_lag_records{component="worker",topic="t",partition="0"} 3.0\n'
            'sardis_consumer_lag_records{component="worker",topic="t",partition="1"} 4.0\n'
            "sardis_ready 1.0\nbroken line NaNx\n\n")
    assert sum_samples(text) == {"sardis_consumer_lag_records": 7.0, "sardis_ready": 1.0}


def test_ansi_escapes_are_stripped() -> None:
    assert ANSI_ESCAPE.sub("", "\x1b[?25lready\x1b[?25h \x1b[1;32mok\x1b[0m") == "ready ok"


def test_status_table_names_every_child() -> None:
    supervisor = Supervisor.__new__(Supervisor)
    supervisor.out = io.StringIO()
    supervisor.children = [Child(spec, log_path=None) for spec in child_specs(None, 9000)]  # type: ignore[arg-type]
    supervisor.children[0].metrics = {"sardis_consumer_lag_records": 12.0}
    table = supervisor.table()
    for name in ("worker", "sink-postgres", "sink-immudb", "decided/s", "lag"):
        assert name in table
    assert " 12 " in table
