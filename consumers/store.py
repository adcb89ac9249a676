"""StoreStage: ``prediction.*`` and ``failure.*`` -> the job's terminal record in Redis.

In prediction-cache profiles it also fills the cache under the message's
``cache_key`` and completes the jobs that waited for the same answer. A job that
asked for a webhook (brokers/callbacks.py) is delivered from here once its record is
written: in a task of its own, so retries and their backoff never hold the queue.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import ClassVar

import httpx
from redis.exceptions import RedisError

from toposerve.brokers import (
    Envelope,
    Failure,
    JobRecord,
    JobStatus,
    Prediction,
    PredictionCache,
    ResultStore,
    current_span,
    decode_terminal,
    utc_now,
)
from toposerve.brokers.callbacks import (
    CallbackRefused,
    CallbackRegistry,
    CallbackSpec,
    check_callback_url,
    deliver,
    shown_url,
)
from toposerve.brokers.settings import Settings
from toposerve.consumers.stage import Outgoing, Stage, TransientError

log = logging.getLogger(__name__)


def follower_record(job_id: str, leader: JobRecord) -> JobRecord:
    """A waiting job ends as its leader did: same answer (or error), marked as from the cache."""
    return leader.model_copy(update={"id": uuid.UUID(job_id), "updated_at": utc_now(),
                                     "cached": leader.status is JobStatus.SUCCEEDED})


class StoreStage(Stage):
    kind: ClassVar[str] = "store"
    input_type: ClassVar[type[Envelope]] = Prediction
    honours_deadline: ClassVar[bool] = False
    outcomes_from_stages_only: ClassVar[bool] = True

    def __init__(self, name: str, results: ResultStore, prediction_cache: PredictionCache | None = None,
                 callbacks: CallbackRegistry | None = None, settings: Settings | None = None) -> None:
        super().__init__(name)
        self.results = results
        self.prediction_cache = prediction_cache
        self.callbacks = callbacks
        self.settings = settings or Settings()
        self._http: httpx.AsyncClient | None = None
        self._deliveries: set[asyncio.Task] = set()

    def decode(self, body: bytes) -> Envelope:
        return decode_terminal(body)

    async def stop(self) -> None:
        # In-flight webhooks get the drain timeout to finish their current try; what is left
        # is cancelled (its registration is gone: a limit, see brokers/callbacks.py).
        if self._deliveries:
            _, pending = await asyncio.wait(self._deliveries, timeout=self.settings.drain_timeout_s)
            for task in pending:
                task.cancel()
        if self._http is not None:
            await self._http.aclose()
        await self.results.client.aclose()

    async def _start_delivery(self, record: JobRecord) -> None:
        assert self.callbacks is not None
        spec = await self.callbacks.take(record.id)
        if spec is None:
            return
        try:
            check_callback_url(spec.url, self.settings)  # again here: this process's own allow-list
        except CallbackRefused as exc:
            log.warning("callback %s for job %s refused: %s", shown_url(spec.url), record.id, exc)
            return
        if self._http is None:
            self._http = httpx.AsyncClient()
        task = asyncio.create_task(self._deliver(spec, record), name=f"callback-{record.id}")
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, spec: CallbackSpec, record: JobRecord) -> None:
        assert self._http is not None
        delivery = await deliver(self._http, spec, record.id, record.model_dump_json().encode(), self.settings)
        try:
            await self.results.record_callback(record.id, delivery)
        except RedisError as exc:
            log.warning("could not record the callback of job %s: %s", record.id, exc)

    async def handle(self, message: Envelope) -> list[Outgoing]:
        assert isinstance(message, Prediction | Failure)
        record = JobRecord.from_terminal(message)
        span = current_span.get()
        if span is not None:
            record.trace_id = span.trace_id
        try:
            written = await self.results.finish(record)
            if written and self.callbacks is not None:
                await self._start_delivery(record)
            if self.prediction_cache is not None and message.cache_key:
                if isinstance(message, Prediction):
                    followers = await self.prediction_cache.fill(message.cache_key, message.rows)
                else:
                    followers = await self.prediction_cache.abandon(message.cache_key)
                for job_id in followers:
                    await self.results.finish(follower_record(job_id, record))
        except RedisError as exc:
            raise TransientError(f"Redis unavailable: {exc}") from exc
        return []
