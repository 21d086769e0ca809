"""`make bench-old-engine`: closed loop, the old engine (sardis-ledger 1.1.0) against this ledger."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OLD_ENGINE_DIR = Path(__file__).resolve().parent
REQUIREMENTS = OLD_ENGINE_DIR / "requirements.txt"
RUNNER = OLD_ENGINE_DIR / "run_old_engine.py"
RESULT_PREFIX = "OLD_ENGINE_RESULT "  # the runner's output line (run_old_engine.RESULT_PREFIX)
VENV_NAME = "old-engine-venv"
STAMP_NAME = ".requirements-sha256"
OLD_DATABASE = "sardis_old_engine"
DEFAULT_CONFIGS = ((1, 1), (16, 1), (16, 1000))
RUNS_DEFAULT = 3
DURATION_S_DEFAULT = 10.0
WARMUP_S_DEFAULT = 1.0
INSTALL_TIMEOUT_S = 900.0
# A run takes its duration plus start-up (a worker process, fresh topics, the stack's health
# checks); past this margin something hangs and the comparison stops with what the child said.
RUN_TIMEOUT_MARGIN_S = 180.0
LOG_TAIL_LINES = 30
# streams.bench prints
# "closed loop, C client(s) / A accts  N broker(s)  R cmd/s   p50 X ms   p99 Y ms ...".
CLOSED_LOOP_LINE = re.compile(
    r"closed loop, (?P<clients>\d+) client\(s\) / (?P<accounts>\d+) accts\s+"
    r"(?:\d+ brokers?\s+)?"
    r"(?P<rate>[\d,]+(?:\.\d+)?) cmd/s\s+p50\s+(?P<p50>[\d.]+) ms\s+p99\s+(?P<p99>[\d.]+) ms")


class CompareError(Exception):
    """A step failed; the message says which and what to look at."""


@dataclass(frozen=True, slots=True)
class Figures:
    rate_per_s: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True, slots=True)
class Row:
    clients: int
    accounts: int
    old: list[Figures]
    new: list[Figures]


def parse_config(text: str) -> tuple[int, int]:
    """'C:A' -> (clients, accounts), both positive."""
    clients, sep, accounts = text.partition(":")
    if sep and clients.isdigit() and accounts.isdigit() and int(clients) > 0 and int(accounts) > 0:
        return int(clients), int(accounts)
    raise argparse.ArgumentTypeError(f"expected CLIENTS:ACCOUNTS such as 16:1000, got {text!r}")


def parse_new_bench(output: str, clients: int, accounts: int) -> Figures:
    """The figures of `sardis-ledger bench --scenario closed` for one configuration."""
    for match in CLOSED_LOOP_LINE.finditer(output):
        if (int(match["clients"]), int(match["accounts"])) == (clients, accounts):
            return Figures(float(match["rate"].replace(",", "")), float(match["p50"]),
                           float(match["p99"]))
    raise CompareError(f"no 'closed loop, {clients} client(s) / {accounts} accts' line in the "
                       f"bench output:\n{output[-2000:]}")


def parse_old_runner(output: str) -> tuple[Figures, dict[str, Any]]:
    """The runner's figures and its exactness checks, from its RESULT_PREFIX line."""
    for line in output.splitlines():
        if line.startswith(RESULT_PREFIX):
            data = json.loads(line[len(RESULT_PREFIX):])
            return Figures(data["rate_per_s"], data["p50_ms"], data["p99_ms"]), data["checks"]
    raise CompareError(f"no result line from the old-engine runner:\n{output[-2000:]}")


def median_figures(runs: Sequence[Figures]) -> Figures:
    """Each figure's median over the runs, separately (as streams.bench reports)."""
    return Figures(statistics.median(f.rate_per_s for f in runs),
                   statistics.median(f.p50_ms for f in runs),
                   statistics.median(f.p99_ms for f in runs))


def _cell(figures: Figures) -> str:
    return f"{figures.rate_per_s:>9,.1f}/s  p50 {figures.p50_ms:7.1f} ms  p99 {figures.p99_ms:7.1f} ms"


def format_table(rows: Sequence[Row]) -> str:
    """Median per configuration of both engines and this ledger's rate and p50 as a multiple of
    the old engine's (rate > 1: this ledger is faster; p50 > 1: its latency is longer)."""
    header = (f"{'configuration':28s} | {'old engine (median)':40s} | {'this ledger (median)':40s}"
              f" | rate ratio | p50 ratio")
    lines = [header, "-" * len(header)]
    for row in rows:
        old, new = median_figures(row.old), median_figures(row.new)
        rate_ratio = new.rate_per_s / old.rate_per_s if old.rate_per_s else float("inf")
        p50_ratio = new.p50_ms / old.p50_ms if old.p50_ms else float("inf")
        label = f"{row.clients} client(s) / {row.accounts} acct(s)"
        lines.append(f"{label:28s} | {_cell(old):40s} | {_cell(new):40s} | {rate_ratio:9.3f}x"
                     f" | {p50_ratio:8.1f}x")
    return "\n".join(lines)


