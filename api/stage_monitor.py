"""Which stage queues have consumers, refreshed every second.

A sync request whose stages have no consumer would only wait for its deadline;
with this the ingress answers 503 at once instead, and /readyz reports it.
"""

from __future__ import annotations

import asyncio
import logging

from aio_pika.abc import AbstractRobustConnection

from toposerve.brokers import stop_task

log = logging.getLogger(__name__)


class StageMonitor:
    def __init__(self, connection: AbstractRobustConnection, queue_names: list[str], interval_s: float = 1.0) -> None:
        self.connection = connection
        self.queue_names = queue_names
        self.interval_s = interval_s
        self.consumers: dict[str, int] = {}
        self.error: str | None = "not checked yet"
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="stage-monitor")

    async def close(self) -> None:
        await stop_task(self._task)

    def without_consumers(self, among: list[str] | None = None) -> list[str]:
        names = self.queue_names if among is None else [n for n in self.queue_names if n in among]
        return [name for name in names if self.consumers.get(name, 0) == 0]

    async def refresh(self) -> None:
        counts: dict[str, int] = {}
        try:
            channel = await asyncio.wait_for(self.connection.channel(publisher_confirms=False), timeout=2.0)
            try:
                for name in self.queue_names:
                    queue = await asyncio.wait_for(channel.declare_queue(name, passive=True), timeout=2.0)
                    counts[name] = queue.declaration_result.consumer_count
            finally:
                await channel.close()
        except Exception as exc:  # the broker is away or a queue is missing: report, do not crash
            self.error = f"{type(exc).__name__}: {exc}"
            return
        self.consumers = counts
        self.error = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.refresh()
