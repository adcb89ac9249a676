"""synchronous, web_single, prep_pred and sync_async on real RabbitMQ and Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aio_pika
import pytest

from tests.integration.conftest import Stack, start_stack
from tests.support.images import b64, sample_images
from tests.support.spy import spy_queue
from toposerve.brokers.settings import Settings

IRIS_ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]


def image_body(index: int = 0) -> tuple[dict, str]:
    path, label = sample_images()[index]
    return {"image": b64(path.read_bytes())}, label


@pytest.fixture
async def prep_pred_stack(settings: Settings) -> AsyncIterator[Stack]:
    async for stack in start_stack(settings, "prep_pred", replicas={"preprocess": 2}):
        yield stack


@pytest.fixture
async def sync_async_stack(settings: Settings) -> AsyncIterator[Stack]:
    async for stack in start_stack(settings, "sync_async"):
        yield stack


@pytest.fixture
async def web_single_stack(settings: Settings) -> AsyncIterator[Stack]:
    async for stack in start_stack(settings, "web_single"):
        yield stack


class Gate:
    """Makes a predict stage block until released: a stage that is up but not answering."""

    def __init__(self, stack: Stack, stage: str) -> None:
        self.batcher = stack.runners[stage].stage.batcher
        self.original = self.batcher.run_batch
        self.released = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    def close(self) -> None:
        self.batcher.inline_max_rows = 0  # block the worker thread, never the event loop

        def blocked(model, features):
            asyncio.run_coroutine_threadsafe(self.released.wait(), self.loop).result()
            return self.original(model, features)

        self.batcher.run_batch = blocked

    def open(self) -> None:
        self.released.set()


# -- synchronous ---------------------------------------------------------------------

async def test_sync_answers_every_row_with_200(sync_stack: Stack) -> None:
    response = await sync_stack.client.post("/v1/models/iris/predict", json={"instances": IRIS_ROWS})
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "succeeded"
    assert [p["label"] for p in body["predictions"]] == ["setosa", "virginica"]
    assert {"preprocess_ms", "predict_ms", "total_ms"} <= set(body["timings"])
    for index in range(len(sample_images())):
        image, label = image_body(index)
        response = await sync_stack.client.post("/v1/models/digits_accurate/predict", json=image)
        assert response.status_code == 200 and response.json()["predictions"][0]["label"] == label


async def test_many_concurrent_sync_requests_share_one_connection(sync_stack: Stack) -> None:
    rows = {"setosa": [5.1, 3.5, 1.4, 0.2], "virginica": [6.7, 3.0, 5.2, 2.3], "versicolor": [5.9, 3.0, 4.2, 1.5]}

    async def one(label: str) -> str:
        response = await sync_stack.client.post("/v1/models/iris/predict", json={"instances": [rows[label]]})
        assert response.status_code == 200, response.text
        return response.json()["predictions"][0]["label"]

    # A batching window (the profile ships 0 ms: batches then form only under load):
    # concurrent requests must be run together and each answered with its own rows.
    sync_stack.runners["predict"].stage.batcher.max_batch_delay_s = 0.005
    labels = [list(rows)[i % 3] for i in range(300)]
    assert await asyncio.gather(*(one(label) for label in labels)) == labels
    assert sync_stack.runners["predict"].stage.batcher.stats.largest > 1  # requests were batched together


@pytest.mark.parametrize("how", ["query", "header"])
async def test_a_deadline_too_short_to_meet_is_a_fast_504(sync_stack: Stack, how: str) -> None:
    kwargs = {"params": {"timeout": "0.000001"}} if how == "query" else {"headers": {"X-Request-Timeout": "1e-6"}}
    started = time.monotonic()
    response = await sync_stack.client.post("/v1/models/iris/predict", json={"instances": IRIS_ROWS}, **kwargs)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "deadline_exceeded"
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("value", ["0", "-3", "nan", "soon"])
async def test_a_bad_timeout_is_422(sync_stack: Stack, value: str) -> None:
    response = await sync_stack.client.post("/v1/models/iris/predict", json={"instances": IRIS_ROWS},
                                            headers={"X-Request-Timeout": value})
    assert response.status_code == 422
    assert "timeout" in response.json()["error"]["message"].lower()


@pytest.mark.parametrize("value", ["61", "inf", "1e9"])
async def test_a_timeout_over_the_profiles_cap_is_refused_not_shortened(sync_stack: Stack, value: str) -> None:
    response = await sync_stack.client.post("/v1/models/iris/predict", json={"instances": IRIS_ROWS},
                                            params={"timeout": value})
    assert response.status_code == 422, response.text
    assert "limit of 60 s" in response.json()["error"]["message"] and "max_timeout_s" in response.json()["error"]["message"]
    assert (await sync_stack.client.post("/v1/models/iris/predict", json={"instances": IRIS_ROWS},
                                         params={"timeout": "60"})).status_code == 200


async def test_a_reply_after_the_deadline_is_a_504_and_the_late_reply_is_dropped(sync_stack: Stack) -> None:
    gate = Gate(sync_stack, "predict")
    gate.close()
    started = time.monotonic()
    response = await sync_stack.client.post("/v1/models/iris/predict", json={"instances": IRIS_ROWS},
                                            params={"timeout": "0.5"})
    elapsed = time.monotonic() - started
    assert response.status_code == 504 and "0.5 s" in response.json()["error"]["message"]
    assert 0.4 < elapsed < 2.0
    gate.open()  # the stage now finishes and replies, too late
    ingress = sync_stack.ingress
    for _ in range(100):
        if ingress.replies.late_replies:
            break
        await asyncio.sleep(0.05)
    assert ingress.replies.late_replies == 1
    # ... and the service answers normally afterwards.
    response = await sync_stack.client.post("/v1/models/iris/predict", json={"instances": IRIS_ROWS})
    assert response.status_code == 200


async def test_a_stage_that_stops_answering_gives_504_within_the_deadline_never_a_hang(sync_stack: Stack) -> None:
    gate = Gate(sync_stack, "predict")
    gate.close()
    started = time.monotonic()
    responses = await asyncio.gather(*(
        sync_stack.client.post("/v1/models/iris/predict", json={"instances": IRIS_ROWS}, params={"timeout": "1"})
        for _ in range(10)))
    assert {r.status_code for r in responses} == {504}
    assert time.monotonic() - started < 3.0
    gate.open()


async def test_with_no_predict_stage_consuming_sync_requests_get_a_fast_503(sync_stack: Stack) -> None:
    await sync_stack.runners["predict"].drain_and_close()
    await sync_stack.ingress.monitor.refresh()  # what the once-a-second refresh would see
    started = time.monotonic()
    response = await sync_stack.client.post("/v1/models/iris/predict", json={"instances": IRIS_ROWS})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_consumer" and "predict" in response.json()["error"]["message"]
    assert response.headers["retry-after"] == "1"
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("model, stage", [
    ("iris", "predict"),               # rows are published to features.iris by the ingress itself
    ("digits_accurate", "preprocess"),  # images go to request.digits_accurate
])
async def test_when_the_broker_refuses_the_publish_the_caller_gets_a_fast_503(
        sync_stack: Stack, model: str, stage: str) -> None:
    # Delete the queue the request would be routed to: the broker returns it unroutable.
    connection = await aio_pika.connect(sync_stack.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(sync_stack.profile.queue_spec(sync_stack.settings.namespace, stage).name)
    sync_stack.ingress.monitor.consumers = {}  # as if its last look saw consumers: the publish decides
    sync_stack.ingress.monitor.error = None
    sync_stack.ingress.monitor.queue_names = []
    body = {"instances": IRIS_ROWS} if model == "iris" else image_body()[0]
    started = time.monotonic()
    response = await sync_stack.client.post(f"/v1/models/{model}/predict", json=body)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "broker_unavailable"
    assert "no queue is bound" in response.json()["error"]["message"]
    assert time.monotonic() - started < 1.0


# -- web_single -------------------------------------------------------------------------

async def test_web_single_serves_from_one_process_through_the_same_queues(web_single_stack: Stack) -> None:
    assert web_single_stack.runners == {}  # no stage outside the app
    response = await web_single_stack.client.post("/v1/models/iris/predict", json={"instances": IRIS_ROWS})
    assert response.status_code == 200
    assert [p["label"] for p in response.json()["predictions"]] == ["setosa", "virginica"]
    consumers = (await web_single_stack.client.get("/readyz")).json()["stage_consumers"]
    assert set(consumers.values()) == {1} and len(consumers) == 2  # preprocess and predict queues, in the app


# -- prep_pred ----------------------------------------------------------------------------

async def test_prep_pred_spreads_preprocessing_over_the_replicas(prep_pred_stack: Stack) -> None:
    runners = prep_pred_stack.runners
    assert {"preprocess", "preprocess[1]", "predict"} == set(runners)
    bodies = [image_body(i % len(sample_images())) for i in range(120)]
    responses = await asyncio.gather(*(
        prep_pred_stack.client.post("/v1/models/digits_fast/predict", json=body) for body, _ in bodies))
    for response, (_, label) in zip(responses, bodies, strict=True):
        assert response.status_code == 200 and response.json()["predictions"][0]["label"] == label
    handled = [runners["preprocess"].stats.handled, runners["preprocess[1]"].stats.handled]
    assert sum(handled) == 120 and min(handled) >= 20, handled
    assert runners["predict"].stats.handled == 120


# -- sync_async ---------------------------------------------------------------------------

async def test_sync_async_answers_fast_now_and_accurate_as_a_job(sync_async_stack: Stack) -> None:
    image, label = image_body(1)
    response = await sync_async_stack.client.post("/v1/models/digits_fast/predict", json=image)
    assert response.status_code == 200
    body = response.json()
    assert body["fast"]["model"] == "digits_fast" and body["fast"]["predictions"][0]["label"] == label
    assert body["job"]["model"] == "digits_accurate" and response.headers["location"] == body["job"]["location"]
    job = (await sync_async_stack.client.get(body["job"]["location"], params={"wait": 10})).json()
    assert job["status"] == "succeeded" and job["model"] == "digits_accurate"
    assert job["predictions"][0]["label"] == label


async def test_sync_async_still_returns_the_job_when_the_fast_path_fails(sync_async_stack: Stack) -> None:
    gate = Gate(sync_async_stack, "predict_fast")
    gate.close()
    image, label = image_body(2)
    response = await sync_async_stack.client.post("/v1/models/digits_fast/predict", json=image,
                                                  params={"timeout": "0.3"})
    assert response.status_code == 202
    body = response.json()
    assert body["fast"]["status"] == "failed" and body["fast"]["error"]["code"] == "deadline_exceeded"
    job = (await sync_async_stack.client.get(body["job"]["location"], params={"wait": 10})).json()
    assert job["status"] == "succeeded" and job["predictions"][0]["label"] == label
    gate.open()


async def test_sync_async_job_fails_with_the_reason_when_the_accurate_model_fails(sync_async_stack: Stack) -> None:
    def broken(model, features):
        raise RuntimeError("accurate model runtime crashed")

    sync_async_stack.runners["predict_accurate"].stage.batcher.run_batch = broken
    image, label = image_body(0)
    response = await sync_async_stack.client.post("/v1/models/digits_fast/predict", json=image)
    assert response.status_code == 200 and response.json()["fast"]["predictions"][0]["label"] == label
    job = (await sync_async_stack.client.get(response.json()["job"]["location"], params={"wait": 15})).json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "internal" and "accurate model runtime crashed" in job["error"]["message"]


async def test_sync_work_a_stage_passes_on_carries_the_callers_remaining_deadline_as_its_ttl(sync_stack: Stack) -> None:
    """An image goes request -> preprocess -> features: the features message expires with its caller."""
    async with spy_queue(sync_stack.settings, "features.#") as spy:
        image, label = image_body()
        response = await sync_stack.client.post("/v1/models/digits_accurate/predict", json=image,
                                                params={"timeout": "3"})
        assert response.status_code == 200 and response.json()["predictions"][0]["label"] == label
        copy = await spy.get(timeout=5)
        await copy.ack()
    assert copy.reply_to == sync_stack.ingress.replies.queue_name
    assert copy.expiration is not None and 0 < float(copy.expiration) <= 3  # RabbitMQ drops it when late
