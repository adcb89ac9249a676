"""Live figures on the topology graph: what ``GET /v1/topology/live`` answers and ``/ui`` draws.

Sources, read on demand (at most once per ``MIN_SAMPLE_GAP_S`` however many pages poll):

- RabbitMQ: queue depth, consumers (and unacked, broker rates with the management API,
  when ``TOPOSERVE_MANAGEMENT_URL`` is set; AMQP passive declares otherwise);
- the stages' own metrics, as each replica reports them to Redis every second
  (brokers/stage_reports.py): messages by outcome, handling-time and batch-size histograms;
- this ingress's own counters (requests, prediction-cache lookups).

Rates and percentiles are differences between the newest sample and one ``WINDOW_S``
older (pure functions below). Flags: a stage with no consumer, a queue that keeps
growing, failures that rise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

import httpx
import redis.asyncio as redis
from aio_pika.abc import AbstractRobustConnection
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, Field, ValidationError

from toposerve.api.topology_graph import (
    INGRESS_ID,
    TopologyGraph,
    queue_node_id,
    stage_node_id,
    store_node_id,
)
from toposerve.brokers import dead_queue_name
from toposerve.brokers.stage_reports import HistogramCounts, StageReport, stage_report_pattern

log = logging.getLogger(__name__)

WINDOW_S = 3.0  # rates over about this many seconds
MIN_SAMPLE_GAP_S = 0.5  # pages polling together share a sample
SAMPLES_KEPT = 40
GROWTH_SAMPLES = 4  # a queue is growing when its depth rose across this many samples ...
GROWTH_MIN = 5  # ... by at least this many messages
FAILURE_RATIO = 0.1  # failed or dead-lettered per message settled, past which a stage is failing


class QueueFigures(BaseModel):
    depth: int | None = None
    consumers: int | None = None
    unacked: int | None = Field(default=None, description="Management API only")
    publish_per_s: float | None = Field(default=None, description="Management API only")
    deliver_per_s: float | None = Field(default=None, description="Management API only")


class StageFigures(BaseModel):
    queue: str
    replicas: int = Field(description="Replicas the profile declares")
    replicas_reporting: int = Field(description="Replicas whose report is fresh (brokers/stage_reports.py)")
    consumers: int | None = None
    depth: int | None = None
    unacked: int | None = None
    in_flight: int = 0
    in_per_s: float = 0.0
    out_per_s: float = 0.0
    failed_per_s: float = 0.0
    dead_lettered_per_s: float = 0.0
    handled: float = 0.0
    failed: float = 0.0
    dead_lettered: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    batch_size_mean: float | None = None
    flags: list[str] = Field(default_factory=list)


class IngressFigures(BaseModel):
    requests_per_s: float = 0.0
    requests: float = 0.0
    in_flight: int = 0
    shed: int = 0


class StoreFigures(BaseModel):
    hit_ratio: float | None = Field(default=None, description="Caches: hits per lookup over the window")
    hits_per_s: float | None = None
    misses_per_s: float | None = None


class LiveTopology(BaseModel):
    at: float
    window_s: float
    source: str = Field(description="Where queue figures come from: management or amqp")
    broker_error: str | None = None
    redis_error: str | None = None
    graph: TopologyGraph
    ingress: IngressFigures
    queues: dict[str, QueueFigures]
    stages: dict[str, StageFigures]
    stores: dict[str, StoreFigures]
    dead_letters: QueueFigures
    flagged: list[str] = Field(description="Ids of the nodes that stand out")


@dataclass
class StageTotals:
    outcomes: dict[str, float] = field(default_factory=dict)
    processing: HistogramCounts = field(default_factory=HistogramCounts)
    batch_size: HistogramCounts = field(default_factory=HistogramCounts)
    replicas: int = 0
    in_flight: int = 0


@dataclass
class Sample:
    at: float
    queues: dict[str, QueueFigures]
    stages: dict[str, StageTotals]
    requests: float = 0.0
    cache_hits: float = 0.0
    cache_misses: float = 0.0


# ---------------------------------------------------------------- pure functions


def add_histograms(a: HistogramCounts, b: HistogramCounts) -> HistogramCounts:
    if not a.bounds:
        return b
    if a.bounds != b.bounds:  # not the same buckets: keep the first (replicas of one stage share them)
        return a
    return HistogramCounts(bounds=a.bounds, cumulative=[x + y for x, y in zip(a.cumulative, b.cumulative, strict=True)],
                           count=a.count + b.count, sum=a.sum + b.sum)


def totals_by_stage(reports: list[StageReport]) -> dict[str, StageTotals]:
    """The replicas' reports summed per stage."""
    totals: dict[str, StageTotals] = {}
    for report in reports:
        total = totals.setdefault(report.stage, StageTotals())
        for outcome, value in report.outcomes.items():
            total.outcomes[outcome] = total.outcomes.get(outcome, 0.0) + value
        total.processing = add_histograms(total.processing, report.processing)
        total.batch_size = add_histograms(total.batch_size, report.batch_size)
        total.replicas += 1
        total.in_flight += report.in_flight
    return totals


