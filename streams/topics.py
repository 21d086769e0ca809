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
)


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
        wanted = [t for t in TOPICS if settings.topic(t.name) not in existing]
        if wanted:
            response = await admin.create_topics(
                [NewTopic(settings.topic(t.name), settings.partitions, 1,
                          topic_configs={**t.config, "max.message.bytes": str(MESSAGE_BYTES_MAX)})
                 for t in wanted],
                timeout_ms=CREATE_TIMEOUT_MS)
            for name, code, *_ in response.topic_errors:
                if code not in (0, TopicAlreadyExistsError.errno):
                    raise TopicError(f"creating {name}: Kafka error code {code}")
            created = [settings.topic(t.name) for t in wanted]
        described = await admin.describe_topics([settings.topic(t.name) for t in TOPICS])
        for topic in described:
            count = len(topic["partitions"])
            if count != settings.partitions:
                raise TopicError(f"{topic['topic']} has {count} partitions, SARDIS_PARTITIONS is "
                                 f"{settings.partitions}: every ledger topic needs the same count")
    except KafkaError as exc:
        raise TopicError(f"creating topics on {settings.kafka_bootstrap}: {exc!r}",
                         retriable=exc.retriable) from exc
    finally:
        await admin.close()
    return created
