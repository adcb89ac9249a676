"""A poison message (a stage bug, not bad input) in the sync and batch profiles.

The asynchronous profile's case is in test_direct_amqp.py and test_dead_letters.py.
Here: a sync caller gets a clear error once the retries are spent, never a hang;
a batch chunk's rows fail with the reason and the rest of the batch succeeds. In
both, the message lands in ``{ns}.dead`` with the reason and its attempts.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.integration.conftest import Stack, start_stack
from tests.integration.test_direct_amqp import dead_letters
from tests.support.batches import IRIS_HEADER, iris_rows, onnx_labels, read_results
from tests.support.images import b64, sample_images
from toposerve.brokers.settings import Settings

POISON = 42.0  # a batch row whose first value is this makes the predict stage raise


def explode_on(stack: Stack, rows: int | None = None):
    """Make the predict stage raise for a batch of exactly ``rows`` rows, or (``rows=None``)
    for any batch holding a row that starts with ``POISON``; returns the list of calls that raised."""
    batcher = stack.runners["predict"].stage.batcher
    real = batcher.run_batch
    calls: list[int] = []

    def run_batch(model: str, features: np.ndarray):
        if len(features) == rows or (rows is None and bool((features[:, 0] == POISON).any())):
            calls.append(len(features))
            raise RuntimeError("simulated crash in the model runtime")
        return real(model, features)

    batcher.run_batch = run_batch
    return calls


@pytest.mark.parametrize("profile_name", ["synchronous", "prep_pred"])
async def test_a_sync_caller_gets_a_clear_error_after_bounded_retries(settings: Settings, profile_name: str) -> None:
    async for stack in start_stack(settings, profile_name):
        if profile_name == "synchronous":
            model, body, poison_rows = "iris", {"instances": [[5.1, 3.5, 1.4, 0.2]] * 3}, 3
            expected_label = "setosa"
        else:
            image, expected_label = sample_images()[0]
            model, body, poison_rows = "digits_fast", {"image": b64(image.read_bytes())}, 1
        batcher = stack.runners["predict"].stage.batcher
        real_run_batch = batcher.run_batch
        calls = explode_on(stack, poison_rows)
        response = await stack.client.post(f"/v1/models/{model}/predict", json=body, params={"timeout": "10"})
        assert response.status_code == 500, response.text
        error = response.json()["error"]
        assert error["code"] == "internal"
        assert f"failed {settings.max_attempts} times" in error["message"]
        assert len(calls) == settings.max_attempts
        dead = await dead_letters(stack, expected=1)
        assert len(dead) == 1 and "simulated crash" in dead[0].headers["x-toposerve-reason"]
        assert dead[0].headers["x-toposerve-attempts"] == settings.max_attempts - 1
        # The bug is fixed: the same stage, still up, answers the same request.
        batcher.run_batch = real_run_batch
        response = await stack.client.post(f"/v1/models/{model}/predict", json=body, params={"timeout": "10"})
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["label"] == expected_label


async def test_a_poison_chunk_fails_its_rows_and_the_rest_of_the_batch_succeeds(settings: Settings) -> None:
    async for stack in start_stack(settings, "batch"):
        rows = iris_rows(25, seed=3)  # chunks of 10, 10 and 5 rows: the 5-row chunk is the poison
        rows[20:, 0] = POISON
        calls = explode_on(stack)
        body = IRIS_HEADER + "\n" + "\n".join(",".join(f"{v:g}" for v in row) for row in rows) + "\n"
        response = await stack.client.post("/v1/batches?model=iris&chunk_rows=10", content=body,
                                           headers={"content-type": "text/csv"})
        assert response.status_code == 202, response.text
        location = response.json()["location"]
        for _ in range(200):
            status = (await stack.client.get(location)).json()
            if status["state"] != "running":
                break
            await asyncio.sleep(0.05)
        assert (status["state"], status["done"], status["failed"]) == ("partial", 20, 5), status
        # Chunks that ran together are retried one by one: only the poison chunk keeps failing.
        assert calls.count(5) == settings.max_attempts, calls
        lines = await read_results(stack, response.json()["id"])
        assert [line["label"] for line in lines[:20]] == onnx_labels(settings, "iris", rows[:20])
        assert all(line["status"] == "failed" and "failed 3 times" in line["error"]["message"] for line in lines[20:])
        dead = await dead_letters(stack, expected=1)
        assert len(dead) == 1 and "simulated crash" in dead[0].headers["x-toposerve-reason"]
        assert dead[0].routing_key == "features.iris"