def histogram_delta(new: HistogramCounts, old: HistogramCounts) -> HistogramCounts:
    """What was observed between two states (the new one alone when the old one does not fit:
    a replica restarted or left, and cumulative counts went down)."""
    if old.bounds != new.bounds or old.count > new.count or any(
            o > n for o, n in zip(old.cumulative, new.cumulative, strict=True)):
        return new
    return HistogramCounts(bounds=new.bounds, cumulative=[n - o for n, o in zip(new.cumulative, old.cumulative,
                                                                                strict=True)],
                           count=new.count - old.count, sum=new.sum - old.sum)


def quantile(histogram: HistogramCounts, q: float) -> float | None:
    """Prometheus's histogram_quantile: linear within the bucket the rank falls in (None: no observations)."""
    if histogram.count <= 0 or not histogram.bounds:
        return None
    rank = q * histogram.count
    lower, below = 0.0, 0.0
    for bound, cumulative in zip(histogram.bounds, histogram.cumulative, strict=True):
        if cumulative >= rank:
            in_bucket = cumulative - below
            return lower + (bound - lower) * ((rank - below) / in_bucket if in_bucket else 1.0)
        lower, below = bound, cumulative
    return lower  # past the last finite bound: its value is all we know


def rate(new: float, old: float, seconds: float) -> float:
    return max(new - old, 0.0) / seconds if seconds > 0 else 0.0


def growing(depths: list[int | None]) -> bool:
    """Depth rose at every step of the last ``GROWTH_SAMPLES`` samples, by ``GROWTH_MIN`` at least."""
    recent = depths[-GROWTH_SAMPLES:]
    if len(recent) < GROWTH_SAMPLES or any(d is None for d in recent):
        return False
    return all(b > a for a, b in zip(recent, recent[1:], strict=False)) and recent[-1] - recent[0] >= GROWTH_MIN


def failing(failures_per_s: float, settled_per_s: float, earlier_failures_per_s: float | None) -> bool:
    """Failures make up a tenth of what is settled, or their rate rose since the window before."""
    if failures_per_s <= 0:
        return False
    if settled_per_s > 0 and failures_per_s / settled_per_s >= FAILURE_RATIO:
        return True
    return earlier_failures_per_s is not None and failures_per_s > 2 * earlier_failures_per_s


def _failures(totals: StageTotals) -> float:
    return totals.outcomes.get("failed", 0.0) + totals.outcomes.get("dead_lettered", 0.0)


def _settled(totals: StageTotals) -> float:
    return sum(totals.outcomes.get(o, 0.0) for o in ("handled", "failed", "dead_lettered", "retried"))


def window_start(samples: list[Sample], now: float, window_s: float) -> Sample | None:
    """The newest sample at least ``window_s`` older than ``now`` (else the oldest there is)."""
    older = [s for s in samples if now - s.at >= window_s]
    if older:
        return older[-1]
    earlier = [s for s in samples if s.at < now]
    return earlier[0] if earlier else None


