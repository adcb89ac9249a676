"""The HTTP SDK (producers/http_client.py) against a live ingress on a real port: 202 followed by
Server-Sent Events or long polls, sync and asyncio flavours, typed refusals, a real 503 retried."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.integration.conftest import start_stack
from tests.integration.test_job_events import serving
from tests.support.images import sample_images
from toposerve.brokers.settings import Settings
from toposerve.deploy.local_services import free_port
from toposerve.producers import AsyncClient, Client, InvalidRequest, NotFound, Unavailable

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]


@pytest.fixture
async def async_url(settings: Settings) -> AsyncIterator[str]:
    async for stack in start_stack(settings, "asynchronous"):
        port = free_port()
        async with serving(stack.app, port):
            yield f"http://127.0.0.1:{port}"


async def test_async_profile_answers_through_events_and_polls(async_url: str) -> None:
    path, label = sample_images()[2]
    for wait in ("sse", "poll"):
        async with AsyncClient(async_url, wait=wait) as client:
            record = await client.predict("iris", rows=ROWS)
            assert [row.label for row in record.predictions or []] == ["setosa", "virginica"], wait
            image = await client.predict("digits_fast", image=path)
            assert image.status.value == "succeeded" and image.predictions[0].label == label, wait
    # The sync flavour, from code without an event loop (a thread here: this loop serves the ingress).
    def call() -> str:
        with Client(async_url) as client:
            return client.predict("iris", rows=ROWS[1:]).predictions[0].label

    assert await asyncio.to_thread(call) == "virginica"


async def test_refusals_are_typed(async_url: str) -> None:
    async with AsyncClient(async_url) as client:
        with pytest.raises(InvalidRequest) as wrong:
            await client.predict("iris", rows=[[1.0, 2.0]])
        assert wrong.value.status == 422 and "expects 4" in wrong.value.message
        with pytest.raises(NotFound) as unknown:
            await client.predict("nope", rows=ROWS)
        assert unknown.value.code == "unknown_model"


async def test_a_real_503_is_retried_then_raised(settings: Settings) -> None:
    async for stack in start_stack(settings, "synchronous", stages=["preprocess"]):  # no predict consumer
        port = free_port()
        async with serving(stack.app, port), AsyncClient(f"http://127.0.0.1:{port}", max_retries=1) as client:
            with pytest.raises(Unavailable) as refused:
                await client.predict("iris", rows=ROWS)
        assert refused.value.status == 503 and refused.value.code == "no_consumer"
