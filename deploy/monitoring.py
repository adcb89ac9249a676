"""Prometheus and Grafana for a deployment: the scrape config (from the profiles), Grafana's
provisioning and the toposerve dashboard (deploy/k8s.py renders the PodMonitors).

``toposerve render monitoring -o deploy/monitoring`` writes ``monitoring_files()``; the files
are committed (compose mounts them: ``docker compose --profile monitoring``) and a unit test
fails when they are stale. The dashboard's queries use only metric names the ingress
(api/metrics.py) and the stages (consumers/metrics.py) export, which a unit test checks
against their registries, plus Prometheus' own ``up``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from toposerve.deploy.k8s import HTTP_PORT, METRICS_PORT, dump_yaml, stage_workers
from toposerve.deploy.profile import Profile

MONITORING_DIR = Path(__file__).parent / "monitoring"
PROMETHEUS_PORT, GRAFANA_PORT = 9090, 3000
DATASOURCE_UID = "toposerve-prometheus"
DASHBOARD_UID = "toposerve"
SCRAPE_INTERVAL = "5s"
RATE_WINDOW = "1m"

Obj = dict[str, Any]


def prometheus_config(profiles: Sequence[Profile]) -> Obj:
    """A job per compose service: the ingress (its port), each stage (DNS lists every replica)."""
    jobs: list[Obj] = []
    for profile in profiles:
        jobs.append({"job_name": f"{profile.name}-ingress", "metrics_path": "/metrics",
                     "static_configs": [{"targets": [f"{profile.name}-ingress:{HTTP_PORT}"],
                                         "labels": {"toposerve_profile": profile.name}}]})
        for stage in stage_workers(profile):
            jobs.append({"job_name": f"{profile.name}-{stage}", "metrics_path": "/metrics",
                         "dns_sd_configs": [{"names": [f"{profile.name}-{stage}"], "type": "A",
                                             "port": METRICS_PORT}],
                         "relabel_configs": [{"target_label": "toposerve_profile", "replacement": profile.name}]})
    return {"global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
            "scrape_configs": jobs}


def _panel(title: str, targets: list[tuple[str, str]], x: int, y: int, unit: str = "short", width: int = 12) -> Obj:
    return {
        "type": "timeseries", "title": title, "datasource": {"type": "prometheus", "uid": DATASOURCE_UID},
        "gridPos": {"x": x, "y": y, "w": width, "h": 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": DATASOURCE_UID}}
                    for i, (expr, legend) in enumerate(targets)],
    }


def dashboard() -> Obj:
    """The toposerve dashboard: the ingress's requests, and each stage's traffic, latency, batches and failures."""
    w = RATE_WINDOW
    stage = 'stage=~"$stage"'
    panels = [
        _panel("Predict requests per second, by model", [
            (f"sum by (model) (rate(toposerve_requests_total[{w}]))", "{{model}}")], 0, 0, "reqps"),
        _panel("Request latency (p50, p99)", [
            (f"histogram_quantile(0.5, sum by (le, model) (rate(toposerve_request_duration_seconds_bucket[{w}])))",
             "p50 {{model}}"),
            (f"histogram_quantile(0.99, sum by (le, model) (rate(toposerve_request_duration_seconds_bucket[{w}])))",
             "p99 {{model}}")], 12, 0, "s"),
        _panel("Errors by code, in flight, shed", [
            (f"sum by (code) (rate(toposerve_failures_total[{w}]))", "{{code}}"),
            ("sum(toposerve_in_flight_requests)", "in flight"),
            (f"sum(rate(toposerve_shed_requests_total[{w}]))", "shed/s")], 0, 8),
        _panel("Prediction cache hit ratio", [
            (f'sum(rate(toposerve_prediction_cache_requests_total{{result="hit"}}[{w}])) / '
             f"sum(rate(toposerve_prediction_cache_requests_total[{w}]))", "hit ratio"),
            (f"sum(rate(toposerve_prediction_cache_errors_total[{w}]))", "errors/s")], 12, 8, "percentunit"),
        _panel("Stage messages per second, by outcome", [
            (f"sum by (stage, outcome) (rate(toposerve_stage_messages_total{{{stage}}}[{w}]))",
             "{{stage}} {{outcome}}")], 0, 16, "ops"),
        _panel("Stage handling time (p50, p99)", [
            (f"histogram_quantile(0.5, sum by (le, stage) (rate(toposerve_stage_processing_seconds_bucket{{{stage}}}"
             f"[{w}])))", "p50 {{stage}}"),
            (f"histogram_quantile(0.99, sum by (le, stage) (rate(toposerve_stage_processing_seconds_bucket{{{stage}}}"
             f"[{w}])))", "p99 {{stage}}")], 12, 16, "s"),
        _panel("Time since the request arrived, when a stage picks it up (p99)", [
            (f"histogram_quantile(0.99, sum by (le, stage) (rate(toposerve_stage_queue_seconds_bucket{{{stage}}}"
             f"[{w}])))", "{{stage}}")], 0, 24, "s"),
        _panel("Predict batch size (mean rows per ONNX Runtime call)", [
            (f"sum by (stage) (rate(toposerve_predict_batch_size_sum{{{stage}}}[{w}])) / "
             f"sum by (stage) (rate(toposerve_predict_batch_size_count{{{stage}}}[{w}]))", "{{stage}}")], 12, 24),
        _panel("Failures and dead letters per second, by stage", [
            (f'sum by (stage) (rate(toposerve_stage_messages_total{{outcome="failed",{stage}}}[{w}]))',
             "failed {{stage}}"),
            (f'sum by (stage) (rate(toposerve_stage_messages_total{{outcome="dead_lettered",{stage}}}[{w}]))',
             "dead-lettered {{stage}}")], 0, 32, "ops"),
        _panel("Scrape targets up (a replica that is down drops to 0)", [
            ('up{job=~".*"}', "{{job}} {{instance}}")], 12, 32),
    ]
    for number, panel in enumerate(panels, 1):
        panel["id"] = number
    return {
        "uid": DASHBOARD_UID, "title": "toposerve", "tags": ["toposerve"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "refresh": "5s", "time": {"from": "now-15m", "to": "now"},
        "templating": {"list": [{
            "name": "stage", "label": "stage", "type": "query", "multi": True, "includeAll": True,
            "allValue": ".*", "current": {"text": "All", "value": "$__all"},
            "datasource": {"type": "prometheus", "uid": DATASOURCE_UID},
            "query": {"query": "label_values(toposerve_stage_messages_total, stage)", "refId": "stage"},
            "definition": "label_values(toposerve_stage_messages_total, stage)", "refresh": 2,
        }]},
        "panels": panels,
    }


def grafana_datasource() -> Obj:
    return {"apiVersion": 1, "datasources": [{
        "name": "Prometheus", "uid": DATASOURCE_UID, "type": "prometheus", "access": "proxy",
        "url": f"http://prometheus:{PROMETHEUS_PORT}", "isDefault": True, "editable": False}]}


def grafana_dashboards_provider() -> Obj:
    return {"apiVersion": 1, "providers": [{
        "name": "toposerve", "type": "file", "disableDeletion": True, "allowUiUpdates": False,
        "options": {"path": "/var/lib/grafana/dashboards"}}]}


GENERATED = "# Generated by `toposerve render monitoring -o deploy/monitoring`: regenerate rather than edit.\n"


def monitoring_files(profiles: Sequence[Profile]) -> dict[str, str]:
    """Relative path -> text of every file under deploy/monitoring."""
    return {
        "prometheus.yml": GENERATED + dump_yaml(prometheus_config(profiles)),
        "grafana/provisioning/datasources/toposerve.yaml": GENERATED + dump_yaml(grafana_datasource()),
        "grafana/provisioning/dashboards/toposerve.yaml": GENERATED + dump_yaml(grafana_dashboards_provider()),
        "grafana/dashboards/toposerve.json": json.dumps(dashboard(), indent=2) + "\n",
    }


def write_monitoring_files(directory: Path, profiles: Sequence[Profile]) -> list[Path]:
    written = []
    for relative, text in monitoring_files(profiles).items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def compose_services() -> dict[str, Obj]:
    """Prometheus and Grafana, activated by ``--profile monitoring`` (paths relative to compose.yaml).

    Grafana lets anyone in as a viewer and nobody log in (no admin password to keep): its
    datasource and dashboard are provisioned, read-only.
    """
    return {
        "prometheus": {
            "image": "prom/prometheus:v2.53.0", "profiles": ["monitoring"],
            "volumes": ["./monitoring/prometheus.yml:/etc/prometheus/prometheus.yml:ro"],
            "ports": [f"127.0.0.1:{PROMETHEUS_PORT}:{PROMETHEUS_PORT}"], "restart": "unless-stopped",
        },
        "grafana": {
            "image": "grafana/grafana:11.1.0", "profiles": ["monitoring"], "depends_on": ["prometheus"],
            "environment": {"GF_AUTH_ANONYMOUS_ENABLED": "true", "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer",
                            "GF_AUTH_DISABLE_LOGIN_FORM": "true", "GF_AUTH_BASIC_ENABLED": "false",
                            "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH": "/var/lib/grafana/dashboards/toposerve.json"},
            "volumes": ["./monitoring/grafana/provisioning:/etc/grafana/provisioning:ro",
                        "./monitoring/grafana/dashboards:/var/lib/grafana/dashboards:ro"],
            "ports": [f"127.0.0.1:{GRAFANA_PORT}:{GRAFANA_PORT}"], "restart": "unless-stopped",
        },
    }
