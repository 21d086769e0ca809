"""Signing, sending and deploying with web3 (async): the account, nonces, receipts, error kinds."""

from __future__ import annotations

import asyncio
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from sardis_ledger.streams.chain.errors import ChainConfigError, ChainRpcError
from sardis_ledger.streams.chain.solc import CompiledContract
from sardis_ledger.streams.config import redact_url, redact_urls_in

PRIVATE_KEY_ENV = "SARDIS_CHAIN_PRIVATE_KEY"
PRIVATE_KEY_FILE_ENV = "SARDIS_CHAIN_PRIVATE_KEY_FILE"
KEY_FILE_BYTES_MAX = 256
# anvil's well-known account 0 (from its public test mnemonic): holds only test ether on a local
# dev node, and is used ONLY when the node is chain 31337 on a loopback address.
ANVIL_DEV_PRIVATE_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
DEV_CHAIN_ID = 31337
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
RECEIPT_TIMEOUT_S = 120.0
RECEIPT_POLL_S = 0.1
GAS_MARGIN_PERCENT = 20  # estimate_gas is exact for the state it ran on; state may change first
RPC_TIMEOUT_S = 30.0
_PRIVATE_KEY = re.compile(r"^(0x)?[0-9a-fA-F]{64}$")


def connect(rpc_url: str, timeout_s: float = RPC_TIMEOUT_S) -> Any:
    """An AsyncWeb3 over HTTP with a request timeout."""
    import aiohttp
    from web3 import AsyncHTTPProvider, AsyncWeb3

    return AsyncWeb3(AsyncHTTPProvider(
        rpc_url, request_kwargs={"timeout": aiohttp.ClientTimeout(total=timeout_s)}))


def is_dev_node(rpc_url: str, chain_id: int) -> bool:
    return chain_id == DEV_CHAIN_ID and urlparse(rpc_url).hostname in LOOPBACK_HOSTS


def private_key(rpc_url: str, chain_id: int, env: Mapping[str, str] | None = None) -> str:
    """The signing key: SARDIS_CHAIN_PRIVATE_KEY, or anvil's dev key on a local dev node only."""
    env = os.environ if env is None else env
    key = env.get(PRIVATE_KEY_ENV, "").strip()
    path = env.get(PRIVATE_KEY_FILE_ENV, "").strip()
    if key and path:
        raise ChainConfigError(f"set {PRIVATE_KEY_ENV} or {PRIVATE_KEY_FILE_ENV}, not both")
    if path:
        key = read_key_file(path)
    if key:
        if not _PRIVATE_KEY.match(key):
            raise ChainConfigError(f"{PRIVATE_KEY_ENV} is not 32 bytes of hex")
        return key if key.startswith("0x") else "0x" + key
    if is_dev_node(rpc_url, chain_id):
        return ANVIL_DEV_PRIVATE_KEY
    raise ChainConfigError(f"{PRIVATE_KEY_ENV} (or {PRIVATE_KEY_FILE_ENV}) is not set: it is "
                           f"required for chain {chain_id} at {redact_url(rpc_url)} (the anvil "
                           f"dev key is used only for chain {DEV_CHAIN_ID} on a loopback address)")


