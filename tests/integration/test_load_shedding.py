"""Load shedding (circuit break): bounded queues and in-flight requests answer 503 at once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import start_stack
from tests.integration.test_sync_profiles import Gate
from toposerve.brokers.settings import Settings
from toposerve.deploy.components import build_stage_runner
from toposerve.deploy.profile import PROFILES_DIR

ROW = {"instances": [[5.1, 3.5, 1.4, 0.2]]}


def variant(tmp_path: Path, base: str, name: str, ingress: dict | None = None, stages: dict | None = None,
            **fields: object) -> str:
    """A copy of profile ``base`` named ``name``, with some ingress, stage or top-level fields changed."""
    data = yaml.safe_load((PROFILES_DIR / f"{base}.yaml").read_text())
    data.update(fields)
    data["name"] = name
    data["ingress"].update(ingress or {})
    for stage, fields in (stages or {}).items():
        data["stages"][stage].update(fields)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


async def test_a_flood_past_the_queue_bounds_is_shed_fast_and_nothing_accepted_is_lost(
    settings: Settings, tmp_path: Path
) -> None:
    profile = variant(tmp_path, "asynchronous", "bounded",
                      stages={"preprocess": {"max_queue_length": 20}, "predict": {"max_queue_length": 20}})
    async for stack in start_stack(settings, profile):
        await stack.runners["predict"].drain_and_close()  # predict paused: work piles up

        async def one(stack=stack) -> tuple[int, float, str | None]:
            started = time.monotonic()
            response = await stack.client.post("/v1/models/iris/predict", json=ROW)
            return response.status_code, time.monotonic() - started, response.headers.get("location")

        results = []
        for _ in range(10):  # waves, so the bounds fill before the end of the flood
            results += await asyncio.gather(*(one() for _ in range(30)))
        accepted = [location for status, _, location in results if status == 202]
        shed = [(status, elapsed) for status, elapsed, _ in results if status == 503]
        assert accepted and shed, (len(accepted), len(shed))
        assert {status for status, _, _ in results} <= {202, 503}
        assert max(elapsed for _, elapsed in shed) < 1.0  # refused at once, not queued
        shed_body = (await stack.client.post("/v1/models/iris/predict", json=ROW))
        assert shed_body.status_code == 503 and shed_body.json()["error"]["code"] == "overloaded"
        assert shed_body.headers["retry-after"] == "1"

        predict = build_stage_runner(stack.profile, "predict", settings)
        await predict.start()
        try:
            for location in accepted:  # every accepted job completes
                job = (await stack.client.get(location, params={"wait": 20})).json()
                assert job["status"] == "succeeded", job
            # ... and the service recovers by itself.
            response = await stack.client.post("/v1/models/iris/predict", json=ROW)
            assert response.status_code == 202
            job = (await stack.client.get(response.headers["location"], params={"wait": 10})).json()
            assert job["status"] == "succeeded"
        finally:
            await predict.drain_and_close()


async def test_requests_past_the_in_flight_bound_get_503_at_once_then_service_resumes(
    settings: Settings, tmp_path: Path
) -> None:
    profile = variant(tmp_path, "synchronous", "bounded_sync", ingress={"max_in_flight": 5})
    async for stack in start_stack(settings, profile):
        gate = Gate(stack, "predict")
        gate.close()
        waiting = [asyncio.create_task(stack.client.post("/v1/models/iris/predict", json=ROW)) for _ in range(5)]
        await asyncio.sleep(0.3)
        started = time.monotonic()
        extra = await stack.client.post("/v1/models/iris/predict", json=ROW)
        assert extra.status_code == 503 and extra.json()["error"]["code"] == "overloaded"
        assert time.monotonic() - started < 0.5
        gate.open()
        assert {r.status_code for r in await asyncio.gather(*waiting)} == {200}
        assert (await stack.client.post("/v1/models/iris/predict", json=ROW)).status_code == 200
        stats = (await stack.client.get("/v1/stats")).json()["load"]
        assert stats["shed"] == 1 and stats["in_flight"] == 0


async def test_a_profile_with_a_fallback_answers_it_instead_of_503(settings: Settings, tmp_path: Path) -> None:
    fallback = {"predictions": [{"label": "unknown", "class_index": -1, "probabilities": []}]}
    profile = variant(tmp_path, "synchronous", "fallback_sync",
                      ingress={"max_in_flight": 1, "overload_fallback": fallback})
    async for stack in start_stack(settings, profile):
        gate = Gate(stack, "predict")
        gate.close()
        first = asyncio.create_task(stack.client.post("/v1/models/iris/predict", json=ROW))
        await asyncio.sleep(0.3)
        shed = await stack.client.post("/v1/models/iris/predict", json=ROW)
        assert shed.status_code == 200 and shed.headers["x-fallback"] == "true"
        assert shed.json()["fallback"] is True and shed.json()["predictions"][0]["label"] == "unknown"
        gate.open()
        assert (await first).status_code == 200


async def test_a_quorum_profile_declares_quorum_queues_and_serves(settings: Settings, tmp_path: Path) -> None:
    data = yaml.safe_load((PROFILES_DIR / "asynchronous.yaml").read_text())
    data.update(name="quorum_async", queue_type="quorum", delivery_limit=5)
    path = tmp_path / "quorum_async.yaml"
    path.write_text(yaml.safe_dump(data))
    async for stack in start_stack(settings, str(path)):
        response = await stack.client.post("/v1/models/iris/predict", json=ROW)
        job = (await stack.client.get(response.headers["location"], params={"wait": 10})).json()
        assert job["status"] == "succeeded"
        # Declaring one of its queues as classic is refused: the broker made it a quorum queue.
        import aio_pika
        from aio_pika.exceptions import ChannelPreconditionFailed
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            name = stack.profile.queue_spec(settings.namespace, "predict").name
            with pytest.raises(ChannelPreconditionFailed):
                await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "classic"})


async def test_every_transport_passes_the_one_admission_gate(settings: Settings, tmp_path: Path) -> None:
    """With one request in flight allowed, a held /v1 call sheds the Open Inference Protocol's infer,
    the book's routes and a batch upload alike (30 concurrent attempts each: every one refused)."""
    from tests.integration.test_open_inference_protocol import model_input

    profile = variant(tmp_path, "load_shedding", "one_in_flight", ingress={"max_in_flight": 1})
    async for stack in start_stack(settings, profile):
        gate = Gate(stack, "predict")
        gate.close()
        held = asyncio.create_task(stack.client.post("/v1/models/iris/predict", json=ROW, params={"timeout": 10}))
        await asyncio.sleep(0.3)
        name = (await model_input(stack, "iris"))["name"]
        infer = {"inputs": [{"name": name, "shape": [1, 4], "datatype": "FP32", "data": ROW["instances"][0]}]}
        # Defaults bind this iteration's client and body (ruff B023); each lambda is called right below.
        attempts = {
            "/v1": lambda c=stack.client: c.post("/v1/models/iris/predict", json=ROW),
            "/v2 infer": lambda c=stack.client, body=infer: c.post("/v2/models/iris/infer", json=body),
            "GET /predict/test": lambda c=stack.client: c.get("/predict/test"),
            "POST /predict/label": lambda c=stack.client: c.post("/predict/label", json={"data": ROW["instances"]}),
        }
        for transport, attempt in attempts.items():
            responses = await asyncio.gather(*(attempt() for _ in range(30)))
            assert [r.status_code for r in responses] == [503] * 30, transport
            assert all(r.headers["retry-after"] == "1" for r in responses), transport
        gate.open()
        assert (await held).status_code == 200
        shed = (await stack.client.get("/v1/stats")).json()["load"]
        assert shed["shed"] == 120 and shed["in_flight"] == 0
        assert (await stack.client.get("/predict/test")).status_code == 200  # and it serves again
