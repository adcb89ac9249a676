"""Prometheus metrics of the stages.

``StageMetricSet`` creates the metric families in a ``CollectorRegistry`` it is
given (one per process; web_single shares the ingress's), and ``for_stage`` hands
a stage its label children once, so the hot path only calls ``inc``/``observe``.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app

from toposerve.consumers.liveness import LoopHeartbeat

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

OUTCOMES = ("handled", "failed", "retried", "dead_lettered", "untrusted")


@dataclass(frozen=True)
class StageMetrics:
    """One stage's label children."""

    registry: CollectorRegistry
    handled: Counter
    failed: Counter
    retried: Counter
    dead_lettered: Counter
    untrusted: Counter  # outcomes refused: not published by a stage account
    processing_seconds: Histogram
    queue_seconds: Histogram
    batch_size: Histogram
    # Per model version (label children made on use: a stage learns its versions at start).
    version_seconds: Histogram
    version_jobs: Counter


class VersionMetrics:
    """A stage's per-version figures, exported side by side: seconds per message, jobs answered and failed."""

    def __init__(self, metrics: StageMetrics, stage: str) -> None:
        self.metrics = metrics
        self.stage = stage

    def observe(self, model: str, version: str, seconds: float, answered: int = 0, failed: int = 0) -> None:
        self.metrics.version_seconds.labels(self.stage, model, version).observe(seconds)
        if answered:
            self.metrics.version_jobs.labels(self.stage, model, version, "answered").inc(answered)
        if failed:
            self.metrics.version_jobs.labels(self.stage, model, version, "failed").inc(failed)


class StageMetricSet:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.messages = Counter(
            "toposerve_stage_messages", "Messages a stage settled, by outcome "
            "(handled: acked after its outputs were confirmed; failed: a Failure was published; "
            "retried: republished for another attempt; dead_lettered: sent to the dead-letter exchange; "
            "untrusted: an outcome refused because no stage account published it)",
            ["stage", "outcome"], registry=registry)
        self.processing = Histogram(
            "toposerve_stage_processing_seconds", "Seconds from decoding a message to its outputs being confirmed",
            ["stage"], buckets=LATENCY_BUCKETS, registry=registry)
        self.queue = Histogram(
            "toposerve_stage_queue_seconds", "Seconds from the job's created_at to this stage picking the message up",
            ["stage"], buckets=LATENCY_BUCKETS, registry=registry)
        self.batch = Histogram(
            "toposerve_predict_batch_size", "Rows per ONNX Runtime call of a predict stage (micro-batching)",
            ["stage"], buckets=BATCH_BUCKETS, registry=registry)
        self.version_seconds = Histogram(
            "toposerve_model_version_seconds", "Seconds a predict stage spent on a message for one model version",
            ["stage", "model", "version"], buckets=LATENCY_BUCKETS, registry=registry)
        self.version_jobs = Counter(
            "toposerve_model_version_jobs", "Jobs a predict stage answered or failed, per model version",
            ["stage", "model", "version", "outcome"], registry=registry)
        self._stages: dict[str, StageMetrics] = {}

    def for_stage(self, stage: str) -> StageMetrics:
        metrics = self._stages.get(stage)
        if metrics is None:
            metrics = self._stages[stage] = StageMetrics(
                self.registry,
                *(self.messages.labels(stage, outcome) for outcome in OUTCOMES),
                self.processing.labels(stage), self.queue.labels(stage), self.batch.labels(stage),
                self.version_seconds, self.version_jobs,
            )
        return metrics


def stage_metrics(stage: str, registry: CollectorRegistry | None = None) -> StageMetrics:
    """A stage's metrics in ``registry`` (a new one when not given: one stage per process)."""
    return StageMetricSet(registry if registry is not None else CollectorRegistry()).for_stage(stage)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
        """Scrapes and probes every few seconds would drown the stage's own log lines."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scrape never holds up the process's exit


def metrics_app(registry: CollectorRegistry, heartbeat: LoopHeartbeat | None = None):
    """A WSGI app: ``/healthz`` from ``heartbeat`` (when given), the registry's metrics on any other path."""
    metrics = make_wsgi_app(registry)

    def app(environ, start_response):
        if heartbeat is not None and environ.get("PATH_INFO") == "/healthz":
            alive = heartbeat.alive()
            body = json.dumps({"status": "ok" if alive else "stuck",
                               "event_loop_seconds_since_beat": round(heartbeat.age_s(), 3)}).encode()
            start_response("200 OK" if alive else "503 Service Unavailable",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        return metrics(environ, start_response)

    return app


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "127.0.0.1",
                  heartbeat: LoopHeartbeat | None = None) -> WSGIServer:
    """Serve ``registry`` at ``http://host:port/metrics`` (and ``/healthz`` from ``heartbeat``)
    from a daemon thread; returns the server (``server_port`` is the port, also when 0 picked
    a free one; ``shutdown()`` stops it)."""
    server = make_server(host, port, metrics_app(registry, heartbeat), _ThreadingServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True).start()
    return server
