"""The chain watcher's durable progress: next block, recent block hashes and published transfers."""

# Serialized as compact JSON (every number an integer, hashes hex), zlib-compressed behind a
# one-byte format marker (b"Z"; addresses and hashes repeat, so a window of thousands of
# transfers stays far below Kafka's message limit), in the value of one record per watcher on
# the compacted progress topic, written in the same Kafka transaction as the transfers it
# accounts for:
#
#   {"v": 1, "start_block": S, "next_block": N, "config": "<digest>",
#    "hashes": [[number, "0x<hash>"], ...],        ascending; the last one is block N-1
#    "published": [[<ChainTransfer as JSON>], ...]} transfers in the reorg window, chain order
#
# Why keep hashes: a changed hash at block N-1 means a reorg; the highest kept block whose hash
# still matches bounds the fork point (a block hash commits to all its ancestors). Why keep the
# published transfers: a reorg must publish `removed` copies of the orphaned ones, and a rescan
# after a reorg or restart must not publish a kept one twice.

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field, replace
from typing import Any

from sardis_ledger.streams.chain import transfers as tr
from sardis_ledger.streams.chain.errors import WatchStateError

STATE_VERSION = 1
FORMAT_ZLIB_JSON = b"Z"
COMPRESS_LEVEL = 6
# How far below the processed tip a reorg can reach and still be repaired. Blocks are only read
# once `confirmations` deep, so this is depth beyond that; deeper reorgs stop the watcher.
REORG_WINDOW_BLOCKS = 64


@dataclass(frozen=True, slots=True)
class WatchState:
    start_block: int
    next_block: int
    config_digest: str = ""
    hashes: tuple[tuple[int, str], ...] = ()
    published: tuple[tr.ChainTransfer, ...] = field(default_factory=tuple)

    @classmethod
    def fresh(cls, start_block: int, config_digest: str) -> WatchState:
        return cls(start_block=start_block, next_block=start_block, config_digest=config_digest)

    @property
    def tip(self) -> tuple[int, str] | None:
        """(number, hash) of the last processed block, when one was processed."""
        if self.hashes and self.hashes[-1][0] == self.next_block - 1:
            return self.hashes[-1]
        return None

    def hash_of(self, number: int) -> str | None:
        for kept_number, kept_hash in self.hashes:
            if kept_number == number:
                return kept_hash
        return None

    def published_keys(self) -> dict[tuple[str, int, str], str]:
        """Identity of each kept transfer -> the hash of the block it was published in."""
        return {transfer.key: transfer.block_hash for transfer in self.published}

    def window_floor(self, next_block: int) -> int:
        return max(self.start_block, next_block - REORG_WINDOW_BLOCKS)

    def advanced(self, end: int, block_hashes: dict[int, str],
                 new_transfers: list[tr.ChainTransfer]) -> WatchState:
        """The state after publishing `new_transfers` of blocks next_block..end, with the hashes
        read for (some of) those blocks; `end`'s own hash is required."""
        if end < self.next_block:
            raise WatchStateError(f"cannot advance from block {self.next_block} to {end}")
        if end not in block_hashes:
            raise WatchStateError(f"advancing to block {end} needs its hash")
        next_block = end + 1
        floor = self.window_floor(next_block)
        merged = dict(self.hashes)
        merged.update(block_hashes)
        hashes = tuple(sorted((n, h) for n, h in merged.items() if n >= floor or n == end))
        published = tuple(t for t in (*self.published, *new_transfers) if t.block_number >= floor)
        return replace(self, next_block=next_block, hashes=hashes, published=published)

    def rewound(self, fork: int, orphaned: list[tr.ChainTransfer]) -> WatchState:
        """The state after a reorg whose fork point is at or above block `fork` (which is still
        canonical): blocks above it are read again, `orphaned` transfers are forgotten."""
        if fork < self.start_block - 1 or fork >= self.next_block:
            raise WatchStateError(f"fork point {fork} is outside the processed blocks "
                                  f"{self.start_block}..{self.next_block - 1}")
        gone = {(*t.key, t.block_hash) for t in orphaned}
        return replace(
            self, next_block=fork + 1,
            hashes=tuple((n, h) for n, h in self.hashes if n <= fork),
            published=tuple(t for t in self.published if (*t.key, t.block_hash) not in gone))

    def to_bytes(self) -> bytes:
        return FORMAT_ZLIB_JSON + zlib.compress(json.dumps({
            "v": STATE_VERSION, "start_block": self.start_block, "next_block": self.next_block,
            "config": self.config_digest, "hashes": [list(item) for item in self.hashes],
            "published": [tr.to_json(t) for t in self.published],
        }, separators=(",", ":")).encode(), COMPRESS_LEVEL)

    @classmethod
    def from_bytes(cls, data: bytes) -> WatchState:
        try:
            if not data.startswith(FORMAT_ZLIB_JSON):
                raise WatchStateError("watch state record has an unknown format marker")
            raw: Any = json.loads(zlib.decompress(data[len(FORMAT_ZLIB_JSON):]))
            if not isinstance(raw, dict) or raw.get("v") != STATE_VERSION:
                raise WatchStateError(f"watch state record is not version {STATE_VERSION}")
            return cls(start_block=int(raw["start_block"]), next_block=int(raw["next_block"]),
                       config_digest=str(raw.get("config", "")),
                       hashes=tuple((int(n), str(h)) for n, h in raw["hashes"]),
                       published=tuple(tr.from_json(item) for item in raw["published"]))
        except WatchStateError:
            raise
        except (ValueError, KeyError, TypeError, zlib.error) as exc:
            raise WatchStateError(f"watch state record is corrupt: {exc!r}") from exc


def fork_candidates(state: WatchState) -> list[tuple[int, str]]:
    """Kept (number, hash) pairs to test against the chain, highest first: the first one still
    canonical bounds the fork point from below."""
    return sorted(state.hashes, reverse=True)


def fork_when_none_match(state: WatchState) -> int | None:
    """Fork point when no kept hash is canonical any more: just below the start block if every
    block since the start is still within the window (nothing was forgotten), else None."""
    if state.window_floor(state.next_block) <= state.start_block:
        return state.start_block - 1
    return None


def orphan_candidates(state: WatchState, fork: int) -> list[tr.ChainTransfer]:
    """Kept transfers above the fork bound: each is orphaned unless its block hash is unchanged."""
    return [t for t in state.published if t.block_number > fork]


def fresh_transfers(state: WatchState, decoded: list[tr.ChainTransfer]) -> list[tr.ChainTransfer]:
    """`decoded` minus those already published from the same block (after a rewind or restart)."""
    kept = state.published_keys()
    out = []
    seen: set[tuple[str, int, str]] = set()
    for transfer in decoded:
        if kept.get(transfer.key) == transfer.block_hash or transfer.key in seen:
            continue
        seen.add(transfer.key)
        out.append(transfer)
    return out
