"""The replication and retention ledger topics need on N brokers, and how a topic differs (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from sardis_ledger.streams.errors import ConfigError

# Three replicas with min.insync.replicas 2: one broker can be lost (or restarted) while every
# partition still accepts acks=all writes, and no acknowledged write lives on one disk only.
REPLICATION_FACTOR_SAFE = 3
MIN_INSYNC_REPLICAS_FLOOR = 1
RETENTION_FOREVER = -1
MIN_INSYNC_KEY = "min.insync.replicas"
UNCLEAN_ELECTION_KEY = "unclean.leader.election.enable"
CLEANUP_POLICY_KEY = "cleanup.policy"
RETENTION_KEYS = ("retention.ms", "retention.bytes")


@dataclass(frozen=True, slots=True)
class ReplicationPlan:
    """The replication the topics get on this cluster, and why an operator should worry."""

    brokers: int
    replication_factor: int
    min_insync_replicas: int
    warnings: tuple[str, ...] = ()

    @property
    def loses_data_on_broker_loss(self) -> bool:
        """One replica on a cluster that has more: losing that broker loses committed entries."""
        return self.replication_factor == 1 and self.brokers > 1

    def topic_config(self) -> dict[str, str]:
        """The replication settings of every ledger topic."""
        return {MIN_INSYNC_KEY: str(self.min_insync_replicas), UNCLEAN_ELECTION_KEY: "false"}


def min_insync_for(replication_factor: int) -> int:
    """RF-1: one replica may be down (a restart, a failure) and acks=all writes still succeed.
    With RF >= 3 that is at least 2, so every acknowledged write is on two brokers."""
    return max(MIN_INSYNC_REPLICAS_FLOOR, replication_factor - 1)


def plan_replication(requested: int | None, brokers: int) -> ReplicationPlan:
    """SARDIS_REPLICATION_FACTOR (None: auto) checked against the cluster's broker count."""
    if brokers < 1:
        raise ConfigError("the Kafka cluster reports no brokers")
    if requested is None:
        factor = min(REPLICATION_FACTOR_SAFE, brokers)
    elif requested > brokers:
        raise ConfigError(f"SARDIS_REPLICATION_FACTOR={requested} but the cluster has {brokers} "
                          f"broker(s): a topic cannot have more replicas than brokers")
    else:
        factor = requested
    warnings: list[str] = []
    if factor == 1 and brokers > 1:
        warnings.append(f"replication factor 1 on a cluster of {brokers} brokers: losing one broker "
                        "loses committed entries (workers refuse such topics unless allowed)")
    elif factor < REPLICATION_FACTOR_SAFE:
        warnings.append(f"replication factor {factor} ({brokers} broker(s)): "
                        + ("a broker loss loses committed entries; fine for development only"
                           if factor == 1 else
                           f"min.insync.replicas is {min_insync_for(factor)}, so an acknowledged "
                           "write may live on one broker; production needs 3 brokers"))
    return ReplicationPlan(brokers, factor, min_insync_for(factor), tuple(warnings))


@dataclass(frozen=True, slots=True)
class TopicShape:
    """A topic's partitions, replication and the configs the ledger sets (expected or observed)."""

    name: str
    partitions: int
    replication_factor: int
    config: Mapping[str, str] = field(default_factory=dict)


class Severity(StrEnum):
    """How bad a difference is, which decides whether a worker may start on it."""

    OWNERSHIP = "breaks account ownership"  # never allowed: accounts would change partitions
    LOSES_DATA = "can lose data"  # allowed only with --allow-unsafe-topics
    MISSING = "missing"  # `topics create` makes it
    DIFFERS = "differs"  # reported, harmless to data


@dataclass(frozen=True, slots=True)
class Difference:
    topic: str
    setting: str
    expected: str
    actual: str
    severity: Severity
    why: str = ""

    def __str__(self) -> str:
        why = f": {self.why}" if self.why else ""
        return (f"{self.topic}: {self.setting} is {self.actual}, expected {self.expected} "
                f"({self.severity}{why})")


def differences(expected: TopicShape, observed: TopicShape | None) -> list[Difference]:
    """Every way `observed` (None: the topic does not exist) differs from `expected`."""
    if observed is None:
        return [Difference(expected.name, "topic", "present", "missing", Severity.MISSING,
                           "`sardis-ledger topics create` creates it")]
    found: list[Difference] = []
    if observed.partitions != expected.partitions:
        found.append(Difference(
            expected.name, "partitions", str(expected.partitions), str(observed.partitions),
            Severity.OWNERSHIP, "an account's partition is murmur2(account) % partitions; see "
            "README: Growing partitions"))
    found += _replication_differences(expected, observed)
    for key, want in expected.config.items():
        if key in (MIN_INSYNC_KEY,):
            continue  # judged with the replication above
        got = observed.config.get(key)
        if got is None or got == want:
            continue
        found.append(Difference(expected.name, key, want, got, *_config_severity(key, want, got)))
    return found


def _replication_differences(expected: TopicShape, observed: TopicShape) -> list[Difference]:
    found: list[Difference] = []
    rf_got, rf_want = observed.replication_factor, expected.replication_factor
    if rf_got < rf_want:
        found.append(Difference(expected.name, "replication factor", str(rf_want), str(rf_got),
                                Severity.LOSES_DATA,
                                f"losing {rf_got} broker(s) loses its committed records"))
    elif rf_got > rf_want:
        found.append(Difference(expected.name, "replication factor", str(rf_want), str(rf_got),
                                Severity.DIFFERS, "more copies than configured"))
    want_isr = expected.config.get(MIN_INSYNC_KEY)
    got_isr = observed.config.get(MIN_INSYNC_KEY)
    if want_isr is not None and got_isr is not None and got_isr != want_isr:
        if int(got_isr) < int(want_isr):
            found.append(Difference(expected.name, MIN_INSYNC_KEY, want_isr, got_isr,
                                    Severity.LOSES_DATA,
                                    "an acknowledged write may live on fewer brokers"))
        else:
            found.append(Difference(expected.name, MIN_INSYNC_KEY, want_isr, got_isr,
                                    Severity.DIFFERS, "writes stop with fewer brokers down"))
    return found


def _config_severity(key: str, want: str, got: str) -> tuple[Severity, str]:
    if key == UNCLEAN_ELECTION_KEY:
        return ((Severity.LOSES_DATA, "an out-of-sync replica may become leader")
                if got == "true" else (Severity.DIFFERS, ""))
    if key == CLEANUP_POLICY_KEY:
        if "compact" in got and "compact" not in want:
            return Severity.LOSES_DATA, "compaction keeps only the last record of each key"
        return Severity.LOSES_DATA, "deletion by retention drops state a worker recovers from"
    if key in RETENTION_KEYS:
        if _retention(got) < _retention(want):
            return Severity.LOSES_DATA, "records are deleted sooner"
        return Severity.DIFFERS, "records are kept longer"
    return Severity.DIFFERS, ""


def _retention(value: str) -> float:
    number = int(value)
    return float("inf") if number == RETENTION_FOREVER else float(number)


def refusals(found: list[Difference], plan: ReplicationPlan, *,
             allow_unsafe: bool) -> list[str]:
    """Why a worker must not start on these topics ([] if it may): ownership breaks always,
    data-losing settings unless `allow_unsafe` (the operator's explicit choice)."""
    reasons = [str(d) for d in found if d.severity is Severity.OWNERSHIP]
    if not allow_unsafe:
        reasons += [str(d) for d in found if d.severity is Severity.LOSES_DATA]
        if plan.loses_data_on_broker_loss:
            reasons.append(plan.warnings[0])
    return reasons
