"""Which version serves a model right now, when an operator changed it (promote, rollback) while the profile runs.

One Redis hash per model, ``{ns}:serving:{model}``: ``version`` (the one that serves) and
``previous`` (what ``rollback`` returns to). No hash: the profile's ``serve``. The ingress
reads it for every versioned request, so every ingress process switches at the same moment
and a job's version, once chosen, travels in its message (in-flight work finishes on it).
"""

from __future__ import annotations

import redis.asyncio as redis
from pydantic import BaseModel

from toposerve.brokers.versions import ModelVersion

# A promotion outlives any run of the profile; refreshed at every change, and by every ingress
# that reads it (ServingVersions.keep), so a long-running profile never reverts by expiry
# (every key has a TTL).
SERVING_TTL_S = 90 * 24 * 3600
# A predict stage's report of what it loaded, renewed every few seconds: a gone stage's report expires.
LOADED_TTL_S = 15


class LoadedReport(BaseModel):
    """What one predict stage process has loaded of a model, and the versions it refused (with why)."""

    stage: str
    loaded: list[ModelVersion]
    refused: dict[str, str] = {}


class ServingChange(BaseModel):
    model: str
    version: ModelVersion
    previous: ModelVersion


class ServingVersions:
    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.client = client
        self.namespace = namespace

    def key(self, model: str) -> str:
        return f"{self.namespace}:serving:{model}"

    async def current(self, model: str) -> str | None:
        """The promoted version, or None (the profile's ``serve`` serves)."""
        value = await self.client.hget(self.key(model), "version")
        return value.decode() if isinstance(value, bytes) else value

    async def current_many(self, models: list[str]) -> dict[str, str | None]:
        async with self.client.pipeline(transaction=False) as pipe:
            for model in models:
                pipe.hget(self.key(model), "version")
            values = await pipe.execute()
        return {m: (v.decode() if isinstance(v, bytes) else v) for m, v in zip(models, values, strict=True)}

    async def promote(self, model: str, version: str, serving: str) -> ServingChange:
        """``version`` serves from now on; ``serving`` (what served until now) is what rollback returns to."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.key(model), mapping={"version": version, "previous": serving})
            pipe.expire(self.key(model), SERVING_TTL_S)
            await pipe.execute()
        return ServingChange(model=model, version=version, previous=serving)

    async def keep(self, model: str) -> None:
        """Renew the promotion's TTL (nothing when there is none)."""
        await self.client.expire(self.key(model), SERVING_TTL_S)

    async def previous(self, model: str) -> str | None:
        value = await self.client.hget(self.key(model), "previous")
        return value.decode() if isinstance(value, bytes) else value

    async def report_loaded(self, model: str, instance: str, report: LoadedReport) -> None:
        await self.client.set(f"{self.namespace}:loaded:{model}:{instance}", report.model_dump_json(), ex=LOADED_TTL_S)

    async def loaded_reports(self, model: str) -> dict[str, LoadedReport]:
        """The live predict stage processes' reports for ``model``, by instance."""
        prefix = f"{self.namespace}:loaded:{model}:"
        keys = [key async for key in self.client.scan_iter(match=prefix + "*", count=200)]
        values = await self.client.mget(keys) if keys else []
        return {(k.decode() if isinstance(k, bytes) else k)[len(prefix):]: LoadedReport.model_validate_json(v)
                for k, v in zip(keys, values, strict=True) if v is not None}

    async def forget(self, model: str) -> None:
        """Back to the profile's ``serve`` (``toposerve down``, or a fresh start)."""
        await self.client.delete(self.key(model))
