"""Join state for model groups (scatter-gather), in Redis so any aggregate replica can finish a join.

One hash per job: ``part:<member>`` holds each member's answer (first write wins,
so a redelivered part changes nothing), ``tick`` marks that the timeout tick was
scheduled, ``result`` the combined answer once decided and ``decider`` which input
decided it (first decision wins). Only the decider publishes the answer: a join
that several inputs see complete (the last parts on two replicas at once, then the
timeout tick) is announced once. The decider is named by what it is (``part:<member>``
or ``tick``), not by a delivery, so a redelivery of the deciding message (it failed
before its publish was confirmed) decides "again" and publishes, as at-least-once needs.
"""

from __future__ import annotations

import uuid
from typing import NamedTuple

import redis.asyncio as redis

_ADD_PART = """
local added = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
local first = redis.call('HSETNX', KEYS[1], 'tick', '1')
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {added, first}
"""

_DECIDE = """
redis.call('HSETNX', KEYS[1], 'result', ARGV[1])
redis.call('HSETNX', KEYS[1], 'decider', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return redis.call('HMGET', KEYS[1], 'result', 'decider')
"""


class Decision(NamedTuple):
    answer: str  # the kept combined answer (JSON)
    ours: bool  # this input decided it, so this input publishes it


class JoinStore:
    def __init__(self, client: redis.Redis, namespace: str, ttl_s: int) -> None:
        self.client = client
        self.namespace = namespace
        self.ttl_s = ttl_s
        self._add = client.register_script(_ADD_PART)
        self._decide = client.register_script(_DECIDE)

    def key(self, job_id: uuid.UUID) -> str:
        return f"{self.namespace}:join:{job_id}"

    async def add_part(self, job_id: uuid.UUID, member: str, payload: str) -> bool:
        """Record a member's answer; True when this is the job's first part (schedule the timeout)."""
        _, first = await self._add(keys=[self.key(job_id)], args=[f"part:{member}", payload, self.ttl_s])
        return bool(first)

    async def parts(self, job_id: uuid.UUID) -> dict[str, str]:
        fields = await self.client.hgetall(self.key(job_id))
        return {k.decode()[5:]: v.decode() for k, v in fields.items() if k.startswith(b"part:")}

    async def decide(self, job_id: uuid.UUID, result: str, decider: str) -> Decision:
        """Keep the first combined answer for this job; say whether ``decider`` is the one that decided."""
        kept, by = await self._decide(keys=[self.key(job_id)], args=[result, decider, self.ttl_s])
        return Decision(kept.decode(), by.decode() == decider)
