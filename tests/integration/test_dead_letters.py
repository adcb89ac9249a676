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


async def test_a_dead_letter_shows_its_job_id_and_its_message_id_and_replays_by_either(async_stack: Stack) -> None:
    """Many AMQP clients give every publish a message id of their own: the job id is the body's."""
    import aio_pika

    from toposerve.brokers.topology import exchange_name

    settings = async_stack.settings
    preprocess = async_stack.runners["preprocess"].stage  # the stage that gets the client's own message
    real_handle = preprocess.handle

    async def broken(message):
        raise RuntimeError("simulated bug in preprocessing")

    preprocess.handle = broken
    ids = [uuid.uuid4(), uuid.uuid4()]
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(exchange_name(settings.namespace))
        for job_id in ids:
            body = json.dumps({"id": str(job_id), "model": "iris", "instances": [[5.1, 3.5, 1.4, 0.2]]}).encode()
            await exchange.publish(aio_pika.Message(body, message_id=f"client-msg-{job_id.hex[:8]}"), "request.iris")
    async with DeadLetters(settings) as letters:
        await wait_for(lambda: _count_is(letters, 2))
    preprocess.handle = real_handle
    shown = await asyncio.to_thread(toposerve, settings, "dead", "list")
    for job_id in ids:
        assert f"job={job_id}  message=client-msg-{job_id.hex[:8]}" in shown.stdout, shown.stdout
    by_job = await asyncio.to_thread(toposerve, settings, "dead", "replay", "--id", str(ids[0]))
    by_message = await asyncio.to_thread(toposerve, settings, "dead", "replay", "--id", f"client-msg-{ids[1].hex[:8]}")
    assert by_job.returncode == 0 and by_message.returncode == 0, by_job.stdout + by_message.stdout
    async with DeadLetters(settings) as letters:
        await wait_for(lambda: _count_is(letters, 0))


async def test_the_dead_letter_queue_is_bounded_and_keeps_the_newest(settings, tmp_path: Path) -> None:
    """Ten 40 kB poison messages into a queue bounded at 100 kB: the oldest are dropped, the newest stay."""
    from tests.integration.conftest import start_stack
    from tests.integration.test_load_shedding import variant

    profile = variant(tmp_path, "asynchronous", "bounded_dead", dead_letters={"max_length": 1000, "max_bytes": 100_000})
    async for stack in start_stack(settings, profile):
        for index in range(10):
            garbage = json.dumps({"n": index, "pad": "x" * 40_000}).encode()  # not a request: dead at once
            await publish(stack, "request.iris", garbage)
        async with DeadLetters(settings) as letters:
            await wait_for(lambda stack=stack: _at_least_dead_lettered(stack, 10))
            kept = await letters.list()
        assert 1 <= len(kept) <= 2 and sum(letter.size for letter in kept) <= 100_000
        async with DeadLetters(settings) as letters:
            channel, queue = await letters._channel()
            message = await queue.get(no_ack=True)
            await channel.close()
        assert json.loads(message.body)["n"] >= 8  # drop-head: the newest survive


async def _at_least_dead_lettered(stack: Stack, n: int) -> bool:
    return stack.runners["preprocess"].stats.dead_lettered >= n


async def test_a_dead_letter_queue_declared_with_other_bounds_is_kept_and_the_stage_still_starts(
        settings, tmp_path: Path) -> None:
    from tests.integration.conftest import start_stack
    from tests.integration.test_load_shedding import variant

    async for _ in start_stack(settings, "asynchronous", stages=[]):
        pass  # the default bounds are declared by the ingress
    profile = variant(tmp_path, "asynchronous", "other_bounds", dead_letters={"max_length": 7, "max_bytes": None})
    async for stack in start_stack(settings, profile):
        response = await stack.client.post("/v1/models/iris/predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]})
        job = (await stack.client.get(response.headers["location"], params={"wait": 10})).json()
        assert job["status"] == "succeeded"
