"""Pure parts of `sardis-ledger bench`: percentiles, CPU accounting and the report line."""

from __future__ import annotations

import os

import pytest

from sardis_ledger.streams import bench
from sardis_ledger.streams.bench import percentile
from sardis_ledger.streams.errors import ConfigError


@pytest.mark.parametrize(("values", "fraction", "expected"), [
    ([], 0.5, 0.0),
    ([7.0], 0.5, 7.0),
    ([7.0], 0.99, 7.0),
    ([1.0, 2.0, 3.0, 4.0], 0.5, 3.0),
    ([float(i) for i in range(100)], 0.99, 99.0),
    ([float(i) for i in range(1000)], 0.99, 990.0),
    ([1.0, 2.0], 1.0, 2.0),
])
def test_percentile_is_the_nearest_rank_of_a_sorted_list(values: list[float], fraction: float,
                                                          expected: float) -> None:
    assert percentile(values, fraction) == expected

def test_cpu_and_memory_of_live_and_missing_processes() -> None:
    sum(i * i for i in range(200_000))  # burn a little CPU in this process
    assert bench._cpu_s([os.getpid()]) > 0
    assert bench._rss_bytes([os.getpid()]) > 1_000_000
    missing = 2**22 + 7  # above pid_max: no such process
    assert bench._cpu_s([missing]) == 0.0 and bench._rss_bytes([missing]) == 0

def test_report_line_names_size_rate_latency_and_cpu_per_command() -> None:
    runs = [bench.RunFigures(1000.0, 50.0, 90.0, count=2000, worker_cpu_s=1.0, broker_cpu_s=0.5,
                             worker_rss_growth_bytes=1_000_000),
            bench.RunFigures(1200.0, 40.0, 80.0, count=2000, worker_cpu_s=1.2, broker_cpu_s=0.7,
                             worker_rss_growth_bytes=1_400_000)]
    line = bench._report("(a) spread", "cmd/s", 3, runs)
    assert "3 brokers" in line and "1,100 cmd/s" in line
    assert "p50     45.0 ms" in line and "p99     85.0 ms" in line
    assert "per cmd: worker CPU 550 us, broker CPU 300 us, worker memory 600 B" in line
    assert line.endswith("runs: 1,000, 1,200")

def test_report_line_keeps_a_decimal_for_slow_rates() -> None:
    runs = [bench.RunFigures(9.44, 100.0, 150.0, count=94)]
    line = bench._report("closed loop, 1 client(s) / 1 accts", "cmd/s", 1, runs)
    assert "9.4 cmd/s" in line and "1 broker " in line and line.endswith("runs: 9.4")


@pytest.mark.parametrize("legs", [2, 3, 10])
def test_bench_batches_have_the_legs_asked_for_and_sum_to_zero(legs: int) -> None:
    scenario = bench.Scenario("(c)", 50, 20, batches=True, legs=legs)
    batches = bench._batches(scenario, seed=1)
    assert len(batches) == 50
    for batch in batches:
        batch_legs = batch["legs"]
        assert isinstance(batch_legs, list) and len(batch_legs) == legs
        accounts = [leg["account_id"] for leg in batch_legs]
        assert len(set(accounts)) == legs  # distinct accounts
        debits = sum(leg["amount"] for leg in batch_legs if leg["entry_type"] == "debit")
        credits = sum(leg["amount"] for leg in batch_legs if leg["entry_type"] == "credit")
        assert debits == credits > 0
        assert [leg["entry_type"] for leg in batch_legs].count("debit") == 1


def test_bench_refuses_batches_wider_than_its_accounts() -> None:
    with pytest.raises(ConfigError, match="10-leg batch needs as many accounts"):
        bench.run_bench(runs=1, commands=1, accounts=5, hot_commands=1, scenarios=["batches"],
                        batch_legs=[10])
