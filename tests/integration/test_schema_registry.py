"""Confluent wire format against the real registry: confluent-kafka's own serializers in and out."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.schema_registry import (
    Schema,
    SchemaRegistryClient,
    topic_record_subject_name_strategy,
)
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

from sardis_ledger.schemas.codec import (
    CONFLUENT_HEADER_SIZE_BYTES,
    SCHEMA_DIR,
    AvroCodec,
    Framing,
    confluent_header,
)
from sardis_ledger.sinks.replay import replay_postgres
from sardis_ledger.streams.client import LedgerClient
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.errors import LedgerError
from sardis_ledger.streams.topics import LedgerTopic, create_topics
from sardis_ledger.streams.worker_process import WorkerProcess
from tests.integration.support import RawProducer, check_merkle_logs, read_topic

READ_TIMEOUT_S = 90.0
POLL_S = 0.5
FLUSH_TIMEOUT_S = 30.0
# What a team producing commands uses: the published contract, as the file says it.
POST_ENTRY_AVSC = (SCHEMA_DIR / "PostEntry.avsc").read_text()
LATER_FIELDS = ("expected_sequence", "occurred_at", "chain", "chain_tx_hash", "chain_log_index")


def _post_entry(**changes: Any) -> dict[str, Any]:
    return {**json.loads(POST_ENTRY_AVSC), **changes}


def older_post_entry() -> str:
    """PostEntry as it was before its optional later fields (each has a default now)."""
    schema = _post_entry()
    return json.dumps({**schema, "fields": [f for f in schema["fields"]
                                            if f["name"] not in LATER_FIELDS]})


def newer_post_entry() -> str:
    """A producer a version ahead: two new fields, each with a default (compatible)."""
    schema = _post_entry()
    return json.dumps({**schema, "fields": [
        *schema["fields"], {"name": "channel", "type": "string", "default": "api"},
        {"name": "memo", "type": ["null", "string"], "default": None}]})


def incompatible_post_entry() -> str:
    """A new required field without a default: readers of it cannot read older commands."""
    schema = _post_entry()
    return json.dumps({**schema, "fields": [*schema["fields"], {"name": "priority", "type": "int"}]})


def unreadable_post_entry() -> str:
    """The amount as a string: no reader of the ledger's decimal contract can read it."""
    schema = _post_entry()
    return json.dumps({**schema, "fields": [{**f, "type": "string"} if f["name"] == "amount" else f
                                            for f in schema["fields"]]})


def registry(settings: Settings) -> SchemaRegistryClient:
    return SchemaRegistryClient({"url": settings.schema_registry_url})


def command(i: int, account: str, amount: str) -> dict[str, Any]:
    return {"command_id": f"cmd-{uuid.uuid4().hex[:8]}-{i}", "account_id": account,
            "currency": "USD", "entry_type": "credit", "amount": Decimal(amount)}


