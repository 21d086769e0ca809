"""The ledger's Kafka topics (the contract), their configs, and `topics create`."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from streams.config import Settings
from streams.errors import LedgerError

CREATE_TIMEOUT_MS = 30_000
RETAIN_FOREVER = {"retention.ms": "-1", "retention.bytes": "-1"}
MESSAGE_BYTES_MAX = 1_048_576


class LedgerTopic(StrEnum):
    COMMANDS = "ledger.commands"
    ENTRIES = "ledger.entries"
    RESULTS = "ledger.results"
    BALANCES = "ledger.balances"
    TREE_HEADS = "ledger.tree-heads"
    DLQ = "ledger.dlq"
    BATCHES = "ledger.batches"
    RECEIPTS = "ledger.receipts"
    ANCHORS = "ledger.anchors"
    RECONCILIATIONS = "ledger.reconciliations"
    DISCREPANCIES = "ledger.discrepancies"
    CHAIN_TRANSFERS = "chain.transfers"
    CHAIN_CLAIMS = "ledger.chain-claims"


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    key: str
    config: dict[str, str] = field(default_factory=dict)


TOPICS: tuple[TopicSpec, ...] = (
    # Commands are kept: they are the input that replays reproduce the ledger from.
    TopicSpec(LedgerTopic.COMMANDS, "account_id", dict(RETAIN_FOREVER)),
    TopicSpec(LedgerTopic.ENTRIES, "account_id", dict(RETAIN_FOREVER)),
    TopicSpec(LedgerTopic.RESULTS, "command_id", {"retention.ms": str(7 * 24 * 3600 * 1000)}),
    TopicSpec(LedgerTopic.BALANCES, "account_id|currency", {"cleanup.policy": "compact"}),
    TopicSpec(LedgerTopic.TREE_HEADS, "partition", dict(RETAIN_FOREVER)),
    TopicSpec(LedgerTopic.DLQ, "source key", dict(RETAIN_FOREVER)),
    TopicSpec(LedgerTopic.BATCHES, "batch_id", dict(RETAIN_FOREVER)),
    TopicSpec(LedgerTopic.RECEIPTS, "entry_id", dict(RETAIN_FOREVER)),
    TopicSpec(LedgerTopic.ANCHORS, "partition", dict(RETAIN_FOREVER)),
    TopicSpec(LedgerTopic.RECONCILIATIONS, "tx_hash:log_index", dict(RETAIN_FOREVER)),
    TopicSpec(LedgerTopic.DISCREPANCIES, "tx_hash or entry_id", dict(RETAIN_FOREVER)),
    TopicSpec(LedgerTopic.CHAIN_TRANSFERS, "tx_hash", dict(RETAIN_FOREVER)),
    # Entries that name a chain transfer, re-keyed by tx hash so they meet chain.transfers in the
    # same partition (and the reconciler's ticks). Kept: a rebuilt reconciler replays it.
    TopicSpec(LedgerTopic.CHAIN_CLAIMS, "tx_hash", dict(RETAIN_FOREVER)),
)


# The worker's Faust app and its changelog-backed tables. Their changelog topics are created here,
# before any worker starts: Faust would create them itself, but a worker whose metadata does not
# yet show a fresh changelog's partitions crashes its agent (PartitionsMismatch).
APP_NAME = "sardis-ledger"
TABLES = ("accounts", "commands", "merkle-logs", "holds", "batches", "reconcile")


def changelog_topic_name(settings: Settings, table: str) -> str:
    """Faust's own naming, so a worker finds the topics created here."""
    return f"{settings.topic(APP_NAME)}-{table}-changelog"


def changelog_topics(settings: Settings) -> list[str]:
    return [changelog_topic_name(settings, table) for table in TABLES]


class TopicError(LedgerError):
    """A topic could not be created or has the wrong shape."""


async def create_topics(settings: Settings) -> list[str]:
    """Create every ledger topic with SARDIS_PARTITIONS partitions; existing ones are checked."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaError, TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap,
                                request_timeout_ms=CREATE_TIMEOUT_MS)
    created: list[str] = []
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        specs = {settings.topic(t.name): t.config for t in TOPICS}
        specs.update({name: {"cleanup.policy": "compact"} for name in changelog_topics(settings)})
        wanted = [name for name in specs if name not in existing]
        if wanted:
            response = await admin.create_topics(
                [NewTopic(name, settings.partitions, 1,
                          topic_configs={**specs[name], "max.message.bytes": str(MESSAGE_BYTES_MAX)})
                 for name in wanted],
                timeout_ms=CREATE_TIMEOUT_MS)
            for name, code, *_ in response.topic_errors:
                if code not in (0, TopicAlreadyExistsError.errno):
                    raise TopicError(f"creating {name}: Kafka error code {code}")
            created = wanted
        described = await _describe_when_ready(admin, list(specs))
        for topic in described:
            count = len(topic["partitions"])  # type: ignore[arg-type]
            if count != settings.partitions:
                raise TopicError(f"{topic['topic']} has {count} partitions, SARDIS_PARTITIONS is "
                                 f"{settings.partitions}: every ledger topic needs the same count")
    except KafkaError as exc:
        raise TopicError(f"creating topics on {settings.kafka_bootstrap}: {exc!r}",
                         retriable=exc.retriable) from exc
    finally:
        await admin.close()
    return created


async def _describe_when_ready(admin: object, names: list[str]) -> list[dict[str, object]]:
    """Describe topics once every partition has a leader (fresh topics need a moment)."""
    import asyncio
    import time

    deadline = time.monotonic() + CREATE_TIMEOUT_MS / 1000
    while True:
        described: list[dict[str, object]] = await admin.describe_topics(names)  # type: ignore[attr-defined]
        ready = all(t.get("error_code", 0) == 0 and t["partitions"]
                    and all(p["leader"] >= 0 for p in t["partitions"])  # type: ignore[attr-defined]
                    for t in described)
        if ready or time.monotonic() > deadline:
            return described
        await asyncio.sleep(0.2)


async def delete_topics_with_prefix(settings: Settings) -> list[str]:
    """Delete every topic under the settings' prefix (benchmarks and tests clean up after runs)."""
    from aiokafka.admin import AIOKafkaAdminClient

    if not settings.topic_prefix:
        raise TopicError("refusing to delete topics without a topic prefix")
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap,
                                request_timeout_ms=CREATE_TIMEOUT_MS)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(settings.topic_prefix)]
        if names:
            await admin.delete_topics(names)
        return names
    finally:
        await admin.close()
