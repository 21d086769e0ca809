"""`sardis-ledger run`: the worker, both sinks and the chain watcher as supervised child processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TextIO

from sardis_ledger.streams.config import METRICS_PORTS_DEFAULT, Settings
from sardis_ledger.streams.shutdown import arm_stop_deadline
from sardis_ledger.streams.worker_process import STOP_GRACE_S

RESTART_BACKOFF_INITIAL_S: Final = 1.0
RESTART_BACKOFF_MAX_S: Final = 30.0
# A child that ran this long before it died is restarted at the initial backoff again.
HEALTHY_RUN_S: Final = 60.0
# Children get STOP_GRACE_S to exit after SIGTERM (they enforce it themselves); past this, SIGKILL.
CHILD_STOP_TIMEOUT_S: Final = STOP_GRACE_S + 1.0
# The supervisor itself exits within this of the stop signal, whatever its children do.
SUPERVISOR_STOP_DEADLINE_S: Final = CHILD_STOP_TIMEOUT_S + 0.5
STATUS_INTERVAL_S: Final = 1.0
SCRAPE_TIMEOUT_S: Final = 1.0
LINE_CHARS_MAX: Final = 200
METRICS_PORT_BASE_DEFAULT: Final = METRICS_PORTS_DEFAULT["worker"]  # the others follow it
# Terminal control sequences some children print (Faust's spinner): kept out of status lines.
ANSI_ESCAPE: Final = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """One supervised process: `sardis-ledger ARGS` with its metrics on `port`."""

    name: str
    args: tuple[str, ...]
    port: int


def child_specs(watch_config: str | None, port_base: int,
                schema: str | None = None) -> list[ChildSpec]:
    """The ledger's processes: worker, sink postgres, sink immudb and, with a watch config, the
    chain watcher; ports port_base, +1, +2, +3."""
    schema_args = ("--schema", schema) if schema else ()
    specs = [ChildSpec("worker", ("worker", "--loglevel", "warn"), port_base),
             ChildSpec("sink-postgres", ("sink", "postgres", *schema_args), port_base + 1),
             ChildSpec("sink-immudb", ("sink", "immudb"), port_base + 2)]
    if watch_config is not None:
        specs.append(ChildSpec("chain-watch", ("chain", "watch", "--config", watch_config),
                               port_base + 3))
    return specs


def restart_delay_s(failures: int) -> float:
    """Backoff before the next start after `failures` quick deaths in a row (1 s, 2 s, ... 30 s)."""
    return float(min(RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_INITIAL_S * 2 ** max(0, failures - 1)))


@dataclass
class Child:
    spec: ChildSpec
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    state: str = "starting"
    restarts: int = 0
    failures: int = 0
    started_at: float = 0.0
    last_line: str = ""
    last_exit: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    decided_rate: float = 0.0
    pump: asyncio.Task[None] | None = None  # copies this start's output to the log


def scrape(port: int) -> tuple[bool | None, dict[str, float]]:
    """(ready or None when the endpoint does not answer, {metric name: summed value})."""
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=SCRAPE_TIMEOUT_S) as reply:
                ready = json.loads(reply.read())["ready"] is True
        except urllib.error.HTTPError:
            ready = False
        with urllib.request.urlopen(f"{base}/metrics", timeout=SCRAPE_TIMEOUT_S) as reply:
            text = reply.read().decode()
    except (OSError, ValueError):
        return None, {}
    return ready, sum_samples(text)


def sum_samples(text: str) -> dict[str, float]:
    """Prometheus text -> each metric name's samples summed over their labels."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            sums[name] = sums.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return sums


