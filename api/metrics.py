"""Prometheus metrics and trace context of the ingress.

``IngressMetrics`` is created by the app's lifespan in a ``CollectorRegistry`` it
is given (never a module global), and served at ``GET /metrics``. Request
counters and latencies are taken by ``ObservabilityMiddleware`` (pure ASGI: one
dict lookup per predict request for cached label children); in-flight, shed and
prediction-cache numbers are read from ``IngressStats`` when scraped, so the hot
path does nothing for them.

The middleware also sets this request's trace span (a child of the caller's
W3C ``traceparent``, or a new trace), which the ingress puts on what it publishes
and answers as ``X-Trace-Id``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from toposerve.brokers import TRACEPARENT, continue_trace, current_span

if TYPE_CHECKING:
    from toposerve.api.ingress import Ingress

REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TRACEPARENT = TRACEPARENT.encode()
UNKNOWN_MODEL = "unknown"


class IngressMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter("toposerve_requests", "HTTP predict requests by model and status code",
                                ["model", "status"], registry=registry)
        self.duration = Histogram("toposerve_request_duration_seconds",
                                  "Seconds from a predict request's arrival to its response (end to end in sync modes)",
                                  ["model", "mode"], buckets=REQUEST_BUCKETS, registry=registry)
        self.failures = Counter("toposerve_failures",
                                "Predict requests answered with an error, by error code", ["code"], registry=registry)
        self._children: dict[tuple[str, ...], object] = {}
        self._stats: _StatsCollector | None = None

    def watch(self, ingress: Ingress) -> None:
        """Expose ``ingress``'s own counters (in flight, shed, cache) at scrape time."""
        self._stats = _StatsCollector(ingress)
        self.registry.register(self._stats)

    def unwatch(self) -> None:
        if self._stats is not None:
            self.registry.unregister(self._stats)
            self._stats = None

    def request_counter(self, model: str, status: int) -> Counter:
        key = ("r", model, str(status))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(model, key[2])
        return child  # type: ignore[return-value]

    def duration_histogram(self, model: str, mode: str) -> Histogram:
        key = ("d", model, mode)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.duration.labels(model, mode)
        return child  # type: ignore[return-value]

    def failure_counter(self, code: str) -> Counter:
        key = ("f", code)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.failures.labels(code)
        return child  # type: ignore[return-value]


class _StatsCollector(Collector):
    def __init__(self, ingress: Ingress) -> None:
        self.ingress = ingress

    def collect(self) -> Iterator:
        stats = self.ingress.stats
        yield GaugeMetricFamily("toposerve_in_flight_requests", "Predict requests being served by this ingress",
                                value=stats.in_flight)
        yield CounterMetricFamily("toposerve_shed_requests", "Predict requests shed (503 or fallback) by load "
                                  "shedding: over max_in_flight or a queue at its bound", value=stats.shed)
        cache = CounterMetricFamily("toposerve_prediction_cache_requests",
                                    "Prediction-cache lookups by result (coalesced: waited for an identical "
                                    "request's answer)", labels=["result"])
        cache.add_metric(["hit"], stats.cache_hits)
        cache.add_metric(["miss"], stats.cache_misses)
        cache.add_metric(["coalesced"], stats.cache_coalesced)
        yield cache
        yield CounterMetricFamily("toposerve_prediction_cache_errors", "Prediction-cache lookups that failed "
                                  "(Redis unavailable; served through the pipeline)", value=stats.cache_errors)


def predict_model(method: str, path: str, book_model: str | None) -> str | None:
    """The model a predict route serves (``None``: not a predict request)."""
    if path.startswith("/v1/models/"):
        if method == "POST" and (path.endswith("/predict") or path.endswith(":predict")):
            return path[11:-8]
        return None
    if path.startswith("/v2/models/"):
        if method == "POST" and path.endswith("/infer"):
            return path[11:].split("/", 1)[0]
        return None
    if path in ("/predict", "/predict/label") or path.startswith("/predict/test"):
        return book_model
    return None


def _error_code(body: bytes, status: int) -> str:
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    if isinstance(error, dict) and isinstance(error.get("code"), str) and len(error["code"]) <= 64:
        return error["code"]
    return f"http_{status}"


class ObservabilityMiddleware:
    """Trace span per HTTP request; counters and latency of predict requests."""

    def __init__(self, app: Callable, clock: Callable[[], float] | None = None) -> None:
        import time

        self.app = app
        self.clock = clock or time.perf_counter

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope["headers"]:
            if name == _TRACEPARENT:
                incoming = value
                break
        span = continue_trace(incoming)
        token = current_span.set(span)
        try:
            await self._serve(scope, receive, send, span)
        finally:
            current_span.reset(token)

    async def _serve(self, scope: dict, receive: Callable, send: Callable, span) -> None:
        trace_header = (b"x-trace-id", span.trace_id.encode())
        state = getattr(scope.get("app"), "state", None)
        metrics: IngressMetrics | None = getattr(state, "metrics", None)
        ingress = getattr(state, "ingress", None)
        model = None
        if metrics is not None and ingress is not None:
            model = predict_model(scope["method"], scope["path"], ingress.config.book_model)
        if model is None:
            async def send_traced(message: dict) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", ()), trace_header]
                await send(message)

            await self.app(scope, receive, send_traced)
            return

        if model not in ingress.manifests:
            model = UNKNOWN_MODEL  # bounded label values, whatever the path says
        started = self.clock()
        status = 500
        failed = False

        async def send_measured(message: dict) -> None:
            nonlocal status, failed
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), trace_header]
            elif message["type"] == "http.response.body" and status >= 400 and not failed:
                failed = True
                metrics.failure_counter(_error_code(message.get("body", b""), status)).inc()
            await send(message)

        try:
            await self.app(scope, receive, send_measured)
        finally:
            metrics.request_counter(model, status).inc()
            metrics.duration_histogram(model, ingress.config.mode).observe(self.clock() - started)
