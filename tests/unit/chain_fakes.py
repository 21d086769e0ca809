"""An in-memory chain and sink for the chain watcher's unit tests (no node, no Kafka)."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field

from sardis_ledger.streams.chain import state as st
from sardis_ledger.streams.chain import transfers as tr
from sardis_ledger.streams.chain.config import Token, WatchConfig
from sardis_ledger.streams.chain.errors import RangeTooLargeError, WatchStateError

TOKEN = "0x" + "aa" * 20
OTHER_TOKEN = "0x" + "ab" * 20
WALLETS = {"0x" + f"{i:02x}" * 20: f"acc_{i}" for i in (1, 2, 3)}
STRANGERS = ["0x" + f"{i:02x}" * 20 for i in (7, 8)]
_serial = itertools.count(1)


def config(confirmations: int = 0, chunk_blocks: int = 5, start_block: int = 1) -> WatchConfig:
    return WatchConfig(tokens={TOKEN: Token(TOKEN, "USDC", 6)}, wallets=dict(WALLETS),
                       chain="test", confirmations=confirmations, start_block=start_block,
                       chunk_blocks=chunk_blocks)


def _hash(*parts: object) -> str:
    return "0x" + hashlib.sha256(repr(parts).encode()).hexdigest()


def transfer_log(sender: str, to: str, value: int, token: str = TOKEN,
                 tx_hash: str | None = None) -> tr.RawLog:
    """A Transfer log not yet in a block (block fields are set when it is mined)."""
    return tr.RawLog(address=token,
                     topics=(bytes.fromhex(tr.TRANSFER_TOPIC[2:]),
                             bytes(12) + bytes.fromhex(sender[2:]), bytes(12) + bytes.fromhex(to[2:])),
                     data=value.to_bytes(32, "big"), block_number=0, block_hash="",
                     tx_hash=tx_hash or _hash("tx", next(_serial)), log_index=0)


@dataclass(slots=True)
class Block:
    number: int
    hash: str
    parent: str
    logs: list[tr.RawLog]


@dataclass
class FakeChain:
    """A canonical chain of blocks that can be extended and reorganized."""

    blocks: list[Block] = field(default_factory=list)
    max_range: int | None = None  # eth_getLogs refuses wider ranges, like public providers
    calls: int = 0

    def __post_init__(self) -> None:
        if not self.blocks:
            self.blocks.append(Block(0, _hash("genesis"), "0x" + "00" * 32, []))

    @property
    def head_number(self) -> int:
        return self.blocks[-1].number

    def mine(self, pending: list[tr.RawLog] | None = None, salt: object = None) -> Block:
        parent = self.blocks[-1]
        number = parent.number + 1
        block_hash = _hash("block", number, parent.hash, salt, next(_serial))
        logs = [tr.RawLog(log.address, log.topics, log.data, number, block_hash, log.tx_hash, index)
                for index, log in enumerate(pending or [])]
        block = Block(number, block_hash, parent.hash, logs)
        self.blocks.append(block)
        return block

    def reorg(self, depth: int) -> list[tr.RawLog]:
        """Drop the last `depth` blocks (like evm_revert); their logs, for re-inclusion."""
        depth = min(depth, len(self.blocks) - 1)
        dropped = self.blocks[len(self.blocks) - depth:]
        del self.blocks[len(self.blocks) - depth:]
        return [log for block in dropped for log in block.logs]

    def canonical_transfers(self, config: WatchConfig, upto: int) -> set[tuple[str, int, str, str]]:
        logs = [log for block in self.blocks[1:upto + 1] for log in block.logs]
        decoded, _ = tr.decode_logs(logs, config, "test")
        return {(*t.key, t.block_hash) for t in decoded}

    # ChainReader
    async def head(self) -> int:
        self.calls += 1
        return self.head_number

    async def block_hash(self, number: int) -> str | None:
        self.calls += 1
        return self.blocks[number].hash if 0 <= number <= self.head_number else None

    async def headers(self, numbers: list[int]) -> dict[int, tuple[str, str] | None]:
        self.calls += 1
        return {n: (self.blocks[n].hash, self.blocks[n].parent) if 0 <= n <= self.head_number
                else None for n in numbers}

    async def transfer_logs(self, start: int, end: int, tokens: list[str],
                            wallets: list[str]) -> list[tr.RawLog]:
        self.calls += 1
        if self.max_range is not None and end - start + 1 > self.max_range:
            raise RangeTooLargeError(f"range {start}..{end} over {self.max_range}")
        out = []
        watched = set(wallets)
        for block in self.blocks[start:end + 1]:
            for log in block.logs:
                sides = {tr.word_to_address(log.topics[1]), tr.word_to_address(log.topics[2])} \
                    if len(log.topics) == 3 else set()
                if log.address in tokens and sides & watched:
                    out.append(log)
        return out


@dataclass
class FakeSink:
    """Keeps the committed stream and state; `fail_next` simulates a crash before a commit."""

    records: list[tr.ChainTransfer] = field(default_factory=list)
    state: st.WatchState | None = None
    fail_next: int = 0
    commits: int = 0

    async def load_state(self) -> st.WatchState | None:
        return None if self.state is None else st.WatchState.from_bytes(self.state.to_bytes())

    async def commit(self, transfers: list[tr.ChainTransfer], state: st.WatchState) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise WatchStateError("simulated crash before commit", retriable=True)
        # Through the wire and back, as Kafka would carry them.
        self.records.extend(transfers)
        self.state = st.WatchState.from_bytes(state.to_bytes())
        self.commits += 1

    def net(self) -> set[tuple[str, int, str, str]]:
        """Transfers a consumer holds after applying the stream: confirmed minus removed."""
        held: set[tuple[str, int, str, str]] = set()
        for record in self.records:
            item = (*record.key, record.block_hash)
            if record.status == "confirmed":
                assert item not in held, f"published twice: {item}"
                held.add(item)
            else:
                assert item in held, f"removed but never confirmed: {item}"
                held.remove(item)
        return held
