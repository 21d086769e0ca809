"""The demo's chain part: a token on anvil, watched transfers, one planted discrepancy of each kind."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

from sardis_ledger.streams.chain import eth
from sardis_ledger.streams.chain.anchor import read_records
from sardis_ledger.streams.chain.solc import compile_contract
from sardis_ledger.streams.client import LedgerClient
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.topics import LedgerTopic

TOKEN_DECIMALS: Final = 6
UNITS: Final = 10**TOKEN_DECIMALS
# The second watched wallet: an address nobody holds a key for (it only receives).
VAULT_ADDRESS: Final = "0x00000000000000000000000000000000000da117"
STRANGER_ADDRESS: Final = "0x000000000000000000000000000000000000beef"
DISCREPANCY_TYPES: Final = ("amount_mismatch", "currency_mismatch", "account_mismatch",
                            "missing_on_chain", "missing_in_ledger", "duplicate_entry",
                            "status_mismatch")
WATCH_POLL_S: Final = 0.5
DISCREPANCY_WAIT_S: Final = 90.0
PUBLISHED_WAIT_S: Final = 30.0


@dataclass(slots=True)
class Chain:
    """The demo's token and the transfers it made: name -> (tx hash, log index)."""

    sender: eth.Sender
    token: Any
    token_address: str
    treasury: str
    start_block: int
    transfers: dict[str, tuple[str, int]]


async def deploy(settings: Settings) -> Chain:
    """Deploy a TestToken with the dev account (also the watched treasury wallet)."""
    sender = await eth.Sender.create(settings.chain_rpc)
    start_block = int(await sender.w3.eth.block_number) + 1
    compiled = compile_contract("TestToken")
    address, _ = await sender.deploy(compiled, "Demo USD Coin", "dUSDC", TOKEN_DECIMALS)
    return Chain(sender, sender.contract(compiled, address), address, sender.address.lower(),
                 start_block, {})


def write_watch_config(chain: Chain, path: Path) -> Path:
    path.write_text(json.dumps({
        "chain": "anvil", "watch_id": "demo", "confirmations": 0, "start_block": chain.start_block,
        "poll_interval_s": WATCH_POLL_S, "chunk_blocks": 500,
        "tokens": {chain.token_address: {"currency": "USDC", "decimals": TOKEN_DECIMALS}},
        "wallets": {chain.treasury: "acc_treasury", VAULT_ADDRESS: "acc_vault"}}))
    return path


async def _send(chain: Chain, name: str, call: Any) -> None:
    receipt = await chain.sender.send(call, name)
    [log] = receipt["logs"]
    chain.transfers[name] = ("0x" + bytes(receipt["transactionHash"]).hex(), int(log["logIndex"]))


async def make_transfers(chain: Chain) -> None:
    """One on-chain transfer per case; the treasury first receives what it later sends."""
    from web3 import AsyncWeb3

    vault = AsyncWeb3.to_checksum_address(VAULT_ADDRESS)
    treasury = AsyncWeb3.to_checksum_address(chain.treasury)
    mint, transfer = chain.token.functions.mint, chain.token.functions.transfer
    await _send(chain, "funding", mint(treasury, 100 * UNITS))
    await _send(chain, "matched", transfer(vault, 10 * UNITS))
    await _send(chain, "amount", mint(vault, 4 * UNITS))
    await _send(chain, "currency", mint(vault, 5 * UNITS))
    await _send(chain, "account", mint(treasury, 6 * UNITS))
    await _send(chain, "missing_in_ledger", mint(vault, 7 * UNITS))
    await _send(chain, "duplicate", mint(treasury, 8 * UNITS))
    await _send(chain, "orphaned", mint(treasury, 10 * UNITS))


# (command id, entry type, account, amount, transfer, currency): how the ledger booked the
# transfers, with one mistake of each kind planted.
BOOKINGS: Final = (
    ("chain-funding", "credit", "acc_treasury", "100", "funding", "USDC"),
    ("chain-matched-out", "debit", "acc_treasury", "10", "matched", "USDC"),
    ("chain-matched-in", "credit", "acc_vault", "10", "matched", "USDC"),
    ("chain-amount", "credit", "acc_vault", "4.000001", "amount", "USDC"),
    ("chain-currency", "credit", "acc_vault", "5", "currency", "USDT"),
    ("chain-account", "credit", "acc_vault", "6", "account", "USDC"),
    ("chain-dup-1", "credit", "acc_treasury", "8", "duplicate", "USDC"),
    ("chain-dup-2", "credit", "acc_treasury", "8", "duplicate", "USDC"),
    ("chain-orphaned", "credit", "acc_treasury", "10", "orphaned", "USDC"),
    ("chain-not-on-chain", "credit", "acc_treasury", "9", None, "USDC"),
)
NOT_ON_CHAIN_TX: Final = "0x" + "5a" * 32


async def book(settings: Settings, chain: Chain) -> int:
    """Post the bookings (with their chain references); the number committed."""
    committed = 0
    async with LedgerClient(settings) as ledger:
        for command_id, entry_type, account, amount, name, currency in BOOKINGS:
            tx_hash, log_index = chain.transfers[name] if name else (NOT_ON_CHAIN_TX, 0)
            record = {"command_id": command_id, "account_id": account, "currency": currency,
                      "entry_type": entry_type, "amount": Decimal(amount), "reference": None,
                      "metadata": {}, "expected_sequence": None, "allow_overdraft": True,
                      "occurred_at": None, "chain": "anvil", "chain_tx_hash": tx_hash,
                      "chain_log_index": log_index}
            ledger.entry_of(await ledger.wait(await ledger.send_command(record), command_id))
            committed += 1
    return committed


async def orphan_last_block(settings: Settings, chain: Chain) -> None:
    """Once the watcher published the "orphaned" transfer, replace its block (anvil_reorg) with
    one holding an unwatched transfer: the watcher publishes it `removed`."""
    tx_hash = chain.transfers["orphaned"][0]
    deadline = time.monotonic() + PUBLISHED_WAIT_S
    while not any(r.get("tx_hash") == tx_hash
                  for _, r in await read_records(settings, LedgerTopic.CHAIN_TRANSFERS)):
        if time.monotonic() > deadline:
            raise TimeoutError("the watcher did not publish the transfer to orphan")
        await asyncio.sleep(WATCH_POLL_S)
    replacement = {"from": chain.treasury, "to": chain.token_address,
                   "data": chain.token.encode_abi("mint", [
                       _checksum(STRANGER_ADDRESS), 11 * UNITS])}
    await chain.sender.w3.provider.make_request("anvil_reorg", [1, [[replacement, 0]]])


def _checksum(address: str) -> str:
    from web3 import AsyncWeb3

    return str(AsyncWeb3.to_checksum_address(address))


async def mine(chain: Chain, blocks: int) -> None:
    await chain.sender.w3.provider.make_request("anvil_mine", [hex(blocks)])


async def open_discrepancies(settings: Settings, wait_s: float = DISCREPANCY_WAIT_S,
                             tick: Any = None) -> dict[str, dict[str, Any]]:
    """The open discrepancies on ledger.discrepancies by type, once every type is there (or the
    time is up); `tick` (async) runs between reads (mines blocks for the grace window)."""
    deadline = time.monotonic() + wait_s
    while True:
        found = {r["type"]: r for _, r in await read_records(settings, LedgerTopic.DISCREPANCIES)
                 if r.get("status") == "open"}
        if set(DISCREPANCY_TYPES) <= set(found) or time.monotonic() > deadline:
            return found
        if tick is not None:
            await tick()
        await asyncio.sleep(1.0)
