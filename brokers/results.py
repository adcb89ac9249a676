"""The result store: one Redis key per job, with a TTL, written idempotently.

States: ``pending`` (written by the ingress *before* it publishes, so a poll never
races the pipeline) -> ``succeeded`` | ``failed``. The first terminal state wins: a
redelivered message rewrites nothing, so each job ends exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import redis.asyncio as redis
from pydantic import BaseModel, Field, ValidationError

from toposerve.brokers.background import stop_task
from toposerve.brokers.callbacks import CallbackDelivery
from toposerve.brokers.messages import Failure, PartResult, Prediction, RowPrediction, utc_now

log = logging.getLogger(__name__)


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
    cached: bool = Field(default=False, description="Answered from the prediction cache")
    parts: dict[str, PartResult] | None = Field(default=None, description="Model groups: each member's status")
    partial: bool = Field(default=False, description="Model groups: some members did not answer; scores and "
                                                     "probabilities of those are missing (null), see parts")
    answered_by: str | None = Field(default=None, description="Cascades: the model whose answer this is")
    trace_id: str | None = Field(default=None, description="W3C trace id of the request (traceparent header)")
    callback: CallbackDelivery | None = Field(default=None, description="The webhook's delivery, once it is "
                                                                        "over (delivered or failed)")
    # The API key id that created the job (authentication on), never serialized: it lives
    # under its own key (``ResultStore.owner_key``), so terminal rewrites keep it.
    owner: str | None = Field(default=None, exclude=True)

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
                parts=message.parts,
                partial=message.partial,
                answered_by=message.answered_by,
            )
        return cls(
            id=message.id,
            model=message.model,
            status=JobStatus.FAILED,
            created_at=message.created_at,
            timings=timings,
            error=JobError(code=message.code, message=message.message, stage=message.stage),
        )


# Write the terminal record unless one is already there (first terminal state wins),
# and announce it, so waiting callers wake at once instead of polling.
# Records up to this size travel in the job-done announcement (a one-row answer is ~0.5 KB);
# larger ones (a 10,000-row job) are announced by id, and their waiters read the store:
# every ingress process receives every announcement, and Redis drops a subscriber whose
# output buffer grows past its limit.
ANNOUNCED_RECORD_MAX_BYTES = 64 * 1024

_FINISH_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current and not string.find(current, '"status":"pending"', 1, true) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[2], ARGV[5], 'EX', ARGV[2])
else
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
-- The announcement carries what a waiter needs (owner, record): it answers without a read.
-- A large record is announced by id and owner only (every listener gets every announcement).
local record = ''
if string.len(ARGV[1]) <= tonumber(ARGV[6]) then
  record = ARGV[1]
end
redis.call('PUBLISH', ARGV[3], ARGV[4] .. '\\n' .. (redis.call('GET', KEYS[2]) or '') .. '\\n' .. record)
return 1
"""


# A record for one reader: nothing of it leaves Redis unless the reader may see it (the
# owner check comes first, so another key's job costs no more than an unknown id).
_READ_SCRIPT = """
local owner = redis.call('GET', KEYS[2])
if ARGV[1] ~= '' and owner and owner ~= ARGV[1] then
  return false
end
return {redis.call('GET', KEYS[1]), owner}
"""


