"""Listing and cancelling batches on real RabbitMQ and Redis, under API keys.

The batch profile's store runs from the start; the predict stage is started only after the
cancel, so what it skips is known: batch A (5 chunks, one already predicted by the test
playing the predict stage) is cancelled by its owner, batch B of the same owner runs on.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import orjson
import pytest

from tests.integration.conftest import Stack, start_stack
from tests.integration.test_batch import cli
from tests.support.batches import IRIS_HEADER, iris_rows, read_results
from tests.support.faults import wait_for_condition
from toposerve.brokers import publishing
from toposerve.brokers.batches import chunk_id
from toposerve.brokers.messages import Prediction, RowPrediction
from toposerve.brokers.settings import Settings
from toposerve.deploy.components import build_stage_runner

OWNER, OTHER, OPERATOR = "owner-key-1", "other-key-2", "operator-key-3"  # key ids env-1, env-2, env-3


def key(value: str) -> dict[str, str]:
    return {"X-API-Key": value}


@pytest.fixture
async def keyed_batch_stack(settings: Settings) -> AsyncIterator[Stack]:
    keyed = settings.model_copy(update={"api_keys": f"{OWNER},{OTHER},{OPERATOR}", "operator_key_ids": "env-3"})
    async for stack in start_stack(keyed, "batch", stages=["store"]):
        yield stack


async def submit(stack: Stack, rows: int, seed: int, headers: dict[str, str] | None = None) -> dict:
    body = IRIS_HEADER + "\n" + "\n".join(",".join(f"{v:g}" for v in row) for row in iris_rows(rows, seed)) + "\n"
    response = await stack.client.post("/v1/batches?model=iris&chunk_rows=10", content=body,
                                       headers={"content-type": "text/csv", **(key(OWNER) if headers is None else headers)})
    assert response.status_code == 202, response.text
    return response.json()


async def listed(stack: Stack, caller: str, **params: int) -> dict:
    response = await stack.client.get("/v1/batches", params=params, headers=key(caller))
    assert response.status_code == 200, response.text
    return response.json()


async def test_list_progress_and_cancel_by_owner_only_with_the_rest_skipped(keyed_batch_stack: Stack) -> None:
    stack, client = keyed_batch_stack, keyed_batch_stack.client
    first = await submit(stack, 50, seed=1)
    second = await submit(stack, 20, seed=2)
    cancelled_id, running_id = first["id"], second["id"]
    # The test plays the predict stage for chunk 0 of the first batch: a running batch with progress.
    async with publishing(stack.settings, "test-predict") as publisher:
        row = RowPrediction(label="setosa", class_index=0, probabilities=[1.0, 0.0, 0.0])
        await publisher.publish(Prediction(id=chunk_id(cancelled_id, 0), model="iris", model_version="1",
                                           batch_id=cancelled_id, rows=[row] * 10), "prediction.iris")

    async def progressed() -> bool:
        page = await listed(stack, OWNER)
        return any(b["id"] == cancelled_id and b["done"] == 10 for b in page["batches"])

    assert await wait_for_condition(progressed, timeout=15) is not None
    page = await listed(stack, OWNER)
    assert page["total"] == 2 and [b["id"] for b in page["batches"]] == [running_id, cancelled_id]  # newest first
    shown = page["batches"][1]
    assert (shown["state"], shown["done"], shown["failed"], shown["total"]) == ("running", 10, 0, 50)
    assert (shown["chunks_done"], shown["chunks"], shown["owner"]) == (1, 5, "env-1")
    assert shown["created"] > 0 and shown["cancelled"] is None
    paged = await listed(stack, OWNER, offset=1, limit=1)
    assert (paged["total"], [b["id"] for b in paged["batches"]]) == (2, [cancelled_id])
    assert (await listed(stack, OTHER))["total"] == 0  # another key sees none of them
    assert {running_id, cancelled_id} <= {b["id"] for b in (await listed(stack, OPERATOR))["batches"]}
    assert (await client.get("/v1/batches", params={"limit": 0}, headers=key(OWNER))).status_code == 422

    forbidden = await client.post(f"/v1/batches/{cancelled_id}/cancel", headers=key(OTHER))
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"
    for unknown in (str(uuid.uuid4()), "not-a-batch"):
        missing = await client.post(f"/v1/batches/{unknown}/cancel", headers=key(OWNER))
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_batch"
    answer = await client.post(f"/v1/batches/{cancelled_id}/cancel", headers=key(OWNER))
    assert answer.status_code == 200, answer.text
    assert answer.json()["state"] == "cancelled" and answer.json()["cancelled"] is not None
    again = await client.post(f"/v1/batches/{cancelled_id}/cancel", headers=key(OPERATOR))
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]["message"]

    predict = build_stage_runner(stack.profile, "predict", stack.settings)
    await predict.start()
    try:
        async def settled() -> bool:
            states = {b["id"]: b for b in (await listed(stack, OWNER))["batches"]}
            return states[cancelled_id]["chunks_done"] == 5 and states[running_id]["state"] == "succeeded" \
                and predict.stage.skipped_chunks == 5
        assert await wait_for_condition(settled, timeout=30) is not None
        rows_predicted = predict.stage.batcher.stats.rows
    finally:
        await predict.drain_and_close()
    states = {b["id"]: b for b in (await listed(stack, OWNER))["batches"]}
    ended = states[cancelled_id]
    # Every queued chunk of the cancelled batch was skipped (chunk 0's skip counted nothing twice).
    assert (ended["state"], ended["done"], ended["failed"], ended["chunks_done"]) == ("cancelled", 10, 40, 5)
    assert states[running_id]["done"] == 20 and rows_predicted == 20  # only the batch that runs on
    lines = await read_results(stack, cancelled_id)
    assert [line["status"] for line in lines] == ["succeeded"] * 10 + ["failed"] * 40
    assert {line["error"]["code"] for line in lines[10:]} == {"cancelled"}
    finished = await client.post(f"/v1/batches/{running_id}/cancel", headers=key(OWNER))
    assert finished.status_code == 409 and finished.json()["error"]["code"] == "batch_finished"
    assert "'succeeded'" in finished.json()["error"]["message"]



@pytest.fixture
async def batch_stack(settings: Settings) -> AsyncIterator[Stack]:
    async for stack in start_stack(settings, "batch", stages=["store"]):
        yield stack


async def test_the_cli_cancels_a_running_batch_and_refuses_a_finished_one_or_an_unknown_id(batch_stack: Stack) -> None:
    """``toposerve batch cancel ID`` (for batches without an owner key, such as the CLI's own)."""
    stack, settings = batch_stack, batch_stack.settings
    cancelled_id = (await submit(stack, 30, seed=3, headers={}))["id"]
    said = await asyncio.to_thread(cli, "cancel", cancelled_id, settings=settings)
    assert said.returncode == 0, said.stderr
    assert orjson.loads(said.stdout)["state"] == "cancelled"
    again = await asyncio.to_thread(cli, "cancel", cancelled_id, settings=settings)
    assert again.returncode == 1 and "already cancelled" in again.stderr, again.stderr
    unknown = await asyncio.to_thread(cli, "cancel", str(uuid.uuid4()), settings=settings)
    assert unknown.returncode == 1 and "no batch" in unknown.stderr, unknown.stderr

    predict = build_stage_runner(stack.profile, "predict", settings)
    await predict.start()
    try:
        running_id = (await submit(stack, 20, seed=4, headers={}))["id"]

        async def settled() -> bool:
            cancelled = (await stack.client.get(f"/v1/batches/{cancelled_id}")).json()
            running = (await stack.client.get(f"/v1/batches/{running_id}")).json()
            return cancelled["chunks_done"] == 3 and running["state"] == "succeeded"
        assert await wait_for_condition(settled, timeout=30) is not None
    finally:
        await predict.drain_and_close()
    ended = (await stack.client.get(f"/v1/batches/{cancelled_id}")).json()
    assert (ended["state"], ended["done"], ended["failed"]) == ("cancelled", 0, 30)  # every chunk skipped
    finished = await asyncio.to_thread(cli, "cancel", running_id, settings=settings)
    assert finished.returncode == 1 and "has finished ('succeeded')" in finished.stderr, finished.stderr
