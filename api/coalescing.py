"""Coalescing at the edge: concurrent sync requests for one model travel as ONE message.

While a publish for a model is in flight (or within ``window_s``), the requests that arrive
wait; when it is done, they go together as one ``Features`` message with one ``JobSlice`` per
request (brokers/messages.py). The predict stage runs them in one ONNX call and answers this
ingress with one ``Outcomes`` message, which the reply router splits back to the callers. So
the broker's cost per request shrinks as the load grows, the way a dynamic batcher shrinks
the model's.

Each job keeps its own id, deadline and trace: the slice carries them, the predict stage drops
a slice whose deadline passed and fails a bad slice alone. A caller whose deadline passes
while it waits to be published is not published at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from toposerve.brokers import Features, JobSlice, ttl_until, utc_now
from toposerve.models import encode_tensor

# Publishes one message; returns when the broker confirmed it (raises PublishRefused otherwise).
PublishFn = Callable[[Features, float, str | None], Awaitable[None]]


@dataclass(eq=False, slots=True)  # compared by identity: a value comparison of jobs would cost O(n) per lookup
class _Waiting:
    job: JobSlice
    features: np.ndarray
    published: asyncio.Future[None]


class FeatureCoalescer:
    """One per model and ingress process; ``submit`` returns once its message was confirmed."""

    def __init__(self, model: str, publish: PublishFn, *, max_jobs: int, max_rows: int,
                 window_s: float = 0.0, version: str | None = None) -> None:
        self.model = model
        self.version = version  # one coalescer per model version: a message is for one version
        self._publish = publish
        self.max_jobs = max_jobs
        self.max_rows = max_rows
        self.window_s = window_s
        self._queue: list[_Waiting] = []
        self._flusher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.messages = 0
        self.jobs = 0

    async def submit(self, job: JobSlice, features: np.ndarray) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()  # once: on Python 3.11 each lookup is a getpid() call
        waiting = _Waiting(job, features, self._loop.create_future())
        # Read the outcome even when its caller left, so a failed publish is not logged as unretrieved.
        waiting.published.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._queue.append(waiting)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_all(), name=f"coalesce-{self.model}")
        await asyncio.shield(waiting.published)  # a caller that leaves does not cancel the others' publish

    async def _flush_all(self) -> None:
        if self.window_s > 0:
            await asyncio.sleep(self.window_s)
        while self._queue:
            now = utc_now()
            live = []
            for waiting in self._take():
                if waiting.published.done():
                    continue  # cancelled
                if waiting.job.deadline is not None and waiting.job.deadline <= now:
                    waiting.published.set_exception(TimeoutError())  # its deadline passed while it waited
                else:
                    live.append(waiting)
            if not live:
                continue
            message, ttl_s, trace = self.message_of(live)
            try:
                await self._publish(message, ttl_s, trace)
            except asyncio.CancelledError:
                for w in live + self._queue:  # shutting down: nobody is published any more
                    w.published.cancel()
                self._queue.clear()
                raise
            except Exception as exc:  # noqa: BLE001 - every caller of the batch learns why
                for w in live:
                    if not w.published.done():
                        w.published.set_exception(exc)
                continue
            self.messages += 1
            self.jobs += len(live)
            for w in live:
                if not w.published.done():
                    w.published.set_result(None)

    async def close(self) -> None:
        """Stop publishing: the callers still waiting are cancelled."""
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher

    def _take(self) -> list[_Waiting]:
        batch: list[_Waiting] = []
        rows = 0
        while self._queue and len(batch) < self.max_jobs:
            head = self._queue[0]
            if batch and rows + head.job.rows > self.max_rows:
                break
            batch.append(self._queue.pop(0))
            rows += head.job.rows
        return batch

    def message_of(self, live: list[_Waiting]) -> tuple[Features, float, str | None]:
        """One message for these jobs: their rows in order, a slice each; its TTL and trace.

        A job alone travels as the plain message of one request (its id, no ``jobs``): what a
        caller at low load sends is what it sent before coalescing existed.
        """
        jobs = [w.job for w in live]
        deadlines: list[datetime] = [job.deadline for job in jobs if job.deadline is not None]
        deadline = max(deadlines) if len(deadlines) == len(jobs) else None  # one without: none for the message
        if len(jobs) == 1:
            message = Features(id=jobs[0].id, model=self.model, version=self.version, created_at=jobs[0].created_at,
                               deadline=deadline,
                               timings=dict(jobs[0].timings), tensor=encode_tensor(live[0].features))
        else:
            message = Features(id=uuid.uuid4(), model=self.model, version=self.version,
                               created_at=min(job.created_at for job in jobs),
                               deadline=deadline, tensor=encode_tensor(np.concatenate([w.features for w in live])),
                               jobs=jobs)
        return message, ttl_until(deadline) or 0.0, jobs[0].traceparent