def _say(message: str) -> None:
    print(f"[old-engine] {message}", flush=True)


def _load() -> str:
    # Both engines share the machine with the broker and PostgreSQL (and, on a shared machine,
    # whatever else runs): the load average tells a quiet run from a disturbed one.
    one, five, _fifteen = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def venv_dir() -> Path:
    from infra.harness import cache_dir

    return cache_dir() / VENV_NAME


def _requirements_digest() -> str:
    return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()


def ensure_venv(venv: Path, reinstall: bool = False) -> Path:
    """The scratch venv's python, creating the venv and installing the pins when missing, stale
    (requirements.txt changed) or `reinstall`; the stamp is written only after a full install."""
    python = venv / "bin" / "python"
    stamp = venv / STAMP_NAME
    digest = _requirements_digest()
    if not reinstall and python.exists() and stamp.exists() and stamp.read_text() == digest:
        _say(f"scratch venv {venv}: up to date")
        return python
    if venv.exists():
        shutil.rmtree(venv)
    log = venv.parent / f"{venv.name}-install.log"
    venv.parent.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    _say(f"creating the scratch venv {venv} (once; log: {log})")
    _run_logged([sys.executable, "-m", "venv", str(venv)], log, "creating the venv")
    _say(f"installing sardis-ledger 1.1.0 and its pinned dependencies from {REQUIREMENTS.name}")
    _run_logged([str(python), "-m", "pip", "install", "--disable-pip-version-check",
                 "--no-input", "-r", str(REQUIREMENTS)], log, "pip install")
    _run_logged([str(python), "-c", "from sardis_ledger import PostgresLedgerEngine"], log,
                "importing the old engine")
    stamp.write_text(digest)
    _say(f"scratch venv ready in {time.monotonic() - began:.0f} s")
    return python


def _run_logged(cmd: list[str], log: Path, what: str) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise CompareError(f"{what} did not finish in {INSTALL_TIMEOUT_S:.0f} s: {cmd}") from exc
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        raise CompareError(f"{what} failed (exit {done.returncode}); the scratch venv is left "
                           f"unstamped and will be rebuilt next time (check that pip reaches its "
                           f"package index). Last lines (all in {log}):\n"
                           f"{_tail(done.stdout + done.stderr)}")


def ensure_database(admin_dsn: str, name: str) -> str:
    """The DSN of database `name` on the server of `admin_dsn`, created when missing."""
    import asyncpg

    base = admin_dsn.rsplit("/", 1)[0]

    async def create() -> None:
        conn = await asyncpg.connect(admin_dsn, timeout=5)
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                await conn.execute(f'CREATE DATABASE "{name}"')
                _say(f"created database {name}")
        finally:
            await conn.close()

    asyncio.run(create())
    return f"{base}/{name}"


def _run_child(cmd: list[str], timeout_s: float, what: str) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              check=False, cwd=OLD_ENGINE_DIR.parent.parent)
    except subprocess.TimeoutExpired as exc:
        raise CompareError(f"{what} did not finish in {timeout_s:.0f} s: {' '.join(cmd)}") from exc
    if done.returncode != 0:
        raise CompareError(f"{what} failed (exit {done.returncode}): {' '.join(cmd)}\n"
                           f"{_tail(done.stdout + done.stderr)}")
    return done.stdout


def run_old(python: Path, dsn: str, clients: int, accounts: int, duration_s: float,
            warmup_s: float) -> tuple[Figures, dict[str, Any]]:
    """One closed-loop run of the old engine, in the scratch venv, on freshly recreated tables."""
    cmd = [str(python), str(RUNNER), "--dsn", dsn, "--clients", str(clients), "--accounts",
           str(accounts), "--duration-s", str(duration_s), "--warmup-s", str(warmup_s)]
    output = _run_child(cmd, duration_s + warmup_s + RUN_TIMEOUT_MARGIN_S, "old-engine run")
    return parse_old_runner(output)


def run_new(clients: int, accounts: int, duration_s: float) -> Figures:
    """One closed-loop run of this ledger: `sardis-ledger bench --scenario closed`, one worker."""
    cmd = [sys.executable, "-m", "sardis_ledger.streams.cli", "bench", "--runs", "1", "--scenario", "closed",
           "--workers", "1", "--clients", str(clients), "--accounts", str(accounts),
           "--duration-s", str(duration_s)]
    output = _run_child(cmd, duration_s + RUN_TIMEOUT_MARGIN_S, "sardis-ledger bench")
    return parse_new_bench(output, clients, accounts)


