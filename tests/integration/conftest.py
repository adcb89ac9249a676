"""An in-process stack of a profile: its stage runners and its ingress app, on real services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from asgi_lifespan import LifespanManager

from tests.conftest import FreshServices
from toposerve.brokers.connections import connect_redis
from toposerve.brokers.results import ResultStore
from toposerve.brokers.settings import Settings
from toposerve.consumers import StageRunner
from toposerve.deploy.components import build_app, build_stage_runner, load_checked_profile
from toposerve.deploy.profile import Profile


@dataclass
class Stack:
    settings: Settings
    profile: Profile
    runners: dict[str, StageRunner]
    client: httpx.AsyncClient
    results: ResultStore  # direct reads of job records, for tests that check many at once
    app: object = None

    @property
    def ingress(self):
        return self.app.state.ingress  # type: ignore[attr-defined]


@pytest.fixture
def settings(amqp_url: str, redis_url: str, namespace: str) -> Settings:
    return Settings(amqp_url=amqp_url, redis_url=redis_url, namespace=namespace,
                    max_rows=100, max_body_bytes=256 * 1024, max_image_pixels=1_000_000, drain_timeout_s=5)


@pytest.fixture
def fault_settings(fresh_services: FreshServices, namespace: str) -> Settings:
    """Settings for a test's own RabbitMQ and Redis, which it may kill; its stages and ingress
    log in with their roles' accounts (the URLs here are the admin's, for the test itself)."""
    return Settings(amqp_url=fresh_services.amqp_url, redis_url=fresh_services.redis_url, namespace=namespace,
                    max_rows=100, max_body_bytes=256 * 1024, max_image_pixels=1_000_000, drain_timeout_s=5,
                    accounts_file=str(fresh_services.accounts_file))


async def start_stack(
    settings: Settings, profile_name: str, stages: list[str] | None = None, replicas: dict[str, int] | None = None
) -> AsyncIterator[Stack]:
    """Stage runners (``stages``, default all; ``replicas`` per stage, default 1) and the ingress.

    A single-process profile (web_single) runs its stages inside the app instead.
    """
    profile = load_checked_profile(profile_name, settings)
    single = profile.ingress.single_process
    names = [] if single else (list(profile.stages) if stages is None else stages)
    runners = {}
    for name in names:
        for replica in range((replicas or {}).get(name, 1)):
            runners[name if replica == 0 else f"{name}[{replica}]"] = build_stage_runner(profile, name, settings,
                                                                                       replica)
    for runner in runners.values():
        await runner.start()
    app = build_app(profile, settings, with_stages=single)
    try:
        # Generous timeouts: under a loaded CI machine a clean shutdown can take seconds.
        async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://ingress", timeout=30) as client:
                results = ResultStore(connect_redis(settings.redis_url), settings.namespace,
                                      profile.ingress.result_ttl_s)
                try:
                    yield Stack(settings, profile, runners, client, results, app)
                finally:
                    await results.client.aclose()
    finally:
        for runner in runners.values():
            await runner.drain_and_close()


@pytest.fixture
async def async_stack(settings: Settings) -> AsyncIterator[Stack]:
    async for stack in start_stack(settings, "asynchronous"):
        yield stack


@pytest.fixture
async def sync_stack(settings: Settings) -> AsyncIterator[Stack]:
    async for stack in start_stack(settings, "synchronous"):
        yield stack
