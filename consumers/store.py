"""StoreStage: ``prediction.*`` and ``failure.*`` -> the job's terminal record in Redis.

In prediction-cache profiles it also fills the cache under the message's
``cache_key`` and completes the jobs that waited for the same answer. A job that
asked for a webhook (brokers/callbacks.py) is delivered from here once its record is
written: in a task of its own, so retries and their backoff never hold the queue.
"""

from __future__ import annotations

import uuid
from typing import ClassVar

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
from toposerve.brokers.callbacks import CallbackSender
from toposerve.consumers.stage import Outgoing, Stage, TransientError


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
                 callbacks: CallbackSender | None = None) -> None:
        super().__init__(name)
        self.results = results
        self.prediction_cache = prediction_cache
        self.callbacks = callbacks

    def decode(self, body: bytes) -> Envelope:
        return decode_terminal(body)

    async def stop(self) -> None:
        if self.callbacks is not None:
            await self.callbacks.close()
        await self.results.client.aclose()

    async def handle(self, message: Envelope) -> list[Outgoing]:
        assert isinstance(message, Prediction | Failure)
        record = JobRecord.from_terminal(message)
        span = current_span.get()
        if span is not None:
            record.trace_id = span.trace_id
        try:
            await self.results.finish(record)
            # Also for a redelivery (the record was written, the registration maybe not yet
            # taken when Redis failed): the registration is taken once, so it calls once.
            if self.callbacks is not None:
                job_id = record.id
                await self.callbacks.send(job_id, record.model_dump_json().encode(),
                                          lambda delivery: self.results.record_callback(job_id, delivery))
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
