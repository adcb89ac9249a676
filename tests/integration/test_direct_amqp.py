"""Messages published straight to the exchange, by any client: served, or failed with a reason."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta

import aio_pika
import numpy as np
import pytest

from tests.integration.conftest import Stack
from toposerve.brokers.messages import Features, InferenceRequest, Tensor, utc_now
from toposerve.brokers.topology import dead_queue_name, exchange_name
from toposerve.models.tensors import encode_tensor


async def publish(stack: Stack, routing_key: str, body: bytes) -> None:
    connection = await aio_pika.connect(stack.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(exchange_name(stack.settings.namespace))
        await exchange.publish(aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key)


async def job_when_done(stack: Stack, job_id: uuid.UUID | str, timeout: float = 10,
                        headers: dict[str, str] | None = None) -> dict:
    """Poll until the job exists and is terminal (direct publishes have no pending record)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        response = await stack.client.get(f"/v1/jobs/{job_id}", headers=headers)
        if response.status_code == 200:
            return response.json()
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end within {timeout}s")


async def dead_letters(stack: Stack, expected: int, timeout: float = 10) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(stack.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(dead_queue_name(stack.settings.namespace))
        found = []
        deadline = asyncio.get_running_loop().time() + timeout
        while len(found) < expected and asyncio.get_running_loop().time() < deadline:
            message = await queue.get(fail=False)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            await message.ack()
            found.append(message)
        return found


async def test_a_request_published_with_any_client_is_served(async_stack: Stack) -> None:
    job_id = uuid.uuid4()
    body = {"id": str(job_id), "model": "iris", "instances": [[6.7, 3.0, 5.2, 2.3]]}
    await publish(async_stack, "request.iris", json.dumps(body).encode())
    job = await job_when_done(async_stack, job_id)
    assert job["status"] == "succeeded"
    assert job["predictions"][0]["label"] == "virginica"


async def test_invalid_json_is_dead_lettered_and_the_stage_keeps_serving(async_stack: Stack) -> None:
    await publish(async_stack, "request.iris", b"{this is not json")
    await publish(async_stack, "request.iris", b"\xff\xfe binary garbage \x00")
    dead = await dead_letters(async_stack, expected=2)
    assert len(dead) == 2
    for message in dead:
        assert "not a valid InferenceRequest" in message.headers["x-toposerve-reason"]
        assert message.headers["x-toposerve-stage"] == "preprocess"
    # The same stage still serves the next message.
    job_id = uuid.uuid4()
    await publish(async_stack, "request.iris",
                  json.dumps({"id": str(job_id), "model": "iris", "instances": [[5.1, 3.5, 1.4, 0.2]]}).encode())
    assert (await job_when_done(async_stack, job_id))["status"] == "succeeded"


@pytest.mark.parametrize(("body", "code", "words"), [
    ({"model": "iris"}, "invalid_message", ["exactly one of"]),
    ({"model": "iris", "instances": "five"}, "invalid_message", ["instances"]),
    ({"model": "iris", "instances": [[1, 2, 3]]}, "invalid_input", ["3 values", "expects 4"]),
    ({"model": "iris", "instances": []}, "invalid_input", ["empty"]),
    ({"model": "nosuchmodel", "instances": [[1, 2, 3, 4]]}, "unknown_model", ["nosuchmodel"]),
    ({"model": "digits_fast", "image": "bm90IGFuIGltYWdl"}, "invalid_input", ["not a PNG or JPEG"]),
    ({"model": "iris", "instances": [[1, 2, 3, 4]], "deadline": "2001-01-01T00:00:00Z"},
     "deadline_exceeded", ["deadline"]),
], ids=["no-input", "wrong-type", "wrong-arity", "empty", "unknown-model", "not-an-image", "deadline-passed"])
async def test_bad_requests_on_the_queue_fail_their_job_with_the_reason(async_stack: Stack, body, code, words) -> None:
    job_id = uuid.uuid4()
    await publish(async_stack, f"request.{body['model']}", json.dumps({"id": str(job_id), **body}).encode())
    job = await job_when_done(async_stack, job_id)
    assert job["status"] == "failed"
    assert job["error"]["code"] == code
    for word in words:
        assert word in job["error"]["message"]


async def test_bad_feature_tensors_fail_their_job(async_stack: Stack) -> None:
    cases = {
        "bytes do not match shape": Tensor(dtype="float32", shape=[1, 4], data=b"\x00" * 12),
        "wrong width": encode_tensor(np.zeros((1, 3), dtype=np.float32)),
        "nan": encode_tensor(np.array([[np.nan, 1, 2, 3]], dtype=np.float32)),
        # No bytes needed (a zero dimension), and a neighbour numpy cannot even hold.
        "zero by huge": Tensor(dtype="float32", shape=[0, 10**30], data=b""),
    }
    ids = {}
    for name, tensor in cases.items():
        features = Features(id=uuid.uuid4(), model="iris", tensor=tensor)
        ids[name] = features.id
        await publish(async_stack, "features.iris", features.model_dump_json().encode())
    for name, job_id in ids.items():
        job = await job_when_done(async_stack, job_id)
        assert job["status"] == "failed", name
        assert job["error"]["code"] == "invalid_message", name
        assert job["error"]["stage"] == "predict"
    # At once: not after bounded retries of an "internal" error.
    assert async_stack.runners["predict"].stats.retried == 0


async def test_work_whose_deadline_passes_in_the_queue_is_dropped(async_stack: Stack) -> None:
    request = InferenceRequest(id=uuid.uuid4(), model="iris", instances=[[1, 2, 3, 4]],
                               deadline=utc_now() + timedelta(milliseconds=1))
    await asyncio.sleep(0.01)
    await publish(async_stack, "request.iris", request.model_dump_json().encode())
    job = await job_when_done(async_stack, request.id)
    assert job["error"]["code"] == "deadline_exceeded"


async def test_a_poison_message_is_retried_a_bounded_number_of_times_then_dead_lettered(async_stack: Stack) -> None:
    predict = async_stack.runners["predict"].stage
    calls = []

    def explode(model: str, features):  # a bug in the stage, not bad input
        calls.append(len(features))
        raise RuntimeError("simulated crash in the model runtime")

    predict.batcher.run_batch = explode
    job_id = uuid.uuid4()
    await publish(async_stack, "request.iris",
                  json.dumps({"id": str(job_id), "model": "iris", "instances": [[1, 2, 3, 4]]}).encode())
    job = await job_when_done(async_stack, job_id)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "internal"
    assert f"failed {async_stack.settings.max_attempts} times" in job["error"]["message"]
    assert len(calls) == async_stack.settings.max_attempts
    dead = await dead_letters(async_stack, expected=1)
    assert len(dead) == 1
    assert "simulated crash" in dead[0].headers["x-toposerve-reason"]
    assert dead[0].headers["x-toposerve-attempts"] == async_stack.settings.max_attempts - 1
    # Dead-lettered under its original routing key (retries went straight to the queue).
    assert dead[0].routing_key == "features.iris"


async def test_a_sync_profile_settles_direct_publishes_without_reply_to_instead_of_requeueing_them(
    sync_stack: Stack,
) -> None:
    """No stage of a sync profile keeps outcomes: a request published without reply_to is
    handled once and its outcome dropped (logged), never refused and requeued for ever."""
    for body in ({"id": str(uuid.uuid4()), "model": "iris", "instances": [[5.1, 3.5, 1.4, 0.2]]},
                 {"id": str(uuid.uuid4()), "model": "iris", "instances": [[1, 2]]}):
        await publish(sync_stack, "request.iris", json.dumps(body).encode())
    preprocess, predict = sync_stack.runners["preprocess"].stats, sync_stack.runners["predict"].stats
    for _ in range(100):
        if predict.handled == 1 and preprocess.handled == 2:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.5)  # a refused outcome would be requeued after 1 s and counted again
    assert (preprocess.handled, preprocess.failed) == (2, 1), preprocess
    assert (predict.handled, predict.failed) == (1, 0), predict
    connection = await aio_pika.connect(sync_stack.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        for stage in ("preprocess", "predict"):
            queue = await channel.declare_queue(sync_stack.profile.queue_spec(sync_stack.settings.namespace,
                                                                              stage).name, passive=True)
            assert queue.declaration_result.message_count == 0


async def test_a_direct_publish_is_pending_at_once_not_unknown(settings) -> None:
    """The ingress records its jobs as pending; for another publisher the first stage does, so
    ``GET /v1/jobs/{id}`` says 202 pending (not 404) while the job waits for later stages."""
    from tests.integration.conftest import start_stack

    async for stack in start_stack(settings, "asynchronous", stages=["preprocess"]):  # no predict, no store
        job_id = uuid.uuid4()
        body = {"id": str(job_id), "model": "iris", "instances": [[6.7, 3.0, 5.2, 2.3]]}
        await publish(stack, "request.iris", json.dumps(body).encode())
        for _ in range(100):
            response = await stack.client.get(f"/v1/jobs/{job_id}")
            if response.status_code != 404:
                break
            await asyncio.sleep(0.05)
        assert response.status_code == 202 and response.json()["status"] == "pending", response.text
        # It was recorded before being handled; the handling itself goes on as usual.
        for _ in range(100):
            if stack.runners["preprocess"].stats.handled == 1:
                break
            await asyncio.sleep(0.05)
        assert stack.runners["preprocess"].stats.handled == 1
