"""The result store: one Redis key per job, with a TTL, written idempotently.

States: ``pending`` (written by the ingress *before* it publishes, so a poll never
races the pipeline) -> ``succeeded`` | ``failed``. The first terminal state wins: a
redelivered message rewrites nothing, so each job ends exactly once.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

import redis.asyncio as redis
from pydantic import BaseModel, Field

from brokers.messages import Failure, Prediction, RowPrediction, utc_now


class JobStatus(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class JobError(BaseModel):
    code: str
    message: str
    stage: str | None = None


class JobRecord(BaseModel):
    id: uuid.UUID
    model: str
    status: JobStatus
    created_at: datetime
    updated_at: datetime = Field(default_factory=utc_now)
    model_version: str | None = None
    predictions: list[RowPrediction] | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    error: JobError | None = None

    @classmethod
    def from_terminal(cls, message: Prediction | Failure) -> JobRecord:
        timings = dict(message.timings)
        timings["total_ms"] = round((utc_now() - message.created_at).total_seconds() * 1000, 3)
        if isinstance(message, Prediction):
            return cls(
                id=message.id,
                model=message.model,
                status=JobStatus.SUCCEEDED,
                created_at=message.created_at,
                model_version=message.model_version,
                predictions=message.rows,
                timings=timings,
            )
        return cls(
            id=message.id,
            model=message.model,
            status=JobStatus.FAILED,
            created_at=message.created_at,
            timings=timings,
            error=JobError(code=message.code, message=message.message, stage=message.stage),
        )


# Write the terminal record unless one is already there (first terminal state wins).
_FINISH_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current and not string.find(current, '"status":"pending"', 1, true) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""


class ResultStore:
    def __init__(self, client: redis.Redis, namespace: str, ttl_s: int) -> None:
        self.client = client
        self.namespace = namespace
        self.ttl_s = ttl_s
        self._finish = client.register_script(_FINISH_SCRIPT)

    def key(self, job_id: uuid.UUID) -> str:
        return f"{self.namespace}:job:{job_id}"

    async def create_pending(self, job_id: uuid.UUID, model: str, created_at: datetime) -> None:
        record = JobRecord(id=job_id, model=model, status=JobStatus.PENDING, created_at=created_at)
        await self.client.set(self.key(job_id), record.model_dump_json(), ex=self.ttl_s, nx=True)

    async def finish(self, record: JobRecord) -> bool:
        """Store a terminal record; False when the job had already ended (a redelivery)."""
        written = await self._finish(keys=[self.key(record.id)], args=[record.model_dump_json(), self.ttl_s])
        return bool(written)

    async def delete(self, job_id: uuid.UUID) -> None:
        await self.client.delete(self.key(job_id))

    async def get(self, job_id: uuid.UUID) -> JobRecord | None:
        raw = await self.client.get(self.key(job_id))
        return None if raw is None else JobRecord.model_validate_json(raw)
