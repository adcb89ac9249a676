"""Shadow comparisons in Redis: per job, whether the serving and the shadow version agreed; per model, the tally.

``{ns}:shadow:{model}:job:{id}`` holds one job's comparison (it lives as long as job records);
``{ns}:shadow:{model}:tally`` the counts and summed seconds; ``{ns}:shadow:{model}:disagreements``
the newest disagreeing inputs, at most ``sample_size``. One script records a comparison and
counts it only when the job's key is new, so a redelivered message never counts twice.
"""

from __future__ import annotations

import uuid

import redis.asyncio as redis
from pydantic import BaseModel, Field

_RECORD = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) == false then
  return 0
end
redis.call('HINCRBY', KEYS[2], 'jobs', 1)
redis.call('HINCRBY', KEYS[2], 'agreed', ARGV[3])
redis.call('HINCRBY', KEYS[2], 'rows', ARGV[4])
redis.call('HINCRBY', KEYS[2], 'rows_agreed', ARGV[5])
redis.call('HINCRBYFLOAT', KEYS[2], 'serve_seconds', ARGV[6])
redis.call('HINCRBYFLOAT', KEYS[2], 'shadow_seconds', ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[2])
if ARGV[3] == '0' then
  redis.call('LPUSH', KEYS[3], ARGV[1])
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[8]) - 1)
  redis.call('EXPIRE', KEYS[3], ARGV[2])
end
return 1
"""


class ShadowComparison(BaseModel):
    """One job seen by both versions."""

    id: uuid.UUID
    model: str
    serve_version: str
    shadow_version: str
    agreed: bool = Field(description="Every row got the same label from both versions")
    serve_labels: list[str]
    shadow_labels: list[str]
    serve_ms: float
    shadow_ms: float
    # Kept for disagreements only (the bounded sample shows what the versions disagree on).
    inputs: list[list[float]] | None = None


class ShadowTally(BaseModel):
    jobs: int = 0
    agreed: int = 0
    rows: int = 0
    rows_agreed: int = 0
    serve_seconds: float = 0.0
    shadow_seconds: float = 0.0


class ShadowStore:
    def __init__(self, client: redis.Redis, namespace: str, ttl_s: int, sample_size: int = 20) -> None:
        self.client = client
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.sample_size = sample_size
        self._record = client.register_script(_RECORD)

    def _key(self, model: str, what: str) -> str:
        return f"{self.namespace}:shadow:{model}:{what}"

    async def record(self, comparison: ShadowComparison) -> bool:
        """Keep one job's comparison; False when the job was recorded already (a redelivery)."""
        model = comparison.model
        rows_agreed = sum(a == b for a, b in zip(comparison.serve_labels, comparison.shadow_labels, strict=True))
        recorded = await self._record(
            keys=[self._key(model, f"job:{comparison.id}"), self._key(model, "tally"),
                  self._key(model, "disagreements")],
            args=[comparison.model_dump_json(exclude_none=comparison.agreed), self.ttl_s, int(comparison.agreed),
                  len(comparison.serve_labels), rows_agreed, comparison.serve_ms / 1000, comparison.shadow_ms / 1000,
                  self.sample_size])
        return bool(recorded)

    async def comparison(self, model: str, job_id: uuid.UUID) -> ShadowComparison | None:
        raw = await self.client.get(self._key(model, f"job:{job_id}"))
        return None if raw is None else ShadowComparison.model_validate_json(raw)

    async def tally(self, model: str) -> ShadowTally:
        fields = await self.client.hgetall(self._key(model, "tally"))
        return ShadowTally.model_validate({k.decode(): v.decode() for k, v in fields.items()})

    async def disagreements(self, model: str) -> list[ShadowComparison]:
        """The newest disagreeing jobs, newest first (at most ``sample_size``)."""
        raw = await self.client.lrange(self._key(model, "disagreements"), 0, self.sample_size - 1)
        return [ShadowComparison.model_validate_json(item) for item in raw]
