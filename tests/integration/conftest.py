"""Integration fixtures: one real stack per session, unique topics and schemas per test."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from infra import harness
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.topics import delete_topics_with_prefix
from tests.integration import chain_support

TEST_TOPIC_PREFIX = "t-"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    """The five real servers: testcontainers where asked for and possible, else the dev harness.

    Servers that were already running (`make up`) are reused and left running; servers this
    fixture started are stopped at the end of the session.
    """
    from tests.integration.containers import container_stack, docker_available

    if os.environ.get("SARDIS_TEST_CONTAINERS") == "1":
        if not docker_available():
            pytest.fail("SARDIS_TEST_CONTAINERS=1 but no Docker engine answers")
        with container_stack() as settings:
            yield settings
        return
    started = harness.up()
    settings = Settings.from_env()
    try:
        if "kafka" in started:
            _delete_stale_test_topics(settings)
        yield settings
    finally:
        harness.down(started)


def _delete_stale_test_topics(settings: Settings) -> None:
    """Drop topics that runs killed before their teardown left (each partition slows a start).

    Called only when this session started the broker, so no other session is using it. Only
    hygiene: a failure is reported and the tests go on.
    """
    try:
        stale = asyncio.run(delete_topics_with_prefix(
            dataclasses.replace(settings, topic_prefix=TEST_TOPIC_PREFIX)))
    except Exception as exc:  # the tests do not depend on it
        print(f"[tests] could not delete stale test topics: {exc!r}", file=sys.stderr)
        return
    if stale:
        print(f"[tests] deleted {len(stale)} topics left by earlier, interrupted runs",
              file=sys.stderr)


@pytest.fixture
def settings(stack: Settings) -> Iterator[Settings]:
    """Stack settings with a topic prefix of this test's own, so tests never see each other.

    The test's topics are deleted afterwards: a broker that keeps every test's partitions starts
    slower with each run.
    """
    own = dataclasses.replace(stack, topic_prefix=f"{TEST_TOPIC_PREFIX}{uuid.uuid4().hex[:10]}.")
    yield own
    asyncio.run(delete_topics_with_prefix(own))


@pytest.fixture
async def pg_schema(stack: Settings) -> AsyncIterator[str]:
    """A PostgreSQL schema of this test's own, dropped afterwards."""
    import asyncpg

    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(stack.pg_dsn)
    try:
        await conn.execute(f'CREATE SCHEMA "{name}"')
        yield name
    finally:
        with contextlib.suppress(Exception):
            await conn.execute(f'DROP SCHEMA "{name}" CASCADE')
        await conn.close()


@pytest.fixture
async def snapshot(stack: Settings) -> Any:
    """evm_snapshot before the test, evm_revert after: the chain state tests leave is undone.

    The revert waits until anvil has mined every pending transaction: a transaction left pending
    across a revert keeps a nonce the reverted account no longer has and blocks that account.
    (anvil_dropAllTransactions is no way out: on anvil 1.7.1, dropping thousands of pending
    transactions left the node mining empty blocks without end.)
    """
    snap = await chain_support.rpc(stack.chain_rpc, "evm_snapshot")
    yield snap
    await chain_support.wait_pool_empty(stack)
    await chain_support.rpc(stack.chain_rpc, "evm_revert", [snap])
