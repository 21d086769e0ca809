"""JSON-lines I/O of the CLI: produce commands from stdin, consume topics to stdout, balances."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from collections import deque
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import IO, Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from sardis_ledger.streams.client import LedgerClient, LedgerClientError, _at_scale
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.core import EPOCH, ONE_MS
from sardis_ledger.streams.errors import CodecError, LedgerError, RegistryError
from sardis_ledger.streams.money import currency_table
from sardis_ledger.streams.wire import Wire

EXIT_OK = 0
EXIT_SOME_FAILED = 1
LINE_BYTES_MAX = 1_048_576
IN_FLIGHT_MAX = 1000  # commands produced but not yet answered, with --wait
MONEY_FIELDS = ("amount", "running_balance", "balance", "available")
FETCH_TIMEOUT_MS = 500


_CURRENCIES = currency_table()


def _jsonable(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _at_currency_scale(record: dict[str, Any]) -> dict[str, Any]:
    """Show money at its currency's scale (10.50 USD, not the wire's 18 decimals)."""
    out = dict(record)
    if isinstance(out.get("entry"), Mapping):
        out["entry"] = _at_currency_scale(dict(out["entry"]))
    if isinstance(out.get("entries"), list):
        out["entries"] = [_at_currency_scale(dict(e)) for e in out["entries"]]
    currency = _CURRENCIES.get(out.get("currency") or "")
    if currency is None:
        return out
    for name in MONEY_FIELDS:
        if isinstance(out.get(name), Decimal):
            out[name] = _at_scale(out[name], currency.decimals)
    return out


def dumps(record: Mapping[str, Any]) -> str:
    return json.dumps(_jsonable(record), separators=(",", ":"), ensure_ascii=False)


def _err(message: str) -> None:
    print(f"sardis-ledger: {message}", file=sys.stderr)


COMMAND_TYPES = {"post_entry": "PostEntry", "submit_batch": "SubmitBatch",
                 "rollback_batch": "RollbackBatch"}


def _decimal(value: Any, what: str) -> Decimal:
    if isinstance(value, Decimal):
        return value
    try:
        return Decimal(str(value))
    except ArithmeticError as exc:
        raise ValueError(f"{what} {value!r} is not a decimal number") from exc


def parse_command_line(line: str) -> tuple[str, dict[str, Any]]:
    """One JSON command -> (Avro record name, record). Numbers are read as Decimal, never float.

    `type` picks the command: post_entry (default), submit_batch or rollback_batch.
    """
    raw = json.loads(line, parse_float=Decimal, parse_int=Decimal)
    if not isinstance(raw, dict):
        raise ValueError("a command is a JSON object")
    kind = raw.pop("type", "post_entry")
    record_name = COMMAND_TYPES.get(kind)
    if record_name is None:
        raise ValueError(f"unknown command type {kind!r} (one of {', '.join(COMMAND_TYPES)})")
    if record_name == "SubmitBatch":
        legs = raw.get("legs")
        if not isinstance(legs, list):
            raise ValueError("submit_batch needs legs: a list of objects")
        for index, leg in enumerate(legs):
            if not isinstance(leg, dict):
                raise ValueError(f"leg {index} is not an object")
            if "amount" in leg:
                leg["amount"] = _decimal(leg["amount"], f"leg {index} amount")
            leg.setdefault("currency", "USDC")
        if isinstance(raw.get("timeout_ms"), Decimal):
            raw["timeout_ms"] = int(raw["timeout_ms"])
        return record_name, raw
    if record_name == "RollbackBatch":
        return record_name, raw
    if "amount" in raw:
        raw["amount"] = _decimal(raw["amount"], "amount")
    for name in ("expected_sequence", "chain_log_index"):
        if isinstance(raw.get(name), Decimal):
            raw[name] = int(raw[name])
    if isinstance(raw.get("occurred_at"), str):
        raw["occurred_at"] = datetime.fromisoformat(raw["occurred_at"].replace("Z", "+00:00"))
    raw.setdefault("currency", "USDC")
    return record_name, raw


async def produce(settings: Settings, stdin: IO[str], stdout: IO[str], *, wait: bool) -> int:
    failed = 0
    async with LedgerClient(settings) as client:
        in_flight: deque[tuple[str, asyncio.Future[dict[str, Any]]]] = deque()

        async def drain(limit: int) -> None:
            while len(in_flight) > limit:
                command_id, fut = in_flight.popleft()
                result = await client.wait(fut, command_id)
                print(dumps(_at_currency_scale(dict(result))), file=stdout, flush=True)

        for number, line in enumerate(stdin, start=1):
            if not line.strip():
                continue
            if len(line) > LINE_BYTES_MAX:
                _err(f"line {number}: longer than {LINE_BYTES_MAX} bytes; skipped")
                failed += 1
                continue
            try:
                record_name, record = parse_command_line(line)
                if record_name == "PostEntry":
                    key, fut = record["command_id"], await client.send_command(record)
                else:
                    key, fut = await client.send_batch_command(record_name, record)
            except (ValueError, KeyError, CodecError) as exc:
                _err(f"line {number}: {exc}; skipped")
                failed += 1
                continue
            if wait:
                in_flight.append((key, fut))
                await drain(IN_FLIGHT_MAX)
            else:
                print(dumps({"command_id": key, "sent": True}), file=stdout)
        await drain(0)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _parse_offsets(values: list[str]) -> dict[int, int]:
    offsets: dict[int, int] = {}
    for value in values:
        partition, sep, offset = value.partition(":")
        if not sep or not partition.isdigit() or not offset.isdigit():
            raise LedgerError(f"--from-offset {value!r}: use PARTITION:OFFSET, e.g. 3:1200")
        offsets[int(partition)] = int(offset)
    return offsets


async def consume(settings: Settings, topic_name: str, stdout: IO[str], *,
                  from_beginning: bool = False, from_offset: list[str] | None = None,
                  from_time: str | None = None, max_records: int | None = None,
                  timeout_s: float | None = None) -> int:
    wire = Wire(settings)
    topic = settings.topic(topic_name)
    consumer = AIOKafkaConsumer(**settings.kafka_connection(),
                                isolation_level="read_committed", enable_auto_commit=False)
    count = 0
    try:
        await consumer.start()
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise LedgerError(f"topic {topic} does not exist")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        if from_offset:
            offsets = _parse_offsets(from_offset)
            unknown = set(offsets) - set(partitions)
            if unknown:
                raise LedgerError(f"{topic} has no partition {sorted(unknown)}")
            starts = await consumer.beginning_offsets(tps)
            for tp in tps:
                consumer.seek(tp, offsets.get(tp.partition, starts[tp]))
        elif from_time:
            at = datetime.fromisoformat(from_time.replace("Z", "+00:00"))
            if at.tzinfo is None:
                at = at.replace(tzinfo=UTC)
            at_ms = (at - EPOCH) // ONE_MS
            found = await consumer.offsets_for_times({tp: at_ms for tp in tps})
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                hit = found.get(tp)
                consumer.seek(tp, hit.offset if hit is not None else ends[tp])
        elif from_beginning:
            for tp, start in (await consumer.beginning_offsets(tps)).items():
                consumer.seek(tp, start)
        else:
            await consumer.seek_to_end(*tps)
        last_record = time.monotonic()
        while max_records is None or count < max_records:
            batches = await consumer.getmany(timeout_ms=FETCH_TIMEOUT_MS)
            if not batches:
                if timeout_s is not None and time.monotonic() - last_record > timeout_s:
                    break
                continue
            last_record = time.monotonic()
            for tp, messages in sorted(batches.items(), key=lambda item: item[0].partition):
                for message in messages:
                    out: dict[str, Any] = {
                        "topic": tp.topic, "partition": tp.partition, "offset": message.offset,
                        "timestamp": message.timestamp,
                        "key": message.key.decode(errors="replace") if message.key else None,
                    }
                    try:
                        await wire.learn([message.value])  # a Confluent schema id, once
                        name, record = wire.codec.decode(message.value)
                        out["type"] = name
                        out["value"] = _at_currency_scale(record)
                    except CodecError as exc:
                        out["type"] = None
                        out["error"] = f"{exc.reason}: {exc}"
                        out["raw"] = message.value
                    except RegistryError as exc:
                        out["type"] = None
                        out["error"] = f"schema_registry_unavailable: {exc}"
                        out["raw"] = message.value
                    print(dumps(out), file=stdout, flush=True)
                    count += 1
                    if max_records is not None and count >= max_records:
                        break
                if max_records is not None and count >= max_records:
                    break
    except KafkaError as exc:
        raise LedgerClientError(f"consuming {topic}: {exc!r}", retriable=True) from exc
    finally:
        await consumer.stop()
    return EXIT_OK


async def balance(settings: Settings, account_id: str, currency: str, stdout: IO[str]) -> int:
    async with LedgerClient(settings) as client:
        result = await client.get_balance(account_id, currency)
    print(dumps({"account_id": result.account_id, "currency": result.currency,
                 "balance": result.balance, "available": result.available,
                 "sequence": result.sequence, "updated_at": result.updated_at}), file=stdout)
    return EXIT_OK
