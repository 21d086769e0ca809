"""The edge between codec and registry (streams/wire.py): subjects, and decode's failure reasons."""

from __future__ import annotations

import dataclasses

import pytest

from sardis_ledger.schemas.codec import AvroCodec, Framing, confluent_header
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.errors import CodecError, RegistryError
from sardis_ledger.streams.schema_registry import SchemaRegistry
from sardis_ledger.streams.topics import INPUT_RECORDS, TOPIC_RECORDS, WORKER_TOPICS, LedgerTopic
from sardis_ledger.streams.wire import Wire, subject_name, subjects_of

CLOSED_PORT_URL = "http://127.0.0.1:9"  # discard port: nothing listens, connections are refused


def test_topic_name_strategy_and_one_subject_per_type_on_mixed_topics() -> None:
    assert subject_name("acme.ledger.commands", "PostEntry", 1) == "acme.ledger.commands-value"
    assert subject_name("ledger.batches", "sardis.ledger.SubmitBatch", 2) == \
        "ledger.batches-sardis.ledger.SubmitBatch"
    settings = Settings(topic_prefix="t.")
    subjects = dict(subjects_of(settings, [LedgerTopic.COMMANDS, LedgerTopic.BATCHES,
                                           LedgerTopic.ENTRIES], AvroCodec()))
    assert subjects == {"t.ledger.commands-value": "PostEntry",
                        "t.ledger.batches-sardis.ledger.SubmitBatch": "SubmitBatch",
                        "t.ledger.batches-sardis.ledger.RollbackBatch": "RollbackBatch",
                        "t.ledger.entries-value": "Entry"}


def test_every_topic_lists_its_records_and_the_worker_registers_what_it_encodes() -> None:
    assert set(TOPIC_RECORDS) == set(LedgerTopic)
    for topic, names in INPUT_RECORDS.items():
        assert set(TOPIC_RECORDS[topic]) == names
    codec = AvroCodec()
    written = {name for topic in WORKER_TOPICS for name in TOPIC_RECORDS[topic]}
    assert written <= {name.rpartition(".")[2] for name in codec.record_names()}
    assert {"Entry", "Result", "Balance", "TreeHead", "DeadLetter", "ReserveLeg", "SettleLeg",
            "LegReport", "BatchTick", "ReconcileTick", "Reconciliation", "Discrepancy"} <= written


async def test_without_a_registry_confluent_input_is_unknown_and_start_needs_nothing() -> None:
    wire = Wire(Settings(schema_registry_url=""))
    assert await wire.start(WORKER_TOPICS) == {}
    with pytest.raises(CodecError, match="no schema registry is configured") as caught:
        await wire.decode(confluent_header(12) + b"\x00")
    assert caught.value.reason == "unknown_schema_id"


async def test_a_registry_that_gives_no_answer_dead_letters_and_pauses_lookups() -> None:
    wire = Wire(Settings(schema_registry_url=CLOSED_PORT_URL))
    wire.registry = SchemaRegistry(CLOSED_PORT_URL, attempts=1)
    for schema_id in (12, 13):  # the second is refused during the pause, without a lookup
        with pytest.raises(CodecError) as caught:
            await wire.decode(confluent_header(schema_id) + b"\x00")
        assert caught.value.reason == "schema_registry_unavailable"
    # Not remembered as refused: once the registry answers, the id is looked up again.
    assert wire.codec.unresolved_schema_id(confluent_header(12)) == 12
    # Readers of the ledger's own topics get the RegistryError, to retry.
    with pytest.raises(RegistryError) as raised:
        await wire.learn([confluent_header(12) + b"\x00"])
    assert raised.value.retriable


async def test_confluent_start_fails_clearly_when_the_registry_gives_no_answer() -> None:
    settings = dataclasses.replace(Settings(), wire_format=Framing.CONFLUENT,
                                   schema_registry_url=CLOSED_PORT_URL)
    wire = Wire(settings)
    wire.registry = SchemaRegistry(CLOSED_PORT_URL, attempts=1)
    with pytest.raises(RegistryError, match="no answer"):
        await wire.start([LedgerTopic.ENTRIES])
