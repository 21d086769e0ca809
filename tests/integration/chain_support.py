"""Helpers for chain tests on anvil: raw JSON-RPC, a deployed TestToken, many transfers fast."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from sardis_ledger.streams.chain import eth
from sardis_ledger.streams.chain.solc import compile_contract
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.errors import LedgerError
from sardis_ledger.streams.worker_process import ChildProcess

TRANSFER_SELECTOR = "a9059cbb"  # transfer(address,uint256)
MINT_SELECTOR = "40c10f19"  # mint(address,uint256)
SEND_BATCH_SIZE = 200  # JSON-RPC requests per HTTP batch
RPC_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 60.0

_ids = itertools.count(1)


def _selector(signature: str) -> str:
    from eth_utils import keccak

    return keccak(text=signature)[:4].hex()


TRANSFER_MANY_SELECTOR = _selector("transferMany(address[],uint256[])")


class RpcError(LedgerError):
    """A JSON-RPC error answer in a test helper."""


async def rpc(url: str, method: str, params: list[Any] | None = None) -> Any:
    async with aiohttp.ClientSession() as session:
        return (await rpc_batch(session, url, [(method, params or [])]))[0]


async def rpc_batch(session: aiohttp.ClientSession, url: str,
                    calls: list[tuple[str, list[Any]]]) -> list[Any]:
    if not calls:
        return []  # an empty JSON-RPC batch is an error, not an empty answer
    body = [{"jsonrpc": "2.0", "id": next(_ids), "method": m, "params": p} for m, p in calls]
    async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=RPC_TIMEOUT_S)) as r:
        replies = await r.json()
    by_id = {reply["id"]: reply for reply in replies}
    out = []
    for request in body:
        reply = by_id[request["id"]]
        if "error" in reply:
            raise RpcError(f"{request['method']}: {reply['error']}")
        out.append(reply["result"])
    return out


def _word(value: int) -> str:
    return f"{value:064x}"


def _address_word(address: str) -> str:
    return "0" * 24 + address[2:].lower()


def transfer_data(to: str, value: int) -> str:
    return "0x" + TRANSFER_SELECTOR + _address_word(to) + _word(value)


def mint_data(to: str, value: int) -> str:
    return "0x" + MINT_SELECTOR + _address_word(to) + _word(value)


def transfer_many_data(pairs: list[tuple[str, int]]) -> str:
    count = len(pairs)
    head_size = 2 * 32
    to_offset = head_size
    values_offset = head_size + 32 + 32 * count
    parts = [_word(to_offset), _word(values_offset), _word(count)]
    parts += [_address_word(to) for to, _ in pairs]
    parts += [_word(count)] + [_word(value) for _, value in pairs]
    return "0x" + TRANSFER_MANY_SELECTOR + "".join(parts)


@dataclass(slots=True)
class Token:
    address: str
    decimals: int


async def deploy_token(settings: Settings, symbol: str = "TUSD", decimals: int = 6) -> Token:
    """A fresh TestToken compiled from Solidity, deployed by the dev account."""
    sender = await eth.Sender.create(settings.chain_rpc)
    try:
        address, _ = await sender.deploy(compile_contract("TestToken"), f"Test {symbol}", symbol,
                                         decimals)
    finally:
        await sender.close()
    return Token(address, decimals)


async def accounts(settings: Settings) -> list[str]:
    return [a.lower() for a in await rpc(settings.chain_rpc, "eth_accounts")]


async def send_all(settings: Settings, txs: list[dict[str, Any]],
                   nonces: dict[str, int] | None = None) -> list[str]:
    """eth_sendTransaction from anvil's unlocked accounts, with explicit nonces; tx hashes.

    anvil mines each transaction into its own block (automine), in order.
    """
    hashes: list[str] = []
    async with aiohttp.ClientSession() as session:
        # Nonces anvil picks itself can collide under load: set them.
        # Pass the same `nonces` to consecutive calls: the node's pending count can lag behind
        # transactions it is still mining.
        nonces = {} if nonces is None else nonces
        senders = sorted({tx["from"] for tx in txs} - set(nonces))
        counts = await rpc_batch(session, settings.chain_rpc,
                                 [("eth_getTransactionCount", [sender, "pending"])
                                  for sender in senders])
        nonces.update({sender: int(count, 16) for sender, count in zip(senders, counts, strict=True)})
        numbered = []
        for tx in txs:
            numbered.append({**tx, "nonce": hex(nonces[tx["from"]])})
            nonces[tx["from"]] += 1
        # One request at a time: anvil runs the requests of a batch concurrently and then
        # answers "replacement transaction underpriced" for nonces it reorders.
        for tx in numbered:
            hashes += await rpc_batch(session, settings.chain_rpc, [("eth_sendTransaction", [tx])])
    return hashes


async def mint(settings: Settings, token: Token, to: str, value: int, minter: str) -> str:
    return (await send_all(settings, [{"from": minter, "to": token.address,
                                       "data": mint_data(to, value)}]))[0]


def transfer_tx(token: Token, sender: str, to: str, value: int) -> dict[str, Any]:
    return {"from": sender, "to": token.address, "data": transfer_data(to, value), "gas": hex(100_000)}


def transfer_many_tx(token: Token, sender: str, pairs: list[tuple[str, int]]) -> dict[str, Any]:
    return {"from": sender, "to": token.address, "data": transfer_many_data(pairs),
            "gas": hex(60_000 + 40_000 * len(pairs))}


async def receipts(settings: Settings, hashes: list[str]) -> list[dict[str, Any]]:
    """Receipts of mined transactions, waiting for those anvil has not mined yet."""
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + RPC_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while len(found) < len(hashes):
            missing = [h for h in hashes if h not in found]
            for start in range(0, len(missing), SEND_BATCH_SIZE):
                chunk = missing[start:start + SEND_BATCH_SIZE]
                answers = await rpc_batch(session, settings.chain_rpc,
                                          [("eth_getTransactionReceipt", [h]) for h in chunk])
                found.update({h: r for h, r in zip(chunk, answers, strict=True) if r is not None})
            if len(found) < len(hashes):
                if time.monotonic() > deadline:
                    raise RpcError(f"{len(hashes) - len(found)} transactions not mined")
                await asyncio.sleep(0.1)
    return [found[h] for h in hashes]


async def wait_pool_empty(settings: Settings, timeout_s: float = RPC_TIMEOUT_S) -> None:
    """Until anvil has mined every pending transaction."""
    deadline = time.monotonic() + timeout_s
    while int((await rpc(settings.chain_rpc, "txpool_status"))["pending"], 16):
        if time.monotonic() > deadline:
            raise RpcError(f"anvil still has pending transactions after {timeout_s:.0f}s")
        await asyncio.sleep(0.1)


async def block_number(settings: Settings) -> int:
    return int(await rpc(settings.chain_rpc, "eth_blockNumber"), 16)


async def mine(settings: Settings, blocks: int) -> None:
    await rpc(settings.chain_rpc, "anvil_mine", [hex(blocks)])


def write_config(path: Path, token: Token, wallets: dict[str, str], **options: Any) -> Path:
    path.write_text(json.dumps({"chain": "anvil", "tokens": {token.address: {
        "currency": "USDC", "decimals": token.decimals}}, "wallets": wallets, **options}))
    return path


class WatcherProcess(ChildProcess):
    """`sardis-ledger chain watch --config CONFIG` as a child process."""

    def __init__(self, settings: Settings, config: Path, log_dir: Path, name: str = "watch") -> None:
        from sardis_ledger.streams.chain.watch import READY_MARKER

        self.config = config
        super().__init__(settings, ["chain", "watch", "--config", str(config), "--loglevel", "info"],
                         READY_MARKER, log_dir=log_dir, name=name, ready_timeout_s=READY_TIMEOUT_S)