def describe_checks(clients: int, accounts: int, checks: dict[str, Any]) -> str:
    """One line on what the old engine stored: exact sums or not, its audit chain, stale balances."""
    from decimal import Decimal

    exact = (Decimal(checks["sum"]) == Decimal(checks["expected_sum"])
             and Decimal(checks["balance"]) == Decimal(checks["expected_balance"]))
    return (f"  {clients} client(s) / {accounts} acct(s): {checks['entries']:,} credits of 0.10 "
            f"sum to {checks['sum']} (exact: {checks['expected_sum']}); stored amount(s) "
            f"{', '.join(checks['stored_amounts'])}; get_balance({checks['balance_account']}) = "
            f"{checks['balance']} (exact: {checks['expected_balance']}) -> "
            f"{'exact' if exact else 'NOT exact'}; audit log rows naming an already-named "
            f"predecessor (hash chain forks): {checks['audit_forks']:,}; entries whose running "
            f"balance repeats an earlier one of the account (stale reads): "
            f"{checks['stale_running_balances']:,}")


def compare(args: argparse.Namespace) -> int:
    from infra import harness
    from sardis_ledger.streams.config import Settings

    began = time.monotonic()
    harness.up()
    python = ensure_venv(Path(args.venv) if args.venv else venv_dir(), reinstall=args.reinstall)
    dsn = ensure_database(Settings.from_env().pg_dsn, args.database)
    configs = args.config or list(DEFAULT_CONFIGS)
    total, step = len(configs) * args.runs, 0
    rows: list[Row] = []
    checks: dict[tuple[int, int], dict[str, Any]] = {}
    _say(f"{len(configs)} configuration(s) x {args.runs} run(s), old engine then this ledger "
         f"each time, {args.duration_s:g} s per run; {_load()}")
    for clients, accounts in configs:
        row = Row(clients, accounts, [], [])
        for run in range(args.runs):
            step += 1
            label = f"[{step}/{total}] {clients} client(s) / {accounts} acct(s), run {run + 1}"
            old, checks[(clients, accounts)] = run_old(python, dsn, clients, accounts,
                                                       args.duration_s, args.warmup_s)
            _say(f"{label}: old engine  {_cell(old)}")
            new = run_new(clients, accounts, args.duration_s)
            _say(f"{label}: this ledger {_cell(new)}")
            row.old.append(old)
            row.new.append(new)
        rows.append(row)
    print(f"\nclosed loop, median of {args.runs} run(s) of {args.duration_s:g} s, alternating; "
          f"each client awaits create_entry before the next (amount 0.10, USDC)")
    print(format_table(rows))
    print("\nold engine, what it stored (last run of each configuration):")
    for (clients, accounts), found in checks.items():
        print(describe_checks(clients, accounts, found))
    print(f"\nwall time {time.monotonic() - began:.0f} s; {_load()}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m infra.old_engine.compare",
        description="Closed-loop comparison with the engine this ledger replaces: sardis-ledger "
        "1.1.0's PostgresLedgerEngine. Once, a scratch virtual environment is created under "
        f"$SARDIS_CACHE_DIR (default ~/.cache/sardis-ledger)/{VENV_NAME} with the pins of "
        "infra/old_engine/requirements.txt (the old library never enters this project's "
        "environment). Then, per configuration CLIENTS:ACCOUNTS and run, alternately: the old "
        "engine on PostgreSQL (its tables dropped and recreated from sardis-core's SCHEMA_SQL in "
        f"database {OLD_DATABASE}, a short warm-up, then CLIENTS tasks each awaiting "
        "create_entry(amount=0.10) before the next, over ACCOUNTS random accounts), and this "
        "ledger's `sardis-ledger bench --scenario closed` (fresh topics, one worker, "
        "LedgerClient.create_entry awaited the same way). Prints each run, then the medians "
        "side by side, and what the old engine stored (exact sums or not, audit chain forks).")
    parser.add_argument("--config", type=parse_config, action="append", metavar="C:A",
                        help="clients:accounts (repeatable; default: 1:1, 16:1 and 16:1000)")
    parser.add_argument("--runs", type=int, default=RUNS_DEFAULT,
                        help=f"runs per configuration and engine, median reported "
                        f"(default {RUNS_DEFAULT})")
    parser.add_argument("--duration-s", type=float, default=DURATION_S_DEFAULT, metavar="S",
                        help=f"seconds per run (default {DURATION_S_DEFAULT:g})")
    parser.add_argument("--warmup-s", type=float, default=WARMUP_S_DEFAULT, metavar="S",
                        help="old engine: seconds of the same loop before each run, its rows "
                        f"then emptied (default {WARMUP_S_DEFAULT:g}); this ledger's bench "
                        "warms up on its own")
    parser.add_argument("--database", default=OLD_DATABASE,
                        help=f"PostgreSQL database for the old engine, created when missing, its "
                        f"ledger tables dropped per run (default {OLD_DATABASE}); on the server "
                        "of SARDIS_PG_DSN")
    parser.add_argument("--venv", help="scratch venv directory (default under the cache dir)")
    parser.add_argument("--reinstall", action="store_true",
                        help="recreate the scratch venv even if it is up to date")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.runs < 1 or args.duration_s <= 0:
        print("error: --runs must be >= 1 and --duration-s > 0", file=sys.stderr)
        return 2
    from sardis_ledger.streams.errors import InfraError

    try:
        return compare(args)
    except (CompareError, InfraError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
