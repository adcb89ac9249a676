"""The asynchronous profile end to end on real RabbitMQ and Redis: submit, poll, read."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tests.integration.conftest import Stack, start_stack
from tests.support.images import b64, sample_images
from toposerve.brokers.settings import Settings
from toposerve.deploy.components import build_stage_runner
from toposerve.deploy.profile import MODELS_DIR
from toposerve.models import load_manifests

IRIS_ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]

IRIS_VERSION = load_manifests(MODELS_DIR)["iris"].version


async def wait_job(stack: Stack, location: str) -> dict:
    response = await stack.client.get(location, params={"wait": 10})
    assert response.status_code == 200, response.text
    return response.json()


async def test_iris_job_goes_pending_then_succeeds_with_one_prediction_per_row(settings: Settings) -> None:
    # Without a predict stage at first, so the job is observably pending.
    async for stack in start_stack(settings, "asynchronous", stages=["preprocess", "store"]):
        response = await stack.client.post("/v1/models/iris/predict", json={"instances": IRIS_ROWS})
        assert response.status_code == 202
        body = response.json()
        assert body["status"] == "pending"
        assert uuid.UUID(body["id"]).version == 4
        assert response.headers["location"] == f"/v1/jobs/{body['id']}"

        pending = await stack.client.get(response.headers["location"])
        assert pending.status_code == 202
        assert pending.json()["status"] == "pending"

        predict = build_stage_runner(stack.profile, "predict", settings)
        await predict.start()
        try:
            job = await wait_job(stack, response.headers["location"])
        finally:
            await predict.drain_and_close()
        assert job["status"] == "succeeded"
        assert job["model_version"] == IRIS_VERSION  # the manifest's, the one that answered
        assert [row["label"] for row in job["predictions"]] == ["setosa", "virginica", "versicolor"]
        for row in job["predictions"]:
            assert len(row["probabilities"]) == 3
            assert abs(sum(row["probabilities"]) - 1) < 1e-3
            assert row["class_index"] == ["setosa", "versicolor", "virginica"].index(row["label"])
        assert {"preprocess_ms", "predict_ms", "total_ms"} <= set(job["timings"])


@pytest.mark.parametrize("model", ["digits_fast", "digits_accurate"])
async def test_every_sample_image_is_classified_correctly(async_stack: Stack, model: str) -> None:
    locations = {}
    for path, label in sample_images():
        response = await async_stack.client.post(f"/v1/models/{model}/predict",
                                                 json={"image": b64(path.read_bytes())})
        assert response.status_code == 202, response.text
        locations[path.name] = (response.headers["location"], label)
    assert len(locations) >= 5
    for name, (location, label) in locations.items():
        job = await wait_job(async_stack, location)
        assert job["status"] == "succeeded", (name, job)
        assert job["predictions"][0]["label"] == label, name


async def test_unknown_and_malformed_job_ids_are_404(async_stack: Stack) -> None:
    for job_id in (str(uuid.uuid4()), "not-a-uuid", "1" * 300):
        response = await async_stack.client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "unknown_job"


async def test_job_keys_are_namespaced_and_expire(async_stack: Stack) -> None:
    response = await async_stack.client.post("/v1/models/iris/predict", json={"instances": IRIS_ROWS[:1]})
    job = await wait_job(async_stack, response.headers["location"])
    client = async_stack.runners["store"].stage.results.client
    key = f"{async_stack.settings.namespace}:job:{job['id']}"
    ttl = await client.ttl(key)
    assert 0 < ttl <= async_stack.profile.ingress.result_ttl_s
    keys = [k.decode() async for k in client.scan_iter(match=f"{async_stack.settings.namespace}:*")]
    assert keys and all(k.startswith(f"{async_stack.settings.namespace}:") for k in keys)
    for k in keys:
        assert await client.ttl(k) > 0, f"{k} has no TTL"


async def test_models_endpoints_describe_the_profile_models(async_stack: Stack) -> None:
    listing = (await async_stack.client.get("/v1/models")).json()["models"]
    assert {m["name"] for m in listing} == {"iris", "digits_fast", "digits_accurate"}
    iris = (await async_stack.client.get("/v1/models/iris")).json()
    assert iris["labels"] == ["setosa", "versicolor", "virginica"]
    assert iris["input"]["shape"] == [None, 4] and len(iris["sha256"]) == 64
    assert iris["input_kind"] == "instances"
    digits = (await async_stack.client.get("/v1/models/digits_fast")).json()
    assert digits["input_kind"] == "image" and digits["preprocessing"]["width"] == 8
    missing = await async_stack.client.get("/v1/models/nope")
    assert missing.status_code == 404 and "iris" in missing.json()["error"]["message"]


async def test_health_and_readiness_report_dependencies(async_stack: Stack) -> None:
    assert (await async_stack.client.get("/healthz")).json() == {"status": "ok"}
    ready = await async_stack.client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["checks"]["broker"]["ok"] and body["checks"]["redis"]["ok"]
    assert set(body["stage_consumers"].values()) == {1}


async def test_readiness_fails_when_redis_is_unreachable(amqp_url: str, namespace: str) -> None:
    dead_redis = Settings(amqp_url=amqp_url, redis_url="redis://127.0.0.1:1/0", namespace=namespace)
    async for stack in start_stack(dead_redis, "asynchronous", stages=[]):
        ready = await stack.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["redis"]["ok"] is False
        # Submitting while the store is down is refused clearly, not accepted and lost.
        response = await stack.client.post("/v1/models/iris/predict", json={"instances": IRIS_ROWS[:1]})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "store_unavailable"


async def test_a_job_whose_record_vanished_is_gone_not_unknown(async_stack: Stack) -> None:
    """Its id was issued here, so the ingress can tell a lost (or expired) record from a bad id."""
    response = await async_stack.client.post("/v1/models/iris/predict", json={"instances": IRIS_ROWS[:1]})
    job_id = response.json()["id"]
    (await async_stack.client.get(f"/v1/jobs/{job_id}", params={"wait": 10})).raise_for_status()
    await async_stack.results.delete(uuid.UUID(job_id))  # as a Redis restart without persistence would
    gone = await async_stack.client.get(f"/v1/jobs/{job_id}")
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "job_gone"
    assert "accepted here" in gone.json()["error"]["message"]
    unknown = await async_stack.client.get(f"/v1/jobs/{uuid.uuid4()}")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_job"


async def test_waiting_for_a_direct_publish_waits_for_its_record_to_appear(settings: Settings) -> None:
    """A job published straight to the exchange has no record until a stage takes it; ?wait= waits."""
    import asyncio
    import json

    from tests.integration.test_direct_amqp import publish

    async for stack in start_stack(settings, "asynchronous", stages=["predict", "store"]):
        job_id = uuid.uuid4()
        await publish(stack, "request.iris",
                      json.dumps({"id": str(job_id), "model": "iris", "instances": IRIS_ROWS[:1]}).encode())
        waiting = asyncio.create_task(stack.client.get(f"/v1/jobs/{job_id}", params={"wait": 15}))
        await asyncio.sleep(1.0)
        assert not waiting.done()  # no 404 at once
        preprocess = build_stage_runner(stack.profile, "preprocess", settings)
        await preprocess.start()
        try:
            answer = await waiting
        finally:
            await preprocess.drain_and_close()
        assert answer.status_code == 200 and answer.json()["status"] == "succeeded"


async def long_poll_counting_reads(stack: Stack, settings: Settings, rows: list[list[float]]):
    """Submit ``rows``, long-poll the job while no predict stage runs, then start one: the
    answer, and how many reads of the store the poll made before and after the prediction."""
    response = await stack.client.post("/v1/models/iris/predict", json={"instances": rows})
    assert response.status_code == 202, response.text
    reads: list[uuid.UUID] = []
    get_for = stack.ingress.results.get_for

    async def counted(job_id: uuid.UUID, reader: str | None):
        reads.append(job_id)
        return await get_for(job_id, reader)

    stack.ingress.results.get_for = counted  # type: ignore[method-assign]
    waiting = asyncio.create_task(stack.client.get(response.headers["location"], params={"wait": 10}))
    await asyncio.sleep(0.3)  # the poll read the pending record and waits
    assert not waiting.done()
    before = len(reads)
    predict = build_stage_runner(stack.profile, "predict", settings)
    await predict.start()
    try:
        answer = await asyncio.wait_for(waiting, 10)
    finally:
        await predict.drain_and_close()
    return answer, before, len(reads)


async def test_a_long_poll_is_answered_from_the_stores_announcement_without_a_second_read(settings: Settings) -> None:
    """The store announces a job's end with its record (written in the same script), so a caller
    waiting on ?wait= is answered from it: one read of the store per long poll, not two."""
    async for stack in start_stack(settings, "asynchronous", stages=["preprocess", "store"]):
        answer, before, after = await long_poll_counting_reads(stack, settings, IRIS_ROWS[:1])
        assert before == 1
        assert answer.status_code == 200 and answer.json()["status"] == "succeeded"
        assert answer.json()["predictions"][0]["label"] == "setosa"
        assert after == 1  # answered from the announcement


async def test_a_large_record_is_announced_by_id_and_its_long_poll_reads_the_store(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records past ANNOUNCED_RECORD_MAX_BYTES are announced without their record (every
    ingress process receives every announcement): the waiter reads the store instead."""
    from toposerve.brokers import results

    monkeypatch.setattr(results, "ANNOUNCED_RECORD_MAX_BYTES", 1_000)  # the store runs in this process
    rows = IRIS_ROWS * 10  # 30 rows: a record of a few KiB
    async for stack in start_stack(settings, "asynchronous", stages=["preprocess", "store"]):
        answer, before, after = await long_poll_counting_reads(stack, settings, rows)
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == len(rows)
        assert len(answer.content) > 1_000
        assert (before, after) == (1, 2)  # the pending record, then the finished one after the bare announcement
