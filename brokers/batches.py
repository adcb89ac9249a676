"""Batch jobs in Redis: the manifest, per-chunk row errors, per-chunk results, progress.

A batch is an input file cut into chunks of ``chunk_rows`` rows. Chunk ``i`` covers
input rows ``[i * chunk_rows, (i + 1) * chunk_rows)`` and travels as ONE ``Features``
message whose id is ``chunk_id(batch_id, i)`` (uuid5: a re-sent chunk has the same
id). Rows the submitter could not parse never travel: they are recorded with their
reason in the chunk's ``meta`` before the chunk is published.

Keys (all with the batch TTL, refreshed on every write):

- ``{ns}:batch:{id}``          hash: manifest fields + counters ``done``/``failed``/``chunks_done``
- ``{ns}:batch:{id}:meta``     hash: chunk index -> JSON {"sent": n, "errors": {offset: reason}, "names": [...]}
- ``{ns}:batch:{id}:published`` set: chunk indices the broker confirmed
- ``{ns}:batch:{id}:results``  hash: chunk index -> compact JSON of the chunk's outcome
- ``{ns}:batch:{id}:cancelled`` string: present once the batch is cancelled (the predict stage's one read per chunk)
- ``{ns}:batch:index``          sorted set: batch id -> created, the newest ``BATCH_INDEX_MAX`` within the TTL
- ``{ns}:batch:index:owner:{key id}`` the same, for one API key's batches

Progress is exact under redelivery: a chunk's result and the counters are written by
one Lua script that does nothing when the chunk's field already exists.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import orjson
import redis.asyncio as redis
from pydantic import BaseModel, Field

from toposerve.brokers.callbacks import CallbackDelivery

BATCH_NAMESPACE = uuid.UUID("6f1c2b1e-6a2d-5d1e-9a8f-2b7e4c0d9a11")
# The index keeps the newest batches only: listing stays bounded however many were made.
BATCH_INDEX_MAX = 10_000
# What cancelling found: it cancelled the batch, or the batch was already finished or cancelled.
CANCELLED, ALREADY_FINISHED, ALREADY_CANCELLED, NO_BATCH = "cancelled", "finished", "already_cancelled", "missing"


def new_batch_id() -> str:
    return str(uuid.uuid4())


def chunk_id(batch_id: str, index: int) -> uuid.UUID:
    """Deterministic message id of chunk ``index``: the same on every (re)send."""
    return uuid.uuid5(BATCH_NAMESPACE, f"{batch_id}:{index}")


class BatchManifest(BaseModel):
    id: str
    model: str
    total: int = Field(ge=1, description="Input rows")
    chunks: int = Field(ge=1)
    chunk_rows: int = Field(ge=1)
    created: float = Field(description="Unix time the batch was recorded")
    source: str = ""
    fingerprint: str = ""
    kind: str = "csv"
    # The API key id that created it over HTTP (None: authentication off, or the CLI).
    # Kept in the manifest hash, so it lives exactly as long as the batch does.
    owner: str | None = None

    def chunk_range(self, index: int) -> range:
        start = index * self.chunk_rows
        return range(start, min(start + self.chunk_rows, self.total))


class BatchStatus(BaseModel):
    id: str
    model: str
    state: str
    total: int
    done: int
    failed: int
    chunks: int
    chunks_done: int
    created: float
    updated: float | None = None
    elapsed_s: float
    rate: float = Field(description="Finished rows per second since the batch was created")
    owner: str | None = Field(None, description="The API key id that created it (None: authentication off, the CLI)")
    cancelled: float | None = Field(None, description="Unix time it was cancelled; its remaining chunks are skipped")
    callback: CallbackDelivery | None = Field(default=None, description="The webhook's delivery, once it is over")


class BatchPage(BaseModel):
    """One page of the batches a caller may see, newest first."""

    total: int = Field(description="Batches listed for this caller (the newest, within the batch TTL)")
    offset: int
    limit: int
    batches: list[BatchStatus]


# KEYS: results hash, manifest hash, meta hash, published set.
# ARGV: field, payload, ok rows, failed rows, ttl, now. Every key of the batch lives ttl past this write.
_COMPLETE_CHUNK = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 0
end
redis.call('HINCRBY', KEYS[2], 'done', ARGV[3])
redis.call('HINCRBY', KEYS[2], 'failed', ARGV[4])
redis.call('HINCRBY', KEYS[2], 'chunks_done', 1)
redis.call('HSET', KEYS[2], 'updated', ARGV[6])
for i = 1, 4 do
  redis.call('EXPIRE', KEYS[i], ARGV[5])
end
return 1
"""

