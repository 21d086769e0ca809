"""`make demo`: the whole ledger under `sardis-ledger run`, each claim shown and checked in a step."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

from sardis_ledger.streams import demo_chain
from sardis_ledger.streams.client import BatchRejected, LedgerClient, LedgerEntry, LedgerRejected
from sardis_ledger.streams.config import Settings

DEMO_PARTITIONS: Final = 3  # fewer partitions: the worker starts faster
METRICS_PORT_BASE: Final = 9564
READY_WAIT_S: Final = 120.0
SINK_WAIT_S: Final = 60.0
STOP_WITHIN_S: Final = 10.0
GRACE_S: Final = 3  # the reconciler's grace window in the demo (seconds and blocks)
GRACE_BLOCKS: Final = 2
POLL_S: Final = 0.5


def _say(text: str = "") -> None:
    print(text, flush=True)


class Story:
    """Numbered steps; each prints what it proves and whether that was confirmed."""

    def __init__(self) -> None:
        self.results: list[tuple[str, bool]] = []
        self.steps = 0
        self.started = time.monotonic()

    def step(self, title: str) -> None:
        self.steps += 1
        _say(f"\n[{self.steps}] {title}")

    def confirm(self, proof: str, ok: bool, detail: str = "") -> None:
        self.results.append((proof, ok))
        mark = "CONFIRMED" if ok else "NOT CONFIRMED"
        _say(f"    {mark}: {proof}" + (f" ({detail})" if detail else ""))

    def summary(self) -> int:
        confirmed = sum(ok for _, ok in self.results)
        _say(f"\n{confirmed}/{len(self.results)} claims confirmed in {self.steps} steps, "
             f"{time.monotonic() - self.started:.0f} s")
        for proof, ok in self.results:
            if not ok:
                _say(f"  not confirmed: {proof}")
        return 0 if confirmed == len(self.results) and self.results else 1


@dataclasses.dataclass
class Demo:
    settings: Settings
    schema: str
    state_dir: Path
    story: Story
    run: subprocess.Popen[bytes] | None = None
    entries: list[LedgerEntry] = dataclasses.field(default_factory=list)
    before_batch: datetime | None = None

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.settings.as_env(), "SARDIS_PG_SCHEMA": self.schema,
                "SARDIS_STATE_DIR": str(self.state_dir)}


def _metrics_url(index: int) -> str:
    return f"http://127.0.0.1:{METRICS_PORT_BASE + index}/metrics"


async def _start_ledger(demo: Demo, watch_config: Path, log_path: Path) -> None:
    from sardis_ledger.streams.status import endpoint_status

    demo.story.step("Start the ledger with `sardis-ledger run` (worker, both sinks, chain watcher)")
    with log_path.open("wb") as log:
        demo.run = subprocess.Popen(
            [sys.executable, "-m", "sardis_ledger.streams.cli", "run", "--view", "plain", "--watch-config",
             str(watch_config), "--metrics-port-base", str(METRICS_PORT_BASE), "--schema",
             demo.schema, "--log-dir", str(log_path.parent / "logs")],
            stdout=log, stderr=subprocess.STDOUT, env=demo.env(), start_new_session=True)
    names = ("worker", "sink-postgres", "sink-immudb", "chain-watch")
    deadline = time.monotonic() + READY_WAIT_S
    states = {}
    while time.monotonic() < deadline:
        states = {name: await asyncio.to_thread(endpoint_status, name, METRICS_PORT_BASE + i)
                  for i, name in enumerate(names)}
        if all(s.state == "ready" for s in states.values()):
            break
        await asyncio.sleep(POLL_S)
    for i, name in enumerate(names):
        _say(f"    {name:14s} {states[name].state:10s} metrics {_metrics_url(i)}")
    demo.story.confirm("every process is up and ready (/readyz), each with its own /metrics",
                       all(s.state == "ready" for s in states.values()), f"log: {log_path}")


async def _entries(demo: Demo, ledger: LedgerClient) -> None:
    story = demo.story
    story.step("Entries: a credit and a debit, each a command on Kafka decided by the worker")
    credit = await ledger.create_entry(account_id="acc_alice", amount="500.00", entry_type="credit",
                                       currency="USD", command_id="demo-deposit-1")
    debit = await ledger.create_entry(account_id="acc_alice", amount="120.25", entry_type="debit",
                                      currency="USD", command_id="demo-withdrawal-1")
    demo.entries += [credit, debit]
    _say(f"    {credit.entry_id}: credit 500.00 USD, balance {credit.running_balance}")
    _say(f"    {debit.entry_id}: debit 120.25 USD, balance {debit.running_balance}")
    story.confirm("money is exact: 500.00 - 120.25 = 379.75",
                  debit.running_balance == Decimal("379.75"))

    story.step("An overdraft is refused")
    try:
        await ledger.create_entry(account_id="acc_alice", amount="10000", entry_type="debit",
                                  currency="USD")
        story.confirm("a debit beyond the balance is refused", False, "it was booked")
    except LedgerRejected as exc:
        story.confirm("a debit beyond the balance is refused and books nothing",
                      exc.reason == "insufficient_funds", f"reason {exc.reason}")

    story.step("A duplicate is answered from idempotency")
    again = await ledger.create_entry(account_id="acc_alice", amount="500.00", entry_type="credit",
                                      currency="USD", command_id="demo-deposit-1")
    story.confirm("the same command_id returns the original entry, never a second booking",
                  again.entry_id == credit.entry_id, f"{again.entry_id}")


async def _batches(demo: Demo, ledger: LedgerClient) -> None:
    story = demo.story
    demo.before_batch = datetime.now(UTC)
    await asyncio.sleep(1.0)  # a clear point in time before the batch, for `balance --at`
    story.step("An atomic transfer batch across accounts (and partitions), then its rollback")
    batch = await ledger.create_batch([
        {"account_id": "acc_alice", "amount": "100", "entry_type": "debit", "currency": "USD"},
        {"account_id": "acc_bob", "amount": "100", "entry_type": "credit", "currency": "USD"},
    ], batch_id="demo-transfer-1")
    demo.entries += list(batch.entries)
    for entry in batch.entries:
        _say(f"    leg {entry.leg_index}: {entry.entry_type} {entry.account_id} {entry.amount} "
             f"(partition {entry.partition})")
    story.confirm("both legs posted together", len(batch.entries) == 2
                  and all(e.batch_id == "demo-transfer-1" for e in batch.entries))
    reversal = await ledger.rollback_batch(batch_id="demo-transfer-1", reason="demo dispute")
    alice = await ledger.get_balance("acc_alice", "USD")
    story.confirm("the rollback adds reversal entries (nothing is edited) and restores balances",
                  len(reversal.entries) == 2 and alice.balance == Decimal("379.75"),
                  f"acc_alice back to {alice.balance}")

    story.step("A batch with a leg that would overdraw is refused whole, naming the leg")
    try:
        await ledger.create_batch([
            {"account_id": "acc_alice", "amount": "1000000", "entry_type": "credit",
             "currency": "USD"},
            {"account_id": "acc_bob", "amount": "1000000", "entry_type": "debit", "currency": "USD"},
        ], batch_id="demo-transfer-2")
        story.confirm("the batch is refused", False, "it was posted")
    except BatchRejected as exc:
        alice = await ledger.get_balance("acc_alice", "USD")
        story.confirm("no leg is booked, and the failing leg is named",
                      exc.failed_leg_index == 1 and alice.balance == Decimal("379.75"),
                      f"reason {exc.reason}, failed leg {exc.failed_leg_index}")


async def _until(check: Callable[[], Awaitable[bool]], wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while not await check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(POLL_S)
    return True


async def _projection(demo: Demo) -> None:
    import asyncpg

    from sardis_ledger.sinks.queries import balance_at

    story = demo.story
    story.step("The PostgreSQL projection, and a balance at a past time (`balance --at`)")
    wanted = {e.entry_id for e in demo.entries}

    async def sunk() -> bool:
        conn = await asyncpg.connect(demo.settings.pg_dsn)
        try:
            rows = await conn.fetch(f'SELECT entry_id FROM "{demo.schema}".entries')
        finally:
            await conn.close()
        return wanted <= {r["entry_id"] for r in rows}

    in_postgres = await _until(sunk, SINK_WAIT_S)
    before = demo.before_batch or datetime.now(UTC)
    past = await balance_at(demo.settings.pg_dsn, demo.schema, "acc_alice", "USD", before)
    _say(f"    sardis-ledger balance acc_alice --currency USD --at {before.isoformat()}"
         f" -> {past.balance}")
    story.confirm("the sink copied every entry, and the balance before the batch is 379.75",
                  in_postgres and past.balance == Decimal("379.75"))


async def _receipt_and_tamper(demo: Demo) -> None:
    import asyncpg

    from sardis_ledger.sinks.verify import receipt, verify

    story = demo.story
    story.step("A receipt: Merkle inclusion proof to a tree head, and an immudb verified read")
    found: dict[str, Any] = {}

    async def verified() -> bool:
        nonlocal found
        found = await receipt(demo.settings, demo.schema, demo.entries[0].entry_id,
                              state_directory=demo.state_dir)
        return bool(found.get("verified"))

    ok = await _until(verified, SINK_WAIT_S)
    merkle = found.get("merkle", {})
    _say(f"    {demo.entries[0].entry_id}: leaf {merkle.get('leaf_index')} of a tree of "
         f"{merkle.get('tree_size')}, proof of {len(merkle.get('proof', []))} hashes, root "
         f"{str(merkle.get('root_hash'))[:16]}…; immudb tx {found.get('immudb', {}).get('tx')}")
    story.confirm("the entry is in its partition's Merkle log and in immudb, both proofs checked", ok)

    story.step("An edit made behind the ledger's back is caught and named by `verify`")
    victim = demo.entries[1].entry_id
    conn = await asyncpg.connect(demo.settings.pg_dsn)
    try:
        async with conn.transaction():  # as a superuser with the append-only triggers off
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(f'UPDATE "{demo.schema}".entries SET amount = amount - 100 '
                               "WHERE entry_id = $1", victim)
    finally:
        await conn.close()
    report = await verify(demo.settings, demo.schema, state_directory=demo.state_dir,
                          check_anchors=False)
    first = report.problems[0] if report.problems else None
    _say(f"    UPDATE entries SET amount = amount - 100 WHERE entry_id = '{victim}'")
    _say(f"    verify: {first}")
    story.confirm("verify fails and names the edited entry",
                  not report.ok and first is not None and first.entry_id == victim)


async def _chain(demo: Demo, chain: demo_chain.Chain) -> None:
    story = demo.story
    story.step("On anvil: token transfers watched, booked, reconciled; one mistake of each kind "
               "planted")
    committed = await demo_chain.book(demo.settings, chain)
    await demo_chain.orphan_last_block(demo.settings, chain)
    await asyncio.sleep(GRACE_S)

    async def tick() -> None:
        await demo_chain.mine(chain, GRACE_BLOCKS + 1)

    found = await demo_chain.open_discrepancies(demo.settings, tick=tick)
    for kind in demo_chain.DISCREPANCY_TYPES:
        record = found.get(kind)
        _say(f"    {kind:18s} " + (f"{record['severity']:8s} {record['description']}"
                                    if record else "NOT FOUND"))
    story.confirm(f"{committed} bookings reconciled: each planted mistake is on "
                  "ledger.discrepancies, named by type",
                  set(demo_chain.DISCREPANCY_TYPES) <= set(found))


async def _anchor(demo: Demo) -> None:
    from sardis_ledger.streams.chain.anchor import publish_anchors, verify_anchors

    story = demo.story
    story.step("Tree heads anchored on chain, then verified against the recomputed Merkle logs")
    run = await publish_anchors(demo.settings)
    report = await verify_anchors(demo.settings)
    for record in run.anchored:
        _say(f"    partition {record['partition']}: tree size {record['tree_size']} root "
             f"{record['root_hash'][:16]}… in tx {record['tx_hash'][:18]}…")
    story.confirm(f"{len(run.anchored)} partitions anchored on {run.contract_address}; every "
                  "anchored root equals the root recomputed from ledger.entries",
                  bool(run.anchored) and report.ok)


async def _metrics(demo: Demo) -> None:
    from sardis_ledger.streams.supervisor import scrape

    story = demo.story
    story.step("Metrics: what Prometheus would scrape")
    _ready, sums = await asyncio.to_thread(scrape, METRICS_PORT_BASE)
    decided = sums.get("sardis_commands_decided_total", 0.0)
    _say(f"    {_metrics_url(0)}: sardis_commands_decided_total {decided:.0f}, "
         f"sardis_decision_latency_seconds_count "
         f"{sums.get('sardis_decision_latency_seconds_count', 0):.0f}, "
         f"sardis_discrepancies_open {sums.get('sardis_discrepancies_open', 0):.0f}")
    story.confirm("the worker counted every decision", decided >= len(demo.entries))


def _stop(demo: Demo) -> None:
    demo.story.step("Stop everything with SIGTERM")
    if demo.run is None:
        demo.story.confirm("the ledger stops", False, "it never started")
        return
    started = time.monotonic()
    os.killpg(demo.run.pid, signal.SIGTERM)
    try:
        code = demo.run.wait(timeout=STOP_WITHIN_S + 5)
    except subprocess.TimeoutExpired:
        os.killpg(demo.run.pid, signal.SIGKILL)
        code = demo.run.wait()
    took = time.monotonic() - started
    demo.story.confirm(f"every process stopped cleanly within {STOP_WITHIN_S:.0f} s",
                       code == 0 and took <= STOP_WITHIN_S, f"{took:.1f} s, exit {code}")


async def _story(demo: Demo, work: Path) -> None:
    import asyncpg

    from sardis_ledger.streams.topics import create_topics

    await create_topics(demo.settings)
    conn = await asyncpg.connect(demo.settings.pg_dsn)
    try:
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{demo.schema}"')
    finally:
        await conn.close()
    chain = await demo_chain.deploy(demo.settings)
    try:
        await _start_ledger(demo, demo_chain.write_watch_config(chain, work / "watch.json"),
                            work / "run.log")
        await demo_chain.make_transfers(chain)
        async with LedgerClient(demo.settings) as ledger:
            await _entries(demo, ledger)
            await _batches(demo, ledger)
        await _projection(demo)
        await _receipt_and_tamper(demo)
        await _chain(demo, chain)
        await _anchor(demo)
        await _metrics(demo)
    finally:
        await chain.sender.close()


def run_demo() -> int:
    from infra import harness

    started = time.monotonic()
    _say("Starting the dev servers (provisioned on the first run)…")
    harness.up()
    base = Settings.from_env()
    stamp = int(time.time())
    settings = dataclasses.replace(base, topic_prefix=f"{base.topic_prefix}demo-{stamp}.",
                                   partitions=DEMO_PARTITIONS, reconcile_grace_s=GRACE_S,
                                   reconcile_grace_blocks=GRACE_BLOCKS)
    work = Path(tempfile.mkdtemp(prefix="sardis-demo-"))
    demo = Demo(settings, f"demo_{stamp}", work / "state", Story())
    demo.state_dir.mkdir()
    _say(f"Topics under {settings.topic_prefix!r}, PostgreSQL schema {demo.schema}, files in {work}")
    try:
        asyncio.run(_story(demo, work))
    except Exception as exc:  # the story says how far it got, then the error
        demo.story.confirm("the demo ran to its end", False, f"{type(exc).__name__}: {exc}")
    finally:
        _stop(demo)
    _say(f"\nReplay it: SARDIS_TOPIC_PREFIX={settings.topic_prefix} sardis-ledger consume "
         f"ledger.entries --from-beginning --timeout 3   (wall time {time.monotonic() - started:.0f} s)")
    return demo.story.summary()
