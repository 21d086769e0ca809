"""The ledger's Kafka topics (the contract), their configs, and `topics create`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.core import Reason
from sardis_ledger.streams.errors import LedgerError
from sardis_ledger.streams.topic_policy import (
    CLEANUP_POLICY_KEY,
    Difference,
    ReplicationPlan,
    Severity,
    TopicShape,
    differences,
    plan_replication,
    refusals,
)

CREATE_TIMEOUT_MS = 30_000
RETAIN_FOREVER = {"retention.ms": "-1", "retention.bytes": "-1"}
MESSAGE_BYTES_MAX = 1_048_576
# Offsets read back from the end of each ledger.entries partition to find its newest entry (the
# tail may hold transaction markers and aborted records).
OWNERSHIP_TAIL_OFFSETS = 64
CHECK_FETCH_TIMEOUT_MS = 2_000


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


@dataclass(frozen=True, slots=True)
class TopicReport:
    """What `topics create`/`topics check` found: the cluster's plan, topics made, differences."""

    plan: ReplicationPlan
    created: tuple[str, ...]
    differences: tuple[Difference, ...]

    def unsafe(self, *, allow_unsafe: bool = False) -> list[str]:
        return refusals(list(self.differences), self.plan, allow_unsafe=allow_unsafe)


def expected_topics(settings: Settings, plan: ReplicationPlan) -> list[TopicShape]:
    """Every ledger topic as it must be: partitions, replication, retention or compaction."""
    common = {"max.message.bytes": str(MESSAGE_BYTES_MAX), **plan.topic_config()}
    shapes = [TopicShape(settings.topic(spec.name), settings.partitions, plan.replication_factor,
                         {CLEANUP_POLICY_KEY: "delete", **spec.config, **common})
              for spec in TOPICS]
    shapes += [TopicShape(name, settings.partitions, plan.replication_factor,
                          {CLEANUP_POLICY_KEY: "compact", **common})
               for name in changelog_topics(settings)]
    return shapes


async def create_topics(settings: Settings, *, check_entries: bool = True) -> list[str]:
    """Create every missing ledger topic (SARDIS_PARTITIONS partitions, replication from the
    cluster); raises TopicError when existing topics would move accounts between partitions.
    `check_entries=False` skips reading ledger.entries, for principals that may not read it."""
    report = await ensure_topics(settings, check_entries=check_entries)
    ownership = [str(d) for d in report.differences if d.severity is Severity.OWNERSHIP]
    if ownership:
        raise TopicError("; ".join(ownership))
    return list(report.created)


async def ensure_topics(settings: Settings, *, create: bool = True,
                        check_entries: bool = False) -> TopicReport:
    """Create what is missing (unless `create` is false), then compare every topic with what it
    must be. `check_entries` also reads the newest entry of each partition: an entry whose
    account another partition owns means partitions were added under the ledger."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(**settings.kafka_connection(),
                                request_timeout_ms=CREATE_TIMEOUT_MS)
    try:
        await admin.start()
        plan = plan_replication(settings.replication_factor, await broker_count(admin))
        expected = expected_topics(settings, plan)
        existing = set(await admin.list_topics())
        missing = [shape for shape in expected if shape.name not in existing]
        if create and missing:
            await _create(admin, missing)
        # Only topics that exist: describing a missing one would create it on a broker with
        # auto.create.topics.enable, with the broker's defaults.
        present = [s.name for s in expected if s.name in existing or create]
        observed = await _observe(admin, present, wait_leaders=create and bool(missing))
        found = [d for shape in expected for d in differences(shape, observed.get(shape.name))]
        entries_existed = settings.topic(LedgerTopic.ENTRIES) in existing
        if check_entries and entries_existed and not any(d.severity is Severity.OWNERSHIP
                                                         for d in found):
            found += await misplaced_entries(settings)
    except KafkaError as exc:
        raise TopicError(f"topics on {settings.kafka_bootstrap}: {exc!r}",
                         retriable=exc.retriable) from exc
    finally:
        await admin.close()
    return TopicReport(plan, tuple(s.name for s in missing) if create else (), tuple(found))


def worker_settings(settings: Settings, report: TopicReport, *, allow_unsafe: bool) -> Settings:
    """The settings a worker runs with (its replication resolved from the cluster), or TopicError
    naming every topic setting that forbids starting it."""
    reasons = report.unsafe(allow_unsafe=allow_unsafe)
    if reasons:
        hint = ("" if all("breaks account ownership" in r for r in reasons) else
                "\n  (to start anyway, knowing a broker loss can lose entries: --allow-unsafe-topics)")
        raise TopicError("refusing to start the worker on these topics:\n  "
                         + "\n  ".join(reasons) + hint)
    return dataclasses.replace(settings, replication_factor=report.plan.replication_factor)


def app_topic_settings(settings: Settings) -> dict[str, Any]:
    """Faust's settings for the topics it declares itself (its assignor's leader topic; the
    changelogs are created here first), from the replication `worker_settings` resolved."""
    if settings.replication_factor is None:
        raise TopicError("the worker's replication factor is unresolved: start workers with "
                         "`sardis-ledger worker`, which resolves it from the cluster")
    return {"topic_replication_factor": settings.replication_factor}


async def broker_count(admin: Any) -> int:
    """Brokers registered with the cluster now (a stopped broker is not counted)."""
    return len((await admin.describe_cluster())["brokers"])


async def _create(admin: Any, shapes: list[TopicShape]) -> None:
    from aiokafka.admin import NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    response = await admin.create_topics(
        [NewTopic(s.name, s.partitions, s.replication_factor, topic_configs=dict(s.config))
         for s in shapes], timeout_ms=CREATE_TIMEOUT_MS)
    for name, code, *_ in response.topic_errors:
        if code not in (0, TopicAlreadyExistsError.errno):
            raise TopicError(f"creating {name}: Kafka error code {code}")


async def _observe(admin: Any, names: list[str], *, wait_leaders: bool) -> dict[str, TopicShape]:
    """Topics that exist (`names`), with their replication and configs."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    described = (await _describe_when_ready(admin, names) if wait_leaders
                 else await admin.describe_topics(names))
    present = {t["topic"]: t for t in described
               if t.get("error_code", 0) == 0 and t["partitions"]}
    if not present:
        return {}
    responses = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, name) for name in present])
    configs: dict[str, dict[str, str]] = {}
    for response in responses:
        for resource in response.to_object()["resources"]:
            configs[resource["resource_name"]] = {
                entry["config_names"]: entry["config_value"]
                for entry in resource["config_entries"] if entry["config_value"] is not None}
    return {name: TopicShape(name, len(topic["partitions"]),
                             min(len(p["replicas"]) for p in topic["partitions"]),
                             configs.get(name, {}))
            for name, topic in present.items()}


