"""The Kafka ACLs of a deployment, as data: which principal may do what on which topic (pure)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum, StrEnum

from sardis_ledger.streams.errors import ConfigError
from sardis_ledger.streams.topics import APP_NAME, TOPICS, LedgerTopic

# Names other modules give their consumer groups and transactional ids (kept in step by a unit
# test): the worker's Faust app id, the immudb sinks' group, quarantine and the chain watcher.
IMMUDB_SINK_GROUP = "sardis-immudb-sink"
QUARANTINE_TRANSACTIONAL_ID = "sardis-quarantine"
CHAIN_WATCH_TRANSACTIONAL_PREFIX = "sardis-chain-watch."
CHAIN_WATCH_STATE_TOPIC = "chain.watch-state"
PRINCIPAL_LENGTH_MAX = 200


class ResourceType(IntEnum):
    """org.apache.kafka.common.resource.ResourceType codes."""

    ANY = 1
    TOPIC = 2
    GROUP = 3
    CLUSTER = 4
    TRANSACTIONAL_ID = 5


class PatternType(IntEnum):
    """org.apache.kafka.common.resource.PatternType codes."""

    ANY = 1
    LITERAL = 3
    PREFIXED = 4


class Operation(IntEnum):
    """org.apache.kafka.common.acl.AclOperation codes (the ones a plan may use)."""

    ANY = 1
    READ = 3
    WRITE = 4
    CREATE = 5
    DESCRIBE = 8
    DESCRIBE_CONFIGS = 10


class Permission(IntEnum):
    ANY = 1
    DENY = 2
    ALLOW = 3


class Role(StrEnum):
    CLIENT = "client"  # LedgerClient, `produce`, `balance`: the untrusted side
    WORKER = "worker"  # the Faust ledger worker
    SINK = "sink"  # the PostgreSQL and immudb sinks
    WATCHER = "watcher"  # the chain watcher
    OPERATOR = "operator"  # anchoring and quarantine, run by hand


DEFAULT_PRINCIPALS: dict[Role, str] = {role: f"User:sardis-{role.value}" for role in Role}


@dataclass(frozen=True, slots=True, order=True)
class AclBinding:
    """One ALLOW rule: `principal` may `operation` on the resource, from any host."""

    principal: str
    resource_type: ResourceType
    pattern: PatternType
    name: str
    operation: Operation

    def row(self) -> str:
        return (f"{self.principal:<24} {self.operation.name:<16} {self.resource_type.name:<16} "
                f"{self.pattern.name:<8} {self.name}")


def _grants(prefix: str) -> dict[Role, list[tuple[ResourceType, PatternType, str, Operation]]]:
    def topic(name: str, *operations: Operation) -> list[tuple[ResourceType, PatternType, str,
                                                               Operation]]:
        return [(ResourceType.TOPIC, PatternType.LITERAL, f"{prefix}{name}", op)
                for op in operations]

    read, write = Operation.READ, Operation.WRITE
    app_id = f"{prefix}{APP_NAME}"
    client = [*topic(LedgerTopic.COMMANDS, write), *topic(LedgerTopic.BATCHES, write),
              *topic(LedgerTopic.RESULTS, read), *topic(LedgerTopic.BALANCES, read)]
    worker = [
        *topic(LedgerTopic.COMMANDS, read), *topic(LedgerTopic.BATCHES, read),
        *topic(LedgerTopic.CHAIN_TRANSFERS, read), *topic(CHAIN_WATCH_STATE_TOPIC, read),
        (ResourceType.TOPIC, PatternType.PREFIXED, f"{prefix}ledger.internal.", read),
        (ResourceType.TOPIC, PatternType.PREFIXED, f"{prefix}ledger.internal.", write),
        *[g for t in (LedgerTopic.ENTRIES, LedgerTopic.RESULTS, LedgerTopic.BALANCES,
                      LedgerTopic.TREE_HEADS, LedgerTopic.DLQ, LedgerTopic.RECONCILIATIONS,
                      LedgerTopic.DISCREPANCIES) for g in topic(t, write)],
        # `topics check` at start reads the newest entry of each partition.
        *topic(LedgerTopic.ENTRIES, read),
        # Faust's own topics (table changelogs, the assignor's) start with the app id.
        *[(ResourceType.TOPIC, PatternType.PREFIXED, app_id, op)
          for op in (read, write, Operation.CREATE)],
        (ResourceType.GROUP, PatternType.PREFIXED, app_id, read),
        (ResourceType.TRANSACTIONAL_ID, PatternType.PREFIXED, app_id, write),
    ]
    sink = [
        *topic(LedgerTopic.ENTRIES, read), *topic(LedgerTopic.TREE_HEADS, read),
        *topic(LedgerTopic.RECEIPTS, read, write), *topic(LedgerTopic.ANCHORS, read),
        *topic(LedgerTopic.SINK_DLQ, write),
        (ResourceType.GROUP, PatternType.PREFIXED, f"{prefix}{IMMUDB_SINK_GROUP}", read),
        (ResourceType.TRANSACTIONAL_ID, PatternType.PREFIXED, f"{prefix}{IMMUDB_SINK_GROUP}",
         write),
    ]
    watcher = [
        *topic(LedgerTopic.CHAIN_TRANSFERS, write),
        *topic(CHAIN_WATCH_STATE_TOPIC, read, write, Operation.CREATE),
        (ResourceType.TRANSACTIONAL_ID, PatternType.PREFIXED,
         f"{CHAIN_WATCH_TRANSACTIONAL_PREFIX}{prefix}", write),
    ]
    operator = [
        *topic(LedgerTopic.TREE_HEADS, read), *topic(LedgerTopic.ANCHORS, read, write),
        *topic(LedgerTopic.ENTRIES, read), *topic(LedgerTopic.DLQ, read),
        *topic(LedgerTopic.QUARANTINE, read, write),
        (ResourceType.TRANSACTIONAL_ID, PatternType.LITERAL,
         f"{prefix}{QUARANTINE_TRANSACTIONAL_ID}", write),
    ]
    # Services check every ledger topic at start (streams/topics.ensure_topics): they must see
    # each one (DESCRIBE_CONFIGS does not imply DESCRIBE, and a topic a process cannot describe
    # looks missing, so it would try to create it) and read its config. Metadata only, no records.
    described = [*(g for spec in TOPICS
                   for g in topic(spec.name, Operation.DESCRIBE, Operation.DESCRIBE_CONFIGS)),
                 *((ResourceType.TOPIC, PatternType.PREFIXED, app_id, op)  # the changelogs
                   for op in (Operation.DESCRIBE, Operation.DESCRIBE_CONFIGS))]
    return {Role.CLIENT: client, Role.WORKER: worker + described, Role.SINK: sink + described,
            Role.WATCHER: watcher + described, Role.OPERATOR: operator + described}


def plan(prefix: str, principals: Mapping[Role, str] | None = None,
         roles: Iterable[Role] | None = None) -> tuple[AclBinding, ...]:
    """The ALLOW rules of a deployment whose topics start with `prefix`, sorted, no duplicates.

    Everything else is denied (the broker runs with allow.everyone.if.no.acl.found=false).
    """
    names = {**DEFAULT_PRINCIPALS, **(principals or {})}
    wanted = set(Role) if roles is None else set(roles)
    bindings = {AclBinding(names[role], resource, pattern, name, operation)
                for role, grants in _grants(prefix).items() if role in wanted
                for resource, pattern, name, operation in grants}
    return tuple(sorted(bindings))


def parse_principal(raw: str) -> tuple[Role, str]:
    """`role=User:name` from the command line, checked."""
    role_text, sep, principal = raw.partition("=")
    try:
        role = Role(role_text)
    except ValueError as exc:
        raise ConfigError(f"--principal {raw!r}: role must be one of "
                          f"{', '.join(r.value for r in Role)}") from exc
    kind, colon, name = principal.partition(":")
    if not sep or kind != "User" or not colon or not name or len(principal) > PRINCIPAL_LENGTH_MAX \
            or any(c.isspace() or c in ",;" for c in name):
        raise ConfigError(f"--principal {raw!r}: use ROLE=User:NAME")
    return role, principal


def table(bindings: Iterable[AclBinding]) -> str:
    header = f"{'PRINCIPAL':<24} {'OPERATION':<16} {'RESOURCE':<16} {'PATTERN':<8} NAME"
    return "\n".join([header, *(b.row() for b in bindings)])