def produce(settings: Settings, values: list[tuple[str, bytes]]) -> None:
    """(account_id key, value) to ledger.commands with confluent-kafka's Java-compatible
    partitioner (murmur2), as a Kafka shop's producer would."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap,
                         "partitioner": "murmur2_random", "enable.idempotence": True})
    for key, value in values:
        producer.produce(settings.topic(LedgerTopic.COMMANDS), key=key.encode(), value=value)
    assert producer.flush(FLUSH_TIMEOUT_S) == 0


def serialize(settings: Settings, schema_text: str, records: list[dict[str, Any]],
              **conf: Any) -> list[tuple[str, bytes]]:
    serializer = AvroSerializer(registry(settings), schema_text, conf=conf or None)
    context = SerializationContext(settings.topic(LedgerTopic.COMMANDS), MessageField.VALUE)
    out = []
    for record in records:
        value = serializer(record, context)
        assert value is not None
        out.append((record["account_id"], value))
    return out


def read_confluent(settings: Settings, topic: LedgerTopic,
                   done: Callable[[list[tuple[bytes, dict[str, Any]]]], bool]
                   ) -> list[tuple[bytes, dict[str, Any]]]:
    """(raw value, record) of a topic, read_committed, decoded by confluent-kafka's
    AvroDeserializer (writer schema fetched by id from the registry) until `done`."""
    name = settings.topic(topic)
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                         "group.id": f"t-{uuid.uuid4().hex}", "enable.auto.commit": False,
                         "isolation.level": "read_committed"})
    deserializer = AvroDeserializer(registry(settings))
    context = SerializationContext(name, MessageField.VALUE)
    consumer.assign([TopicPartition(name, p, OFFSET_BEGINNING) for p in range(settings.partitions)])
    out: list[tuple[bytes, dict[str, Any]]] = []
    deadline = time.monotonic() + READ_TIMEOUT_S
    try:
        while not done(out):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {name}: {len(out)} records after {READ_TIMEOUT_S}s")
            message = consumer.poll(POLL_S)
            if message is None:
                continue
            assert message.error() is None, message.error()
            value = message.value()
            assert value is not None
            record = deserializer(value, context)
            assert isinstance(record, dict)
            out.append((value, record))
    finally:
        consumer.close()
    return out


def _ids(records: list[tuple[bytes, dict[str, Any]]]) -> set[str]:
    return {record["command_id"] for _, record in records}


@pytest.fixture(autouse=True)
def own_subjects(settings: Settings) -> Iterator[None]:
    """The test's subjects are deleted afterwards, as its topics are: the harness's registry
    keeps its database between runs."""
    yield
    client = registry(settings)
    for subject in client.get_subjects():
        if subject.startswith(settings.topic_prefix):
            client.delete_subject(subject, permanent=True)


@pytest.fixture
def confluent(settings: Settings) -> Settings:
    return dataclasses.replace(settings, wire_format=Framing.CONFLUENT)


@pytest.fixture
def confluent_worker(confluent: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    asyncio.run(create_topics(confluent))
    process = WorkerProcess(confluent, tmp_path)
    with process:
        yield process


async def test_confluent_producers_and_consumers_with_both_framings_and_evolution(
    confluent: Settings, confluent_worker: WorkerProcess, pg_schema: str
) -> None:
    settings = confluent
    current = [command(i, f"acc-{i % 6}", f"{i + 1}.25") for i in range(30)]
    older = [command(100 + i, f"acc-{i % 6}", "0.5") for i in range(6)]
    newer = [{**command(200 + i, f"acc-{i % 6}", "2"), "channel": "pos", "memo": f"m{i}"}
             for i in range(6)]
    single = [command(300 + i, f"acc-{i % 6}", "100") for i in range(6)]
    await asyncio.to_thread(produce, settings, [
        *serialize(settings, POST_ENTRY_AVSC, current),
        *serialize(settings, older_post_entry(), [{k: v for k, v in c.items()} for c in older]),
        *serialize(settings, newer_post_entry(), newer)])
    async with RawProducer(settings) as raw:  # single-object framing, on the same topic
        for record in single:
            await raw.post_entry(record)
        await raw.flush()

    # A producer's incompatible change is refused by the registry itself (409)...
    with pytest.raises(SchemaRegistryError) as refused:
        serialize(settings, incompatible_post_entry(), [{**current[0], "priority": 1}])
    assert refused.value.http_status_code == 409
    assert "ncompatible" in refused.value.error_message
    # ...and one registered under a subject without BACKWARD (another naming strategy) reaches
    # the topic, where the worker refuses it: a dead letter, with the schema id and the field.
    rogue = serialize(settings, unreadable_post_entry(), [{**command(400, "acc-0", "1"),
                                                           "amount": "1"}],
                      **{"subject.name.strategy": topic_record_subject_name_strategy})
    made_up = ("acc-0", confluent_header(2**31 - 7) + rogue[0][1][CONFLUENT_HEADER_SIZE_BYTES:])
    await asyncio.to_thread(produce, settings, [*rogue, made_up])

    everything = current + older + newer + single
    wanted = {c["command_id"] for c in everything}
    results = await asyncio.to_thread(read_confluent, settings, LedgerTopic.RESULTS,
                                      lambda got: wanted <= _ids(got))
    assert Counter(record["status"] for _, record in results) == {"committed": len(everything)}
    entries = await asyncio.to_thread(read_confluent, settings, LedgerTopic.ENTRIES,
                                      lambda got: wanted <= _ids(got))
    amounts = {c["command_id"]: c["amount"] for c in everything}
    totals: dict[str, Decimal] = defaultdict(Decimal)
    last_balance: dict[str, Decimal] = {}
    for _, entry in sorted(entries, key=lambda item: (item[1]["account_id"], item[1]["sequence"])):
        assert entry["amount"] == amounts[entry["command_id"]]
        totals[entry["account_id"]] += entry["amount"]
        last_balance[entry["account_id"]] = entry["running_balance"]
    assert last_balance == totals
    entries_id = registry(settings).get_latest_version(
        f"{settings.topic(LedgerTopic.ENTRIES)}-value").schema_id
    assert entries_id is not None
    assert {value[:CONFLUENT_HEADER_SIZE_BYTES] for value, _ in entries} == \
        {confluent_header(entries_id)}
    heads = await asyncio.to_thread(read_confluent, settings, LedgerTopic.TREE_HEADS,
                                    lambda got: bool(got))
    check_merkle_logs([entry for _, entry in entries], [head for _, head in heads])
    # The PostgreSQL sink reads the Confluent-framed entries too (every one a row, none set aside).
    replayed = await replay_postgres(settings, pg_schema, drop_old=True)
    assert replayed["entries"] == len(everything)

    dead = await asyncio.to_thread(read_confluent, settings, LedgerTopic.DLQ,
                                   lambda got: len(got) >= 2)
    reasons = {record["reason"]: record["detail"] for _, record in dead}
    assert set(reasons) == {"incompatible_schema", "unknown_schema_id"}
    assert "/amount" in reasons["incompatible_schema"]
    assert str(2**31 - 7) in reasons["unknown_schema_id"]

    client = registry(settings)
    for topic in (LedgerTopic.COMMANDS, LedgerTopic.ENTRIES, LedgerTopic.RESULTS):
        assert client.get_compatibility(f"{settings.topic(topic)}-value") == "BACKWARD"
    # The ledger's own client, in Confluent framing, reads results and balances the same way.
    async with LedgerClient(settings) as ledger:
        posted = await ledger.create_entry(account_id="acc-0", amount=Decimal("1"),
                                           entry_type="credit", currency="USD")
        balance = await ledger.get_balance("acc-0", currency="USD")
    assert posted.running_balance == totals["acc-0"] + 1 == balance.balance


async def test_a_worker_whose_schema_the_registry_refuses_stops_saying_why(
    confluent: Settings, tmp_path: Path
) -> None:
    # Someone registered an Entry whose sequence is a string: the worker's Entry cannot read
    # records written with it, so registering the worker's version is refused (BACKWARD).
    entry = json.loads(AvroCodec().schema_text("Entry"))
    rogue = {**entry, "fields": [{**f, "type": "string"} if f["name"] == "sequence" else f
                                 for f in entry["fields"]]}
    subject = f"{confluent.topic(LedgerTopic.ENTRIES)}-value"
    registry(confluent).register_schema(subject, Schema(json.dumps(rogue), "AVRO"))
    await create_topics(confluent)
    worker = WorkerProcess(confluent, tmp_path)
    with pytest.raises(LedgerError) as stopped:
        worker.start()
    worker.stop()
    assert worker.proc is not None and worker.proc.returncode == 1
    message = str(stopped.value)
    assert f"refuses this version's Entry under subject {subject} (compatibility BACKWARD) " \
        "at field sequence" in message
    assert "HTTP 409" in message and "not compatible" in message


async def test_a_single_object_worker_also_decides_confluent_commands(
    settings: Settings, tmp_path: Path
) -> None:
    assert settings.wire_format is Framing.SINGLE_OBJECT
    await create_topics(settings)
    confluent_commands = [command(i, f"acc-{i}", "3") for i in range(4)]
    single = [command(10 + i, f"acc-{i}", "4") for i in range(4)]
    with WorkerProcess(settings, tmp_path):
        await asyncio.to_thread(produce, settings, serialize(settings, POST_ENTRY_AVSC,
                                                             confluent_commands))
        async with RawProducer(settings) as raw:
            for record in single:
                await raw.post_entry(record)
            await raw.flush()
        wanted = {c["command_id"] for c in confluent_commands + single}
        results = await read_topic(settings, LedgerTopic.RESULTS,
                                   until=lambda rows: wanted <= {r[3]["command_id"] for r in rows})
    assert {r[3]["status"] for r in results} == {"committed"}
    # It writes single-object framing: readers without a registry keep working.
    entries = await read_topic(settings, LedgerTopic.ENTRIES, until=lambda rows: len(rows) >= 8)
    assert all("__undecodable__" not in row[3] for row in entries)
