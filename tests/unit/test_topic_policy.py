"""Replication plans from the broker count, and every way a topic can differ from what it must be."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sardis_ledger.streams.errors import ConfigError
from sardis_ledger.streams.topic_policy import (
    REPLICATION_FACTOR_SAFE,
    Severity,
    TopicShape,
    differences,
    min_insync_for,
    plan_replication,
    refusals,
)


@pytest.mark.parametrize(
    ("requested", "brokers", "factor", "min_isr", "warns", "loses_data"),
    [
        (None, 1, 1, 1, True, False),  # the single dev node: allowed, with a warning
        (None, 2, 2, 1, True, False),
        (None, 3, 3, 2, False, False),
        (None, 6, 3, 2, False, False),
        (5, 6, 5, 4, False, False),
        (2, 3, 2, 1, True, False),
        (1, 3, 1, 1, True, True),  # asked for, but losing its broker loses entries
    ],
)
def test_plan_replication(requested: int | None, brokers: int, factor: int, min_isr: int,
                          warns: bool, loses_data: bool) -> None:
    plan = plan_replication(requested, brokers)
    assert (plan.replication_factor, plan.min_insync_replicas) == (factor, min_isr)
    assert bool(plan.warnings) == warns
    assert plan.loses_data_on_broker_loss == loses_data
    assert plan.topic_config() == {"min.insync.replicas": str(min_isr),
                                   "unclean.leader.election.enable": "false"}


@pytest.mark.parametrize(("requested", "brokers", "message"),
                         [(4, 3, "SARDIS_REPLICATION_FACTOR=4 but the cluster has 3 broker"),
                          (None, 0, "no brokers")])
def test_plan_replication_refuses_what_the_cluster_cannot_hold(requested: int | None, brokers: int,
                                                               message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_replication(requested, brokers)


@given(st.integers(min_value=1, max_value=9))
def test_one_broker_may_be_down_and_writes_still_count_twice(replicas: int) -> None:
    min_isr = min_insync_for(replicas)
    assert 1 <= min_isr <= replicas
    if replicas > 1:
        assert min_isr < replicas  # acks=all writes go on with one replica down
    if replicas >= REPLICATION_FACTOR_SAFE:
        assert min_isr >= 2  # an acknowledged write is on two brokers


KEPT = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1",
        "max.message.bytes": "1048576", "min.insync.replicas": "2",
        "unclean.leader.election.enable": "false"}
EXPECTED = TopicShape("ledger.entries", 12, 3, KEPT)


def _observed(partitions: int = 12, replicas: int = 3, **config: str) -> TopicShape:
    return TopicShape("ledger.entries", partitions, replicas,
                      {**KEPT, **{k.replace("_", "."): v for k, v in config.items()}})


@pytest.mark.parametrize(
    ("observed", "setting", "severity"),
    [
        (_observed(partitions=16), "partitions", Severity.OWNERSHIP),
        (_observed(replicas=1), "replication factor", Severity.LOSES_DATA),
        (_observed(replicas=2), "replication factor", Severity.LOSES_DATA),
        (_observed(replicas=5), "replication factor", Severity.DIFFERS),
        (_observed(min_insync_replicas="1"), "min.insync.replicas", Severity.LOSES_DATA),
        (_observed(min_insync_replicas="3"), "min.insync.replicas", Severity.DIFFERS),
        (_observed(unclean_leader_election_enable="true"), "unclean.leader.election.enable",
         Severity.LOSES_DATA),
        (_observed(cleanup_policy="compact"), "cleanup.policy", Severity.LOSES_DATA),
        (_observed(retention_ms="604800000"), "retention.ms", Severity.LOSES_DATA),
        (_observed(retention_bytes="1000000"), "retention.bytes", Severity.LOSES_DATA),
        (_observed(max_message_bytes="500000"), "max.message.bytes", Severity.DIFFERS),
    ],
)
def test_each_difference_is_named_with_its_severity(observed: TopicShape, setting: str,
                                                    severity: Severity) -> None:
    [found] = differences(EXPECTED, observed)
    assert (found.setting, found.severity) == (setting, severity)
    assert str(found).startswith(f"ledger.entries: {setting} is ")


def test_a_topic_as_expected_has_no_difference_and_a_missing_one_says_so() -> None:
    assert differences(EXPECTED, _observed()) == []
    [missing] = differences(EXPECTED, None)
    assert missing.severity is Severity.MISSING and "topics create" in str(missing)


@pytest.mark.parametrize(("want", "got", "severity"),
                         [("compact", "delete", Severity.LOSES_DATA),
                          ("compact", "compact,delete", Severity.LOSES_DATA),
                          ("delete", "compact", Severity.LOSES_DATA)])
def test_any_other_cleanup_policy_loses_records(want: str, got: str, severity: Severity) -> None:
    expected = TopicShape("t", 1, 1, {"cleanup.policy": want})
    [found] = differences(expected, TopicShape("t", 1, 1, {"cleanup.policy": got}))
    assert found.severity is severity


def test_longer_retention_only_differs() -> None:
    expected = TopicShape("t", 1, 1, {"retention.ms": "604800000"})
    [found] = differences(expected, TopicShape("t", 1, 1, {"retention.ms": "-1"}))
    assert found.severity is Severity.DIFFERS


def test_refusals_ownership_always_data_loss_unless_allowed() -> None:
    plan = plan_replication(None, 3)
    found = differences(EXPECTED, _observed(replicas=1)) + \
        differences(EXPECTED, _observed(partitions=24)) + \
        differences(EXPECTED, _observed(max_message_bytes="1"))
    strict = refusals(found, plan, allow_unsafe=False)
    assert len(strict) == 2 and any("partitions" in r for r in strict)
    allowed = refusals(found, plan, allow_unsafe=True)
    assert len(allowed) == 1 and "partitions is 24" in allowed[0]


def test_a_requested_replication_factor_of_one_on_a_cluster_is_refused_unless_allowed() -> None:
    plan = plan_replication(1, 3)
    assert refusals([], plan, allow_unsafe=False) == [plan.warnings[0]]
    assert refusals([], plan, allow_unsafe=True) == []
    assert refusals([], plan_replication(None, 1), allow_unsafe=False) == []