# KEYS: meta hash, manifest hash. ARGV: field, payload, bad rows, ttl, now.
_RECORD_META = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 0
end
if tonumber(ARGV[3]) > 0 then
  redis.call('HINCRBY', KEYS[2], 'failed', ARGV[3])
  redis.call('HSET', KEYS[2], 'updated', ARGV[5])
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""

# KEYS: manifest hash, cancel flag. ARGV: ttl, now. Finished or cancelled batches are left as they are.
_CANCEL = """
local fields = redis.call('HMGET', KEYS[1], 'model', 'total', 'done', 'failed', 'cancelled')
if not fields[1] then
  return 'missing'
end
if fields[5] then
  return 'already_cancelled'
end
if tonumber(fields[3] or 0) + tonumber(fields[4] or 0) >= tonumber(fields[2]) then
  return 'finished'
end
redis.call('HSET', KEYS[1], 'cancelled', ARGV[2])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[1])
return 'cancelled'
"""


@dataclass
class ChunkMeta:
    sent: int
    errors: dict[int, str]
    names: list[str] | None = None

    def dumps(self) -> bytes:
        body: dict[str, object] = {"sent": self.sent, "errors": {str(k): v for k, v in self.errors.items()}}
        if self.names is not None:
            body["names"] = self.names
        return orjson.dumps(body)

    @classmethod
    def loads(cls, raw: bytes) -> ChunkMeta:
        data = orjson.loads(raw)
        return cls(sent=int(data["sent"]), errors={int(k): v for k, v in data.get("errors", {}).items()},
                   names=data.get("names"))


def batch_state(total: int, done: int, failed: int, cancelled: bool = False) -> str:
    if cancelled:
        return "cancelled"
    if done + failed < total:
        return "running"
    if failed == 0:
        return "succeeded"
    return "failed" if done == 0 else "partial"