class Supervisor:
    """Starts every child, restarts one that exits with backoff, stops all on SIGTERM/SIGINT."""

    def __init__(self, settings: Settings, specs: Sequence[ChildSpec], log_dir: Path,
                 out: TextIO = sys.stdout, live: bool | None = None) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.out = out
        self.live = out.isatty() if live is None else live
        self.children = [Child(spec, log_dir / f"{spec.name}.log") for spec in specs]
        self.stopping = asyncio.Event()

    def say(self, text: str) -> None:
        if not self.live:
            print(f"{time.strftime('%H:%M:%S')} run: {text}", file=self.out, flush=True)

    async def run(self) -> int:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal)
        self.say(f"starting {', '.join(c.spec.name for c in self.children)}; logs in {self.log_dir}")
        tasks = [asyncio.create_task(self._keep(child)) for child in self.children]
        tasks.append(asyncio.create_task(self._status()))
        await self.stopping.wait()
        self.say("stopping every process (SIGTERM)")
        await asyncio.gather(*(self._stop(child) for child in self.children))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.say("stopped: " + ", ".join(f"{c.spec.name} exit {c.last_exit}" for c in self.children))
        return 0

    def _on_signal(self) -> None:
        arm_stop_deadline("run", SUPERVISOR_STOP_DEADLINE_S)
        self.stopping.set()

    async def _keep(self, child: Child) -> None:
        """Run `child` until stopping; after an exit wait the backoff and start it again."""
        while not self.stopping.is_set():
            await self._start(child)
            proc = child.proc
            if proc is None:
                return
            returncode = await proc.wait()
            child.last_exit = returncode
            if self.stopping.is_set():
                return
            ran_s = time.monotonic() - child.started_at
            child.failures = 1 if ran_s >= HEALTHY_RUN_S else child.failures + 1
            delay = restart_delay_s(child.failures)
            child.state = f"exited {returncode}, restart in {delay:.0f}s"
            self.say(f"{child.spec.name} exited with {returncode} after {ran_s:.0f}s; restarting in "
                     f"{delay:.0f}s (last line: {child.last_line})")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=delay)
            child.restarts += 1

    async def _start(self, child: Child) -> None:
        env = {**os.environ, **self.settings.as_env(), "SARDIS_METRICS_PORT": str(child.spec.port),
               "PYTHONUNBUFFERED": "1"}
        child.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sardis_ledger.streams.cli", *child.spec.args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True)
        child.started_at = time.monotonic()
        child.state = "starting"
        self.say(f"{child.spec.name} started (pid {child.proc.pid}, metrics "
                 f"http://127.0.0.1:{child.spec.port}/metrics)")
        child.pump = asyncio.create_task(self._pump(child, child.proc))

    async def _pump(self, child: Child, proc: asyncio.subprocess.Process) -> None:
        """Copy the child's output to its log file (and, without a terminal, to ours)."""
        if proc.stdout is None:
            return
        with child.log_path.open("ab") as log:
            async for raw in proc.stdout:
                log.write(raw)
                log.flush()
                line = ANSI_ESCAPE.sub("", raw.decode(errors="replace")).strip()[:LINE_CHARS_MAX]
                if line:
                    child.last_line = line
                    if not self.live:
                        print(f"[{child.spec.name}] {line}", file=self.out, flush=True)

    async def _stop(self, child: Child) -> None:
        proc = child.proc
        if proc is None or proc.returncode is not None:
            return
        child.state = "stopping"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            child.last_exit = await asyncio.wait_for(proc.wait(), timeout=CHILD_STOP_TIMEOUT_S)
        except TimeoutError:
            self.say(f"{child.spec.name} still running {CHILD_STOP_TIMEOUT_S:.0f}s after SIGTERM; "
                     "SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            child.last_exit = await proc.wait()
        child.state = "stopped"

    async def _status(self) -> None:
        """Scrape each child's endpoint every STATUS_INTERVAL_S; redraw the table on a terminal."""
        while True:
            for child in self.children:
                await self._scrape(child)
            if self.live:
                self.out.write("\x1b[H\x1b[2J" + self.table() + "\n")
                self.out.flush()
            await asyncio.sleep(STATUS_INTERVAL_S)

    async def _scrape(self, child: Child) -> None:
        if child.proc is None or child.proc.returncode is not None or child.state == "stopping":
            return
        ready, sums = await asyncio.to_thread(scrape, child.spec.port)
        before = child.metrics.get("sardis_commands_decided_total")
        after = sums.get("sardis_commands_decided_total")
        if before is not None and after is not None:
            child.decided_rate = max(0.0, after - before) / STATUS_INTERVAL_S
        child.metrics = sums
        if ready is not None:
            became = "ready" if ready else "catching up"
            if child.state != became:
                self.say(f"{child.spec.name} {became}")
            child.state = became

    def table(self) -> str:
        rows = [f"sardis-ledger run  {time.strftime('%H:%M:%S')}  (Ctrl-C stops everything)", "",
                f"{'process':14s} {'state':26s} {'pid':>7s} {'restarts':>8s} {'decided/s':>9s} "
                f"{'lag':>8s}  last line"]
        for child in self.children:
            pid = str(child.proc.pid) if child.proc is not None else "-"
            lag = child.metrics.get("sardis_consumer_lag_records")
            rows.append(f"{child.spec.name:14s} {child.state[:26]:26s} {pid:>7s} {child.restarts:>8d} "
                        f"{child.decided_rate:>9.0f} {'-' if lag is None else f'{lag:.0f}':>8s}  "
                        f"{child.last_line[:60]}")
        return "\n".join(rows)


def run_supervised(settings: Settings, watch_config: str | None, log_dir: Path,
                   port_base: int = METRICS_PORT_BASE_DEFAULT, schema: str | None = None,
                   live: bool | None = None) -> int:
    """Create the topics, then supervise the ledger's processes until SIGTERM/SIGINT."""
    from sardis_ledger.streams.topics import create_topics

    asyncio.run(create_topics(settings))
    return asyncio.run(Supervisor(settings, child_specs(watch_config, port_base, schema), log_dir,
                                  live=live).run())