class ResultStore:
    def __init__(self, client: redis.Redis, namespace: str, ttl_s: int) -> None:
        self.client = client
        self.namespace = namespace
        self.ttl_s = ttl_s
        self._finish = client.register_script(_FINISH_SCRIPT)
        self._read = client.register_script(_READ_SCRIPT)

    def key(self, job_id: uuid.UUID) -> str:
        return f"{self.namespace}:job:{job_id}"

    def owner_key(self, job_id: uuid.UUID) -> str:
        return f"{self.namespace}:job-owner:{job_id}"

    @property
    def done_channel(self) -> str:
        return f"{self.namespace}:job-done"

    async def create_pending(self, job_id: uuid.UUID, model: str, created_at: datetime,
                             owner: str | None = None) -> None:
        record = JobRecord(id=job_id, model=model, status=JobStatus.PENDING, created_at=created_at)
        if owner is None:
            await self.client.set(self.key(job_id), record.model_dump_json(), ex=self.ttl_s, nx=True)
            return
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.owner_key(job_id), owner, ex=self.ttl_s)
            pipe.set(self.key(job_id), record.model_dump_json(), ex=self.ttl_s, nx=True)
            await pipe.execute()

    async def claim(self, job_id: uuid.UUID, owner: str) -> None:
        """Record who owns a job before anything about it is stored (a sync call whose answer
        the store keeps): the terminal write then keeps this owner, so no other key reads it."""
        await self.client.set(self.owner_key(job_id), owner, ex=self.ttl_s, nx=True)

    async def finish(self, record: JobRecord) -> bool:
        """Store a terminal record; False when the job had already ended (a redelivery)."""
        written = await self._finish(
            keys=[self.key(record.id), self.owner_key(record.id)],
            args=[record.model_dump_json(), self.ttl_s, self.done_channel, str(record.id), record.owner or "",
                  ANNOUNCED_RECORD_MAX_BYTES],
        )
        return bool(written)

    async def record_callback(self, job_id: uuid.UUID, delivery: CallbackDelivery) -> None:
        """Note on the (terminal) record how its webhook went; its time to live is kept."""
        raw = await self.client.get(self.key(job_id))
        if raw is None:
            return  # expired meanwhile
        record = JobRecord.model_validate_json(raw).model_copy(update={"callback": delivery})
        await self.client.set(self.key(job_id), record.model_dump_json(), keepttl=True, xx=True)

    async def delete(self, job_id: uuid.UUID) -> None:
        await self.client.delete(self.key(job_id), self.owner_key(job_id))

    async def get(self, job_id: uuid.UUID) -> JobRecord | None:
        raw, owner = await self.client.mget(self.key(job_id), self.owner_key(job_id))
        return self._record(raw, owner)

    async def get_for(self, job_id: uuid.UUID, reader: str | None) -> JobRecord | None:
        """The record if ``reader`` (a key id; None: authentication off) may read it, else None.

        A job with no owner is everyone's; one with an owner only its owner's.
        """
        found = await self._read(keys=[self.key(job_id), self.owner_key(job_id)], args=[reader or ""])
        if not found:
            return None
        raw, owner = found
        return self._record(raw, owner)

    @staticmethod
    def _record(raw: bytes | None, owner: bytes | str | None) -> JobRecord | None:
        if raw is None:
            return None
        record = JobRecord.model_validate_json(raw)
        if owner is not None:
            record.owner = owner.decode() if isinstance(owner, bytes) else str(owner)
        return record


@dataclass(frozen=True, slots=True)
class JobDone:
    """A ``job-done`` announcement: ``<job id>\\n<owner>\\n<terminal record JSON>``, published by
    the store in the same script that wrote the record (so it is the record, not a hint)."""

    job_id: str
    owner: str | None
    record: bytes | None  # None: the id alone

    @classmethod
    def parse(cls, data: bytes) -> JobDone:
        job_id, _, rest = data.partition(b"\n")
        owner, _, record = rest.partition(b"\n")
        return cls(job_id.decode(errors="replace"), owner.decode(errors="replace") or None, record or None)

    def record_for(self, reader: str | None) -> JobRecord | None:
        """The record if ``reader`` may read it (the rule ``get_for`` applies in Redis), else None."""
        if self.record is None or (reader and self.owner and self.owner != reader):
            return None
        try:
            return ResultStore._record(self.record, self.owner)
        except ValidationError:
            return None  # not a record after all: the caller reads it from the store instead


class CompletionListener:
    """Wakes callers waiting for a job to end, from the store's ``job-done`` announcements.

    One Redis subscription per process. Announcements are a speed-up, not the source
    of truth: waiters always re-read the record, and poll slowly as a fallback, so a
    lost announcement (a reconnect) only delays an answer.
    """

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self.client = client
        self.channel = channel
        self._waiters: dict[str, set[asyncio.Future[bytes]]] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="completion-listener")

    async def close(self) -> None:
        await stop_task(self._task)

    @contextlib.contextmanager
    def watch(self, job_id: uuid.UUID | str) -> Iterator[asyncio.Future[bytes]]:
        """A future that resolves, with the announcement, when ``job_id`` is announced (an
        announcement is the key alone, or the key and a newline and what follows it).

        Watch *before* reading the record: an announcement between the read and the
        wait would otherwise be missed, and the caller would wait out its fallback.
        """
        key = str(job_id)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, set()).add(future)
        try:
            yield future
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(future)
                if not waiters:
                    del self._waiters[key]

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                backoff = 0.1
                async for message in pubsub.listen():
                    data = message.get("data")
                    data = data if isinstance(data, bytes) else str(data).encode()
                    key = data.partition(b"\n")[0].decode(errors="replace")
                    for future in self._waiters.get(key, ()):
                        if not future.done():
                            future.set_result(data)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: waiters fall back to polling meanwhile
                log.warning("job-done subscription lost (%s); resubscribing", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                # Bounded: closing a subscription cancelled mid-connect can wait forever.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), 1.0)
