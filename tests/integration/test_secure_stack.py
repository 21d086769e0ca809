"""The secured stack (`dev up --secure`): each refusal with the server's own error, and the ledger
end to end (client, worker, both sinks, verify) on nothing but the secured listeners."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, TopicAuthorizationFailedError

from infra import secure_stack
from sardis_ledger.sinks.process import SinkProcess
from sardis_ledger.sinks.verify import verify
from sardis_ledger.streams import acl
from sardis_ledger.streams.client import LedgerClient
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.kafka_acls import apply
from sardis_ledger.streams.kafka_security import KafkaSecurity, Protocol
from sardis_ledger.streams.topics import delete_topics_with_prefix, ensure_topics
from sardis_ledger.streams.worker_process import WorkerProcess

pytestmark = pytest.mark.secure

PARTITIONS = 2
REFUSAL_TIMEOUT_S = 20.0  # a forbidden assign() waits forever; every call here has a limit
CATCH_UP_TIMEOUT_S = 120.0
ENTRIES = 20
POLL_S = 0.5


@pytest.fixture(scope="session")
def secured() -> Iterator[float]:
    """The secured stack, started if it is not running (and then stopped at the end)."""
    started_at = time.monotonic()
    started = secure_stack.up()
    ready_s = time.monotonic() - started_at
    print(f"[tests] secured stack ready in {ready_s:.1f}s (started: {started or 'none'})")
    yield ready_s
    secure_stack.down(started)


def as_role(role: str, prefix: str) -> Settings:
    return Settings.from_env({**secure_stack.role_env(role), "SARDIS_TOPIC_PREFIX": prefix,
                              "SARDIS_PARTITIONS": str(PARTITIONS)})


@pytest.fixture
def prefix(secured: float) -> Iterator[str]:
    """A topic prefix of this test's own: topics created and ACLs applied by the admin."""
    name = f"s-{uuid.uuid4().hex[:10]}."
    admin = as_role("admin", name)
    asyncio.run(ensure_topics(admin))
    report = asyncio.run(apply(admin, acl.plan(name), name))
    assert len(report.created) == len(acl.plan(name))
    yield name
    asyncio.run(delete_topics_with_prefix(admin))


async def _produce(settings: Settings, topic: str) -> int:
    producer = AIOKafkaProducer(**settings.kafka_connection(), enable_idempotence=True, acks="all",
                                request_timeout_ms=10_000)
    await producer.start()
    try:
        meta = await asyncio.wait_for(producer.send_and_wait(topic, b"x", key=b"k", partition=0),
                                      REFUSAL_TIMEOUT_S)
        return int(meta.offset)
    finally:
        await producer.stop()


async def _subscribe(settings: Settings, topic: str) -> Any:
    consumer = AIOKafkaConsumer(topic, **settings.kafka_connection(),
                                group_id=f"{settings.topic_prefix}probe", enable_auto_commit=False,
                                request_timeout_ms=10_000)
    try:
        await consumer.start()
        return await asyncio.wait_for(consumer.getmany(timeout_ms=1000), REFUSAL_TIMEOUT_S)
    finally:
        await consumer.stop()


async def test_a_client_may_post_commands_but_not_write_internal_topics_entries_or_read_changelogs(
        prefix: str) -> None:
    client = as_role("client", prefix)
    assert await _produce(client, client.topic("ledger.commands")) >= 0
    for topic in ("ledger.internal.commands", "ledger.internal.coordinator", "ledger.entries",
                  "ledger.results", "sardis-ledger-accounts-changelog"):
        with pytest.raises(TopicAuthorizationFailedError):
            await _produce(client, client.topic(topic))
    for topic in ("sardis-ledger-accounts-changelog", "ledger.entries", "ledger.internal.commands"):
        with pytest.raises(TopicAuthorizationFailedError):
            await _subscribe(client, client.topic(topic))
    # The sink principal reads entries but cannot write them either.
    with pytest.raises(TopicAuthorizationFailedError):
        await _produce(as_role("sink", prefix), client.topic("ledger.entries"))


