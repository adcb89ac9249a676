"""Webhooks: the store stage POSTs a job's outcome to the caller's URL, signed with HMAC-SHA256,
retried with backoff, bounded, and records how it went on the job; hosts not allowed are refused
at submit."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from tests.integration.conftest import Stack, start_stack
from tests.support.processes import stage_processes
from toposerve.brokers.settings import Settings
from toposerve.deploy.local_services import free_port

SECRET = "s3cret-of-the-receiver-0123456789"
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]


@dataclass
class Receiver:
    """A caller's webhook endpoint: answers 500 to the first ``failures`` calls, then 204."""

    failures: int
    calls: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append((dict(request.headers), await request.read()))
        return web.Response(status=500 if len(self.calls) <= self.failures else 204)


@contextlib.asynccontextmanager
async def receiving(failures: int) -> AsyncIterator[Receiver]:
    receiver = Receiver(failures)
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    receiver.url = f"http://127.0.0.1:{port}/hook?token=not-for-logs"
    try:
        yield receiver
    finally:
        await runner.cleanup()


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    allowed = settings.model_copy(update={"callback_allowed_hosts": "127.0.0.1", "callback_schemes": "http,https",
                                          "callback_backoff_s": 0.05, "callback_max_attempts": 3})
    async for started in start_stack(allowed, "asynchronous"):
        yield started


def verified(headers: dict[str, str], body: bytes) -> bool:
    """What a receiver does: recompute the signature over "<timestamp>.<body>" with its secret."""
    expected = hmac.new(SECRET.encode(), headers["X-Toposerve-Timestamp"].encode() + b"." + body,
                        hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers["X-Toposerve-Signature"], f"sha256={expected}")


async def submit_with_callback(stack: Stack, url: str) -> str:
    body = {"instances": ROWS, "callback": {"url": url, "secret": SECRET}}
    accepted = await stack.client.post("/v1/models/iris/predict", json=body)
    assert accepted.status_code == 202, accepted.text
    return accepted.json()["id"]


async def callback_recorded(stack: Stack, job_id: str) -> dict:
    for _ in range(200):
        record = (await stack.client.get(f"/v1/jobs/{job_id}", params={"wait": 5})).json()
        if record.get("callback") is not None:
            return record
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id}: no callback recorded")


async def test_the_outcome_is_delivered_signed_after_two_failed_tries(stack: Stack) -> None:
    async with receiving(failures=2) as receiver:
        job_id = await submit_with_callback(stack, receiver.url)
        record = await callback_recorded(stack, job_id)
    assert len(receiver.calls) == 3  # 500, 500, then 204
    assert record["callback"] == {"status": "delivered", "attempts": 3, "last_status": 204, "last_error": None,
                                  "url": receiver.url.split("?")[0]}  # the query (a token) is not shown
    for headers, body in receiver.calls:
        assert verified(headers, body) and headers["X-Toposerve-Job"] == job_id
    delivered = json.loads(receiver.calls[-1][1])
    assert delivered["id"] == job_id and delivered["status"] == "succeeded"
    assert [row["label"] for row in delivered["predictions"]] == ["setosa", "virginica"]
    # A signature made with another secret does not verify.
    headers, body = receiver.calls[-1]
    assert not verified({**headers, "X-Toposerve-Signature": "sha256=" + "0" * 64}, body)


async def test_a_receiver_that_keeps_failing_is_given_up_on_and_that_is_recorded(stack: Stack) -> None:
    async with receiving(failures=100) as receiver:
        job_id = await submit_with_callback(stack, receiver.url)
        record = await callback_recorded(stack, job_id)
    assert len(receiver.calls) == 3  # TOPOSERVE_CALLBACK_MAX_ATTEMPTS, no more
    assert record["status"] == "succeeded"
    assert record["callback"]["status"] == "failed" and record["callback"]["attempts"] == 3
    assert record["callback"]["last_error"] == "HTTP 500"


