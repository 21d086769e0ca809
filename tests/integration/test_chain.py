"""The chain watcher and anchoring on a real anvil node and real Kafka: exactly once, reorgs,
kill -9, ingest rate, anchored roots that verify and tampered entries that do not."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from sardis_ledger.schemas.codec import AvroCodec
from sardis_ledger.sinks.postgres import PostgresSink
from sardis_ledger.sinks.schema import connect, quoted
from sardis_ledger.sinks.verify import verify
from sardis_ledger.streams import canonical, merkle, records
from sardis_ledger.streams.chain import anchor
from sardis_ledger.streams.chain import config as wc
from sardis_ledger.streams.chain.bench import measure_ingest
from sardis_ledger.streams.chain.watch import run_watch
from sardis_ledger.streams.client import LedgerClient
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.money import currency_table
from sardis_ledger.streams.topics import create_topics
from sardis_ledger.streams.worker_process import WorkerProcess
from tests.integration import chain_support as cs
from tests.integration.support import CrashLoop, read_topic

TRANSFERS_TOPIC = "chain.transfers"
KILL_TRANSFERS = 2_000
BENCH_TRANSFERS = 10_000


@pytest.fixture
def chain_settings(settings: Settings) -> Settings:
    """Fewer partitions than the ledger default: these tests read whole topics many times."""
    return dataclasses.replace(settings, partitions=3)


@dataclasses.dataclass
class Actors:
    token: cs.Token
    minter: str
    watched: dict[str, str]  # address -> account
    strangers: list[str]
    start_block: int


async def actors(settings: Settings, watched_count: int = 2) -> Actors:
    accounts = await cs.accounts(settings)
    start = await cs.block_number(settings) + 1
    token = await cs.deploy_token(settings)
    watched = {accounts[1 + i]: f"acc_{i + 1}" for i in range(watched_count)}
    strangers = accounts[1 + watched_count:]
    for holder in [*watched, *strangers]:
        await cs.mint(settings, token, holder, 10**15, accounts[0])
    return Actors(token, accounts[0], watched, strangers, start)


def watch_config(a: Actors, **options: Any) -> wc.WatchConfig:
    return wc.from_mapping({"chain": "anvil", "confirmations": 0, "start_block": a.start_block,
                            "tokens": {a.token.address: {"currency": "USDC",
                                                         "decimals": a.token.decimals}},
                            "wallets": a.watched, **options})


def transfer_key(record: dict[str, Any]) -> tuple[str, int, str]:
    return (record["tx_hash"], record["log_index"], record["direction"])


async def expected_from_receipts(settings: Settings, a: Actors, hashes: list[str]
                                 ) -> dict[tuple[str, int, str], dict[str, Any]]:
    """What the watcher must publish, computed independently from the transaction receipts."""
    out: dict[tuple[str, int, str], dict[str, Any]] = {}
    for receipt in await cs.receipts(settings, hashes):
        assert receipt["status"] == "0x1"
        for log in receipt["logs"]:
            sender = "0x" + log["topics"][1][-40:]
            to = "0x" + log["topics"][2][-40:]
            value = int(log["data"], 16)
            for address, direction in ((sender, "out"), (to, "in")):
                if address in a.watched:
                    record = {"chain": "anvil", "block_number": int(log["blockNumber"], 16),
                              "block_hash": log["blockHash"], "tx_hash": log["transactionHash"],
                              "log_index": int(log["logIndex"], 16), "token": a.token.address,
                              "from_address": sender, "to_address": to,
                              "amount": Decimal(value).scaleb(-a.token.decimals),
                              "currency": "USDC", "account_id": a.watched[address],
                              "direction": direction, "status": "confirmed"}
                    out[transfer_key(record)] = record
    return out


async def published(settings: Settings, count: int | None = None, idle_s: float | None = 3.0,
                    timeout_s: float = 120.0) -> list[dict[str, Any]]:
    until = None if count is None else (lambda rows: len(rows) >= count)
    rows = await read_topic(settings, TRANSFERS_TOPIC, until=until, idle_s=idle_s,
                            timeout_s=timeout_s)
    for _p, _o, key, record in rows:
        assert key.decode() == record["tx_hash"]  # keyed by tx hash
    return [row[3] for row in rows]


# ------------------------------------------------------------------ watcher


async def test_watcher_publishes_each_transfer_once_with_the_right_fields(
        chain_settings: Settings, snapshot: Any) -> None:
    settings = chain_settings
    a = await actors(settings)
    w1, w2 = list(a.watched)
    txs = [cs.transfer_tx(a.token, w1, a.strangers[0], 1_500_000),         # out of acc_1
           cs.transfer_tx(a.token, a.strangers[1], w2, 7),                 # into acc_2
           cs.transfer_tx(a.token, w1, w2, 10**12 + 1),                    # both sides watched
           cs.transfer_tx(a.token, a.strangers[0], a.strangers[1], 99),    # not watched
           cs.transfer_many_tx(a.token, w2, [(a.strangers[0], 1), (w1, 2), (a.strangers[2], 3)])]
    hashes = await cs.send_all(settings, txs)
    expected = await expected_from_receipts(settings, a, hashes)
    # Mints to the watched wallets (in the blocks after start_block) are transfers too.
    mints = await published_mints(settings, a)
    stats = await run_watch(settings, watch_config(a), once=True)
    got = await published(settings)
    by_key = Counter(transfer_key(r) for r in got)
    assert all(n == 1 for n in by_key.values()), "a transfer was published twice"
    assert {k: v for k, v in ((transfer_key(r), r) for r in got) if k not in mints} == expected
    assert len(got) == len(expected) + len(mints) == stats.confirmed
    first = next(r for r in got if r["tx_hash"] == hashes[0])
    assert first["amount"] == Decimal("1.5") and first["account_id"] == "acc_1"  # exact
    big = next(r for r in got if r["tx_hash"] == hashes[2] and r["direction"] == "in")
    assert str(big["amount"]) == "1000000.000001000000000000"  # 10**12 + 1 units at 6 decimals
    # A second run (a restart) has nothing new to publish.
    again = await run_watch(settings, watch_config(a), once=True)
    assert again.confirmed == 0
    assert len(await published(settings, idle_s=2)) == len(got)


async def published_mints(settings: Settings, a: Actors) -> set[tuple[str, int, str]]:
    logs = await cs.rpc(settings.chain_rpc, "eth_getLogs", [{
        "fromBlock": hex(a.start_block), "toBlock": "latest", "address": a.token.address,
        "topics": [None, "0x" + "00" * 32]}])
    return {(log["transactionHash"], int(log["logIndex"], 16), "in") for log in logs
            if "0x" + log["topics"][2][-40:] in a.watched}


async def test_watcher_waits_for_confirmations(chain_settings: Settings, snapshot: Any) -> None:
    settings = chain_settings
    a = await actors(settings)
    w1 = next(iter(a.watched))
    config = watch_config(a, confirmations=3)
    await run_watch(settings, config, once=True)
    before = len(await published(settings, idle_s=2))
    [tx] = await cs.send_all(settings, [cs.transfer_tx(a.token, w1, a.strangers[0], 5)])
    await cs.mine(settings, 2)  # 2 blocks on top: not yet 3 deep
    await run_watch(settings, config, once=True)
    assert tx not in {r["tx_hash"] for r in await published(settings, idle_s=2)}
    await cs.mine(settings, 1)
    await run_watch(settings, config, once=True)
    rows = await published(settings, idle_s=2)
    assert len(rows) == before + 1 and tx in {r["tx_hash"] for r in rows}


async def test_reorg_publishes_removed_and_the_replacing_transfers(
        chain_settings: Settings, snapshot: Any) -> None:
    settings = chain_settings
    a = await actors(settings)
    w1, w2 = list(a.watched)
    config = watch_config(a)
    await run_watch(settings, config, once=True)
    fork = await cs.rpc(settings.chain_rpc, "evm_snapshot")
    orphaned = await cs.send_all(settings, [cs.transfer_tx(a.token, w1, a.strangers[0], 11),
                                            cs.transfer_tx(a.token, a.strangers[1], w2, 12)])
    orphaned_expected = await expected_from_receipts(settings, a, orphaned)
    await run_watch(settings, config, once=True)
    before = await published(settings, idle_s=2)
    assert set(orphaned_expected) <= {transfer_key(r) for r in before}
    # The reorg: back to the fork point, then a different, longer history.
    assert await cs.rpc(settings.chain_rpc, "evm_revert", [fork]) is True
    replacing = await cs.send_all(settings, [cs.transfer_tx(a.token, w2, a.strangers[2], 21),
                                             cs.transfer_tx(a.token, a.strangers[0], w1, 22),
                                             cs.transfer_tx(a.token, w1, w2, 23)])
    replacing_expected = await expected_from_receipts(settings, a, replacing)
    stats = await run_watch(settings, config, once=True)
    rows = await published(settings, idle_s=2)
    removed = [r for r in rows if r["status"] == "removed"]
    assert {transfer_key(r): r for r in removed} == {
        k: {**v, "status": "removed"} for k, v in orphaned_expected.items()}
    seen_before = {(*transfer_key(r), r["block_hash"]) for r in before}
    new_confirmed = {transfer_key(r): r for r in rows if r["status"] == "confirmed"
                     and (*transfer_key(r), r["block_hash"]) not in seen_before}
    assert new_confirmed == replacing_expected
    assert stats.reorgs == 1 and stats.removed == len(orphaned_expected)
    assert net_view(rows) == await canonical_view(settings, a)


async def test_anvil_reorg_replaces_blocks_with_other_transactions(
        chain_settings: Settings, snapshot: Any) -> None:
    """anvil_reorg: the node replaces the last blocks itself (the chain does not get shorter)."""
    settings = chain_settings
    a = await actors(settings)
    w1 = next(iter(a.watched))
    config = watch_config(a)
    first = await cs.send_all(settings, [cs.transfer_tx(a.token, w1, a.strangers[0], v)
                                         for v in (31, 32, 33)])
    before = await expected_from_receipts(settings, a, first)
    await run_watch(settings, config, once=True)
    head = await cs.block_number(settings)
    depth = 2
    replacement = cs.transfer_tx(a.token, a.strangers[1], w1, 34)
    await cs.rpc(settings.chain_rpc, "anvil_reorg", [depth, [[replacement, 0]]])
    assert await cs.block_number(settings) == head
    stats = await run_watch(settings, config, once=True)
    rows = await published(settings, idle_s=2)
    orphaned = {k for k, r in before.items() if r["block_number"] > head - depth}
    assert orphaned and stats.reorgs == 1
    assert {transfer_key(r) for r in rows if r["status"] == "removed"} == orphaned
    assert net_view(rows) == await canonical_view(settings, a)
    assert [str(r["amount"]) for r in rows if r["status"] == "confirmed"
            and r["from_address"] == a.strangers[1]] == ["0.000034000000000000"]


def net_view(rows: list[dict[str, Any]]) -> set[tuple[str, int, str, str]]:
    """What a consumer holds after applying the stream: confirmed minus removed."""
    held: Counter[tuple[str, int, str, str]] = Counter()
    for r in rows:
        held[(*transfer_key(r), r["block_hash"])] += 1 if r["status"] == "confirmed" else -1
    assert all(v in (0, 1) for v in held.values()), "a transfer held twice or removed unheld"
    return {k for k, v in held.items() if v}


async def canonical_view(settings: Settings, a: Actors) -> set[tuple[str, int, str, str]]:
    """The watched sides of every Transfer of the token on the canonical chain, from the node."""
    logs = await cs.rpc(settings.chain_rpc, "eth_getLogs", [{
        "fromBlock": hex(a.start_block), "toBlock": "latest", "address": a.token.address}])
    out = set()
    for log in logs:
        sender, to = "0x" + log["topics"][1][-40:], "0x" + log["topics"][2][-40:]
        for address, direction in ((sender, "out"), (to, "in")):
            if address in a.watched:
                out.add((log["transactionHash"], int(log["logIndex"], 16), direction,
                         log["blockHash"]))
    return out


@pytest.mark.slow
async def test_kill_9_during_2000_transfers_publishes_every_transfer_exactly_once(
        chain_settings: Settings, snapshot: Any, tmp_path: Path) -> None:
    settings = chain_settings
    a = await actors(settings, watched_count=3)
    watched, strangers = list(a.watched), a.strangers
    # A fresh seed per run: after evm_revert the same transactions would have the same hashes,
    # and anvil refuses a hash it imported before ("transaction already imported").
    seed = random.randrange(2**32)
    print(f"\nkill -9 test seed {seed}")
    rng = random.Random(seed)
    txs: list[dict[str, Any]] = []
    count = 0
    while count < KILL_TRANSFERS:  # each transfer has exactly one watched side
        if rng.random() < 0.1 and KILL_TRANSFERS - count >= 10:
            sender = rng.choice(watched)
            txs.append(cs.transfer_many_tx(a.token, sender, [(rng.choice(strangers), rng.randint(1, 10**9))
                                                             for _ in range(10)]))
            count += 10
        elif rng.random() < 0.5:
            txs.append(cs.transfer_tx(a.token, rng.choice(watched), rng.choice(strangers),
                                      rng.randint(1, 10**9)))
            count += 1
        else:
            txs.append(cs.transfer_tx(a.token, rng.choice(strangers), rng.choice(watched),
                                      rng.randint(1, 10**9)))
            count += 1
    config_path = cs.write_config(tmp_path / "watch.json", a.token, a.watched, confirmations=0,
                                  start_block=a.start_block, poll_interval_s=0.05, chunk_blocks=40)
    await create_topics(settings)
    watcher = cs.WatcherProcess(settings, config_path, tmp_path)
    try:
        await kill_loop_run(settings, a, txs, watcher, rng)
    finally:
        watcher.stop()


async def kill_loop_run(settings: Settings, a: Actors, txs: list[dict[str, Any]],
                        watcher: cs.WatcherProcess, rng: random.Random) -> None:
    await asyncio.to_thread(watcher.start)
    crash = CrashLoop(watcher, rng, (0.5, 1.5))
    crasher = asyncio.create_task(crash.run())
    hashes: list[str] = []
    nonces: dict[str, int] = {}
    try:
        for start in range(0, len(txs), 50):  # stream in over time, so kills land mid-stream
            hashes += await cs.send_all(settings, txs[start:start + 50], nonces)
            await asyncio.sleep(0.1)
        expected = await expected_from_receipts(settings, a, hashes)
        mints = await published_mints(settings, a)
        assert len(expected) == KILL_TRANSFERS
        while crash.kills < 3:
            await asyncio.sleep(0.2)
    finally:
        crash.stop.set()
        await crasher
    await published(settings, count=len(expected) + len(mints), idle_s=None, timeout_s=180)
    rows = await published(settings, idle_s=3)  # and nothing more arrives
    keys = Counter(transfer_key(r) for r in rows)
    doubles = [k for k, n in keys.items() if n > 1]
    assert not doubles, f"published more than once: {doubles[:5]}"
    assert {k: r for k, r in ((transfer_key(r), r) for r in rows) if k not in mints} == expected
    assert crash.kills >= 3


async def test_watcher_ingest_rate(chain_settings: Settings, snapshot: Any) -> None:
    """Catch-up ingest (eth_getLogs + headers + Avro + Kafka transactions), in transfers/s."""
    settings = chain_settings
    a = await actors(settings, watched_count=2)
    watched = list(a.watched)
    # Mostly batched (anvil mines ~100 transactions/s here; the watcher is what is measured).
    pairs_per_tx = 100
    singles = 200
    txs = [cs.transfer_many_tx(a.token, watched[i % 2],
                               [(a.strangers[j % len(a.strangers)], 1000 + j)
                                for j in range(pairs_per_tx)])
           for i in range((BENCH_TRANSFERS - singles) // pairs_per_tx)]
    txs += [cs.transfer_tx(a.token, a.strangers[i % len(a.strangers)], watched[i % 2], 5 + i)
            for i in range(singles)]
    hashes = await cs.send_all(settings, txs)
    await cs.receipts(settings, hashes)  # every transaction mined
    end = await cs.block_number(settings)
    figure = await measure_ingest(settings, watch_config(a), a.start_block, end)
    print(f"\nchain watcher ingest: {figure}")
    assert figure.transfers == BENCH_TRANSFERS + len(await published_mints(settings, a))
    rows = await published(settings, count=figure.transfers, idle_s=None)
    assert len(rows) == figure.transfers


# ------------------------------------------------------------------ anchoring


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    asyncio.run(create_topics(settings))
    process = WorkerProcess(settings, tmp_path)
    yield process
    process.stop()


async def post_entries(settings: Settings, count: int, tag: str) -> None:
    async with LedgerClient(settings) as ledger:
        await asyncio.gather(*(ledger.create_entry(
            account_id=f"acc_{i % 7}", amount=Decimal(f"{i + 1}.25"), entry_type="credit",
            currency="USDC", command_id=f"{tag}-{i}") for i in range(count)))


async def settled_heads(settings: Settings, previous: dict[int, Any] | None = None
                        ) -> dict[int, Any]:
    """The latest tree heads once they stop changing (and differ from `previous`)."""
    last: dict[int, Any] = {}
    for _ in range(120):
        heads = await anchor.latest_tree_heads(settings)
        if heads and heads == last and heads != previous:
            return heads
        last = heads
        await asyncio.sleep(1.0)
    raise AssertionError("tree heads did not settle")


async def post_waves(settings: Settings, tag: str) -> None:
    """Two waves of entries 1.5 s apart: a partition publishes a tree head once a second of
    traffic has passed, so the second wave makes heads that cover the first."""
    await post_entries(settings, 40, f"{tag}1")
    await asyncio.sleep(1.5)
    await post_entries(settings, 40, f"{tag}2")


async def copy_entries(settings: Settings, topic: str, change: Any) -> None:
    """Copy ledger.entries to `topic`, passing each record through `change` (the tamperer)."""
    from aiokafka import AIOKafkaProducer

    codec = AvroCodec()
    rows = await read_topic(settings, "ledger.entries", idle_s=2, timeout_s=60)
    await create_extra_topic(settings, topic)
    producer = AIOKafkaProducer(**settings.kafka_connection(), acks="all")
    await producer.start()
    try:
        for partition, _o, key, record in rows:
            await producer.send_and_wait(settings.topic(topic),
                                         codec.encode("Entry", change(record)), key=key,
                                         partition=partition)
    finally:
        await producer.stop()


async def create_extra_topic(settings: Settings, name: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(**settings.kafka_connection())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(settings.topic(name), settings.partitions, 1)])
    finally:
        await admin.close()
    await asyncio.sleep(1)


def rehash_partition(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a careful tamperer does: recompute entry_hash and merkle_root after a change."""
    currencies = currency_table()
    frontier = merkle.MerkleFrontier()
    out = []
    for record in sorted(entries, key=lambda r: r["leaf_index"]):
        entry_bytes = canonical.entry_bytes(records.entry_from_wire(record, currencies))
        frontier = frontier.append(merkle.leaf_hash(entry_bytes))
        out.append({**record, "entry_hash": canonical.entry_hash(entry_bytes).hex(),
                    "merkle_root": frontier.root().hex()})
    return out


