"""The ACL plan: who may do what, table-driven against the topic contract (pure, no broker)."""

from __future__ import annotations

import pytest

from sardis_ledger.sinks.immudb import group_id_for
from sardis_ledger.streams import acl
from sardis_ledger.streams.acl import AclBinding, Operation, PatternType, ResourceType, Role
from sardis_ledger.streams.chain.watch import STATE_TOPIC
from sardis_ledger.streams.chain.watch import transactional_id as watch_transactional_id
from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.errors import ConfigError
from sardis_ledger.streams.topics import TOPICS, LedgerTopic
from sardis_ledger.streams.worker.compat import transactional_id_for

PREFIX = "p."
PLAN = acl.plan(PREFIX)
W, R = Operation.WRITE, Operation.READ


def allowed(role: Role, operation: Operation, resource: ResourceType, name: str) -> bool:
    """Does the plan let `role` do `operation` on `name` (literal or prefixed match)?"""
    principal = acl.DEFAULT_PRINCIPALS[role]
    return any(b.principal == principal and b.operation == operation
               and b.resource_type == resource
               and (b.name == name if b.pattern is PatternType.LITERAL else name.startswith(b.name))
               for b in PLAN)


def topic(name: str) -> str:
    return f"{PREFIX}{name}"


@pytest.mark.parametrize(("role", "operation", "name", "expected"), [
    (Role.CLIENT, W, LedgerTopic.COMMANDS, True),
    (Role.CLIENT, W, LedgerTopic.BATCHES, True),
    (Role.CLIENT, R, LedgerTopic.RESULTS, True),
    (Role.CLIENT, R, LedgerTopic.BALANCES, True),
    (Role.CLIENT, W, LedgerTopic.ENTRIES, False),
    (Role.CLIENT, W, LedgerTopic.INTERNAL_COMMANDS, False),
    (Role.CLIENT, W, LedgerTopic.INTERNAL_COORDINATOR, False),
    (Role.CLIENT, W, LedgerTopic.RESULTS, False),
    (Role.CLIENT, R, LedgerTopic.ENTRIES, False),
    (Role.CLIENT, R, "sardis-ledger-accounts-changelog", False),
    (Role.CLIENT, W, LedgerTopic.CHAIN_TRANSFERS, False),
    (Role.WORKER, W, LedgerTopic.ENTRIES, True),
    (Role.WORKER, W, LedgerTopic.INTERNAL_COMMANDS, True),
    (Role.WORKER, R, LedgerTopic.INTERNAL_COORDINATOR, True),
    (Role.WORKER, W, "sardis-ledger-accounts-changelog", True),
    (Role.WORKER, W, LedgerTopic.COMMANDS, False),
    (Role.WORKER, W, LedgerTopic.CHAIN_TRANSFERS, False),
    (Role.WORKER, W, LedgerTopic.RECEIPTS, False),
    (Role.SINK, R, LedgerTopic.ENTRIES, True),
    (Role.SINK, W, LedgerTopic.RECEIPTS, True),
    (Role.SINK, W, LedgerTopic.SINK_DLQ, True),
    (Role.SINK, W, LedgerTopic.ENTRIES, False),
    (Role.SINK, R, "sardis-ledger-accounts-changelog", False),
    (Role.WATCHER, W, LedgerTopic.CHAIN_TRANSFERS, True),
    (Role.WATCHER, W, STATE_TOPIC, True),
    (Role.WATCHER, W, LedgerTopic.ENTRIES, False),
    (Role.WATCHER, R, LedgerTopic.ENTRIES, False),
    (Role.OPERATOR, W, LedgerTopic.ANCHORS, True),
    (Role.OPERATOR, W, LedgerTopic.ENTRIES, False),
])
def test_who_may_do_what(role: Role, operation: Operation, name: str, expected: bool) -> None:
    assert allowed(role, operation, ResourceType.TOPIC, topic(name)) is expected


def test_only_the_worker_writes_entries_internal_topics_and_changelogs() -> None:
    worker_only = [topic(LedgerTopic.ENTRIES), topic("sardis-ledger-holds-changelog"),
                   topic(LedgerTopic.INTERNAL_COMMANDS), topic(LedgerTopic.INTERNAL_COORDINATOR),
                   topic(LedgerTopic.CHAIN_CLAIMS)]
    for name in worker_only:
        writers = {role for role in Role if allowed(role, W, ResourceType.TOPIC, name)}
        assert writers == {Role.WORKER}, name


def test_each_topic_has_writers_as_its_contract_says() -> None:
    for spec in TOPICS:
        writers = {role for role in Role if allowed(role, W, ResourceType.TOPIC, topic(spec.name))}
        expected = {"clients": {Role.CLIENT}, "workers only": {Role.WORKER},
                    "workers, read by clients": {Role.WORKER}, "sinks": {Role.SINK},
                    "chain watcher": {Role.WATCHER}, "anchoring (operator)": {Role.OPERATOR}}
        wanted = expected[spec.access.value]
        if spec.name == LedgerTopic.QUARANTINE:
            wanted = {Role.WORKER, Role.OPERATOR}  # `quarantine` is run by hand
        assert writers == wanted, spec.name


def test_the_plan_matches_the_names_the_processes_use() -> None:
    settings = Settings(topic_prefix=PREFIX)
    ids = [(Role.WORKER, ResourceType.TRANSACTIONAL_ID,
            transactional_id_for(settings.topic("sardis-ledger"), 0, 3)),
           (Role.WORKER, ResourceType.GROUP, settings.topic("sardis-ledger")),
           (Role.SINK, ResourceType.GROUP, group_id_for(settings)),
           (Role.SINK, ResourceType.TRANSACTIONAL_ID, f"{group_id_for(settings)}-shard-1"),
           (Role.WATCHER, ResourceType.TRANSACTIONAL_ID,
            watch_transactional_id(settings, "anvil", "w1"))]
    for role, resource, name in ids:
        operation = Operation.READ if resource is ResourceType.GROUP else Operation.WRITE
        assert allowed(role, operation, resource, name), (role, name)
    assert STATE_TOPIC == acl.CHAIN_WATCH_STATE_TOPIC


def test_the_plan_is_sorted_without_duplicates_and_only_allows() -> None:
    assert list(PLAN) == sorted(set(PLAN))
    assert acl.plan(PREFIX) == PLAN
    assert not any(b.operation is Operation.ANY for b in PLAN)


def test_principals_and_roles_can_be_chosen() -> None:
    only = acl.plan("", {Role.CLIENT: "User:payments-api"}, [Role.CLIENT])
    assert {b.principal for b in only} == {"User:payments-api"}
    assert AclBinding("User:payments-api", ResourceType.TOPIC, PatternType.LITERAL,
                      "ledger.commands", W) in only


@pytest.mark.parametrize("raw", ["client", "client=bob", "root=User:x", "client=User:",
                                 "client=Group:x", "client=User:a,b"])
def test_bad_principals_are_refused(raw: str) -> None:
    with pytest.raises(ConfigError):
        acl.parse_principal(raw)


def test_acl_plan_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    from sardis_ledger.streams.cli import main

    assert main(["acl", "plan", "--prefix", "p.", "--role", "client",
                 "--principal", "client=User:payments"]) == 0
    out = capsys.readouterr().out
    assert "User:payments            WRITE            TOPIC            LITERAL  p.ledger.commands" in out
    assert "# 4 ALLOW rules for topic prefix 'p.'" in out
    assert main(["acl", "plan", "--principal", "root=User:x"]) == 1  # a clear error, not a trace
