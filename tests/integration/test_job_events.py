"""Server-Sent Events of a job: status changes in order, then the outcome, then the stream
closes; read with ``curl -N``, and resumed with ``Last-Event-ID`` on a restarted ingress."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn
from asgi_lifespan import LifespanManager
from httpx_sse import aconnect_sse

from tests.integration.conftest import Stack, start_stack
from tests.integration.test_sync_profiles import Gate
from toposerve.brokers.settings import Settings
from toposerve.deploy.components import build_app
from toposerve.deploy.local_services import free_port

ROWS = {"instances": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}


@contextlib.asynccontextmanager
async def serving(app: object, port: int) -> AsyncIterator[uvicorn.Server]:
    """``app`` (its lifespan already running) on a real port, as an ingress process serves it."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning",
                                           timeout_graceful_shutdown=5))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        yield server
    finally:
        server.should_exit = True  # sse-starlette sees it and ends open streams, as on SIGTERM
        await asyncio.wait_for(task, 15)


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    async for started in start_stack(settings.model_copy(update={"sse_ping_s": 0.5}), "asynchronous"):
        yield started


def parse_stream(text: str) -> list[dict]:
    """SSE text -> its events ({event, id, data}); comments (pings) and retry lines dropped."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = {}
        for line in block.split("\n"):
            if line and not line.startswith(":") and ":" in line:
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
        if "data" in fields:
            events.append({"event": fields.get("event"), "id": fields.get("id"), "data": json.loads(fields["data"])})
    return events


async def submit(client: httpx.AsyncClient) -> str:
    accepted = await client.post("/v1/models/iris/predict", json=ROWS)
    assert accepted.status_code == 202, accepted.text
    return accepted.json()["id"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_n_gets_status_events_in_order_then_the_outcome_and_the_stream_closes(stack: Stack) -> None:
    gate = Gate(stack, "predict")
    gate.close()
    port = free_port()
    async with serving(stack.app, port):
        job_id = await submit(stack.client)
        curl = await asyncio.create_subprocess_exec(
            "curl", "-N", "-s", "--max-time", "30", f"http://127.0.0.1:{port}/v1/jobs/{job_id}/events",
            stdout=asyncio.subprocess.PIPE)
        assert curl.stdout is not None
        first = b""
        while b"\n\n" not in first.replace(b"\r\n", b"\n"):  # the pending event, while the job is held
            first += await asyncio.wait_for(curl.stdout.read(1024), 20)
        gate.open()
        rest = await asyncio.wait_for(curl.stdout.read(), 20)  # to EOF: the server closed the stream
        assert await asyncio.wait_for(curl.wait(), 10) == 0
    events = parse_stream((first + rest).decode())
    assert [(e["event"], e["id"]) for e in events] == [("status", "1"), ("status", "2"), ("outcome", "3")]
    assert [e["data"].get("status") for e in events] == ["pending", "succeeded", "succeeded"]
    outcome = events[2]["data"]
    assert outcome["id"] == job_id and [row["label"] for row in outcome["predictions"]] == ["setosa", "virginica"]


async def test_an_ended_job_streams_its_outcome_at_once(stack: Stack) -> None:
    job_id = await submit(stack.client)
    await stack.client.get(f"/v1/jobs/{job_id}", params={"wait": 10})
    async with stack.client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = parse_stream((await response.aread()).decode())
    assert [(e["event"], e["id"]) for e in events] == [("status", "2"), ("outcome", "3")]
    # Resuming after the outcome: nothing more to send, the stream closes at once.
    resumed = await stack.client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "3"})
    assert parse_stream(resumed.text) == []
    bad = await stack.client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "x"})
    assert bad.status_code == 400 and "Last-Event-ID" in bad.json()["error"]["message"]
    unknown = await stack.client.get("/v1/jobs/6f1c1a8e-0000-4000-8000-000000000000/events")
    assert unknown.status_code == 404



@pytest.mark.fault
async def test_a_client_resumes_with_last_event_id_on_a_restarted_ingress(stack: Stack, settings: Settings) -> None:
    gate = Gate(stack, "predict")
    gate.close()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(timeout=30) as client:
        seen = []
        async with serving(stack.app, port):
            job_id = await submit(stack.client)
            with contextlib.suppress(httpx.HTTPError):
                async with aconnect_sse(client, "GET", f"{url}/v1/jobs/{job_id}/events") as source:
                    async for event in source.aiter_sse():
                        seen.append((event.event, event.id, event.json()["status"]))
                        break  # pending seen; the server now goes away under the open stream
        assert seen == [("status", "1", "pending")]
        # A new ingress process on the same address (nothing carried over but Redis and the broker).
        app = build_app(stack.profile, settings.model_copy(update={"sse_ping_s": 0.5}), with_stages=False)
        async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30), serving(app, port):
            async with aconnect_sse(client, "GET", f"{url}/v1/jobs/{job_id}/events",
                                    headers={"Last-Event-ID": "1"}) as source:
                gate.open()
                resumed = [(event.event, event.id, event.json()["status"]) async for event in source.aiter_sse()]
    # Only what the client had not seen, then the stream closed (the loop ended).
    assert resumed == [("status", "2", "succeeded"), ("outcome", "3", "succeeded")]
