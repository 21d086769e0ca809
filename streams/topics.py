"""The ledger's Kafka topics (the contract), their configs, and `topics create`."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from streams.config import Settings
from streams.core import Reason
from streams.errors import LedgerError

CREATE_TIMEOUT_MS = 30_000
RETAIN_FOREVER = {"retention.ms": "-1", "retention.bytes": "-1"}
MESSAGE_BYTES_MAX = 1_048_576


class LedgerTopic(StrEnum):
    # Client topics: the only topics a client principal may write.
    COMMANDS = "ledger.commands"
    BATCHES = "ledger.batches"
    # Internal topics (prefix ledger.internal.): written by workers only, never granted to
    # clients. Coordinator and account sides talk over them; misrouted client commands are
    # forwarded over them to the partition that owns them.
    INTERNAL_COMMANDS = "ledger.internal.commands"
    INTERNAL_COORDINATOR = "ledger.internal.coordinator"
    CHAIN_CLAIMS = "ledger.internal.chain-claims"
    QUARANTINE = "ledger.internal.quarantine"
    # Outputs: written by workers (or sinks, anchoring), read by clients and sinks.
    ENTRIES = "ledger.entries"
    RESULTS = "ledger.results"
    BALANCES = "ledger.balances"
    TREE_HEADS = "ledger.tree-heads"
    DLQ = "ledger.dlq"
    SINK_DLQ = "ledger.sink-dlq"
    RECEIPTS = "ledger.receipts"
    ANCHORS = "ledger.anchors"
    RECONCILIATIONS = "ledger.reconciliations"
    DISCREPANCIES = "ledger.discrepancies"
    # Written by the chain watcher.
    CHAIN_TRANSFERS = "chain.transfers"


INTERNAL_PREFIX = "ledger.internal."


class Access(StrEnum):
    """Who writes a topic; what the deployment's ACLs grant (see README: topics)."""

    CLIENT = "clients"  # client principals write it; everything on it is untrusted
    INTERNAL = "workers only"  # never granted to clients
    OUTPUT = "workers, read by clients"
    SINK = "sinks"
    WATCHER = "chain watcher"
    OPERATOR = "anchoring (operator)"


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    key: str
    config: dict[str, str] = field(default_factory=dict)
    access: Access = Access.OUTPUT


TOPICS: tuple[TopicSpec, ...] = (
    # Commands are kept: they are the input that replays reproduce the ledger from.
    TopicSpec(LedgerTopic.COMMANDS, "account_id", dict(RETAIN_FOREVER), Access.CLIENT),
    TopicSpec(LedgerTopic.BATCHES, "batch_id", dict(RETAIN_FOREVER), Access.CLIENT),
    TopicSpec(LedgerTopic.INTERNAL_COMMANDS, "account_id", dict(RETAIN_FOREVER), Access.INTERNAL),
    TopicSpec(LedgerTopic.INTERNAL_COORDINATOR, "batch_id", dict(RETAIN_FOREVER), Access.INTERNAL),
    # Entries that name a chain transfer, re-keyed by tx hash so they meet chain.transfers in the
    # same partition (and the reconciler's ticks). Kept: a rebuilt reconciler replays it.
    TopicSpec(LedgerTopic.CHAIN_CLAIMS, "tx_hash", dict(RETAIN_FOREVER), Access.INTERNAL),
    TopicSpec(LedgerTopic.QUARANTINE, "topic:partition:offset", {"cleanup.policy": "compact"},
              Access.INTERNAL),
    TopicSpec(LedgerTopic.ENTRIES, "account_id", dict(RETAIN_FOREVER)),
    TopicSpec(LedgerTopic.RESULTS, "command_id", {"retention.ms": str(7 * 24 * 3600 * 1000)}),
    TopicSpec(LedgerTopic.BALANCES, "account_id|currency", {"cleanup.policy": "compact"}),
    TopicSpec(LedgerTopic.TREE_HEADS, "partition", dict(RETAIN_FOREVER)),
    TopicSpec(LedgerTopic.DLQ, "source key", dict(RETAIN_FOREVER)),
    TopicSpec(LedgerTopic.SINK_DLQ, "source key", dict(RETAIN_FOREVER), Access.SINK),
    TopicSpec(LedgerTopic.RECEIPTS, "entry_id", dict(RETAIN_FOREVER), Access.SINK),
    TopicSpec(LedgerTopic.ANCHORS, "partition", dict(RETAIN_FOREVER), Access.OPERATOR),
    TopicSpec(LedgerTopic.RECONCILIATIONS, "tx_hash:log_index", dict(RETAIN_FOREVER)),
    TopicSpec(LedgerTopic.DISCREPANCIES, "tx_hash or entry_id", dict(RETAIN_FOREVER)),
    TopicSpec(LedgerTopic.CHAIN_TRANSFERS, "tx_hash", dict(RETAIN_FOREVER), Access.WATCHER),
)

