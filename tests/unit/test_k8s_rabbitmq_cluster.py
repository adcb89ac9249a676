"""`toposerve render k8s --rabbitmq-replicas 3`: a RabbitmqCluster next to the profile's objects.

The RabbitMQ Cluster Operator's CRD schema is not in any package registry we can use (PyPI, npm,
Debian), so the structure emitted is checked here against the CRD's documented fields.
"""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from toposerve.deploy.cli.render import render
from toposerve.deploy.k8s import QUORUM_CLUSTER_CONFIG, render_k8s
from toposerve.deploy.profile import load_profile

NS = "ml"


def test_a_three_node_cluster_is_rendered_and_the_accounts_and_scalers_use_it() -> None:
    profile = load_profile("asynchronous")
    objects = render_k8s(profile, namespace=NS, image="toposerve:test", rabbitmq_cluster="mq", rabbitmq_replicas=3)
    (cluster,) = [o for o in objects if o["kind"] == "RabbitmqCluster"]
    assert cluster["apiVersion"] == "rabbitmq.com/v1beta1"
    assert cluster["metadata"]["name"] == "mq" and cluster["metadata"]["namespace"] == NS
    assert set(cluster["spec"]) <= {"replicas", "rabbitmq", "image", "persistence", "resources", "service", "tls"}
    assert cluster["spec"]["replicas"] == 3
    config = cluster["spec"]["rabbitmq"]["additionalConfig"]
    assert config == QUORUM_CLUSTER_CONFIG and "pause_minority" in config
    accounts = [o for o in objects if o["kind"] in ("User", "Permission", "TopicPermission")]
    assert accounts and all(o["spec"]["rabbitmqClusterReference"] == {"name": "mq"} for o in accounts)
    scaled = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ScaledObject"}
    queues = {o["spec"]["triggers"][0]["metadata"]["queueName"] for o in scaled.values()}
    assert queues == {q.name for q in profile.queue_specs(NS)}  # each stage on its own queue depth


def test_without_replicas_it_points_at_an_existing_cluster() -> None:
    objects = render_k8s(load_profile("batch"), namespace=NS, image="toposerve:test", rabbitmq_cluster="shared")
    assert not [o for o in objects if o["kind"] == "RabbitmqCluster"]
    assert {o["spec"]["rabbitmqClusterReference"]["name"] for o in objects if o["kind"] == "User"} == {"shared"}


def test_the_cli_renders_it_and_refuses_a_negative_count() -> None:
    runner = CliRunner()
    result = runner.invoke(render, ["k8s", "--profile", "asynchronous", "--rabbitmq-replicas", "3"])
    assert result.exit_code == 0, result.output
    kinds = [doc["kind"] for doc in yaml.safe_load_all(result.output) if doc]
    assert kinds[0] == "RabbitmqCluster" and "ScaledObject" in kinds
    assert "durable work wants `queue_type: quorum`" in result.output  # asynchronous ships classic
    refused = runner.invoke(render, ["k8s", "--profile", "asynchronous", "--rabbitmq-replicas", "-1"])
    assert refused.exit_code == 2 and "--rabbitmq-replicas" in refused.output


def test_a_cluster_needs_a_replica() -> None:
    from toposerve.deploy.k8s import rabbitmq_cluster_object

    with pytest.raises(ValueError, match="at least one replica"):
        rabbitmq_cluster_object("mq", NS, 0, {})
