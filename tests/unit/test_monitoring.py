"""Prometheus, Grafana and PodMonitors: the shipped files are current, and the dashboard asks only for metrics that exist."""

from __future__ import annotations

import json
import re

import pytest
from prometheus_client import CollectorRegistry

from toposerve.api.ingress import IngressStats
from toposerve.api.metrics import IngressMetrics
from toposerve.consumers import StageMetricSet
from toposerve.deploy.compose import render_compose
from toposerve.deploy.k8s import render_k8s, stage_workers
from toposerve.deploy.monitoring import MONITORING_DIR, dashboard, monitoring_files, prometheus_config
from toposerve.deploy.profile import available_profiles, load_profile

PROMETHEUS_OWN = {"up"}  # Prometheus' own series, not an exporter's


def all_profiles():
    return [load_profile(name) for name in available_profiles()]


class _Ingress:
    stats = IngressStats()


def exported_names() -> set[str]:
    """Every sample name the ingress's and a stage's registries expose once they have counted something."""
    registry = CollectorRegistry()
    ingress = IngressMetrics(registry)
    ingress.watch(_Ingress())  # type: ignore[arg-type]
    ingress.request_counter("iris", 200).inc()
    ingress.duration_histogram("iris", "sync").observe(0.01)
    ingress.failure_counter("invalid_input").inc()
    stage = StageMetricSet(registry).for_stage("predict")
    stage.handled.inc()
    stage.processing_seconds.observe(0.01)
    stage.queue_seconds.observe(0.01)
    stage.batch_size.observe(4)
    return {sample.name for family in registry.collect() for sample in family.samples}


def referenced_names(document: dict) -> set[str]:
    exprs = [target["expr"] for panel in document["panels"] for target in panel["targets"]]
    exprs += [variable["definition"] for variable in document["templating"]["list"]]
    names = set()
    for expr in exprs:
        for name in re.findall(r"\b([a-z_][a-z0-9_]*)\s*(?=[{\[(,)])", expr):
            if name.startswith("toposerve_") or name in PROMETHEUS_OWN:
                names.add(name)
        names |= set(re.findall(r"\btoposerve_[a-z0-9_]+", expr))
    return names


def test_every_metric_the_dashboard_asks_for_is_exported() -> None:
    wanted = referenced_names(dashboard())
    exported = exported_names()
    assert len(wanted) >= 10  # not vacuous: the ingress's and the stages' families are there
    assert wanted - PROMETHEUS_OWN <= exported, sorted(wanted - PROMETHEUS_OWN - exported)


def test_a_metric_that_is_not_exported_would_be_caught() -> None:
    broken = dashboard()
    broken["panels"][0]["targets"][0]["expr"] = "sum(rate(toposerve_requests_served_total[1m]))"
    assert referenced_names(broken) - PROMETHEUS_OWN - exported_names() == {"toposerve_requests_served_total"}


def test_the_shipped_monitoring_files_are_current() -> None:
    for relative, text in monitoring_files(all_profiles()).items():
        path = MONITORING_DIR / relative
        assert path.is_file() and path.read_text() == text, (
            f"{path} is stale: regenerate with `toposerve render monitoring -o deploy/monitoring`")
    json.loads((MONITORING_DIR / "grafana/dashboards/toposerve.json").read_text())


def test_prometheus_scrapes_every_ingress_and_stage_service_of_every_profile() -> None:
    profiles = all_profiles()
    jobs = {job["job_name"]: job for job in prometheus_config(profiles)["scrape_configs"]}
    services = render_compose(profiles)["services"]
    for profile in profiles:
        assert f"{profile.name}-ingress" in jobs
        for stage in stage_workers(profile):
            job = jobs[f"{profile.name}-{stage}"]
            assert job["dns_sd_configs"][0]["names"] == [f"{profile.name}-{stage}"]
            assert f"{profile.name}-{stage}" in services  # the name it resolves is a compose service
    assert services["prometheus"]["profiles"] == services["grafana"]["profiles"] == ["monitoring"]


@pytest.mark.parametrize("name", ["asynchronous", "web_single"])
def test_the_kubernetes_output_has_a_pod_monitor_on_the_pods_metrics_ports(name: str) -> None:
    objects = render_k8s(load_profile(name), namespace="ml", image="toposerve:test")
    (monitor,) = [obj for obj in objects if obj["kind"] == "PodMonitor"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    pods = [obj["spec"]["template"] for obj in objects if obj["kind"] == "Deployment"]
    assert pods and all(selector.items() <= pod["metadata"]["labels"].items() for pod in pods)
    ports = {port["name"] for pod in pods for c in pod["spec"]["containers"] for port in c.get("ports", [])}
    assert {endpoint["port"] for endpoint in monitor["spec"]["podMetricsEndpoints"]} >= ports
