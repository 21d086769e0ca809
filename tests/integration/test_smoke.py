"""Smoke tests: each of the four real servers answers the way the ledger relies on."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from infra import harness
from sardis_ledger.streams.config import Settings

RECEIVE_TIMEOUT_S = 20


async def _read_all_committed(settings: Settings, topic: str, end_marker: bytes) -> list[bytes]:
    consumer = AIOKafkaConsumer(**settings.kafka_connection(),
                                isolation_level="read_committed", enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        values: list[bytes] = []
        while end_marker not in values:
            msg = await asyncio.wait_for(consumer.getone(), RECEIVE_TIMEOUT_S)
            values.append(msg.value)
        return values
    finally:
        await consumer.stop()


async def test_kafka_transactions_hide_aborted_records(settings: Settings) -> None:
    topic = settings.topic("smoke")
    producer = AIOKafkaProducer(**settings.kafka_connection(),
                                transactional_id=f"smoke-{uuid.uuid4().hex}")
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send_and_wait(topic, b"committed-1", partition=0)
        await producer.begin_transaction()
        await producer.send_and_wait(topic, b"aborted", partition=0)
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send_and_wait(topic, b"committed-2", partition=0)
    finally:
        await producer.stop()
    values = await _read_all_committed(settings, topic, b"committed-2")
    assert values == [b"committed-1", b"committed-2"]


async def test_postgres_round_trip_in_own_schema(stack: Settings, pg_schema: str) -> None:
    conn = await asyncpg.connect(stack.pg_dsn)
    try:
        await conn.execute(f'CREATE TABLE "{pg_schema}".t (amount numeric(78, 18) NOT NULL)')
        await conn.execute(f'INSERT INTO "{pg_schema}".t VALUES ($1)',
                           __import__("decimal").Decimal("340282366920938463463.374607431768211456"))
        total = await conn.fetchval(f'SELECT sum(amount)::text FROM "{pg_schema}".t')
        version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    assert total == "340282366920938463463.374607431768211456"
    assert version.startswith("15")


def test_immudb_verified_set_and_get(stack: Settings) -> None:
    # The harness check does login + verifiedSet + verifiedGet; run it against the stack.
    harness.health_immudb(stack)


def test_immudb_rejects_wrong_password(stack: Settings) -> None:
    import dataclasses

    import pytest

    from sardis_ledger.streams.errors import InfraError

    wrong = dataclasses.replace(stack, immudb_password="not-the-password")
    with pytest.raises(InfraError, match="immudb health check"):
        harness.health_immudb(wrong)


def test_anvil_answers_chain_id_and_has_funded_accounts(stack: Settings) -> None:
    chain_id = harness.json_rpc(stack.chain_rpc, "eth_chainId")
    accounts = harness.json_rpc(stack.chain_rpc, "eth_accounts")
    assert isinstance(accounts, list)
    balance = harness.json_rpc(stack.chain_rpc, "eth_getBalance", [accounts[0], "latest"])
    assert chain_id == hex(harness.ANVIL_CHAIN_ID)
    assert isinstance(balance, str) and int(balance, 16) > 0


def test_solcjs_is_provisioned_offline() -> None:
    package = json.loads((harness.solcjs_path() / "package.json").read_text())
    assert package["name"] == "solc"
    assert (harness.solcjs_path() / "soljson.js").stat().st_size > 1_000_000
