"""Prometheus metrics of the stages.

``StageMetricSet`` creates the metric families in a ``CollectorRegistry`` it is
given (one per process; web_single shares the ingress's), and ``for_stage`` hands
a stage its label children once, so the hot path only calls ``inc``/``observe``.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

OUTCOMES = ("handled", "failed", "retried", "dead_lettered")


@dataclass(frozen=True)
class StageMetrics:
    """One stage's label children."""

    registry: CollectorRegistry
    handled: Counter
    failed: Counter
    retried: Counter
    dead_lettered: Counter
    processing_seconds: Histogram
    queue_seconds: Histogram
    batch_size: Histogram


class StageMetricSet:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.messages = Counter(
            "toposerve_stage_messages", "Messages a stage settled, by outcome "
            "(handled: acked after its outputs were confirmed; failed: a Failure was published; "
            "retried: republished for another attempt; dead_lettered: sent to the dead-letter exchange)",
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
        self._stages: dict[str, StageMetrics] = {}

    def for_stage(self, stage: str) -> StageMetrics:
        metrics = self._stages.get(stage)
        if metrics is None:
            metrics = self._stages[stage] = StageMetrics(
                self.registry,
                *(self.messages.labels(stage, outcome) for outcome in OUTCOMES),
                self.processing.labels(stage), self.queue.labels(stage), self.batch.labels(stage),
            )
        return metrics


def stage_metrics(stage: str, registry: CollectorRegistry | None = None) -> StageMetrics:
    """A stage's metrics in ``registry`` (a new one when not given: one stage per process)."""
    return StageMetricSet(registry if registry is not None else CollectorRegistry()).for_stage(stage)


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "127.0.0.1"):
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread; returns the server
    (``server_port`` is the port, also when 0 picked a free one; ``shutdown()`` stops it)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