REFUSED = [
    ({"url": "http://example.com/hook", "secret": SECRET}, "'example.com' is not allowed"),
    ({"url": "http://user:pw@127.0.0.1/hook", "secret": SECRET}, "must not carry credentials"),
    ({"url": "ftp://127.0.0.1/hook", "secret": SECRET}, "must use http or https"),
    ({"url": "http://127.0.0.1/hook", "secret": "short"}, "callback.secret"),
    ({"url": "http://127.0.0.1/hook"}, "callback.secret"),
    ({"url": "http://127.0.0.1/hook", "secret": SECRET, "extra": 1}, "callback.extra"),
    ("http://127.0.0.1/hook", "callback"),
]


async def test_a_callback_this_server_may_not_call_is_refused_at_submit(stack: Stack) -> None:
    for callback, says in REFUSED:  # one stack for all: each case is a request
        response = await stack.client.post("/v1/models/iris/predict", json={"instances": ROWS, "callback": callback})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_callback" and says in error["message"], error
        assert "pw" not in error["message"]  # the credentials are not echoed back


async def test_a_batch_calls_back_with_its_status_once_complete(settings: Settings) -> None:
    allowed = settings.model_copy(update={"callback_allowed_hosts": "127.0.0.1", "callback_schemes": "http",
                                          "callback_backoff_s": 0.05})
    csv = "a,b,c,d\n" + "\n".join(",".join(map(str, row)) for row in ROWS * 5) + "\n"
    async for stack in start_stack(allowed, "batch"):
        async with receiving(failures=0) as receiver:
            headers = {"Content-Type": "text/csv", "X-Callback-Url": receiver.url, "X-Callback-Secret": SECRET}
            accepted = await stack.client.post("/v1/batches", params={"model": "iris", "chunk_rows": 4},
                                               content=csv, headers=headers)
            assert accepted.status_code == 202, accepted.text
            batch_id = accepted.json()["id"]
            for _ in range(200):
                status = (await stack.client.get(f"/v1/batches/{batch_id}")).json()
                if status.get("callback") is not None:
                    break
                await asyncio.sleep(0.05)
        assert len(receiver.calls) == 1  # once, though three chunks completed
        headers, body = receiver.calls[0]
        assert verified(headers, body) and headers["X-Toposerve-Job"] == batch_id
        called = json.loads(body)
        assert called["id"] == batch_id and called["state"] == "succeeded" and called["done"] == 10
        assert status["callback"]["status"] == "delivered" and status["callback"]["attempts"] == 1
        refused = await stack.client.post("/v1/batches", params={"model": "iris"}, content=csv,
                                          headers={"Content-Type": "text/csv",
                                                   "X-Callback-Url": "http://example.com/hook",
                                                   "X-Callback-Secret": SECRET})
        assert refused.status_code == 422 and "'example.com' is not allowed" in refused.json()["error"]["message"]


async def test_a_store_process_logged_in_as_its_role_delivers(fault_settings: Settings, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """As deployed: the store stage a process of its own, with its role's Redis account (whose
    key rights must cover the callback registrations)."""
    for name, value in {"TOPOSERVE_CALLBACK_ALLOWED_HOSTS": "127.0.0.1", "TOPOSERVE_CALLBACK_SCHEMES": "http",
                        "TOPOSERVE_CALLBACK_BACKOFF_S": "0.05"}.items():
        monkeypatch.setenv(name, value)  # the worker process reads its settings from the environment
    allowed = fault_settings.model_copy(update={"callback_allowed_hosts": "127.0.0.1", "callback_schemes": "http"})
    async for stack in start_stack(allowed, "asynchronous", stages=["preprocess", "predict"]):
        with stage_processes(stack.settings, "asynchronous", ("store",), tmp_path):
            async with receiving(failures=1) as receiver:
                job_id = await submit_with_callback(stack, receiver.url)
                record = await callback_recorded(stack, job_id)
    assert record["callback"]["status"] == "delivered" and record["callback"]["attempts"] == 2
    assert verified(*receiver.calls[-1])
