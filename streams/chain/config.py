"""Watch configuration of `sardis-ledger chain watch`: tokens, wallets, depth; validated up front."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sardis_ledger.streams.chain.errors import ChainConfigError
from sardis_ledger.streams.money import CURRENCY_CODE_LENGTH_MAX, DECIMALS_MAX

CONFIRMATIONS_DEFAULT = 12
# eth_getLogs block span per request. Public providers cap spans (often 2,000-10,000 blocks) or
# result counts; a refused span is halved down to one block, never skipped.
CHUNK_BLOCKS_DEFAULT = 2_000
CHUNK_BLOCKS_MAX = 100_000
POLL_INTERVAL_S_DEFAULT = 2.0
POLL_INTERVAL_S_MIN = 0.01
CONFIRMATIONS_MAX = 10_000
NAME_LENGTH_MAX = 64
ACCOUNT_ID_LENGTH_MAX = 128  # streams.core.ID_LENGTH_MAX: the ledger's own account id limit

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_CURRENCY = re.compile(rf"^[A-Z0-9]{{1,{CURRENCY_CODE_LENGTH_MAX}}}$")
# Names chains are known by on the wire, by chain id; others are called evm-<id>.
CHAIN_NAMES = {1: "ethereum", 10: "optimism", 137: "polygon", 8453: "base", 42161: "arbitrum",
               84532: "base-sepolia", 11155111: "sepolia", 31337: "anvil"}
_FILE_KEYS = {"chain", "watch_id", "confirmations", "start_block", "chunk_blocks",
              "poll_interval_s", "tokens", "wallets"}


def chain_name_for(chain_id: int) -> str:
    return CHAIN_NAMES.get(chain_id, f"evm-{chain_id}")


@dataclass(frozen=True, slots=True)
class Token:
    """A watched ERC-20 contract: the ledger currency its units are and how many decimals."""

    address: str  # lowercase 0x-hex
    currency: str
    decimals: int


@dataclass(frozen=True, slots=True)
class WatchConfig:
    """What one watcher reads. Addresses are kept lowercase (logs carry them lowercase)."""

    tokens: Mapping[str, Token]
    wallets: Mapping[str, str]  # address -> account_id
    chain: str | None = None  # None: named from the node's chain id
    watch_id: str = "default"
    confirmations: int = CONFIRMATIONS_DEFAULT
    start_block: int = 0
    chunk_blocks: int = CHUNK_BLOCKS_DEFAULT
    poll_interval_s: float = POLL_INTERVAL_S_DEFAULT

    def __post_init__(self) -> None:
        if not self.tokens:
            raise ChainConfigError("watch config: no tokens; give at least one token contract")
        if not self.wallets:
            raise ChainConfigError("watch config: no wallets; give at least one watched address")
        if self.chain is not None:
            _check_name("chain", self.chain)
        _check_name("watch_id", self.watch_id)
        _check_int("confirmations", self.confirmations, 0, CONFIRMATIONS_MAX)
        _check_int("start_block", self.start_block, 0, 2**63 - 1)
        _check_int("chunk_blocks", self.chunk_blocks, 1, CHUNK_BLOCKS_MAX)
        if isinstance(self.poll_interval_s, bool) or not isinstance(self.poll_interval_s, int | float) \
                or not self.poll_interval_s >= POLL_INTERVAL_S_MIN:
            raise ChainConfigError(f"watch config: poll_interval_s must be a number >= "
                                   f"{POLL_INTERVAL_S_MIN}, got {self.poll_interval_s!r}")

    def digest(self) -> str:
        """Fingerprint of what is watched, kept with the progress: a changed set is logged."""
        body = {"tokens": sorted((t.address, t.currency, t.decimals) for t in self.tokens.values()),
                "wallets": sorted(self.wallets.items())}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _check_name(what: str, value: object) -> None:
    if not isinstance(value, str) or not value or len(value) > NAME_LENGTH_MAX \
            or not _NAME.match(value):
        raise ChainConfigError(f"watch config: {what} {value!r} must be 1..{NAME_LENGTH_MAX} "
                               "characters from [a-z0-9_.-], starting with a letter or digit")


def _check_int(what: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ChainConfigError(f"watch config: {what} must be a whole number {low}..{high}, "
                               f"got {value!r}")


def normalize_address(value: object, what: str) -> str:
    """Lowercase 0x address; a mixed-case address must carry a valid EIP-55 checksum."""
    from eth_utils import is_checksum_address

    if not isinstance(value, str) or not _ADDRESS.match(value):
        raise ChainConfigError(f"watch config: {what} {value!r} is not a 0x-prefixed 20-byte "
                               "hex address")
    body = value[2:]
    if body != body.lower() and body != body.upper() and not is_checksum_address(value):
        # A mixed-case address with a wrong checksum is usually a typo in one character.
        raise ChainConfigError(f"watch config: {what} {value} has a bad EIP-55 checksum")
    return "0x" + body.lower()


def parse_token(address: object, spec: object) -> Token:
    """A token from `address` and {"currency": "USDC", "decimals": 6} (or "USDC:6")."""
    where = f"token {address}"
    if isinstance(spec, str):
        code, sep, raw = spec.partition(":")
        if not sep:
            raise ChainConfigError(f"watch config: {where}: give CURRENCY:DECIMALS, got {spec!r}")
        try:
            places = int(raw)
        except ValueError as exc:
            raise ChainConfigError(f"watch config: {where}: decimals {raw!r} is not a whole "
                                   "number") from exc
        spec = {"currency": code, "decimals": places}
    if not isinstance(spec, Mapping):
        raise ChainConfigError(f"watch config: {where}: give {{currency, decimals}}")
    unknown = set(spec) - {"currency", "decimals"}
    if unknown:
        raise ChainConfigError(f"watch config: {where}: unknown keys {sorted(unknown)}")
    currency = spec.get("currency")
    if not isinstance(currency, str) or not _CURRENCY.match(currency):
        raise ChainConfigError(f"watch config: {where}: currency {currency!r} must be 1.."
                               f"{CURRENCY_CODE_LENGTH_MAX} upper-case letters or digits")
    decimals = spec.get("decimals")
    if isinstance(decimals, bool) or not isinstance(decimals, int) \
            or not 0 <= decimals <= DECIMALS_MAX:
        # The wire decimal has scale 18: a token with more decimals could not be carried exactly.
        raise ChainConfigError(f"watch config: {where}: decimals must be 0..{DECIMALS_MAX}, "
                               f"got {decimals!r}")
    return Token(normalize_address(address, "token"), currency, decimals)


def _check_account_id(address: str, account_id: object) -> str:
    if not isinstance(account_id, str) or not account_id.strip() \
            or len(account_id) > ACCOUNT_ID_LENGTH_MAX:
        raise ChainConfigError(f"watch config: wallet {address}: account id {account_id!r} must "
                               f"be a non-empty string of at most {ACCOUNT_ID_LENGTH_MAX} characters")
    return account_id


def from_mapping(raw: Mapping[str, Any]) -> WatchConfig:
    """A WatchConfig from a parsed JSON/YAML document; every problem is a ChainConfigError."""
    if not isinstance(raw, Mapping):
        raise ChainConfigError("watch config: the document must be a mapping")
    unknown = set(raw) - _FILE_KEYS
    if unknown:
        raise ChainConfigError(f"watch config: unknown keys {sorted(unknown)} (known: "
                               f"{sorted(_FILE_KEYS)})")
    tokens_raw = raw.get("tokens") or {}
    wallets_raw = raw.get("wallets") or {}
    if not isinstance(tokens_raw, Mapping) or not isinstance(wallets_raw, Mapping):
        raise ChainConfigError("watch config: tokens and wallets must be mappings keyed by address")
    tokens: dict[str, Token] = {}
    for address, spec in tokens_raw.items():
        token = parse_token(address, spec)
        if token.address in tokens:
            raise ChainConfigError(f"watch config: token {token.address} is listed twice")
        tokens[token.address] = token
    wallets: dict[str, str] = {}
    for address, account_id in wallets_raw.items():
        normalized = normalize_address(address, "wallet")
        if normalized in wallets:
            raise ChainConfigError(f"watch config: wallet {normalized} is listed twice")
        wallets[normalized] = _check_account_id(normalized, account_id)
    options = {key: raw[key] for key in ("chain", "watch_id", "confirmations", "start_block",
                                         "chunk_blocks", "poll_interval_s") if key in raw}
    return WatchConfig(tokens=tokens, wallets=wallets, **options)


def load(path: Path) -> dict[str, Any]:
    """Parse a watch config file: JSON (.json) or YAML (anything else)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ChainConfigError(f"watch config {path}: {exc.strerror or exc}") from exc
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # JSON and YAML parsers raise their own error kinds
        raise ChainConfigError(f"watch config {path}: not valid {path.suffix or 'YAML'}: {exc}") \
            from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ChainConfigError(f"watch config {path}: the document must be a mapping")
    return data


