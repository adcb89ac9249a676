"""Join state for model groups (scatter-gather), in Redis so any aggregate replica can finish a join.

One hash per job: ``part:<member>`` holds each member's answer (first write wins,
so a redelivered part changes nothing), ``tick`` marks that the timeout tick was
scheduled, ``result`` the combined answer once decided (first decision wins, so a
join finished twice publishes the same answer twice, which the store and the
reply path ignore).
"""

from __future__ import annotations

import uuid

import redis.asyncio as redis

_ADD_PART = """
local added = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
local first = redis.call('HSETNX', KEYS[1], 'tick', '1')
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {added, first}
"""


class JoinStore:
    def __init__(self, client: redis.Redis, namespace: str, ttl_s: int) -> None:
        self.client = client
        self.namespace = namespace
        self.ttl_s = ttl_s
        self._add = client.register_script(_ADD_PART)

    def key(self, job_id: uuid.UUID) -> str:
        return f"{self.namespace}:join:{job_id}"

    async def add_part(self, job_id: uuid.UUID, member: str, payload: str) -> bool:
        """Record a member's answer; True when this is the job's first part (schedule the timeout)."""
        _, first = await self._add(keys=[self.key(job_id)], args=[f"part:{member}", payload, self.ttl_s])
        return bool(first)

    async def parts(self, job_id: uuid.UUID) -> dict[str, str]:
        fields = await self.client.hgetall(self.key(job_id))
        return {k.decode()[5:]: v.decode() for k, v in fields.items() if k.startswith(b"part:")}

    async def decide(self, job_id: uuid.UUID, result: str) -> str:
        """Keep the first combined answer for this job and return whichever was kept."""
        key = self.key(job_id)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hsetnx(key, "result", result)
            pipe.hget(key, "result")
            pipe.expire(key, self.ttl_s)
            _, kept, _ = await pipe.execute()
        return kept.decode()