async def test_kafka_refuses_a_wrong_password_and_untrusted_certificates(
        prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    client = as_role("client", prefix)
    pki = secure_stack.pki_dir()
    wrong = dataclasses.replace(client, kafka_security=dataclasses.replace(
        client.kafka_security, password="not-the-password"))
    caplog.set_level(logging.ERROR, logger="aiokafka")
    with pytest.raises(KafkaConnectionError):
        await _produce(wrong, client.topic("ledger.commands"))
    # aiokafka raises KafkaConnectionError; the broker's own answer is in the log line it writes.
    assert "SaslAuthenticationFailed" in caplog.text and "invalid credentials" in caplog.text
    caplog.clear()
    rogue_trust = dataclasses.replace(client, kafka_security=dataclasses.replace(
        client.kafka_security, ca_file=str(pki / "rogue-ca.crt")))
    with pytest.raises(KafkaConnectionError):
        await _produce(rogue_trust, client.topic("ledger.commands"))
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
    # mTLS listener: a certificate from another CA claiming the admin's name is refused; the
    # real admin certificate on the same listener is accepted.
    impostor = KafkaSecurity(protocol=Protocol.SSL, ca_file=str(pki / "ca.crt"),
                             cert_file=str(pki / "rogue-client.crt"),
                             key_file=str(pki / "rogue-client.key"))
    mtls = dataclasses.replace(client, kafka_bootstrap=secure_stack.ENDPOINTS.kafka_mtls)
    with pytest.raises(KafkaConnectionError):
        await _produce(dataclasses.replace(mtls, kafka_security=impostor),
                       client.topic("ledger.commands"))
    assert await _produce(dataclasses.replace(mtls, kafka_security=secure_stack.admin_kafka()),
                          client.topic("ledger.commands")) >= 0


async def test_mutual_tls_maps_the_certificate_to_the_client_principal(prefix: str) -> None:
    pki = secure_stack.pki_dir()
    client_cert = KafkaSecurity(protocol=Protocol.SSL, ca_file=str(pki / "ca.crt"),
                                cert_file=str(pki / "client.crt"), key_file=str(pki / "client.key"))
    mtls = dataclasses.replace(as_role("client", prefix), kafka_security=client_cert,
                               kafka_bootstrap=secure_stack.ENDPOINTS.kafka_mtls)
    assert await _produce(mtls, mtls.topic("ledger.commands")) >= 0
    with pytest.raises(TopicAuthorizationFailedError):
        await _produce(mtls, mtls.topic("ledger.entries"))


async def test_postgres_refuses_wrong_passwords_plain_connections_and_untrusted_servers(
        secured: float) -> None:
    sink = as_role("sink", "")
    with pytest.raises(asyncpg.InvalidPasswordError, match="password authentication failed"):
        await asyncpg.connect(secure_stack.pg_dsn(secure_stack.PG_SINK), password="wrong")
    plain = secure_stack.pg_dsn(secure_stack.PG_SINK).split("?")[0] + "?sslmode=disable"
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        await asyncpg.connect(plain, password=_password(sink.pg_dsn))
    rogue = secure_stack.pg_dsn(secure_stack.PG_SINK).replace("ca.crt", "rogue-ca.crt")
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncpg.connect(rogue, password=_password(sink.pg_dsn))


def _password(dsn: str) -> str:
    from urllib.parse import unquote, urlsplit

    return unquote(urlsplit(dsn).password or "")


@pytest.fixture
async def owner_schema(secured: float) -> AsyncIterator[str]:
    """A migrated schema of this test's own, granted to the sink and reader roles."""
    name = f"s_{uuid.uuid4().hex[:12]}"
    owner = await asyncpg.connect(as_role("admin", "").pg_dsn)
    try:
        # What an operator runs: `sardis-ledger migrate` as the owner, granting the two roles.
        done = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "sardis_ledger.streams.cli", "migrate", "--schema", name, "--grant-sink",
            secure_stack.PG_SINK, "--grant-reader", secure_stack.PG_READER],
            env={**os.environ, **secure_stack.role_env("admin")}, capture_output=True, text=True,
            timeout=60)
        assert done.returncode == 0, done.stderr
        assert "applied [1, 2]" in done.stdout
        yield name
    finally:
        await owner.execute(f'DROP SCHEMA "{name}" CASCADE')
        await owner.close()