def read_key_file(path: str) -> str:
    """The key in `path`, which only its owner may read or write (mode 0600 or stricter)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ChainConfigError(f"{PRIVATE_KEY_FILE_ENV}={path}: cannot open it ({exc.strerror})") \
            from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ChainConfigError(f"{PRIVATE_KEY_FILE_ENV}={path} is not a regular file")
        if info.st_mode & 0o077 or info.st_uid != os.geteuid():
            raise ChainConfigError(
                f"{PRIVATE_KEY_FILE_ENV}={path} has mode {stat.S_IMODE(info.st_mode):04o} and owner "
                f"uid {info.st_uid}: it must belong to this user (uid {os.geteuid()}) with mode "
                "0600 or stricter (chmod 600)")
        data = handle.read(KEY_FILE_BYTES_MAX + 1)
    if len(data) > KEY_FILE_BYTES_MAX:
        raise ChainConfigError(f"{PRIVATE_KEY_FILE_ENV}={path} is longer than a key")
    return data.decode("ascii", errors="replace").strip()


def rpc_error(what: str, exc: BaseException) -> ChainRpcError:
    """A web3/aiohttp failure as a ChainRpcError; retriable for transport trouble only."""
    import aiohttp
    from web3 import exceptions as w3e

    retriable = isinstance(exc, aiohttp.ClientError | TimeoutError | ConnectionError | OSError
                           | w3e.TooManyRequests | w3e.RequestTimedOut | w3e.TimeExhausted
                           | w3e.ProviderConnectionError)
    # web3's HTTP errors quote the URL they called, API key and all.
    return ChainRpcError(redact_urls_in(f"{what}: {exc!r}"), retriable=retriable)


@dataclass(slots=True)
class Sender:
    """One signing account on one node; sends are serialized so nonces never collide."""

    w3: Any
    account: Any
    chain_id: int
    _lock: asyncio.Lock

    @classmethod
    async def create(cls, rpc_url: str, env: Mapping[str, str] | None = None,
                     w3: Any = None) -> Sender:
        from eth_account import Account

        w3 = w3 or connect(rpc_url)
        try:
            chain_id = int(await w3.eth.chain_id)
        except Exception as exc:  # node unreachable or not an Ethereum node
            raise rpc_error(f"eth_chainId on {redact_url(rpc_url)}", exc) from exc
        account = Account.from_key(private_key(rpc_url, chain_id, env))
        return cls(w3, account, chain_id, asyncio.Lock())

    @property
    def address(self) -> str:
        return str(self.account.address)

    async def close(self) -> None:
        await self.w3.provider.disconnect()

    async def send(self, call: Any, what: str) -> dict[str, Any]:
        """Sign and send a contract call or constructor (anything with build_transaction) and
        return its receipt; a reverted transaction is a ChainRpcError naming `what`."""
        from web3 import exceptions as w3e

        async with self._lock:
            try:
                nonce = await self.w3.eth.get_transaction_count(self.account.address, "pending")
                tx = await call.build_transaction({"from": self.account.address, "nonce": nonce,
                                                   "chainId": self.chain_id})
                tx["gas"] = int(tx["gas"]) * (100 + GAS_MARGIN_PERCENT) // 100
                signed = self.account.sign_transaction(tx)
                tx_hash = await self.w3.eth.send_raw_transaction(signed.raw_transaction)
                receipt = await self.w3.eth.wait_for_transaction_receipt(
                    tx_hash, timeout=RECEIPT_TIMEOUT_S, poll_latency=RECEIPT_POLL_S)
            except w3e.ContractLogicError as exc:
                # Reverted in gas estimation: the contract refused the call (never retriable).
                raise ChainRpcError(f"{what} reverted: {exc}", retriable=False) from exc
            except Exception as exc:  # classified by rpc_error
                raise rpc_error(what, exc) from exc
        if receipt["status"] != 1:
            raise ChainRpcError(f"{what} reverted in transaction 0x{bytes(receipt['transactionHash']).hex()}",
                                retriable=False)
        return dict(receipt)

    async def deploy(self, compiled: CompiledContract, *args: Any) -> tuple[str, dict[str, Any]]:
        """Deploy a compiled contract; (lowercase address, receipt)."""
        factory = self.w3.eth.contract(abi=compiled.abi, bytecode=compiled.bytecode)
        receipt = await self.send(factory.constructor(*args), f"deploying {compiled.name}")
        return str(receipt["contractAddress"]).lower(), receipt

    def contract(self, compiled: CompiledContract, address: str) -> Any:
        from web3 import AsyncWeb3

        return self.w3.eth.contract(address=AsyncWeb3.to_checksum_address(address),
                                    abi=compiled.abi)
