"""Pure parts of the multi-broker dev cluster: ports, the static quorum, each node's properties."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra import harness, kafka_cluster
from sardis_ledger.streams.errors import InfraError


def test_three_nodes_on_their_own_loopback_ports_clear_of_the_single_node() -> None:
    ports = [p for n in kafka_cluster.node_ids() for p in kafka_cluster.node(n).ports]
    assert ports == list(range(19192, 19198))
    assert harness.KAFKA_PORT not in ports and harness.KAFKA_CONTROLLER_PORT not in ports
    assert kafka_cluster.bootstrap() == "127.0.0.1:19192,127.0.0.1:19194,127.0.0.1:19196"
    assert kafka_cluster.voters() == "1@127.0.0.1:19193,2@127.0.0.1:19195,3@127.0.0.1:19197"


def test_node_properties_are_filled_in_replicated_and_bound_to_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SARDIS_RUN_DIR", str(tmp_path))
    text = kafka_cluster.node_properties(2).read_text()
    assert "${" not in text
    lines = set(text.splitlines())
    assert {"node.id=2", "process.roles=broker,controller",
            f"controller.quorum.voters={kafka_cluster.voters()}",
            "listeners=PLAINTEXT://127.0.0.1:19194,CONTROLLER://127.0.0.1:19195",
            f"log.dirs={tmp_path / 'kafka-cluster' / 'node-2' / 'data'}",
            "offsets.topic.replication.factor=3", "transaction.state.log.replication.factor=3",
            "transaction.state.log.min.isr=2", "default.replication.factor=3",
            "min.insync.replicas=2", "unclean.leader.election.enable=false"} <= lines
    assert not any(line.startswith("controller.quorum.bootstrap.servers") for line in lines)


def test_one_cluster_id_for_every_node_and_no_other_quorum_on_its_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SARDIS_RUN_DIR", str(tmp_path))
    first = kafka_cluster._cluster_id(3)
    assert kafka_cluster._cluster_id(3) == first
    with pytest.raises(InfraError, match="formatted for the quorum"):
        kafka_cluster._cluster_id(5)


def test_a_cluster_has_at_least_three_nodes() -> None:
    with pytest.raises(InfraError, match="at least 3 nodes"):
        kafka_cluster.up(2)


def test_quorum_lagging_voters_and_its_description() -> None:
    quorum = kafka_cluster.Quorum(2, 7, 1000, (kafka_cluster.Voter(1, 1000, 0),
                                               kafka_cluster.Voter(2, 1000, 0),
                                               kafka_cluster.Voter(3, 200, 0)))
    assert quorum.lagging() == [3]
    assert str(quorum) == ("active controller: node 2 (epoch 7), high watermark 1000; voters "
                           "1 (behind by 0), 2 (leader), 3 (behind by 800)")
