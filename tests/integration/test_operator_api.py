"""The operator's JSON on a real RabbitMQ and Redis: the live topology with stage reports, and the
dead-letter routes under API keys (listing for any key, replay and discard for operator keys only)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest

from tests.integration.conftest import Stack, start_stack
from tests.support.faults import wait_for_condition
from toposerve.brokers import Settings, connect_redis, exchange_name
from toposerve.consumers.stage_report import StageReporter

OPERATOR, VIEWER = "operator-key-1", "viewer-key-2"  # key ids env-1 and env-2 (api/auth.py)


@pytest.fixture
async def keyed_stack(settings: Settings) -> AsyncIterator[Stack]:
    keyed = settings.model_copy(update={"api_keys": f"{OPERATOR},{VIEWER}", "operator_key_ids": "env-1"})
    async for stack in start_stack(keyed, "asynchronous"):
        yield stack


def key(value: str) -> dict[str, str]:
    return {"X-API-Key": value}


async def publish_garbage(stack: Stack, message_id: str) -> None:
    connection = await aio_pika.connect(stack.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(exchange_name(stack.settings.namespace))
        await exchange.publish(aio_pika.Message(b"{not json", message_id=message_id), "request.iris")


async def test_the_live_topology_needs_a_key_and_carries_the_stages_reports(keyed_stack: Stack) -> None:
    client = keyed_stack.client
    assert (await client.get("/v1/topology/live")).status_code == 401
    predict = keyed_stack.runners["predict"]
    reporter = StageReporter(connect_redis(keyed_stack.settings.redis_url), keyed_stack.settings.namespace,
                             "asynchronous", "predict", "test", predict.metrics.registry, lambda: predict.stats.in_flight)
    try:
        await reporter.write()
        first = (await client.get("/v1/topology/live", headers=key(VIEWER))).json()
        queues = {n["label"] for n in first["graph"]["nodes"] if n["kind"] == "queue"}
        assert queues == {spec.name for spec in keyed_stack.profile.queue_specs(keyed_stack.settings.namespace)}
        assert first["stages"]["predict"]["replicas_reporting"] == 1
        assert first["stages"]["predict"]["consumers"] == 1 and first["stages"]["predict"]["flags"] == []
        # The other stages write no report here (in-process runners): flagged, not hidden.
        assert "not_reporting" in first["stages"]["store"]["flags"]
        for _ in range(5):
            response = await client.post("/v1/models/iris/predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]},
                                          headers=key(VIEWER))
            assert response.status_code == 202
            await client.get(f"/v1/jobs/{response.json()['id']}", params={"wait": 5}, headers=key(VIEWER))
        await asyncio.sleep(0.6)  # past the shared-sample gap
        await reporter.write()
        later = (await client.get("/v1/topology/live", headers=key(VIEWER))).json()
        assert later["stages"]["predict"]["handled"] >= 5 and later["stages"]["predict"]["out_per_s"] > 0
        assert later["stages"]["predict"]["p50_ms"] is not None and later["ingress"]["requests"] >= 5
    finally:
        await reporter.close()


async def test_dead_letters_are_listed_for_any_key_and_acted_on_only_with_an_operator_key(keyed_stack: Stack) -> None:
    client = keyed_stack.client
    message_id = f"garbage-{uuid.uuid4()}"
    await publish_garbage(keyed_stack, message_id)

    async def listed() -> bool:
        body = (await client.get("/v1/dead-letters", headers=key(VIEWER))).json()
        return any(letter["message_id"] == message_id for letter in body["letters"])

    await wait_for_condition(listed, timeout=15)
    viewer = (await client.get("/v1/dead-letters", headers=key(VIEWER))).json()
    assert viewer["may_act"] is False
    (letter,) = [item for item in viewer["letters"] if item["message_id"] == message_id]
    assert letter["stage"] == "preprocess" and "not a valid InferenceRequest" in letter["reason"]
    assert (await client.get("/v1/dead-letters", headers=key(OPERATOR))).json()["may_act"] is True

    refused = await client.post("/v1/dead-letters/discard", json={"ids": [message_id]}, headers=key(VIEWER))
    assert refused.status_code == 403 and "operator key" in refused.json()["error"]["message"]
    assert (await client.post("/v1/dead-letters/replay", json={"ids": [message_id]}, headers=key(VIEWER))
            ).status_code == 403
    assert (await client.get("/v1/dead-letters", headers=key(VIEWER))).json()["total"] == 1  # nothing was touched

    for wrong in ({}, {"ids": []}, {"ids": "x"}, {"id": "x"}):
        response = await client.post("/v1/dead-letters/discard", json=wrong, headers=key(OPERATOR))
        assert response.status_code == 422 and "ids" in response.text, (wrong, response.text)
    assert (await client.get("/v1/dead-letters", params={"limit": 0}, headers=key(VIEWER))).status_code == 422

    missing = await client.post("/v1/dead-letters/discard", json={"ids": ["no-such-id"]}, headers=key(OPERATOR))
    assert missing.status_code == 200 and missing.json()["not_found"] == ["no-such-id"]
    discarded = await client.post("/v1/dead-letters/discard", json={"ids": [message_id]}, headers=key(OPERATOR))
    assert discarded.status_code == 200 and discarded.json()["done"] == ["-"]  # no job id in a garbage body
    assert (await client.get("/v1/dead-letters", headers=key(VIEWER))).json()["total"] == 0


async def test_the_page_is_served_without_a_key_and_holds_no_data(keyed_stack: Stack) -> None:
    page = await keyed_stack.client.get("/ui")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert keyed_stack.settings.namespace in page.text  # the shell names its namespace, nothing more
    assert "script-src 'self'" in page.headers["content-security-policy"]
    script = await keyed_stack.client.get("/ui/app.js")
    assert script.status_code == 200 and "/v1/topology/live" in script.text
    assert (await keyed_stack.client.get("/ui/../v1/jobs")).status_code in (401, 404)
    assert (await keyed_stack.client.get("/ui/secrets.txt")).status_code == 404


@pytest.fixture
async def web_single_stack(settings: Settings) -> AsyncIterator[Stack]:
    async for stack in start_stack(settings, "web_single"):
        yield stack


async def test_a_single_process_profiles_stages_report_too(web_single_stack: Stack) -> None:
    async def all_reporting() -> bool:
        view = (await web_single_stack.client.get("/v1/topology/live")).json()
        return all(s["replicas_reporting"] == s["replicas"] and not s["flags"] for s in view["stages"].values())

    await wait_for_condition(all_reporting, timeout=10)
