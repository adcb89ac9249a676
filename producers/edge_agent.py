"""The long-running side of an edge client (``toposerve edge run``): keep models current, report telemetry.

Two loops, each a single ``*_once`` step that tests call directly:

- ``refresh_once`` asks the server for each model with its ETag (a 304 costs one
  header exchange) and hot-swaps a model whose new version was verified and
  installed; an unreachable server only means the current version keeps serving;
- ``report_once`` closes the telemetry windows, spools the reports (durably) and
  forwards every spool to the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import httpx

from toposerve.brokers import Telemetry
from toposerve.producers.edge import EdgeRuntime
from toposerve.producers.edge_cache import EdgeError, PullResult
from toposerve.producers.edge_spool import DEFAULT_MAX_REPORTS, Spool
from toposerve.producers.edge_telemetry import ForwardResult, forward

log = logging.getLogger(__name__)


def spool_dir(cache_root: Path) -> Path:
    return cache_root / "spool"


async def spool_and_forward(reports: list[Telemetry], cache_root: Path, models: list[str], amqp_url: str,
                            namespace: str, max_reports: int = DEFAULT_MAX_REPORTS,
                            connect_timeout_s: float = 3.0) -> dict[str, ForwardResult]:
    """Spool ``reports`` first (so a crash from here on loses none), then forward the spools of ``models``."""
    spools = {model: Spool(spool_dir(cache_root), model, max_reports) for model in {*models, *(r.model for r in reports)}}
    for report in reports:
        await asyncio.to_thread(spools[report.model].append, report)
    results = {}
    for model, spool in sorted(spools.items()):
        results[model] = await forward(spool, amqp_url, namespace, connect_timeout_s=connect_timeout_s)
    return results


class EdgeAgent:
    def __init__(self, runtime: EdgeRuntime, models: list[str], server: str, http: httpx.AsyncClient,
                 amqp_url: str, namespace: str, max_spooled: int = DEFAULT_MAX_REPORTS,
                 say: Callable[[str], None] = log.info) -> None:
        self.runtime = runtime
        self.models = models
        self.server = server
        self.http = http
        self.amqp_url = amqp_url
        self.namespace = namespace
        self.max_spooled = max_spooled
        self.say = say

    async def refresh_once(self) -> list[PullResult]:
        results = []
        for model in self.models:
            try:
                result = await self.runtime.cache(model).pull(self.http, self.server)
            except EdgeError as exc:
                self.say(f"{model}: keeping version {self._version(model)}: {exc}")
                continue
            if await asyncio.to_thread(self.runtime.reload_if_changed, model):
                self.say(f"{model}: now serving version {result.version} (sha256 {result.sha256[:12]}…)")
            results.append(result)
        return results

    def _version(self, model: str) -> str:
        edge = self.runtime.models.get(model)
        return edge.pointer.version if edge else "(none)"

    async def report_once(self) -> dict[str, ForwardResult]:
        results = await spool_and_forward(self.runtime.take_reports(), self.runtime.cache_root, self.models,
                                          self.amqp_url, self.namespace, self.max_spooled)
        for model, result in results.items():
            if result.error and result.pending:
                log.info("%s: %d telemetry reports kept in the spool (%s)", model, result.pending, result.error)
        return results

    async def run(self, stop: asyncio.Event, poll_interval_s: float, report_interval_s: float) -> None:
        """Both loops until ``stop``; then a last report, so a clean exit leaves nothing unspooled."""
        async def every(interval: float, step: Callable) -> None:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
                if stop.is_set():
                    return
                try:
                    await step()
                except Exception:  # one failed round must not end the loop; the next one retries
                    log.exception("edge agent: %s failed", step.__name__)

        try:
            await asyncio.gather(every(poll_interval_s, self.refresh_once), every(report_interval_s, self.report_once))
        finally:
            await self.report_once()