class BatchStore:
    def __init__(self, client: redis.Redis, namespace: str, ttl_s: int) -> None:
        self.client = client
        self.namespace = namespace
        self.ttl_s = ttl_s
        self._complete = client.register_script(_COMPLETE_CHUNK)
        self._meta = client.register_script(_RECORD_META)
        self._cancel = client.register_script(_CANCEL)
        self._manifests: dict[str, BatchManifest] = {}
        self._chunk_index: dict[str, dict[uuid.UUID, int]] = {}

    def key(self, batch_id: str, suffix: str = "") -> str:
        return f"{self.namespace}:batch:{batch_id}" + (f":{suffix}" if suffix else "")

    # -- the submitter ------------------------------------------------------------

    async def create(self, manifest: BatchManifest) -> None:
        fields = {k: str(v) for k, v in manifest.model_dump(exclude_none=True).items()}
        fields |= {"done": "0", "failed": "0", "chunks_done": "0"}
        key = self.key(manifest.id)
        indices = [self.index_key(None)] + ([self.index_key(manifest.owner)] if manifest.owner is not None else [])
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=fields)
            pipe.expire(key, self.ttl_s)
            for index in indices:
                pipe.zadd(index, {manifest.id: manifest.created})
                pipe.zremrangebyscore(index, "-inf", f"({manifest.created - self.ttl_s}")  # expired batches
                pipe.zremrangebyrank(index, 0, -BATCH_INDEX_MAX - 1)
                pipe.expire(index, self.ttl_s)
            await pipe.execute()

    def index_key(self, owner: str | None) -> str:
        """Every batch (``owner`` None), or one API key's."""
        return f"{self.namespace}:batch:index" + (f":owner:{owner}" if owner is not None else "")

    def cancel_key(self, batch_id: str) -> str:
        return self.key(batch_id, "cancelled")

    async def record_meta(self, batch_id: str, index: int, meta: ChunkMeta) -> bool:
        """The chunk's row errors (counted as failed once), written before the chunk is published."""
        written = await self._meta(keys=[self.key(batch_id, "meta"), self.key(batch_id)],
                                   args=[index, meta.dumps(), len(meta.errors), self.ttl_s, time.time()])
        return bool(written)

    async def mark_published(self, batch_id: str, indices: list[int]) -> None:
        if not indices:
            return
        key = self.key(batch_id, "published")
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.sadd(key, *indices)
            pipe.expire(key, self.ttl_s)
            await pipe.execute()

    async def published(self, batch_id: str) -> set[int]:
        return {int(i) for i in await self.client.smembers(self.key(batch_id, "published"))}

    async def completed(self, batch_id: str) -> set[int]:
        return {int(i) for i in await self.client.hkeys(self.key(batch_id, "results"))}

    # -- the store stage ------------------------------------------------------------

    async def manifest(self, batch_id: str, cached: bool = False) -> BatchManifest | None:
        if cached and batch_id in self._manifests:
            return self._manifests[batch_id]
        raw = await self.client.hgetall(self.key(batch_id))
        if not raw or b"model" not in raw:
            return None
        data = {k.decode(): v.decode() for k, v in raw.items()}
        manifest = BatchManifest.model_validate({k: data[k] for k in BatchManifest.model_fields if k in data})
        if cached:
            if len(self._manifests) > 1000:
                self._manifests.clear()
                self._chunk_index.clear()
            self._manifests[batch_id] = manifest
        return manifest

    def chunk_index(self, manifest: BatchManifest, message_id: uuid.UUID) -> int | None:
        table = self._chunk_index.get(manifest.id)
        if table is None:
            table = self._chunk_index[manifest.id] = {chunk_id(manifest.id, i): i for i in range(manifest.chunks)}
        return table.get(message_id)

    async def chunk_meta(self, batch_id: str, index: int) -> ChunkMeta | None:
        raw = await self.client.hget(self.key(batch_id, "meta"), str(index))
        return None if raw is None else ChunkMeta.loads(raw)

    async def complete_chunk(self, batch_id: str, index: int, payload: bytes, ok_rows: int, failed_rows: int) -> bool:
        """Store a chunk's outcome and count its rows, once; False for a redelivered chunk."""
        written = await self._complete(keys=[self.key(batch_id, "results"), self.key(batch_id),
                                             self.key(batch_id, "meta"), self.key(batch_id, "published")],
                                       args=[index, payload, ok_rows, failed_rows, self.ttl_s, time.time()])
        return bool(written)

    # -- cancelling -----------------------------------------------------------------

    async def cancel(self, batch_id: str) -> str:
        """Mark a running batch cancelled (its flag lives the batch TTL); what was found, as one of
        ``CANCELLED``, ``ALREADY_CANCELLED``, ``ALREADY_FINISHED``, ``NO_BATCH``."""
        found = await self._cancel(keys=[self.key(batch_id), self.cancel_key(batch_id)],
                                   args=[self.ttl_s, time.time()])
        return found.decode() if isinstance(found, bytes) else str(found)

    async def is_cancelled(self, batch_id: str) -> bool:
        """One read of the batch's flag key (the only batch key the predict stage may read)."""
        return bool(await self.client.exists(self.cancel_key(batch_id)))

    # -- readers --------------------------------------------------------------------

    async def status(self, batch_id: str) -> BatchStatus | None:
        return batch_status(batch_id, await self.client.hgetall(self.key(batch_id)))

    async def record_callback(self, batch_id: str, delivery: CallbackDelivery) -> None:
        """Note on the batch how its webhook went (the hash keeps its time to live)."""
        await self.client.hset(self.key(batch_id), "callback", delivery.model_dump_json())

    async def page(self, owner: str | None, offset: int, limit: int) -> BatchPage:
        """The newest batches first (every batch for ``owner`` None, else that key's); a batch that
        expired since it was indexed is dropped from the index as it is met."""
        index = self.index_key(owner)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(index, "-inf", f"({time.time() - self.ttl_s}")
            pipe.zcard(index)
            pipe.zrevrange(index, offset, offset + limit - 1)
            _, total, ids = await pipe.execute()
        names = [raw.decode() for raw in ids]
        async with self.client.pipeline(transaction=False) as pipe:
            for batch_id in names:
                pipe.hgetall(self.key(batch_id))
            hashes = await pipe.execute() if names else []
        found = [batch_status(batch_id, raw) for batch_id, raw in zip(names, hashes, strict=True)]
        gone = [batch_id for batch_id, status in zip(names, found, strict=True) if status is None]
        if gone:
            await self.client.zrem(index, *gone)
        return BatchPage(total=total - len(gone), offset=offset, limit=limit,
                         batches=[status for status in found if status is not None])


