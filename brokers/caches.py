"""The two Redis caches: predictions (whole answers) and features (preprocessed items).

Every key has a TTL. Cache trouble is never a reason to fail a request: callers
treat a Redis error as a miss and go through the pipeline.
"""

from __future__ import annotations

import json

import numpy as np
import redis.asyncio as redis
from pydantic import TypeAdapter

from toposerve.brokers.messages import RowPrediction

_ROWS = TypeAdapter(list[RowPrediction])

# Fill the cache, release the single-flight lock, and tell waiters — in one step, so
# a waiter can never see the lock gone and the entry not yet there.
_FILL_SCRIPT = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('DEL', KEYS[2])
local followers = redis.call('SMEMBERS', KEYS[3])
redis.call('DEL', KEYS[3])
redis.call('PUBLISH', ARGV[3], KEYS[1])
return followers
"""

# The leader failed: release the lock and wake waiters so they try themselves.
_ABANDON_SCRIPT = """
redis.call('DEL', KEYS[1])
local followers = redis.call('SMEMBERS', KEYS[2])
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return followers
"""


# A leader gives up (refused, timed out, found the answer already there): free the lock
# if it is still its own, hand back the async jobs that followed it, and wake the waiters.
_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {}
end
redis.call('DEL', KEYS[1])
local followers = redis.call('SMEMBERS', KEYS[2])
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return followers
"""


class PredictionCache:
    """Cached answers by ``cache_keys.prediction_key``, with single flight for misses."""

    def __init__(self, client: redis.Redis, namespace: str, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.filled_channel = f"{namespace}:pred-filled"
        self._fill = client.register_script(_FILL_SCRIPT)
        self._abandon = client.register_script(_ABANDON_SCRIPT)
        self._release = client.register_script(_RELEASE_SCRIPT)

    @staticmethod
    def _lock(key: str) -> str:
        return f"{key}:lock"

    @staticmethod
    def _followers(key: str) -> str:
        return f"{key}:followers"

    async def get(self, key: str) -> list[RowPrediction] | None:
        raw = await self.client.get(key)
        return None if raw is None else _ROWS.validate_json(raw)

    async def try_lead(self, key: str, job_id: str, lock_ttl_s: float) -> bool:
        """True when this caller computes the answer; others wait for it (single flight)."""
        return bool(await self.client.set(self._lock(key), job_id, nx=True, px=max(1, int(lock_ttl_s * 1000))))

    async def follow(self, key: str, job_id: str, ttl_s: float) -> None:
        """Register an async job to be completed from the leader's answer."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.sadd(self._followers(key), job_id)
            pipe.expire(self._followers(key), max(1, int(ttl_s)))
            await pipe.execute()

    async def fill(self, key: str, rows: list[RowPrediction]) -> list[str]:
        """Store the answer; returns the follower job ids to complete with it."""
        payload = _ROWS.dump_json(rows).decode()
        followers = await self._fill(keys=[key, self._lock(key), self._followers(key)],
                                     args=[payload, self.ttl_s, self.filled_channel])
        return [f.decode() if isinstance(f, bytes) else str(f) for f in followers]

    async def release(self, key: str, job_id: str) -> list[str]:
        """The leader ``job_id`` gives the lock up (if it still holds it); returns the jobs that followed it."""
        followers = await self._release(keys=[self._lock(key), self._followers(key)],
                                        args=[job_id, self.filled_channel, key])
        return [f.decode() if isinstance(f, bytes) else str(f) for f in followers]

    async def abandon(self, key: str) -> list[str]:
        followers = await self._abandon(keys=[self._lock(key), self._followers(key)],
                                        args=[self.filled_channel, key])
        return [f.decode() if isinstance(f, bytes) else str(f) for f in followers]


async def flush_keys(client: redis.Redis, match: str, keep: tuple[str, ...] = ()) -> int:
    """Delete every key matching ``match`` (a SCAN pattern) except those ending in ``keep``; the count.

    For operators (``toposerve cache flush``): SCAN walks the keyspace in steps, so a large
    Redis is not blocked, and keys written meanwhile may or may not be seen.
    """
    deleted = 0
    batch: list[bytes] = []
    async for key in client.scan_iter(match=match, count=1000):
        if keep and key.decode().endswith(keep):
            continue
        batch.append(key)
        if len(batch) >= 500:
            deleted += await client.unlink(*batch)
            batch = []
    if batch:
        deleted += await client.unlink(*batch)
    return deleted


class FeatureCache:
    """Preprocessed tensors of data-cache items, stored binary (a hash: dtype, shape, data)."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s

    async def get(self, key: str) -> np.ndarray | None:
        fields = await self.client.hgetall(key)
        if not fields or b"data" not in fields:
            return None
        dtype = np.dtype(fields[b"dtype"].decode())
        shape = tuple(json.loads(fields[b"shape"]))
        return np.frombuffer(fields[b"data"], dtype=dtype).reshape(shape)

    async def put(self, key: str, features: np.ndarray) -> None:
        array = np.ascontiguousarray(features, dtype=np.dtype("<f4"))
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"dtype": array.dtype.str, "shape": json.dumps(list(array.shape)),
                                    "data": array.tobytes()})
            pipe.expire(key, self.ttl_s)
            await pipe.execute()