async def misplaced_entries(settings: Settings) -> list[Difference]:
    """The newest entry of each partition of ledger.entries must belong to an account that
    partition owns under SARDIS_PARTITIONS; if not, partitions were added under the ledger."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from sardis_ledger.schemas.codec import AvroCodec
    from sardis_ledger.streams.core import partition_for

    topic = settings.topic(LedgerTopic.ENTRIES)
    codec = AvroCodec()
    consumer = AIOKafkaConsumer(**settings.kafka_connection(),
                                isolation_level="read_committed", enable_auto_commit=False)
    await consumer.start()
    found: list[Difference] = []
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.partitions)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            account = await _newest_account(consumer, codec, tp, ends[tp])
            if account is not None and partition_for(account, settings.partitions) != tp.partition:
                owner = partition_for(account, settings.partitions)
                found.append(Difference(
                    topic, f"partition {tp.partition}", "entries of accounts it owns",
                    f"an entry of {account!r}, which partition {owner} owns with "
                    f"{settings.partitions} partitions", Severity.OWNERSHIP,
                    "partitions were added under the ledger; see README: Growing partitions"))
    finally:
        await consumer.stop()
    return found


async def _newest_account(consumer: Any, codec: Any, tp: Any, end: int) -> str | None:
    """The account of the last decodable Entry before `end` (None: no entry in the tail)."""
    from sardis_ledger.streams.errors import CodecError

    if end == 0:
        return None
    consumer.seek(tp, max(0, end - OWNERSHIP_TAIL_OFFSETS))
    account: str | None = None
    while (await consumer.position(tp)) < end:
        batch = await consumer.getmany(tp, timeout_ms=CHECK_FETCH_TIMEOUT_MS)
        if not batch:
            break  # only transaction markers or aborted records left before the end
        for message in batch.get(tp, []):
            try:
                name, record = codec.decode(message.value)
            except CodecError:
                continue
            if name == "Entry" and message.offset < end:
                account = record["account_id"]
    return account


async def _describe_when_ready(admin: Any, names: list[str]) -> list[dict[str, Any]]:
    """Describe topics once every partition has a leader (fresh topics need a moment)."""
    import asyncio
    import time

    deadline = time.monotonic() + CREATE_TIMEOUT_MS / 1000
    while True:
        described: list[dict[str, Any]] = await admin.describe_topics(names)
        ready = all(t.get("error_code", 0) == 0 and t["partitions"]
                    and all(p["leader"] >= 0 for p in t["partitions"])
                    for t in described)
        if ready or time.monotonic() > deadline:
            return described
        await asyncio.sleep(0.2)


async def delete_topics_with_prefix(settings: Settings) -> list[str]:
    """Delete every topic under the settings' prefix (benchmarks and tests clean up after runs)."""
    from aiokafka.admin import AIOKafkaAdminClient

    if not settings.topic_prefix:
        raise TopicError("refusing to delete topics without a topic prefix")
    admin = AIOKafkaAdminClient(**settings.kafka_connection(),
                                request_timeout_ms=CREATE_TIMEOUT_MS)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(settings.topic_prefix)]
        if names:
            await admin.delete_topics(names)
        return names
    finally:
        await admin.close()
