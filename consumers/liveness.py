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
from collections import deque
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


class LoopStalls:
    """How long this event loop was held up lately: a stage telling its own slowness from an outage.

    A task wakes every ``tick_s``; a wake-up that comes late by more than ``tick_s``
    means the loop was held (a long parse, a blocking call). When a publish confirm
    times out, the stage asks how much of that wait the loop itself was stalled: if
    most of it, the confirm may well have arrived and waited for the loop, and the
    message counts an attempt instead of being requeued as an outage.
    """

    def __init__(self, tick_s: float = 0.05, keep_s: float = 120.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.tick_s = tick_s
        self.keep_s = keep_s
        self.clock = clock
        self._stalls: deque[tuple[float, float]] = deque()  # (when it ended, how long it lasted)
        self._last_wake = clock()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="loop-stalls")

    async def close(self) -> None:
        await stop_task(self._task)

    def record(self, ended: float, lasted: float) -> None:
        self._stalls.append((ended, lasted))
        while self._stalls and self._stalls[0][0] < ended - self.keep_s:
            self._stalls.popleft()

    def stalled_s(self, since: float) -> float:
        """Seconds the loop was held up after ``since`` (a ``clock()`` reading), the stall
        going on now included (the caller runs on the loop, before the watcher wakes again)."""
        now = self.clock()
        ongoing = max(0.0, min(now - self._last_wake - self.tick_s, now - since))
        return ongoing + sum(min(lasted, ended - since) for ended, lasted in self._stalls if ended > since)

    async def _watch(self) -> None:
        self._last_wake = self.clock()
        while True:
            await asyncio.sleep(self.tick_s)
            now = self.clock()
            late = now - self._last_wake - self.tick_s
            if late > self.tick_s:
                self.record(now, late)
            self._last_wake = now
