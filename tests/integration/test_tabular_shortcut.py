"""ingress.preprocess_tabular_in_ingress on real RabbitMQ and Redis: rows skip the preprocess stage.

The ingress publishes the Features of tabular rows straight to ``features.<model>``;
images (and item ids) still need the preprocess stage. Every stack here runs without
a preprocess stage unless a test says otherwise, so an answer proves the hop is gone.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest

from tests.integration.conftest import Stack, start_stack
from tests.integration.test_caches import cache_filled, profile_variant
from tests.support.faults import wait_for_condition
from tests.support.images import b64, sample_images
from tests.support.spy import spy_queue
from toposerve.brokers.messages import Features
from toposerve.brokers.settings import Settings
from toposerve.brokers.tracing import TRACEPARENT

IRIS = "/v1/models/iris/predict"
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
async def rows_stack(settings: Settings) -> AsyncIterator[Stack]:
    """synchronous (which ships with the knob on) with its predict stage only."""
    async for stack in start_stack(settings, "synchronous", stages=["predict"]):
        yield stack


async def queued(stack: Stack, stage: str) -> int:
    """Messages waiting in a stage's queue (the ingress declared it; nothing consumes it here)."""
    connection = await aio_pika.connect(stack.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        name = stack.profile.queue_spec(stack.settings.namespace, stage).name
        queue = await channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count


async def test_rows_are_answered_with_no_preprocess_stage_running(rows_stack: Stack) -> None:
    assert set(rows_stack.runners) == {"predict"}
    await rows_stack.ingress.monitor.refresh()  # it sees no consumer on the preprocess queue
    response = await rows_stack.client.post(IRIS, json={"instances": ROWS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [p["label"] for p in body["predictions"]] == ["setosa", "virginica"]
    # Per-stage timings stay truthful: preprocessing was timed where it ran (the ingress).
    assert {"preprocess_ms", "predict_ms", "total_ms"} <= set(body["timings"])
    assert body["timings"]["preprocess_ms"] <= body["timings"]["total_ms"]
    # The stage counts a message once it is settled, which is after it published the reply the
    # caller already has: waited for, not read at once (it raced under load in CI).
    async def counted() -> bool:
        return rows_stack.runners["predict"].stats.handled >= 1

    await wait_for_condition(counted, timeout=5)
    assert rows_stack.runners["predict"].stats.handled == 1
    assert await queued(rows_stack, "preprocess") == 0  # nothing was routed to request.*


async def test_the_open_inference_protocol_takes_the_same_shortcut(rows_stack: Stack) -> None:
    await rows_stack.ingress.monitor.refresh()
    name = (await rows_stack.client.get("/v2/models/iris")).json()["inputs"][0]["name"]
    response = await rows_stack.client.post("/v2/models/iris/infer", json={
        "inputs": [{"name": name, "shape": [1, 4], "datatype": "FP32", "data": ROWS[0]}]})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == ["setosa"]
    # A model is ready when the stages its requests pass through are consuming.
    assert (await rows_stack.client.get("/v2/models/iris/ready")).status_code == 200
    assert (await rows_stack.client.get("/v2/models/digits_fast/ready")).status_code == 400


async def test_images_still_need_the_preprocess_stage_and_get_a_fast_503_without_it(rows_stack: Stack) -> None:
    await rows_stack.ingress.monitor.refresh()
    path, _ = sample_images()[0]
    started = time.monotonic()
    response = await rows_stack.client.post("/v1/models/digits_accurate/predict",
                                            json={"image": b64(path.read_bytes())})
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "no_consumer" and "preprocess" in error["message"]
    assert response.headers["retry-after"] == "1"
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("rows, status", [
    ([[5.1, 3.5, 1.4]], 422),            # a value short
    ([[1e39, 3.5, 1.4, 0.2]], 422),      # beyond float32
    ([[5.1, 3.5, 1.4, 0.2]] * 101, 413),  # more rows than the limit (100 in these settings)
    ([], 422),
])
async def test_bad_rows_are_still_refused_with_a_4xx(rows_stack: Stack, rows: list, status: int) -> None:
    response = await rows_stack.client.post(IRIS, json={"instances": rows})
    assert response.status_code == status, response.text
    assert rows_stack.runners["predict"].stats.handled == 0  # refused before anything was queued


async def test_a_deadline_too_short_to_meet_is_still_a_504(rows_stack: Stack) -> None:
    response = await rows_stack.client.post(IRIS, json={"instances": ROWS}, params={"timeout": "0.000001"})
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "deadline_exceeded"


async def test_the_features_carry_the_reply_address_deadline_and_trace(rows_stack: Stack) -> None:
    # A spy queue bound next to the predict stage's: it gets a copy of what the ingress publishes.
    async with spy_queue(rows_stack.settings, "features.iris") as spy:
        response = await rows_stack.client.post(
            IRIS, json={"instances": ROWS}, params={"timeout": "3"},
            headers={"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"})
        assert response.status_code == 200, response.text
        copy = await spy.get(timeout=5)
        await copy.ack()
    message = Features.model_validate_json(copy.body)
    assert str(message.id) == response.json()["id"] == copy.correlation_id
    assert copy.reply_to == rows_stack.ingress.replies.queue_name
    assert message.deadline is not None
    assert abs((message.deadline - message.created_at).total_seconds() - 3) < 1e-3
    assert copy.expiration is not None and 0 < float(copy.expiration) <= 3  # RabbitMQ drops it when late
    assert copy.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT  # sync messages are transient
    assert TRACE_ID in str((copy.headers or {})[TRACEPARENT])
    assert message.tensor.dtype == "float32" and message.tensor.shape == [2, 4]


async def test_with_the_knob_off_rows_need_the_preprocess_stage(settings: Settings, tmp_path: Path) -> None:
    path = profile_variant(tmp_path, "synchronous", "rows_via_stage", preprocess_tabular_in_ingress=False)
    async for stack in start_stack(settings, path, stages=["predict"]):
        await stack.ingress.monitor.refresh()
        response = await stack.client.post(IRIS, json={"instances": ROWS})
        assert response.status_code == 503 and "preprocess" in response.json()["error"]["message"]


async def test_an_async_profile_with_the_knob_stores_the_job(settings: Settings, tmp_path: Path) -> None:
    path = profile_variant(tmp_path, "asynchronous", "async_rows", preprocess_tabular_in_ingress=True)
    async for stack in start_stack(settings, path, stages=["predict", "store"]):
        accepted = await stack.client.post(IRIS, json={"instances": ROWS})
        assert accepted.status_code == 202, accepted.text
        job = (await stack.client.get(accepted.headers["location"], params={"wait": 10})).json()
        assert job["status"] == "succeeded", job
        assert [p["label"] for p in job["predictions"]] == ["setosa", "virginica"]
        assert {"preprocess_ms", "predict_ms", "total_ms"} <= set(job["timings"])


async def test_with_a_prediction_cache_rows_from_any_route_share_one_cache_key(
        settings: Settings, tmp_path: Path) -> None:
    # The OIP route does not read the cache, but what it computes fills it under the key
    # the native route reads: the same canonical tensor, whichever process preprocessed it.
    path = profile_variant(tmp_path, "prediction_cache", "cache_rows", preprocess_tabular_in_ingress=True)
    async for stack in start_stack(settings, path, stages=["predict", "store"]):
        await stack.ingress.monitor.refresh()
        name = (await stack.client.get("/v2/models/iris")).json()["inputs"][0]["name"]
        infer = await stack.client.post("/v2/models/iris/infer", json={
            "inputs": [{"name": name, "shape": [1, 4], "datatype": "FP32", "data": ROWS[1]}]})
        assert infer.status_code == 200, infer.text
        await cache_filled(stack)
        response = await stack.client.post(IRIS, json={"instances": [ROWS[1]]})
        assert response.status_code == 200 and response.headers["x-cache"] == "hit"
        assert response.json()["predictions"][0]["label"] == "virginica"