async def test_the_sink_role_cannot_change_entries_or_disable_the_append_only_triggers(
        owner_schema: str) -> None:
    sink = await asyncpg.connect(as_role("sink", "").pg_dsn)
    q = f'"{owner_schema}"'
    refused = {
        f"UPDATE {q}.entries SET amount = 0": "permission denied for table entries",
        f"DELETE FROM {q}.entries": "permission denied for table entries",
        f"TRUNCATE {q}.entries": "permission denied for table entries",
        f"ALTER TABLE {q}.entries DISABLE TRIGGER entries_append_only": "must be owner",
        f"ALTER TABLE {q}.entries DISABLE TRIGGER ALL": "must be owner",
        f"DROP TRIGGER entries_append_only ON {q}.entries": "must be owner",
        "SET session_replication_role = replica": "permission denied to set parameter",
        f"CREATE TABLE {q}.evil (x int)": f"permission denied for schema {owner_schema}",
    }
    try:
        for sql, message in refused.items():
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match=message):
                await sink.execute(sql)
    finally:
        await sink.close()
    reader = await asyncpg.connect(as_role("client", "").pg_dsn)  # queries run as the reader
    try:
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await reader.execute(f"INSERT INTO {q}.batches VALUES ('b', 1, 0, now())")
    finally:
        await reader.close()


