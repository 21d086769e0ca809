"""Canonical byte encoding of a committed entry: the input of entry_hash and of its Merkle leaf.

Byte layout, version 1 (every integer big-endian):

    magic            4 bytes  b"SLE\\x01" (format and version)
    then each field below, in this order, by its type:
      str            u32 byte length, then the UTF-8 bytes
      int            u8 sign (0 = zero or positive, 1 = negative), u16 magnitude length,
                     then the magnitude's minimal big-endian bytes (zero has length 0)
      opt str/int    u8 0 when absent; u8 1 then the value as above when present
      map            u32 pair count, then (str key, str value) pairs sorted by key bytes

    fields: entry_id str, command_id str, account_id str, currency str, entry_type str,
            amount_minor int, running_balance_minor int, sequence int,
            batch_id opt str, batch_size opt int, leg_index opt int, reverses_entry_id opt str,
            reference opt str, metadata map, occurred_at_ms opt int, committed_at_ms int,
            partition int, leaf_index int, chain opt str, chain_tx_hash opt str,
            chain_log_index opt int

entry_hash  = SHA-256(canonical bytes)
Merkle leaf = SHA-256(0x00 || canonical bytes)    (RFC 6962, see streams/merkle.py)

Amounts are integer minor units: the currency code fixes the scale, so no decimal formatting
choice can change a hash. Why a custom layout instead of Avro bytes: the Avro wire schema may
evolve (new optional fields, other framings), while a hash must mean the same thing forever.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING

from sardis_ledger.streams.errors import InvariantViolation

if TYPE_CHECKING:
    from sardis_ledger.streams.core import Entry

MAGIC = b"SLE\x01"
INT_MAGNITUDE_BYTES_MAX = 0xFFFF
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")


def _str(out: bytearray, value: str) -> None:
    data = value.encode("utf-8")
    out += _U32.pack(len(data))
    out += data


def _int(out: bytearray, value: int) -> None:
    magnitude = abs(value)
    data = magnitude.to_bytes((magnitude.bit_length() + 7) // 8, "big")
    if len(data) > INT_MAGNITUDE_BYTES_MAX:
        raise InvariantViolation("integer too large for the canonical encoding")
    out.append(1 if value < 0 else 0)
    out += _U16.pack(len(data))
    out += data


def _opt_str(out: bytearray, value: str | None) -> None:
    if value is None:
        out.append(0)
    else:
        out.append(1)
        _str(out, value)


def _opt_int(out: bytearray, value: int | None) -> None:
    if value is None:
        out.append(0)
    else:
        out.append(1)
        _int(out, value)


def _map(out: bytearray, value: Mapping[str, str]) -> None:
    pairs = sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in value.items())
    out += _U32.pack(len(pairs))
    for key, val in pairs:
        out += _U32.pack(len(key))
        out += key
        out += _U32.pack(len(val))
        out += val


def entry_bytes(entry: Entry) -> bytes:
    """The canonical bytes of an entry (all fields but entry_hash and merkle_root)."""
    out = bytearray(MAGIC)
    _str(out, entry.entry_id)
    _str(out, entry.command_id)
    _str(out, entry.account_id)
    _str(out, entry.currency)
    _str(out, entry.entry_type)
    _int(out, entry.amount_minor)
    _int(out, entry.running_balance_minor)
    _int(out, entry.sequence)
    _opt_str(out, entry.batch_id)
    _opt_int(out, entry.batch_size)
    _opt_int(out, entry.leg_index)
    _opt_str(out, entry.reverses_entry_id)
    _opt_str(out, entry.reference)
    _map(out, entry.metadata)
    _opt_int(out, entry.occurred_at_ms)
    _int(out, entry.committed_at_ms)
    _int(out, entry.partition)
    _int(out, entry.leaf_index)
    _opt_str(out, entry.chain)
    _opt_str(out, entry.chain_tx_hash)
    _opt_int(out, entry.chain_log_index)
    return bytes(out)


def entry_hash(canonical: bytes) -> bytes:
    return hashlib.sha256(canonical).digest()
