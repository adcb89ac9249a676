"""A stage replica's report to the operator's view: its metrics, written to Redis every second.

``report_of`` turns the replica's Prometheus registry into a ``StageReport`` (a pure
function over what the registry collects: the same numbers ``/metrics`` serves), and
``StageReporter`` writes it with a TTL (brokers/stage_reports.py says why Redis).
A Redis outage only costs the view its figures: it is logged once, never raised.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import redis.asyncio as redis
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from toposerve.brokers import connect_redis, stop_task
from toposerve.brokers.stage_reports import (
    REPORT_INTERVAL_S,
    REPORT_TTL_S,
    HistogramCounts,
    StageReport,
    stage_report_key,
)

if TYPE_CHECKING:
    from toposerve.consumers.runner import StageRunner

log = logging.getLogger(__name__)

MESSAGES = "toposerve_stage_messages"
PROCESSING = "toposerve_stage_processing_seconds"
BATCH_SIZE = "toposerve_predict_batch_size"


def _histogram(families: dict[str, Metric], name: str, stage: str) -> HistogramCounts:
    family = families.get(name)
    if family is None:
        return HistogramCounts()
    buckets: list[tuple[float, float]] = []
    count = total = 0.0
    for sample in family.samples:
        if sample.labels.get("stage") != stage:
            continue
        if sample.name.endswith("_bucket"):
            bound = float(sample.labels["le"])
            if bound != float("inf"):  # the +Inf bucket is the count (and JSON has no infinity)
                buckets.append((bound, sample.value))
        elif sample.name.endswith("_count"):
            count = sample.value
        elif sample.name.endswith("_sum"):
            total = sample.value
    buckets.sort()
    return HistogramCounts(bounds=[b for b, _ in buckets], cumulative=[c for _, c in buckets], count=count, sum=total)


def report_of(registry: CollectorRegistry, profile: str, stage: str, replica: str, in_flight: int,
              at: float) -> StageReport:
    """The stage's figures as its registry holds them now."""
    families = {family.name: family for family in registry.collect()}
    outcomes = {}
    messages = families.get(MESSAGES)
    for sample in messages.samples if messages is not None else ():
        if sample.name.endswith("_total") and sample.labels.get("stage") == stage:
            outcomes[sample.labels["outcome"]] = sample.value
    return StageReport(profile=profile, stage=stage, replica=replica, at=at, outcomes=outcomes,
                       processing=_histogram(families, PROCESSING, stage),
                       batch_size=_histogram(families, BATCH_SIZE, stage), in_flight=in_flight)


class StageReporter:
    """Writes a replica's report every ``interval_s`` while it runs; deletes it when it stops."""

    def __init__(self, client: redis.Redis, namespace: str, profile: str, stage: str, replica: str,
                 registry: CollectorRegistry, in_flight: Callable[[], Iterable[object]],
                 interval_s: float = REPORT_INTERVAL_S, ttl_s: int = REPORT_TTL_S) -> None:
        self.client = client
        self.key = stage_report_key(namespace, profile, stage, replica)
        self.profile, self.stage, self.replica = profile, stage, replica
        self.registry = registry
        self.in_flight = in_flight
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self._task: asyncio.Task | None = None
        self._failing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"stage-report-{self.stage}")

    async def close(self) -> None:
        await stop_task(self._task)
        try:  # a stage that stopped on purpose leaves the view at once
            await self.client.delete(self.key)
        except (redis.RedisError, OSError):
            pass
        await self.client.aclose(close_connection_pool=True)

    async def write(self) -> None:
        report = report_of(self.registry, self.profile, self.stage, self.replica,
                           len(list(self.in_flight())), time.time())
        await self.client.set(self.key, report.model_dump_json(), ex=self.ttl_s)

    async def _loop(self) -> None:
        while True:
            try:
                await self.write()
                self._failing = False
            except (redis.RedisError, OSError) as exc:
                if not self._failing:
                    log.warning("stage report of %s not written (%s: %s); the operator's view misses its figures",
                                self.stage, type(exc).__name__, exc)
                self._failing = True
            await asyncio.sleep(self.interval_s)


def reporter_for(runner: StageRunner, profile: str, replica: int) -> StageReporter:
    """The runner's reporter, under a name unique to this process (replica indexes repeat
    across pods, and a restarted replica is a new process)."""
    return StageReporter(connect_redis(runner.settings.redis_url, max_connections=2), runner.settings.namespace,
                         profile, runner.stage.name, f"{replica}.{socket.gethostname()}.{os.getpid()}",
                         runner.metrics.registry, lambda: runner.stats.in_flight)


class ReportedStage:
    """A stage runner that reports while it runs: what a single-process ingress runs as its companions."""

    def __init__(self, runner: StageRunner, reporter: StageReporter) -> None:
        self.runner = runner
        self.reporter = reporter

    async def start(self) -> None:
        await self.runner.start()
        self.reporter.start()

    async def drain_and_close(self) -> None:
        await self.reporter.close()
        await self.runner.drain_and_close()
