"""An in-process stack of a profile: its stage runners and its ingress app, on real services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from asgi_lifespan import LifespanManager

from brokers.connections import connect_redis
from brokers.results import ResultStore
from brokers.settings import Settings
from consumers.stage import StageRunner
from deploy.components import build_app, build_stage_runner, load_checked_profile
from deploy.profile import Profile


@dataclass
class Stack:
    settings: Settings
    profile: Profile
    runners: dict[str, StageRunner]
    client: httpx.AsyncClient
    results: ResultStore  # direct reads of job records, for tests that check many at once


@pytest.fixture
def settings(amqp_url: str, redis_url: str, namespace: str) -> Settings:
    return Settings(amqp_url=amqp_url, redis_url=redis_url, namespace=namespace,
                    max_rows=100, max_body_bytes=256 * 1024, max_image_pixels=1_000_000, drain_timeout_s=5)


async def start_stack(settings: Settings, profile_name: str, stages: list[str] | None = None) -> AsyncIterator[Stack]:
    profile = load_checked_profile(profile_name, settings)
    runners = {name: build_stage_runner(profile, name, settings) for name in (list(profile.stages) if stages is None else stages)}
    for runner in runners.values():
        await runner.start()
    app = build_app(profile, settings)
    try:
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://ingress", timeout=30) as client:
                results = ResultStore(connect_redis(settings.redis_url), settings.namespace,
                                      profile.ingress.result_ttl_s)
                try:
                    yield Stack(settings, profile, runners, client, results)
                finally:
                    await results.client.aclose()
    finally:
        for runner in runners.values():
            await runner.drain_and_close()


@pytest.fixture
async def async_stack(settings: Settings) -> AsyncIterator[Stack]:
    async for stack in start_stack(settings, "asynchronous"):
        yield stack
