"""Scatter-gather: one request, three binary models, one joined answer with per-part status."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest

from tests.integration.conftest import Stack, start_stack
from tests.integration.test_load_shedding import variant
from tests.integration.test_sync_profiles import Gate
from tests.support.spy import spy_queue
from toposerve.brokers import JoinStore, connect_redis
from toposerve.brokers.messages import Prediction, RowPrediction
from toposerve.brokers.settings import Settings
from toposerve.brokers.topology import exchange_name

GROUP = "/v1/models/iris_species/predict"
ROWS = [[5.1, 3.5, 1.4, 0.2], [5.9, 3.0, 4.2, 1.5], [6.7, 3.0, 5.2, 2.3]]
MEMBERS = ["iris_setosa", "iris_versicolor", "iris_virginica"]


@pytest.fixture
async def group_stack(settings: Settings) -> AsyncIterator[Stack]:
    async for stack in start_stack(settings, "horizontal_microservice"):
        yield stack


async def job(stack: Stack, response) -> dict:
    assert response.status_code == 202, response.text
    result = await stack.client.get(response.headers["location"], params={"wait": 15})
    return result.json()


async def test_all_parts_join_into_one_answer(group_stack: Stack) -> None:
    record = await job(group_stack, await group_stack.client.post(GROUP, json={"instances": ROWS}))
    assert record["status"] == "succeeded" and record["model"] == "iris_species"
    assert [row["label"] for row in record["predictions"]] == ["setosa", "versicolor", "virginica"]
    assert {m: p["status"] for m, p in record["parts"].items()} == dict.fromkeys(MEMBERS, "succeeded")
    for row in record["predictions"]:
        assert set(row["scores"]) == set(MEMBERS) and len(row["probabilities"]) == 3
    # Published once, answered by each member's own stage once.
    for member in ("predict_setosa", "predict_versicolor", "predict_virginica"):
        assert group_stack.runners[member].stats.handled == 1
    described = (await group_stack.client.get("/v1/models/iris_species")).json()
    assert described["labels"] == ["setosa", "versicolor", "virginica"]


async def published(queue: aio_pika.abc.AbstractQueue) -> list[str]:
    """The group's answers (``prediction.<group>`` or ``failure.<group>``) the spy queue holds now."""
    keys = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        keys.append(message.routing_key)  # the spy also sees request.*, join-wait.* and join.*
    return [key for key in keys if key.split(".")[0] in {"prediction", "failure"}]


async def test_a_join_is_announced_once_though_its_parts_and_its_timeout_tick_each_see_it_complete(
        group_stack: Stack, settings: Settings) -> None:
    async with spy_queue(settings, "*.iris_species") as spy:
        record = await job(group_stack, await group_stack.client.post(GROUP, json={"instances": ROWS}))
        assert record["status"] == "succeeded" and record["partial"] is False
        await asyncio.sleep(3)  # past the 2 s join timeout: the tick has come back and found the join decided
        assert group_stack.runners["aggregate"].stats.handled == 4  # three parts and the tick
        assert await published(spy) == ["prediction.iris_species"]


async def test_a_slow_part_past_the_join_timeout_leaves_a_partial_answer(group_stack: Stack, settings: Settings) -> None:
    gate = Gate(group_stack, "predict_virginica")
    gate.close()
    started = time.monotonic()
    record = await job(group_stack, await group_stack.client.post(GROUP, json={"instances": ROWS[:1]}))
    assert 1.5 < time.monotonic() - started < 8  # the profile's 2 s join timeout, not a hang
    assert record["status"] == "succeeded"
    assert record["parts"]["iris_virginica"]["status"] == "missing"
    assert record["parts"]["iris_setosa"]["status"] == "succeeded"
    assert record["predictions"][0]["label"] == "setosa"
    assert set(record["predictions"][0]["scores"]) == {"iris_setosa", "iris_versicolor"}
    # It says it is partial, and the missing member's probability is null, not an invented 0.
    assert record["partial"] is True
    assert record["predictions"][0]["probabilities"][2] is None
    async with spy_queue(settings, "*.iris_species") as spy:
        gate.open()
        await asyncio.sleep(0.5)  # the late part arrives: the answer does not change, nor is it announced again
        assert await published(spy) == []
    again = (await group_stack.client.get(f"/v1/jobs/{record['id']}")).json()
    assert again["parts"]["iris_virginica"]["status"] == "missing"


async def test_a_row_only_the_missing_member_could_claim_is_left_undecided(group_stack: Stack) -> None:
    """A clear virginica row with the virginica member missing: the members that answered both say
    "not mine", so the partial answer labels it null instead of the least unlikely of them."""
    gate = Gate(group_stack, "predict_virginica")
    gate.close()
    record = await job(group_stack, await group_stack.client.post(GROUP, json={"instances": [ROWS[2]]}))
    gate.open()
    assert record["status"] == "succeeded" and record["partial"] is True
    row = record["predictions"][0]
    assert row["label"] is None and row["class_index"] is None
    assert row["probabilities"][2] is None and all(p < 0.5 for p in row["probabilities"][:2])


