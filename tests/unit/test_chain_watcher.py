"""The chain watcher's algorithm on an in-memory chain: exactly once, reorgs, restarts, ranges."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from sardis_ledger.streams.chain import state as st
from sardis_ledger.streams.chain import transfers as tr
from sardis_ledger.streams.chain.errors import ChainReorgTooDeepError, WatchStateError
from sardis_ledger.streams.chain.watch import ChainWatcher
from tests.unit.chain_fakes import (
    OTHER_TOKEN,
    STRANGERS,
    WALLETS,
    FakeChain,
    FakeSink,
    config,
    transfer_log,
)

W1, W2, W3 = list(WALLETS)


def run(coro):
    return asyncio.run(coro)


def watcher(chain: FakeChain, sink: FakeSink, **options: int) -> ChainWatcher:
    return ChainWatcher(config(**options), "test", chain, sink)


def test_publishes_each_watched_side_once_and_ignores_others() -> None:
    chain, sink = FakeChain(), FakeSink()
    chain.mine([transfer_log(STRANGERS[0], W1, 5_000_000)])  # in for acc_1
    chain.mine([transfer_log(W1, W2, 1), transfer_log(STRANGERS[0], STRANGERS[1], 7)])
    chain.mine([transfer_log(W3, STRANGERS[1], 2, token=OTHER_TOKEN)])  # token not watched
    run(watcher(chain, sink).sync())
    got = [(r.account_id, r.direction, str(r.amount), r.block_number) for r in sink.records]
    assert got == [("acc_1", "in", "5.000000", 1), ("acc_1", "out", "0.000001", 2),
                   ("acc_2", "in", "0.000001", 2)]
    assert sink.state is not None and sink.state.next_block == 4
    run(watcher(chain, sink).sync())  # a restart with nothing new publishes nothing
    assert len(sink.records) == 3


def test_waits_for_confirmations() -> None:
    chain, sink = FakeChain(), FakeSink()
    chain.mine([transfer_log(STRANGERS[0], W1, 1)])
    chain.mine()
    run(watcher(chain, sink, confirmations=2).sync())
    assert sink.records == []
    chain.mine()
    run(watcher(chain, sink, confirmations=2).sync())
    assert [r.block_number for r in sink.records] == [1]


def test_reorg_publishes_removed_then_replacements() -> None:
    chain, sink = FakeChain(), FakeSink()
    for i in range(5):
        chain.mine([transfer_log(STRANGERS[0], W1, i + 1)])
    w = watcher(chain, sink)
    run(w.sync())
    orphaned = chain.reorg(2)  # blocks 4 and 5 vanish
    chain.mine([orphaned[1]])  # block 5's tx is re-included in the new block 4
    chain.mine([transfer_log(STRANGERS[1], W2, 99)])
    run(w.sync())
    statuses = [(r.status, r.block_number, str(r.amount)) for r in sink.records[5:]]
    assert statuses == [("removed", 4, "0.000004"), ("removed", 5, "0.000005"),
                        ("confirmed", 4, "0.000005"), ("confirmed", 5, "0.000099")]
    assert sink.net() == chain.canonical_transfers(config(), chain.head_number)
    assert w.stats.reorgs == 1


def test_reorg_to_a_shorter_chain_removes_what_is_gone() -> None:
    chain, sink = FakeChain(), FakeSink()
    for i in range(4):
        chain.mine([transfer_log(STRANGERS[0], W1, i + 1)])
    run(watcher(chain, sink).sync())
    chain.reorg(3)  # like evm_revert to block 1, with no new blocks yet
    run(watcher(chain, sink).sync())
    assert [r.status for r in sink.records].count("removed") == 3
    assert sink.net() == chain.canonical_transfers(config(), chain.head_number)
    assert sink.state is not None and sink.state.next_block == 2


def test_transfers_in_unchanged_blocks_above_a_sparse_fork_bound_are_kept() -> None:
    # Far behind the head only each range's last hash is kept (40 and 60 here), so after a reorg
    # from block 55 the first canonical kept hash is 40: blocks 41..54 are read again, and their
    # transfers, still in the same blocks, must not be published twice.
    chain, sink = FakeChain(), FakeSink()
    for i in range(200):
        chain.mine([transfer_log(STRANGERS[0], W1, i + 1)] if i % 3 == 0 else None)
    run(watcher(chain, sink, chunk_blocks=40).sync(until_block=60))
    assert sink.state is not None and [n for n, _ in sink.state.hashes] == [40, 60]
    chain.reorg(chain.head_number - 54)
    for _ in range(10):
        chain.mine([transfer_log(STRANGERS[1], W2, 7)])
    w = watcher(chain, sink, chunk_blocks=40)
    run(w.sync())
    assert sink.net() == chain.canonical_transfers(config(), chain.head_number)
    removed = sorted(r.block_number for r in sink.records if r.status == "removed")
    assert removed == [55, 58]  # transfers sit in blocks 1, 4, 7, ...: 55 and 58 are orphaned
    assert w.stats.reorgs == 1


def test_crash_before_commit_resumes_without_gap_or_duplicate() -> None:
    chain, sink = FakeChain(), FakeSink()
    for i in range(30):
        chain.mine([transfer_log(STRANGERS[0], W1, i + 1), transfer_log(W1, W2, 1)])
    sink.fail_next = 1
    first = watcher(chain, sink, chunk_blocks=7)
    with pytest.raises(WatchStateError):
        run(first.sync())
    assert sink.records == []
    sink.fail_next = 0
    run(watcher(chain, sink, chunk_blocks=7).sync(until_block=12))
    sink.fail_next = 1
    with pytest.raises(WatchStateError):
        run(watcher(chain, sink, chunk_blocks=7).sync())
    run(watcher(chain, sink, chunk_blocks=7).sync())
    assert sink.net() == chain.canonical_transfers(config(), chain.head_number)
    assert len(sink.records) == 90


def test_range_refused_as_too_large_is_halved_never_skipped() -> None:
    chain, sink = FakeChain(max_range=3), FakeSink()
    for i in range(20):
        chain.mine([transfer_log(STRANGERS[0], W1, i + 1)])
    run(watcher(chain, sink, chunk_blocks=16).sync())
    assert [r.block_number for r in sink.records] == list(range(1, 21))


def test_reorg_deeper_than_the_window_stops_the_watcher() -> None:
    chain, sink = FakeChain(), FakeSink()
    for _ in range(st.REORG_WINDOW_BLOCKS + 40):
        chain.mine([transfer_log(STRANGERS[0], W1, 1)])
    run(watcher(chain, sink, start_block=1, chunk_blocks=500).sync())
    chain.reorg(st.REORG_WINDOW_BLOCKS + 20)
    for _ in range(st.REORG_WINDOW_BLOCKS + 30):
        chain.mine()
    with pytest.raises(ChainReorgTooDeepError, match="reorg below"):
        run(watcher(chain, sink, chunk_blocks=500).sync())


class MovingChain(FakeChain):
    """Reorganizes the chain in the middle of the first eth_getLogs, like a live node can."""

    moved: bool = False

    async def transfer_logs(self, start, end, tokens, wallets):
        logs = await super().transfer_logs(start, end, tokens, wallets)
        if not self.moved:
            self.moved = True
            kept = self.reorg(2)
            self.mine([transfer_log(STRANGERS[1], W3, 42)])
            self.mine(kept)
        return logs


def test_chain_moving_while_a_range_is_read_reads_it_again() -> None:
    chain, sink = MovingChain(), FakeSink()
    for i in range(6):
        chain.mine([transfer_log(STRANGERS[0], W1, i + 1)])
    w = watcher(chain, sink)
    run(w.sync())
    assert w.stats.chain_moved >= 1
    assert sink.net() == chain.canonical_transfers(config(), chain.head_number)


# ------------------------------------------------------------------ the model, under hypothesis

operation = hs.one_of(
    hs.tuples(hs.just("mine"), hs.integers(0, 4)),        # a block with n transfers
    hs.tuples(hs.just("sync"), hs.integers(0, 0)),
    hs.tuples(hs.just("reorg"), hs.integers(1, 12)),      # drop n blocks, mine n+1 new ones
    hs.tuples(hs.just("restart"), hs.integers(0, 0)),     # a new watcher on the stored progress
    hs.tuples(hs.just("crash"), hs.integers(0, 0)),       # the next commit fails
    # Many blocks, then a sync that stays 66+ blocks behind the head: only range ends are kept.
    hs.tuples(hs.just("burst"), hs.integers(70, 150)),
    hs.tuples(hs.just("deep"), hs.integers(1, 10)),       # reorg n blocks below the processed tip
)


def random_transfer(rng: random.Random, parties: list[str]) -> tr.RawLog:
    sender, to = rng.sample(parties, 2)
    return transfer_log(sender, to, rng.randint(0, 10**9))


@given(ops=hs.lists(operation, min_size=1, max_size=40), confirmations=hs.integers(0, 3),
       chunk=hs.integers(1, 9), seed=hs.integers(0, 2**32))
def test_stream_always_equals_the_canonical_chain(ops: list[tuple[str, int]], confirmations: int,
                                                  chunk: int, seed: int) -> None:
    """After any mix of blocks, reorgs, restarts and failed commits, the published stream
    (confirmed minus removed) is exactly the watched transfers of the confirmed canonical
    blocks, and nothing is published twice."""
    rng = random.Random(seed)
    parties = [*WALLETS, *STRANGERS]
    chain, sink = FakeChain(), FakeSink()
    options = {"confirmations": confirmations, "chunk_blocks": chunk}
    w = watcher(chain, sink, **options)
    for kind, n in ops:
        until = None
        if kind == "mine":
            chain.mine([random_transfer(rng, parties)
                        for _ in range(n)])
        elif kind == "burst":
            for _ in range(n):
                chain.mine([random_transfer(rng, parties)]
                           if rng.random() < 0.5 else None)
            until = chain.head_number - rng.randint(66, 90)
        elif kind in ("reorg", "deep"):
            if kind == "deep":
                tip = w.state.next_block - 1 if w.state is not None else chain.head_number
                n = max(1, chain.head_number - tip + n)
            dropped = chain.reorg(n)
            for index in range(n + 1):
                again = [log for log in dropped if rng.random() < 0.5] if index == 0 else None
                chain.mine(again, salt=rng.random())
        elif kind == "restart":
            w = watcher(chain, sink, **options)
        elif kind == "crash":
            sink.fail_next = 1
        try:
            run(w.sync(until_block=until))
        except WatchStateError:
            w = watcher(chain, sink, **options)  # the process died; progress is what committed
    sink.fail_next = 0
    run(w.sync())
    safe = chain.head_number - confirmations
    assert sink.net() == chain.canonical_transfers(config(**options), max(safe, 0))
    canonical_blocks = {block.hash for block in chain.blocks}
    assert not [r for r in sink.records if r.status == "removed"
                and r.block_hash in canonical_blocks], "removed a transfer that is still canonical"
