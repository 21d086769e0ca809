"""The old-engine comparison's pure parts: parsing both engines' output, medians, the table."""

from __future__ import annotations

import argparse
import json

import pytest

from infra.old_engine import compare, run_old_engine
from sardis_ledger.streams import bench


def test_parse_config_reads_clients_and_accounts() -> None:
    assert compare.parse_config("16:1000") == (16, 1000)


@pytest.mark.parametrize("text", ["16", "16:", ":5", "0:1", "1:0", "00:3", "a:b", "1:2:3", "-1:2"])
def test_parse_config_refuses_anything_else(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        compare.parse_config(text)


def test_parse_new_bench_reads_what_streams_bench_prints(capsys: pytest.CaptureFixture[str]) -> None:
    # The line comes from the real reporter, so a change of its format fails here, not mid-run.
    print(bench._report("closed loop, 16 client(s) / 1000 accts", "cmd/s", 1,
                        [bench.RunFigures(2_345.6, 6.4, 11.5, count=20_000)]))
    print(bench._report("closed loop, 1 client(s) / 1 accts", "cmd/s", 1,
                        [bench.RunFigures(9.1, 107.0, 213.6, count=45)]))
    output = "[dev] kafka: healthy\n" + capsys.readouterr().out
    assert compare.parse_new_bench(output, 16, 1000) == compare.Figures(2_346, 6.4, 11.5)
    assert compare.parse_new_bench(output, 1, 1) == compare.Figures(9.1, 107.0, 213.6)
    with pytest.raises(compare.CompareError, match="16 client"):
        compare.parse_new_bench(output, 16, 1)


def test_parse_old_runner_reads_its_result_line() -> None:
    checks = {"entries": 3, "audit_forks": 0}
    line = run_old_engine.RESULT_PREFIX + json.dumps(
        {"clients": 1, "accounts": 1, "commands": 3, "rate_per_s": 621.0, "p50_ms": 1.6,
         "p99_ms": 2.1, "checks": checks})
    assert compare.RESULT_PREFIX == run_old_engine.RESULT_PREFIX
    figures, found = compare.parse_old_runner("a log line\n" + line + "\n")
    assert figures == compare.Figures(621.0, 1.6, 2.1)
    assert found == checks
    with pytest.raises(compare.CompareError, match="no result line"):
        compare.parse_old_runner("Traceback ...\n")


@pytest.mark.parametrize("values", [[], [7.0], [1.0, 2.0, 3.0, 4.0], [float(i) for i in range(1000)]])
@pytest.mark.parametrize("fraction", [0.5, 0.99, 1.0])
def test_the_runner_percentile_is_the_bench_percentile(values: list[float], fraction: float) -> None:
    assert run_old_engine.percentile(values, fraction) == bench.percentile(values, fraction)


def test_median_figures_takes_each_figure_median_separately() -> None:
    runs = [compare.Figures(100.0, 3.0, 9.0), compare.Figures(300.0, 1.0, 7.0),
            compare.Figures(200.0, 2.0, 8.0)]
    assert compare.median_figures(runs) == compare.Figures(200.0, 2.0, 8.0)


def test_format_table_has_medians_and_ratios() -> None:
    rows = [compare.Row(16, 1000, old=[compare.Figures(2_000.0, 8.0, 12.0),
                                      compare.Figures(2_400.0, 6.0, 10.0)],
                        new=[compare.Figures(60.0, 220.0, 400.0), compare.Figures(80.0, 240.0, 500.0)])]
    lines = compare.format_table(rows).splitlines()
    assert lines[0].startswith("configuration")
    assert set(lines[1]) == {"-"}
    row = lines[2]
    assert row.startswith("16 client(s) / 1000 acct(s)")
    assert "2,200.0/s  p50     7.0 ms  p99    11.0 ms" in row  # old: medians of two runs
    assert "70.0/s  p50   230.0 ms  p99   450.0 ms" in row
    assert "0.032x" in row  # 70 / 2,200
    assert "32.9x" in row  # 230 / 7


def test_format_table_survives_an_old_engine_that_did_nothing() -> None:
    rows = [compare.Row(1, 1, old=[compare.Figures(0.0, 0.0, 0.0)],
                        new=[compare.Figures(9.0, 100.0, 200.0)])]
    assert "inf" in compare.format_table(rows)


@pytest.mark.parametrize(("total", "balance", "verdict"), [
    ("0.30", "0.2", "-> exact"),
    ("0.300000000000000018", "0.200000000000000012", "-> NOT exact"),
])
def test_describe_checks_compares_decimals(total: str, balance: str, verdict: str) -> None:
    checks = {"entries": 3, "sum": total, "expected_sum": "0.30", "stored_amounts": ["0.1"],
              "balance_account": "loop_00000", "balance": balance, "expected_balance": "0.20",
              "audit_forks": 1, "stale_running_balances": 2}
    line = compare.describe_checks(1, 1, checks)
    assert verdict in line
    assert "hash chain forks): 1;" in line
    assert "(stale reads): 2" in line