def batch_status(batch_id: str, raw: dict[bytes, bytes]) -> BatchStatus | None:
    """A batch's progress from its manifest hash; None for a hash that is not a batch (expired)."""
    if not raw or b"model" not in raw:
        return None
    data = {k.decode(): v.decode() for k, v in raw.items()}
    total, done, failed = int(data["total"]), int(data.get("done", 0)), int(data.get("failed", 0))
    created = float(data["created"])
    updated = float(data["updated"]) if "updated" in data else None
    cancelled = float(data["cancelled"]) if "cancelled" in data else None
    state = batch_state(total, done, failed, cancelled is not None)
    end = updated if (state != "running" and updated is not None) else time.time()
    elapsed = max(end - created, 1e-6)
    callback = CallbackDelivery.model_validate_json(data["callback"]) if "callback" in data else None
    return BatchStatus(id=batch_id, model=data["model"], state=state, total=total, done=done, failed=failed,
                       chunks=int(data["chunks"]), chunks_done=int(data.get("chunks_done", 0)),
                       created=created, updated=updated, elapsed_s=round(elapsed, 3),
                       rate=round((done + failed) / elapsed, 1), owner=data.get("owner"), cancelled=cancelled,
                       callback=callback)


async def iter_results(store: BatchStore, manifest: BatchManifest, labels: list[str]) -> AsyncIterator[bytes]:
    """JSON lines (bytes) of one chunk at a time: one line per input row, in input order."""
    for index in range(manifest.chunks):
        rows = manifest.chunk_range(index)
        meta_raw = await store.client.hget(store.key(manifest.id, "meta"), str(index))
        result_raw = await store.client.hget(store.key(manifest.id, "results"), str(index))
        yield b"".join(chunk_lines(rows, None if meta_raw is None else ChunkMeta.loads(meta_raw),
                                   None if result_raw is None else orjson.loads(result_raw), labels))


def encode_chunk_result(version: str, class_indices: list[int], probabilities: list[list[float]]) -> bytes:
    return orjson.dumps({"v": version, "c": class_indices, "p": probabilities})


def encode_chunk_error(code: str, message: str, stage: str | None) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message, "stage": stage}})


def chunk_lines(rows: range, meta: ChunkMeta | None, result: dict | None, labels: list[str]) -> Iterator[bytes]:
    """Merge a chunk's row errors (from the submitter) and its predictions (from the store)."""
    errors = meta.errors if meta is not None else {}
    names = meta.names if meta is not None else None
    sent = 0
    for offset, row in enumerate(rows):
        line: dict[str, object] = {"row": row}
        if names is not None and offset < len(names):
            line["name"] = names[offset]
        if offset in errors:
            line["status"] = "failed"
            line["error"] = {"code": "invalid_input", "message": errors[offset], "stage": "submit"}
        elif meta is None or result is None:
            line["status"] = "pending"
        elif "error" in result:
            line["status"] = "failed"
            line["error"] = result["error"]
            sent += 1
        else:
            index = result["c"][sent]
            line["status"] = "succeeded"
            line["model_version"] = result["v"]
            line["label"] = labels[index] if 0 <= index < len(labels) else str(index)
            line["class_index"] = index
            line["probabilities"] = result["p"][sent]
            sent += 1
        yield orjson.dumps(line) + b"\n"
