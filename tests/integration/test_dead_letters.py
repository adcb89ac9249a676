"""`toposerve dead list|replay`: dead letters are shown with their reason and re-published on demand."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from tests.integration.conftest import Stack
from tests.integration.test_direct_amqp import publish
from toposerve.producers.dead_letters import DeadLetters

REPO = Path(__file__).resolve().parents[2]


async def wait_for(predicate, timeout: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


def toposerve(settings, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOPOSERVE_AMQP_URL": settings.amqp_url, "TOPOSERVE_NAMESPACE": settings.namespace}
    return subprocess.run([sys.executable, "-m", "toposerve", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


async def test_dead_letters_are_listed_and_a_replayed_one_is_consumed_again(async_stack: Stack) -> None:
    settings = async_stack.settings
    predict = async_stack.runners["predict"]
    real_run_batch = predict.stage.batcher.run_batch

    def explode(model: str, features):  # a bug in the stage (a poison message), not bad input
        raise RuntimeError("simulated crash in the model runtime")

    predict.stage.batcher.run_batch = explode
    await publish(async_stack, "request.iris", b"{this is not json")
    poison_id = uuid.uuid4()
    await publish(async_stack, "request.iris",
                  json.dumps({"id": str(poison_id), "model": "iris", "instances": [[6.7, 3.0, 5.2, 2.3]]}).encode())

    async with DeadLetters(settings) as letters:
        await wait_for(lambda: _count_is(letters, 2))
        listed = await letters.list()
        assert await letters.count() == 2, "listing must not remove anything"
    by_stage = {letter.stage: letter for letter in listed}
    assert set(by_stage) == {"preprocess", "predict"}
    garbage = by_stage["preprocess"]  # its id is the message id the publishing client gave it
    assert garbage.routing_key == "request.iris" and garbage.stage == "preprocess"
    assert "not a valid InferenceRequest" in garbage.reason
    poison = by_stage["predict"]
    assert poison.job_id == str(poison_id) and poison.routing_key == "features.iris"
    assert poison.queue == f"{settings.namespace}.asynchronous.predict"
    assert "simulated crash" in poison.reason and poison.attempts == settings.max_attempts - 1

    # The CLI shows the same (a real `toposerve dead list`).
    shown = await asyncio.to_thread(toposerve, settings, "dead", "list", "--limit", "10")
    assert shown.returncode == 0, shown.stderr
    assert str(poison_id) in shown.stdout and "simulated crash" in shown.stdout and "stage=predict" in shown.stdout
    assert "key=request.iris" in shown.stdout and "2 of 2 dead letters" in shown.stderr

    # The bug is fixed; replay only the poison message: the predict stage consumes it again.
    predict.stage.batcher.run_batch = real_run_batch
    handled_before = predict.stats.handled
    store_before = async_stack.runners["store"].stats.handled
    replayed = await asyncio.to_thread(toposerve, settings, "dead", "replay", "--id", str(poison_id))
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert f"replayed {poison_id}" in replayed.stdout

    async def consumed_again() -> bool:
        return predict.stats.handled > handled_before and async_stack.runners["store"].stats.handled > store_before

    await wait_for(consumed_again)
    async with DeadLetters(settings) as letters:
        remaining = await letters.list()
        assert [letter.stage for letter in remaining] == ["preprocess"], "only the invalid JSON is left"
        missing = await letters.replay([str(uuid.uuid4())])
        assert missing.replayed == [] and len(missing.not_found) == 1
    # The job had already ended as failed; its first terminal state stands (no double write).
    job = (await async_stack.client.get(f"/v1/jobs/{poison_id}")).json()
    assert job["status"] == "failed" and job["error"]["code"] == "internal"

    usage = await asyncio.to_thread(toposerve, settings, "dead", "replay")
    assert usage.returncode != 0 and "--all" in usage.stderr


async def test_replay_all_republishes_with_the_original_routing_key_without_attempts(async_stack: Stack) -> None:
    settings = async_stack.settings
    predict = async_stack.runners["predict"]
    calls: list[int] = []

    def explode(model: str, features):
        calls.append(1)
        raise RuntimeError("simulated crash")

    predict.stage.batcher.run_batch = explode
    job_id = uuid.uuid4()
    await publish(async_stack, "request.iris",
                  json.dumps({"id": str(job_id), "model": "iris", "instances": [[5.1, 3.5, 1.4, 0.2]]}).encode())
    async with DeadLetters(settings) as letters:
        await wait_for(lambda: _count_is(letters, 1))
        assert len(calls) == settings.max_attempts
        report = await letters.replay(None)
        assert report.replayed == [str(job_id)] and not report.refused
        # Replayed without the attempts header: it gets its full number of attempts again,
        # then dies again (the bug is still there) with a fresh reason.
        await wait_for(lambda: _count_is(letters, 1))
        assert len(calls) == 2 * settings.max_attempts
        [again] = await letters.list()
        assert again.job_id == str(job_id) and again.attempts == settings.max_attempts - 1


async def _count_is(letters: DeadLetters, n: int) -> bool:
    return await letters.count() == n
