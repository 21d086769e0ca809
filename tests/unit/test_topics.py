"""The expected shape of every ledger topic, and the settings a worker starts with."""

from __future__ import annotations

import dataclasses

import pytest

from sardis_ledger.streams.config import Settings
from sardis_ledger.streams.topic_policy import Difference, Severity, plan_replication
from sardis_ledger.streams.topics import (
    TOPICS,
    TopicError,
    TopicReport,
    app_topic_settings,
    changelog_topics,
    expected_topics,
    worker_settings,
)

SETTINGS = Settings(topic_prefix="p.", partitions=6)


def test_every_topic_gets_the_plans_replication_and_keeps_what_it_must() -> None:
    plan = plan_replication(None, 3)
    shapes = {s.name: s for s in expected_topics(SETTINGS, plan)}
    assert set(shapes) == {f"p.{t.name}" for t in TOPICS} | set(changelog_topics(SETTINGS))
    for shape in shapes.values():
        assert (shape.partitions, shape.replication_factor) == (6, 3)
        assert shape.config["min.insync.replicas"] == "2"
        assert shape.config["unclean.leader.election.enable"] == "false"
    assert shapes["p.ledger.entries"].config["retention.ms"] == "-1"
    assert shapes["p.ledger.entries"].config["cleanup.policy"] == "delete"
    assert shapes["p.ledger.balances"].config["cleanup.policy"] == "compact"
    for name in changelog_topics(SETTINGS):
        assert shapes[name].config["cleanup.policy"] == "compact"


def _report(*found: Difference, requested: int | None = None, brokers: int = 3) -> TopicReport:
    return TopicReport(plan_replication(requested, brokers), (), found)


RF1 = Difference("p.ledger.entries", "replication factor", "3", "1", Severity.LOSES_DATA)
MOVED = Difference("p.ledger.commands", "partitions", "6", "8", Severity.OWNERSHIP)


def test_worker_settings_resolve_the_replication_factor() -> None:
    settings = worker_settings(SETTINGS, _report(), allow_unsafe=False)
    assert settings == dataclasses.replace(SETTINGS, replication_factor=3)
    assert app_topic_settings(settings) == {"topic_replication_factor": 3}


def test_worker_refuses_topics_that_lose_data_unless_allowed() -> None:
    with pytest.raises(TopicError, match=r"(?s)replication factor is 1.*--allow-unsafe-topics"):
        worker_settings(SETTINGS, _report(RF1), allow_unsafe=False)
    assert worker_settings(SETTINGS, _report(RF1), allow_unsafe=True).replication_factor == 3
    with pytest.raises(TopicError, match="replication factor 1 on a cluster of 3 brokers"):
        worker_settings(SETTINGS, _report(requested=1), allow_unsafe=False)


def test_worker_refuses_moved_accounts_even_when_allowed() -> None:
    with pytest.raises(TopicError, match="partitions is 8") as refused:
        worker_settings(SETTINGS, _report(MOVED), allow_unsafe=True)
    assert "--allow-unsafe-topics" not in str(refused.value)


def test_the_app_needs_a_resolved_replication_factor() -> None:
    with pytest.raises(TopicError, match="unresolved"):
        app_topic_settings(SETTINGS)
