"""Is a stage's event loop still turning? The answer behind its liveness probe.

A stage that crashes exits and is restarted by its supervisor. One whose event loop
is stuck (a deadlock, a call that blocks for ever) would sit there holding its
prefetched messages, and nothing would notice. ``LoopHeartbeat`` stamps the time
from a task on the loop; the metrics server, a thread that answers even while the
loop does not, serves ``/healthz`` from that stamp: 200 while it is fresh, 503 once
it is older than ``stale_after_s``. A broker or Redis outage does not make a stage
unhealthy: restarting it would not bring them back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from toposerve.brokers import stop_task


class LoopHeartbeat:
    def __init__(self, interval_s: float = 1.0, stale_after_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.stale_after_s = stale_after_s
        self.clock = clock
        self.last_beat = clock()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.last_beat = self.clock()
        self._task = asyncio.create_task(self._beat(), name="loop-heartbeat")

    async def close(self) -> None:
        await stop_task(self._task)

    def age_s(self) -> float:
        return self.clock() - self.last_beat

    def alive(self) -> bool:
        return self.age_s() <= self.stale_after_s

    async def _beat(self) -> None:
        while True:
            self.last_beat = self.clock()
            await asyncio.sleep(self.interval_s)