def build(path: Path | None = None, *, tokens: list[str] | None = None,
          wallets: list[str] | None = None, **options: Any) -> WatchConfig:
    """A WatchConfig from an optional file plus CLI values (`ADDR=CURRENCY:DECIMALS`,
    `ADDR=ACCOUNT`, options); CLI values win over the file."""
    raw: dict[str, Any] = load(path) if path is not None else {}
    token_map = _by_lower_key(raw.get("tokens"), "tokens")
    wallet_map = _by_lower_key(raw.get("wallets"), "wallets")
    for item in tokens or []:
        address, sep, spec = item.partition("=")
        if not sep:
            raise ChainConfigError(f"--token {item!r}: use ADDRESS=CURRENCY:DECIMALS")
        _put_override(token_map, address, spec)
    for item in wallets or []:
        address, sep, account_id = item.partition("=")
        if not sep:
            raise ChainConfigError(f"--wallet {item!r}: use ADDRESS=ACCOUNT_ID")
        _put_override(wallet_map, address, account_id)
    raw["tokens"] = token_map
    raw["wallets"] = wallet_map
    raw.update({k: v for k, v in options.items() if v is not None})
    return from_mapping(raw)


def _by_lower_key(value: object, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ChainConfigError(f"watch config: {what} must be a mapping keyed by address")
    return dict(value)


def _put_override(target: dict[str, Any], address: str, value: str) -> None:
    """A CLI value replaces the file's entry for the same address, however either is cased."""
    for existing in [key for key in target if isinstance(key, str) and key.lower() == address.lower()]:
        del target[existing]
    target[address] = value
