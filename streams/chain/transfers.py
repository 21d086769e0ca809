"""Pure decoding of ERC-20 Transfer logs into ChainTransfer records with exact amounts."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sardis_ledger.streams.chain.config import Token, WatchConfig
from sardis_ledger.streams.chain.errors import LogDecodeError
from sardis_ledger.streams.money import DECIMALS_MAX, WIRE_PRECISION, to_major, to_minor
from sardis_ledger.streams.money import to_wire as money_to_wire

# keccak256("Transfer(address,address,uint256)"), the ERC-20 event's topic 0.
TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
WORD_SIZE_BYTES = 32
ADDRESS_SIZE_BYTES = 20
UINT256_MAX = 2**256 - 1
# ERC-20 Transfer: topics [signature, from, to] and data = the value word. ERC-721 shares the
# signature but indexes the token id (4 topics, no data), so the shape tells them apart.
ERC20_TOPIC_COUNT = 3


class Direction(StrEnum):
    IN = "in"
    OUT = "out"


class TransferStatus(StrEnum):
    CONFIRMED = "confirmed"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class RawLog:
    """An eth_getLogs entry, normalized: lowercase 0x-hex strings, ints, raw topic/data bytes."""

    address: str
    topics: tuple[bytes, ...]
    data: bytes
    block_number: int
    block_hash: str
    tx_hash: str
    log_index: int


@dataclass(frozen=True, slots=True)
class ChainTransfer:
    """One side of a Transfer log that touches a watched wallet (the ChainTransfer.avsc fields)."""

    chain: str
    block_number: int
    block_hash: str
    tx_hash: str
    log_index: int
    token: str
    from_address: str
    to_address: str
    amount: Decimal  # major units, exactly value / 10**decimals
    currency: str
    account_id: str
    direction: str
    status: str

    @property
    def key(self) -> tuple[str, int, str]:
        """Identity across restarts: one transfer per (tx, log, side)."""
        return (self.tx_hash, self.log_index, self.direction)

    def removed(self) -> ChainTransfer:
        return replace(self, status=TransferStatus.REMOVED.value)


def hex0x(value: bytes) -> str:
    return "0x" + value.hex()


def word_to_address(word: bytes) -> str:
    """The address in a 32-byte topic word; LogDecodeError if the upper 12 bytes are not zero."""
    if len(word) != WORD_SIZE_BYTES:
        raise LogDecodeError(f"topic of {len(word)} bytes, not {WORD_SIZE_BYTES}")
    if any(word[: WORD_SIZE_BYTES - ADDRESS_SIZE_BYTES]):
        raise LogDecodeError(f"topic {word.hex()} is not an address (upper bytes set)")
    return hex0x(word[WORD_SIZE_BYTES - ADDRESS_SIZE_BYTES:])


def address_to_topic(address: str) -> str:
    """The 32-byte topic word of an address, as eth_getLogs filters take it."""
    return "0x" + "0" * 24 + address[2:].lower()


def scale_amount(value: int, decimals: int) -> Decimal:
    """value / 10**decimals exactly (digit tuple, no context rounding); must fit the wire decimal."""
    if not 0 <= value <= UINT256_MAX:
        raise LogDecodeError(f"value {value} is not a uint256")
    if not 0 <= decimals <= DECIMALS_MAX:
        raise LogDecodeError(f"token decimals {decimals} is outside 0..{DECIMALS_MAX}")
    if value * 10 ** (DECIMALS_MAX - decimals) >= 10**WIRE_PRECISION:
        # The wire decimal holds < 10**42 major units; a bigger value cannot be carried exactly.
        raise LogDecodeError(f"value {value} with {decimals} decimals exceeds the wire decimal "
                             f"(precision {WIRE_PRECISION}, scale {DECIMALS_MAX})")
    return to_major(value, decimals)


def is_erc20_transfer(log: RawLog) -> bool:
    return (len(log.topics) == ERC20_TOPIC_COUNT and hex0x(log.topics[0]) == TRANSFER_TOPIC
            and len(log.data) == WORD_SIZE_BYTES)


def decode_transfer(log: RawLog, token: Token, wallets: dict[str, str] | Any,
                    chain: str) -> list[ChainTransfer]:
    """The ChainTransfer of each watched side of one ERC-20 Transfer log (0, 1 or 2 records:
    a transfer between two watched wallets is an `out` for one and an `in` for the other)."""
    if log.address != token.address:
        raise LogDecodeError(f"log of {log.address} decoded as token {token.address}")
    if not is_erc20_transfer(log):
        raise LogDecodeError(f"log {log.tx_hash}:{log.log_index} of {log.address} is not an "
                             "ERC-20 Transfer (topics [Transfer, from, to], 32-byte value)")
    from_address = word_to_address(log.topics[1])
    to_address = word_to_address(log.topics[2])
    amount = scale_amount(int.from_bytes(log.data, "big"), token.decimals)
    out: list[ChainTransfer] = []
    for address, direction in ((from_address, Direction.OUT), (to_address, Direction.IN)):
        account_id = wallets.get(address)
        if account_id is None:
            continue
        out.append(ChainTransfer(
            chain=chain, block_number=log.block_number, block_hash=log.block_hash,
            tx_hash=log.tx_hash, log_index=log.log_index, token=token.address,
            from_address=from_address, to_address=to_address, amount=amount,
            currency=token.currency, account_id=account_id, direction=direction.value,
            status=TransferStatus.CONFIRMED.value))
    return out


def decode_logs(logs: list[RawLog], config: WatchConfig, chain: str) -> tuple[list[ChainTransfer], int]:
    """Transfers of every watched side of `logs`, in chain order, and how many logs were not
    ERC-20 shaped (counted, not fatal: an NFT contract configured by mistake must not stop
    the watcher, but a real ERC-20 log that cannot be carried exactly raises)."""
    out: list[ChainTransfer] = []
    skipped = 0
    for log in sorted(logs, key=lambda item: (item.block_number, item.log_index)):
        token = config.tokens.get(log.address)
        if token is None:
            continue  # the node answered for a contract we did not ask about
        if not is_erc20_transfer(log):
            skipped += 1
            continue
        out.extend(decode_transfer(log, token, config.wallets, chain))
    return out, skipped


def to_wire(transfer: ChainTransfer) -> dict[str, Any]:
    """The Avro ChainTransfer record; amount at the wire scale (18), exact."""
    minor = to_minor(transfer.amount, DECIMALS_MAX)
    if minor is None:
        raise LogDecodeError(f"{transfer.amount} has more than {DECIMALS_MAX} decimals")
    return {
        "chain": transfer.chain,
        "block_number": transfer.block_number,
        "block_hash": transfer.block_hash,
        "tx_hash": transfer.tx_hash,
        "log_index": transfer.log_index,
        "token": transfer.token,
        "from_address": transfer.from_address,
        "to_address": transfer.to_address,
        "amount": money_to_wire(minor, DECIMALS_MAX),
        "currency": transfer.currency,
        "account_id": transfer.account_id,
        "direction": transfer.direction,
        "status": transfer.status,
    }


def from_wire(record: dict[str, Any]) -> ChainTransfer:
    """A ChainTransfer from a decoded Avro record (amount as read: at the wire scale, 18)."""
    return ChainTransfer(**{item.name: record[item.name] for item in fields(ChainTransfer)})


def to_json(transfer: ChainTransfer) -> list[Any]:
    """Compact JSON form kept in the watcher's progress record (amount as an exact string)."""
    return [transfer.chain, transfer.block_number, transfer.block_hash, transfer.tx_hash,
            transfer.log_index, transfer.token, transfer.from_address, transfer.to_address,
            str(transfer.amount), transfer.currency, transfer.account_id, transfer.direction,
            transfer.status]


def from_json(item: list[Any]) -> ChainTransfer:
    (chain, block_number, block_hash, tx_hash, log_index, token, from_address, to_address, amount,
     currency, account_id, direction, status) = item
    return ChainTransfer(chain, block_number, block_hash, tx_hash, log_index, token, from_address,
                         to_address, Decimal(amount), currency, account_id, direction, status)