def live_view(graph: TopologyGraph, samples: list[Sample], source: str, broker_error: str | None,
              redis_error: str | None, namespace: str, window_s: float = WINDOW_S) -> LiveTopology:
    """The figures and flags of the newest sample, with rates against the samples before it."""
    now = samples[-1]
    start = window_start(samples[:-1], now.at, window_s)
    seconds = now.at - start.at if start is not None else 0.0
    earlier = window_start(samples[:-1], start.at, window_s) if start is not None else None
    earlier_s = start.at - earlier.at if start is not None and earlier is not None else 0.0
    stage_nodes = [n for n in graph.nodes if n.kind == "stage"]
    queue_of = {n.stage: n.label for n in graph.nodes if n.kind == "queue"}
    replicas = {n.stage: n.replicas or 1 for n in stage_nodes}
    stages: dict[str, StageFigures] = {}
    flagged: list[str] = []
    for node in stage_nodes:
        name = node.stage or node.label
        queue = now.queues.get(queue_of[name], QueueFigures())
        totals = now.stages.get(name, StageTotals())
        old = start.stages.get(name, StageTotals()) if start is not None else StageTotals()
        figures = StageFigures(queue=queue_of[name], replicas=replicas[name], replicas_reporting=totals.replicas,
                               consumers=queue.consumers, depth=queue.depth, unacked=queue.unacked,
                               in_flight=totals.in_flight, handled=totals.outcomes.get("handled", 0.0),
                               failed=totals.outcomes.get("failed", 0.0),
                               dead_lettered=totals.outcomes.get("dead_lettered", 0.0))
        if seconds > 0:
            figures.out_per_s = round(rate(_settled(totals), _settled(old), seconds), 2)
            figures.failed_per_s = round(rate(totals.outcomes.get("failed", 0.0), old.outcomes.get("failed", 0.0),
                                              seconds), 2)
            figures.dead_lettered_per_s = round(rate(totals.outcomes.get("dead_lettered", 0.0),
                                                     old.outcomes.get("dead_lettered", 0.0), seconds), 2)
            old_depth = start.queues.get(queue_of[name], QueueFigures()).depth
            depth_change = (queue.depth - old_depth) / seconds if queue.depth is not None and old_depth is not None else 0
            figures.in_per_s = round(max(figures.out_per_s + depth_change, 0.0), 2)
            if queue.publish_per_s is not None:
                figures.in_per_s = round(queue.publish_per_s, 2)
            handled = histogram_delta(totals.processing, old.processing)
            p50, p99 = quantile(handled, 0.5), quantile(handled, 0.99)
            figures.p50_ms = None if p50 is None else round(p50 * 1000, 2)
            figures.p99_ms = None if p99 is None else round(p99 * 1000, 2)
            batches = histogram_delta(totals.batch_size, old.batch_size)
            figures.batch_size_mean = round(batches.sum / batches.count, 1) if batches.count > 0 else None
        if queue.consumers == 0:
            figures.flags.append("no_consumer")
        if totals.replicas == 0:
            figures.flags.append("not_reporting")
        if growing([s.queues.get(queue_of[name], QueueFigures()).depth for s in samples]):
            figures.flags.append("growing_queue")
        earlier_failures = None
        if earlier is not None and earlier_s > 0:
            earlier_failures = rate(_failures(old), _failures(earlier.stages.get(name, StageTotals())), earlier_s)
        if seconds > 0 and failing(rate(_failures(totals), _failures(old), seconds),
                                   rate(_settled(totals), _settled(old), seconds), earlier_failures):
            figures.flags.append("rising_failures")
        stages[name] = figures
        if figures.flags:
            flagged.append(stage_node_id(name))
            if "growing_queue" in figures.flags or "no_consumer" in figures.flags:
                flagged.append(queue_node_id(queue_of[name]))
    ingress = IngressFigures(requests=now.requests,
                             requests_per_s=round(rate(now.requests, start.requests, seconds), 2) if start else 0.0)
    stores: dict[str, StoreFigures] = {}
    for node in graph.nodes:
        if node.kind != "store":
            continue
        figures = StoreFigures()
        if node.label == "prediction cache" and start is not None and seconds > 0:
            hits = rate(now.cache_hits, start.cache_hits, seconds)
            misses = rate(now.cache_misses, start.cache_misses, seconds)
            figures = StoreFigures(hits_per_s=round(hits, 2), misses_per_s=round(misses, 2),
                                   hit_ratio=round(hits / (hits + misses), 3) if hits + misses > 0 else None)
        stores[store_node_id(node.label)] = figures
    dead = now.queues.get(dead_queue_name(namespace), QueueFigures())
    if start is not None and dead.depth is not None:
        old_dead = start.queues.get(dead_queue_name(namespace), QueueFigures()).depth
        if old_dead is not None and dead.depth > old_dead:
            flagged.append(f"dead:{dead_queue_name(namespace)}")
    if broker_error is not None:
        flagged.append(INGRESS_ID)
    return LiveTopology(at=now.at, window_s=round(seconds, 2), source=source, broker_error=broker_error,
                        redis_error=redis_error, graph=graph, ingress=ingress,
                        queues={name: q for name, q in now.queues.items() if name != dead_queue_name(namespace)},
                        stages=stages, stores=stores, dead_letters=dead, flagged=flagged)


def counter_total(registry: CollectorRegistry, name: str) -> float:
    """The sum of a counter family's ``_total`` samples in ``registry`` (0 when it has none)."""
    return sum(sample.value for family in registry.collect() if family.name == name
               for sample in family.samples if sample.name.endswith("_total"))


# ---------------------------------------------------------------- reading the sources


def management_api(url: str, amqp_url: str) -> tuple[str, httpx.BasicAuth | None, str]:
    """The management API's base URL, its login and the vhost (the AMQP URL's) from ``url``."""
    parts = urlsplit(url)
    auth = httpx.BasicAuth(unquote(parts.username or ""), unquote(parts.password or "")) if parts.username else None
    netloc = parts.hostname or "127.0.0.1"
    if parts.port:
        netloc += f":{parts.port}"
    vhost = unquote(urlsplit(amqp_url).path[1:]) or "/"
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}", auth, vhost