def test_immudb_refuses_the_default_and_wrong_passwords_other_databases_and_untrusted_ca(
        secured: float) -> None:
    from immudb import ImmudbClient

    from sardis_ledger.sinks.immudb_compat import use_tls

    def tls_client(ca: Path) -> Any:
        client = ImmudbClient(secure_stack.ENDPOINTS.immudb, timeout=5)
        use_tls(client, secure_stack.ENDPOINTS.immudb, str(ca))
        return client

    ca = secure_stack.pki_dir() / "ca.crt"
    for user, password in (("immudb", "immudb"), (secure_stack.IMMUDB_SINK_USER, "Wrong-pass-1!")):
        with pytest.raises(grpc.RpcError) as refused:
            tls_client(ca).login(user, password)
        assert "invalid user name or password" in refused.value.details()
    sink = as_role("sink", "")
    with pytest.raises(grpc.RpcError) as other_db:
        tls_client(ca).login(sink.immudb_user, sink.immudb_password, database=b"defaultdb")
    assert "does not have permission" in other_db.value.details()
    with pytest.raises(grpc.RpcError) as untrusted:
        tls_client(secure_stack.pki_dir() / "rogue-ca.crt").login(
            sink.immudb_user, sink.immudb_password, database=sink.immudb_database.encode())
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.value.details()
    with pytest.raises(grpc.RpcError) as plaintext:
        ImmudbClient(secure_stack.ENDPOINTS.immudb, timeout=5).login(
            sink.immudb_user, sink.immudb_password, database=sink.immudb_database.encode())
    assert plaintext.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_the_ledger_runs_end_to_end_on_the_secured_listeners_and_logs_no_secret(
        prefix: str, owner_schema: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    sink_env = {"SARDIS_PG_SCHEMA": owner_schema, "SARDIS_STATE_DIR": str(state)}
    worker = WorkerProcess(as_role("worker", prefix), tmp_path, env={
        "SARDIS_WORKER_DATADIR": str(tmp_path / "worker-data")})
    sinks = [SinkProcess(as_role("sink", prefix), kind, tmp_path, sink_env)
             for kind in ("postgres", "immudb")]
    try:
        worker.start()
        for sink in sinks:
            sink.start()
        async with LedgerClient(as_role("client", prefix)) as ledger:
            results = [await ledger.create_entry(account_id=f"acct-{i % 4}", amount=Decimal("1.25"),
                                                 entry_type="credit", currency="USD")
                       for i in range(ENTRIES)]
            # A batch across partitions: the coordinator's reserves and settles travel on the
            # internal topics, which only the worker's principal may write.
            batch = await ledger.create_batch([
                {"account_id": "acct-0", "amount": "2", "entry_type": "debit", "currency": "USD"},
                {"account_id": "acct-1", "amount": "2", "entry_type": "credit", "currency": "USD"},
            ])
            balance = await ledger.get_balance("acct-1", "USD")
        assert len(results) == ENTRIES and len(batch.entries) == 2
        assert balance.balance == Decimal("1.25") * (ENTRIES // 4) + 2, balance
        await _wait_sunk(owner_schema, ENTRIES + 2, sinks)
        report = await verify(as_role("operator", prefix), owner_schema, state_directory=state,
                              check_anchors=False)
        assert report.ok, report
    finally:
        worker.stop()
        for sink in sinks:
            sink.stop()
    logs = [*tmp_path.glob("*.log"), *secure_stack.log_files()]
    secrets = {p.name: p.read_text().strip() for p in (secure_stack.secure_dir() / "secrets").glob("*.pw")}
    assert len(logs) >= 5 and len(secrets) >= 8
    for log in logs:
        text = log.read_text(errors="replace")
        leaked = [name for name, value in secrets.items() if value in text]
        assert not leaked, f"{log} contains the secret(s) {leaked}"


async def _wait_sunk(schema: str, expected: int, sinks: list[SinkProcess]) -> None:
    reader = await asyncpg.connect(as_role("client", "").pg_dsn)
    deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
    got: tuple[int, int] = (0, 0)
    try:
        while time.monotonic() < deadline:
            got = (await reader.fetchval(f'SELECT count(*) FROM "{schema}".entries'),
                   await reader.fetchval(f'SELECT count(*) FROM "{schema}".receipts'))
            if got == (expected, expected):
                return
            for sink in sinks:
                assert sink.alive(), f"{sink.name} died:\n{sink.tail()}"
            await asyncio.sleep(POLL_S)
    finally:
        await reader.close()
    raise AssertionError(f"(entries, receipts) = {got}, expected {expected} each; "
                         + "; ".join(f"{s.name}: {s.tail()}" for s in sinks))


def test_the_stack_keeps_its_keys_and_passwords_private(secured: float) -> None:
    for directory in (secure_stack.pki_dir(), secure_stack.secure_dir() / "secrets"):
        assert directory.stat().st_mode & 0o777 == 0o700, directory
    for key in [*secure_stack.pki_dir().glob("*.key"), *secure_stack.pki_dir().glob("*.pem"),
                *(secure_stack.secure_dir() / "secrets").glob("*.pw")]:
        assert key.stat().st_mode & 0o777 == 0o600, key


async def test_the_chain_watcher_starts_and_publishes_as_its_own_principal(prefix: str) -> None:
    """Against the plain dev anvil (read only: eth_blockNumber, eth_getLogs), once ledger.entries
    holds records the watcher may not read: its start-up topic check must not read them."""
    admin = as_role("admin", prefix)
    assert await _produce(admin, admin.topic("ledger.entries")) >= 0
    watcher = as_role("watcher", prefix)
    env = {**os.environ, **secure_stack.role_env("watcher"), "SARDIS_TOPIC_PREFIX": prefix,
           "SARDIS_PARTITIONS": str(PARTITIONS)}
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "sardis_ledger.streams.cli", "chain", "watch", "--token",
                         f"0x{'11' * 20}=USDC:6", "--wallet", f"0x{'22' * 20}=acct-w",
                         "--confirmations", "0", "--once"],
        env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    from aiokafka import TopicPartition

    reader = AIOKafkaConsumer(**admin.kafka_connection(), enable_auto_commit=False)
    await reader.start()
    try:
        state = TopicPartition(admin.topic("chain.watch-state"), 0)
        ends = await reader.end_offsets([state])
    finally:
        await reader.stop()
    assert ends[state] >= 2  # the watcher's progress record and its transaction's commit marker
    with pytest.raises(TopicAuthorizationFailedError):
        await _produce(watcher, watcher.topic("ledger.entries"))
