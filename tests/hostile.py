"""Hostile records for the trust-boundary tests: forged internal records and mutated records of
every type, none of which is a valid client command (so none may have an effect)."""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

import fastavro

from sardis_ledger.schemas.codec import SINGLE_OBJECT_MARKER, AvroCodec, load_schemas
from sardis_ledger.streams import batches, core
from sardis_ledger.streams.errors import CodecError
from sardis_ledger.streams.money import Currency

NAMESPACE = "sardis.ledger"
NOW_MS = 1_767_225_600_000
HEX64 = "ab" * 32
TX = "0x" + "cd" * 32

HOSTILE_STRINGS = ["", "x" * 10_000, "a|b", "\x00", "\n", "USD", "reversal", "post", "void",
                   "posted", "reserved", "refused", "ent_" + "0" * 32, "zz" * 32, "0" * 64, "ETH",
                   "mint", "insufficient_funds", "bat_1:rollback:r", "mallory"]
HOSTILE_INTS = [0, 1, -1, 2, 7, 999, 1000, 2**31 - 1, -(2**31)]
HOSTILE_LONGS = [0, -1, 2**63 - 1, -(2**63), NOW_MS, 2**40]
HOSTILE_DECIMALS = [Decimal(0), Decimal(-500), Decimal("1e41"), Decimal("0.000000000000000001"),
                    Decimal("1.005"), Decimal("1000000")]


def examples(account: str, partition: int, batch_id: str) -> list[tuple[str, dict[str, Any]]]:
    """A valid record of every input type (internal ones as a worker would write them)."""
    leg = {"account_id": account, "currency": "USD", "entry_type": "debit",
           "amount": Decimal("1"), "reference": None, "metadata": {}, "allow_overdraft": False}
    entry = {"entry_id": core.entry_id_for("c"), "command_id": "c", "account_id": account,
             "currency": "USD", "entry_type": "credit", "amount": Decimal("5"),
             "running_balance": Decimal("5"), "sequence": 1, "batch_id": None, "batch_size": None,
             "leg_index": None, "reverses_entry_id": None, "reference": None, "metadata": {},
             "occurred_at": None, "committed_at": NOW_MS, "partition": partition,
             "leaf_index": 0, "entry_hash": HEX64, "merkle_root": HEX64, "chain": "base",
             "chain_tx_hash": TX, "chain_log_index": 1}
    return [
        ("PostEntry", {"command_id": "c1", "account_id": account, "currency": "USD",
                       "entry_type": "credit", "amount": Decimal("1.50"), "reference": "r",
                       "metadata": {"k": "v"}, "expected_sequence": None,
                       "allow_overdraft": False, "occurred_at": None, "chain": None,
                       "chain_tx_hash": None, "chain_log_index": None}),
        ("SubmitBatch", {"batch_id": batch_id, "legs": [leg, {**leg, "entry_type": "credit"}],
                         "require_balanced": True, "timeout_ms": 1000}),
        ("RollbackBatch", {"command_id": "rb", "batch_id": batch_id, "reason": "r",
                           "force": False}),
        ("ReserveLeg", {"batch_id": batch_id, "leg_index": 0, "batch_size": 2,
                        "coordinator_partition": partition, "sign": -1,
                        "reverses_entry_id": None, **leg}),
        ("SettleLeg", {"batch_id": batch_id, "leg_index": 0, "account_id": account,
                       "currency": "USD", "action": "post", "coordinator_partition": partition}),
        ("LegReport", {"batch_id": batch_id, "leg_index": 0, "kind": "posted", "reason": None,
                       "detail": None, "entry": entry}),
        ("BatchTick", {"partition": partition, "now": NOW_MS}),
        ("ChainTransfer", {"chain": "base", "block_number": 19, "block_hash": "0x" + "ab" * 32,
                           "tx_hash": TX, "log_index": 1, "token": "0x" + "12" * 20,
                           "from_address": "0x" + "34" * 20, "to_address": "0x" + "56" * 20,
                           "amount": Decimal("5"), "currency": "USD", "account_id": account,
                           "direction": "in", "status": "confirmed"}),
        ("Entry", entry),
        ("ReconcileTick", {"partition": partition, "now": NOW_MS, "chain_head_block": 20}),
    ]


def _hostile_value(schema: Any, rng: random.Random) -> Any:
    if isinstance(schema, list):
        branch = rng.choice(schema)
        return None if branch == "null" else _hostile_value(branch, rng)
    kind = schema.get("type") if isinstance(schema, dict) else schema
    if isinstance(schema, dict) and schema.get("logicalType") == "decimal":
        return rng.choice(HOSTILE_DECIMALS)
    if isinstance(schema, dict) and schema.get("logicalType") == "timestamp-millis":
        return rng.choice(HOSTILE_LONGS)
    choices: dict[str, Callable[[], Any]] = {
        "string": lambda: rng.choice(HOSTILE_STRINGS), "int": lambda: rng.choice(HOSTILE_INTS),
        "long": lambda: rng.choice(HOSTILE_LONGS), "boolean": lambda: rng.random() < 0.5,
        "map": lambda: rng.choice([{}, {"k": "v" * 600}, {str(i): "v" for i in range(40)}]),
    }
    make = choices.get(kind) if isinstance(kind, str) else None
    return make() if make is not None else None


def mutate(name: str, record: dict[str, Any], rng: random.Random, codec: AvroCodec,
           schemas: Mapping[str, Any]) -> bytes | None:
    """`record` with up to three fields replaced by hostile values (written by fastavro alone,
    as a hostile producer would), then maybe bytes flipped or cut; None when fastavro itself
    cannot write the values chosen."""
    schema = schemas[f"{NAMESPACE}.{name}"]
    record = dict(record)
    for _ in range(rng.randint(1, 3)):
        field = rng.choice(schema["fields"])
        value = _hostile_value(field["type"], rng)
        if value is not None or isinstance(field["type"], list):
            record[field["name"]] = value
    body = io.BytesIO()
    try:
        fastavro.schemaless_writer(body, schema, record)
    except (ValueError, TypeError, OverflowError):
        return None
    data = bytearray(SINGLE_OBJECT_MARKER + codec.fingerprint_of(name) + body.getvalue())
    roll = rng.random()
    if roll < 0.2:
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif roll < 0.3:
        data = data[: rng.randrange(len(data))]
    elif roll < 0.35:
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(data)


def is_valid_client_command(codec: AvroCodec, data: bytes,
                            currencies: Mapping[str, Currency]) -> bool:
    """Whether a client topic would accept `data` as a command (such a record may be booked)."""
    try:
        name, record = codec.decode(data)
    except CodecError:
        return False
    if name == "PostEntry":
        return isinstance(core.parse_post_entry(record, currencies), core.PostEntry)
    if name == "SubmitBatch":
        return isinstance(batches.parse_submit_batch(record, currencies), batches.SubmitBatch)
    if name == "RollbackBatch":
        return isinstance(batches.parse_rollback(record), batches.RollbackBatch)
    return False


def hostile_records(count: int, seed: int, account: str, partition: int, batch_id: str,
                    currencies: Mapping[str, Currency]) -> list[bytes]:
    """`count` mutated records of every input type, none a valid client command."""
    rng = random.Random(seed)
    codec = AvroCodec()
    schemas = load_schemas()
    valid = examples(account, partition, batch_id)
    out: list[bytes] = []
    while len(out) < count:
        name, record = rng.choice(valid)
        data = mutate(name, record, rng, codec, schemas)
        if data is not None and not is_valid_client_command(codec, data, currencies):
            out.append(data)
    return out