async def queues_by_management(client: httpx.AsyncClient, url: str, auth: httpx.BasicAuth | None, vhost: str,
                               names: list[str]) -> dict[str, QueueFigures]:
    response = await client.get(f"{url}/api/queues/{quote(vhost, safe='')}", auth=auth, timeout=2.0,
                                params={"columns": "name,messages_ready,messages_unacknowledged,consumers,"
                                                   "message_stats.publish_details.rate,"
                                                   "message_stats.deliver_get_details.rate"})
    response.raise_for_status()
    wanted = set(names)
    found = {}
    for queue in response.json():
        if queue.get("name") not in wanted:
            continue
        stats = queue.get("message_stats") or {}
        found[queue["name"]] = QueueFigures(
            depth=queue.get("messages_ready"), consumers=queue.get("consumers"),
            unacked=queue.get("messages_unacknowledged"),
            publish_per_s=(stats.get("publish_details") or {}).get("rate"),
            deliver_per_s=(stats.get("deliver_get_details") or {}).get("rate"))
    return found


async def queues_by_amqp(connection: AbstractRobustConnection, names: list[str]) -> dict[str, QueueFigures]:
    channel = await asyncio.wait_for(connection.channel(publisher_confirms=False), timeout=2.0)
    found = {}
    try:
        for name in names:
            queue = await asyncio.wait_for(channel.declare_queue(name, passive=True), timeout=2.0)
            result = queue.declaration_result
            found[name] = QueueFigures(depth=result.message_count, consumers=result.consumer_count)
    finally:
        await channel.close()
    return found


async def stage_reports(client: redis.Redis, namespace: str, profile: str) -> list[StageReport]:
    """Every fresh report of ``profile``'s replicas (an unreadable one is skipped, and logged)."""
    keys = [key async for key in client.scan_iter(match=stage_report_pattern(namespace, profile), count=200)]
    reports = []
    for key, raw in zip(keys, await client.mget(keys) if keys else [], strict=True):
        if raw is None:
            continue  # expired between SCAN and MGET
        try:
            reports.append(StageReport.model_validate_json(raw))
        except ValidationError as exc:
            log.warning("stage report %s is not valid: %s", key, exc.errors()[0]["msg"])
    return reports


class LiveTopologySampler:
    """The samples of one ingress's profile, kept on the app (``app.state``), taken on demand."""

    def __init__(self, graph: TopologyGraph, namespace: str, amqp_url: str, management_url: str | None) -> None:
        self.graph = graph
        self.namespace = namespace
        self.queue_names = [n.label for n in graph.nodes if n.kind == "queue"] + [dead_queue_name(namespace)]
        self.management = management_api(management_url, amqp_url) if management_url else None
        self.samples: deque[Sample] = deque(maxlen=SAMPLES_KEPT)
        self._lock = asyncio.Lock()
        self._view: LiveTopology | None = None

    async def view(self, connection: AbstractRobustConnection | None, client: redis.Redis,
                   registry: CollectorRegistry | None, ingress_stats: object) -> LiveTopology:
        async with self._lock:
            if self._view is not None and time.time() - self._view.at < MIN_SAMPLE_GAP_S:
                return self._view
            broker_error = redis_error = None
            queues: dict[str, QueueFigures] = {}
            try:
                if self.management is not None:
                    url, auth, vhost = self.management
                    async with httpx.AsyncClient() as http:
                        queues = await queues_by_management(http, url, auth, vhost, self.queue_names)
                elif connection is not None:
                    queues = await queues_by_amqp(connection, self.queue_names)
                else:
                    broker_error = "the ingress has no broker connection"
            except Exception as exc:  # the broker is away or a queue is missing: shown, not raised
                broker_error = f"{type(exc).__name__}: {exc}"
            reports: list[StageReport] = []
            try:
                reports = await stage_reports(client, self.namespace, self.graph.profile)
            except (redis.RedisError, OSError) as exc:
                redis_error = f"{type(exc).__name__}: {exc}"
            sample = Sample(at=time.time(), queues=queues, stages=totals_by_stage(reports),
                            requests=counter_total(registry, "toposerve_requests") if registry is not None else 0.0,
                            cache_hits=float(getattr(ingress_stats, "cache_hits", 0)),
                            cache_misses=float(getattr(ingress_stats, "cache_misses", 0)))
            self.samples.append(sample)
            view = live_view(self.graph, list(self.samples), "management" if self.management else "amqp",
                             broker_error, redis_error, self.namespace)
            view.ingress.in_flight = int(getattr(ingress_stats, "in_flight", 0))
            view.ingress.shed = int(getattr(ingress_stats, "shed", 0))
            self._view = view
            return view