async def test_anchored_roots_verify_and_tampered_entries_fail(
        settings: Settings, worker: WorkerProcess, pg_schema: str) -> None:
    worker.start()
    await post_waves(settings, "a")
    heads = await settled_heads(settings)
    run = await anchor.publish_anchors(settings)
    assert run.deployed and len(run.anchored) == len(heads)
    recorded = [r[3] for r in await read_topic(settings, "ledger.anchors", idle_s=2)]
    assert {(r["partition"], r["tree_size"], r["root_hash"]) for r in recorded} == \
        {(h.partition, h.tree_size, h.root_hash) for h in heads.values()}
    assert all(r["contract_address"] == run.contract_address and r["chain"] == "anvil"
               and r["tx_hash"].startswith("0x") and r["block_number"] > 0 for r in recorded)
    report = await anchor.verify_anchors(settings)
    assert report.ok and len(report.checks) == len(heads), report.mismatches

    # Idempotent: nothing new to anchor with the same contract; new entries get new anchors.
    again = await anchor.publish_anchors(settings, contract_address=run.contract_address)
    assert again.anchored == [] and sorted(again.unchanged) == sorted(heads)
    await post_waves(settings, "b")
    await settled_heads(settings, previous=heads)
    later = await anchor.publish_anchors(settings, contract_address=run.contract_address)
    assert later.anchored and not later.deployed
    assert (await anchor.verify_anchors(settings)).ok

    # A changed amount: the entry no longer hashes to its own recorded hashes.
    entries = [r[3] for r in await read_topic(settings, "ledger.entries", idle_s=2)]
    anchored = {h.partition: h.tree_size for h in heads.values()}
    victim = next(r for r in sorted(entries, key=lambda r: (r["partition"], r["leaf_index"]))
                  if 0 < r["leaf_index"] < anchored.get(r["partition"], 0))

    def bump(record: dict[str, Any]) -> dict[str, Any]:
        if record["entry_id"] == victim["entry_id"]:
            return {**record, "amount": record["amount"] + Decimal("0.01")}
        return record

    await copy_entries(settings, "tampered-a.entries", bump)
    report = await anchor.verify_anchors(settings, entries_topic="tampered-a.entries")
    assert not report.ok
    bad = report.mismatches
    assert {c.partition for c in bad} == {victim["partition"]}
    assert all(c.first_bad_entry_id == victim["entry_id"]
               and c.first_bad_leaf == victim["leaf_index"] for c in bad)
    assert victim["entry_id"] in bad[0].problems[0] and "anchored is" in bad[0].problems[0]

    # A careful tamperer also rewrites entry_hash and merkle_root: only the anchor catches it.
    partition = [r for r in entries if r["partition"] == victim["partition"]]
    rewritten = {r["entry_id"]: r for r in rehash_partition([bump(r) for r in partition])}
    await copy_entries(settings, "tampered-b.entries",
                       lambda record: rewritten.get(record["entry_id"], record))
    report = await anchor.verify_anchors(settings, entries_topic="tampered-b.entries")
    assert {c.partition for c in report.mismatches} == {victim["partition"]}
    assert all("every entry matches its own recorded hashes" in c.problems[0]
               for c in report.mismatches)

    # `sardis-ledger verify` checks the anchors of the PostgreSQL projection against the chain.
    await PostgresSink(settings, pg_schema, stop_at_end=True).run()
    ledger_report = await verify(settings, pg_schema, check_immudb=False)
    assert ledger_report.ok, ledger_report.problems
    assert ledger_report.anchors == len(recorded) + len(later.anchored)
    # The careful tamperer again, in PostgreSQL (triggers off): amount, entry_hash, merkle_root
    # and the published tree heads all rewritten. The anchors on chain still catch it.
    conn = await connect(settings.pg_dsn)
    q = quoted(pg_schema)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            for record in rewritten.values():
                await conn.execute(f"UPDATE {q}.entries SET amount = $2, entry_hash = $3, "
                                   "merkle_root = $4 WHERE entry_id = $1", record["entry_id"],
                                   record["amount"], record["entry_hash"], record["merkle_root"])
            await conn.execute(f"UPDATE {q}.tree_heads h SET root_hash = e.merkle_root "
                               f"FROM {q}.entries e WHERE e.partition = h.partition "
                               "AND e.leaf_index = h.tree_size - 1 AND h.partition = $1",
                               victim["partition"])
    finally:
        await conn.close()
    ledger_report = await verify(settings, pg_schema, check_immudb=False)
    anchor_problems = [p for p in ledger_report.problems if "anchor of tree size" in p.detail]
    assert anchor_problems and {p.partition for p in anchor_problems} == {victim["partition"]}, \
        ledger_report.problems
    assert not [p for p in ledger_report.problems if "tree head" in p.detail], ledger_report.problems
    skipped = await verify(settings, pg_schema, check_immudb=False, check_anchors=False)
    assert skipped.anchors == 0 and not any("anchor" in p.detail for p in skipped.problems)