async def test_a_complete_answer_is_not_partial(group_stack: Stack) -> None:
    record = await job(group_stack, await group_stack.client.post(GROUP, json={"instances": ROWS[:1]}))
    assert record["partial"] is False and None not in record["predictions"][0]["probabilities"]


async def test_a_group_without_partial_answers_fails_the_job_naming_the_missing_member(
        settings: Settings, tmp_path: Path) -> None:
    import yaml

    from toposerve.deploy.profile import PROFILES_DIR
    data = yaml.safe_load((PROFILES_DIR / "horizontal_microservice.yaml").read_text())
    data["name"] = "horizontal_strict"
    data["groups"]["iris_species"]["partial_answers"] = False
    path = tmp_path / "horizontal_strict.yaml"
    path.write_text(yaml.safe_dump(data))
    async for stack in start_stack(settings, str(path)):
        gate = Gate(stack, "predict_versicolor")
        gate.close()
        record = await job(stack, await stack.client.post(GROUP, json={"instances": ROWS[:1]}))
        gate.open()
        assert record["status"] == "failed" and record["error"]["code"] == "incomplete"
        assert "iris_versicolor: missing" in record["error"]["message"]


async def test_a_failing_part_is_reported_and_the_others_still_answer(group_stack: Stack) -> None:
    def broken(model, features):
        raise RuntimeError("versicolor runtime crashed")

    group_stack.runners["predict_versicolor"].stage.batcher.run_batch = broken
    record = await job(group_stack, await group_stack.client.post(GROUP, json={"instances": ROWS}))
    assert record["status"] == "succeeded"
    part = record["parts"]["iris_versicolor"]
    assert part["status"] == "failed" and "versicolor runtime crashed" in part["error"]
    assert [row["label"] for row in record["predictions"]][::2] == ["setosa", "virginica"]


async def test_a_duplicated_part_from_redelivery_changes_nothing(group_stack: Stack) -> None:
    record = await job(group_stack, await group_stack.client.post(GROUP, json={"instances": ROWS[:1]}))
    # Replay the setosa part with a different (wrong) answer, as a redelivery would resend it.
    fake = Prediction(id=uuid.UUID(record["id"]), model="iris_species", part="iris_setosa", model_version="1",
                      rows=[RowPrediction(label="not_setosa", class_index=1, probabilities=[0.0, 1.0])])
    connection = await aio_pika.connect(group_stack.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(exchange_name(group_stack.settings.namespace))
        for _ in range(2):
            await exchange.publish(aio_pika.Message(fake.model_dump_json().encode()),
                                   "prediction.iris_species.iris_setosa")
    await asyncio.sleep(0.5)
    again = (await group_stack.client.get(f"/v1/jobs/{record['id']}")).json()
    assert again["predictions"] == record["predictions"] and again["parts"] == record["parts"]


async def test_sync_mode_answers_the_joined_prediction(settings: Settings, tmp_path: Path) -> None:
    profile = variant(tmp_path, "horizontal_microservice", "horizontal_sync", ingress={"mode": "sync"})
    async for stack in start_stack(settings, profile):
        response = await stack.client.post(GROUP, json={"instances": ROWS})
        assert response.status_code == 200
        assert [row["label"] for row in response.json()["predictions"]] == ["setosa", "versicolor", "virginica"]
        gate = Gate(stack, "predict_setosa")
        gate.close()
        partial = await stack.client.post(GROUP, json={"instances": ROWS[2:]}, params={"timeout": "10"})
        assert partial.status_code == 200 and partial.json()["parts"]["iris_setosa"]["status"] == "missing"
        assert partial.json()["predictions"][0]["label"] == "virginica"
        gate.open()


async def test_a_bad_group_request_is_a_4xx(group_stack: Stack) -> None:
    response = await group_stack.client.post(GROUP, json={"instances": [[1, 2, 3]]})
    assert response.status_code == 422 and "expects 4" in response.json()["error"]["message"]


async def test_the_deciding_input_redelivered_publishes_again_and_no_other_input_does(settings: Settings) -> None:
    # At-least-once: the message that decided a join may fail before its publish is confirmed;
    # its redelivery must publish the kept answer, while any other input that sees it decided must not.
    joins = JoinStore(connect_redis(settings.redis_url), settings.namespace, ttl_s=60)
    job_id = uuid.uuid4()
    try:
        assert await joins.decide(job_id, '{"first": 1}', "part:iris_virginica") == ('{"first": 1}', True)
        assert await joins.decide(job_id, '{"second": 2}', "tick") == ('{"first": 1}', False)
        assert await joins.decide(job_id, '{"second": 2}', "part:iris_setosa") == ('{"first": 1}', False)
        assert await joins.decide(job_id, '{"again": 3}', "part:iris_virginica") == ('{"first": 1}', True)
    finally:
        await joins.client.aclose()