# The record types each input topic may carry. Anything else is dead-lettered with no effect:
# `not_a_client_command` for an internal record type on a client topic, else `unknown_command`.
INPUT_RECORDS: dict[LedgerTopic, frozenset[str]] = {
    LedgerTopic.COMMANDS: frozenset({"PostEntry"}),
    LedgerTopic.BATCHES: frozenset({"SubmitBatch", "RollbackBatch"}),
    LedgerTopic.INTERNAL_COMMANDS: frozenset({"PostEntry", "ReserveLeg", "SettleLeg"}),
    LedgerTopic.INTERNAL_COORDINATOR: frozenset({"SubmitBatch", "RollbackBatch", "LegReport",
                                                 "BatchTick"}),
    LedgerTopic.CHAIN_TRANSFERS: frozenset({"ChainTransfer"}),
    LedgerTopic.CHAIN_CLAIMS: frozenset({"Entry", "ReconcileTick"}),
}
# The record types on every topic (the inputs' are those above): what a schema registry's
# subjects hold for each topic in Confluent framing (streams/wire.py).
TOPIC_RECORDS: dict[LedgerTopic, tuple[str, ...]] = {
    LedgerTopic.COMMANDS: ("PostEntry",),
    LedgerTopic.BATCHES: ("SubmitBatch", "RollbackBatch"),
    LedgerTopic.INTERNAL_COMMANDS: ("PostEntry", "ReserveLeg", "SettleLeg"),
    LedgerTopic.INTERNAL_COORDINATOR: ("SubmitBatch", "RollbackBatch", "LegReport", "BatchTick"),
    LedgerTopic.CHAIN_CLAIMS: ("Entry", "ReconcileTick"),
    LedgerTopic.QUARANTINE: ("DeadLetter",),
    LedgerTopic.ENTRIES: ("Entry",),
    LedgerTopic.RESULTS: ("Result",),
    LedgerTopic.BALANCES: ("Balance",),
    LedgerTopic.TREE_HEADS: ("TreeHead",),
    LedgerTopic.DLQ: ("DeadLetter",),
    LedgerTopic.SINK_DLQ: ("DeadLetter",),
    LedgerTopic.RECEIPTS: ("Receipt",),
    LedgerTopic.ANCHORS: ("Anchor",),
    LedgerTopic.RECONCILIATIONS: ("Reconciliation",),
    LedgerTopic.DISCREPANCIES: ("Discrepancy",),
    LedgerTopic.CHAIN_TRANSFERS: ("ChainTransfer",),
}
# The topics a worker writes or decides: it registers their schemas in Confluent framing.
WORKER_TOPICS: tuple[LedgerTopic, ...] = (
    *INPUT_RECORDS, LedgerTopic.ENTRIES, LedgerTopic.RESULTS, LedgerTopic.BALANCES,
    LedgerTopic.TREE_HEADS, LedgerTopic.DLQ, LedgerTopic.RECONCILIATIONS,
    LedgerTopic.DISCREPANCIES)
CLIENT_TOPICS: frozenset[LedgerTopic] = frozenset(
    LedgerTopic(t.name) for t in TOPICS if t.access is Access.CLIENT)


def misplaced_reason(topic: LedgerTopic, record_name: str) -> Reason | None:
    """Why `record_name` may not be decided from `topic` (a DLQ reason), or None if it may."""
    if record_name in INPUT_RECORDS[topic]:
        return None
    if topic in CLIENT_TOPICS:
        return Reason.NOT_A_CLIENT_COMMAND
    return Reason.UNKNOWN_COMMAND


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
