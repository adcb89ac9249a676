"""The bus is as hostile as HTTP: a message of any size, from anyone, cannot stall a stage.

A body over ``TOPOSERVE_MAX_MESSAGE_BYTES`` is refused by its size before it is parsed:
its job fails ``too_large`` and the head of the body is dead-lettered with the reason.
Big bodies under the limit are parsed one at a time, so a prefetch window full of them
never holds the loop long enough for other messages' confirms to time out (which the
stage would otherwise have taken for a broker outage and requeued, uncounted).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from tests.integration.conftest import Stack, start_stack
from tests.integration.test_direct_amqp import dead_letters, job_when_done, publish
from toposerve.brokers import TRUNCATED_HEADER
from toposerve.brokers.settings import Settings
from toposerve.consumers.settlement import SALVAGE_HEAD_BYTES

LIMIT = 1024 * 1024


@pytest.fixture
async def small_limit_stack(settings: Settings) -> AsyncIterator[Stack]:
    async for stack in start_stack(settings.model_copy(update={"max_message_bytes": LIMIT}), "asynchronous"):
        yield stack


def rows_body(job_id: uuid.UUID, rows: int) -> bytes:
    return json.dumps({"id": str(job_id), "model": "iris", "instances": [[5.1, 3.5, 1.4, 0.2]] * rows}).encode()


async def test_a_body_over_the_limit_fails_its_job_by_size_and_is_dead_lettered_truncated(
        small_limit_stack: Stack) -> None:
    job_id = uuid.uuid4()
    body = rows_body(job_id, 120_000)  # about 2.6 MB: 2.5x the limit
    assert len(body) > 2 * LIMIT
    started = time.monotonic()
    await publish(small_limit_stack, "request.iris", body)
    job = await job_when_done(small_limit_stack, job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "too_large"
    assert f"{len(body)} bytes" in job["error"]["message"] and str(LIMIT) in job["error"]["message"]
    assert time.monotonic() - started < 5
    (dead,) = await dead_letters(small_limit_stack, expected=1)
    assert len(dead.body) == SALVAGE_HEAD_BYTES and dead.headers[TRUNCATED_HEADER] == len(body)
    assert "refused before parsing" in dead.headers["x-toposerve-reason"]
    # The stage still serves, and it never took the refusal for an outage.
    ok = uuid.uuid4()
    await publish(small_limit_stack, "request.iris", rows_body(ok, 1))
    assert (await job_when_done(small_limit_stack, ok))["status"] == "succeeded"
    assert small_limit_stack.runners["preprocess"].stats.requeued == 0


async def test_an_oversized_body_without_a_readable_id_is_only_dead_lettered(small_limit_stack: Stack) -> None:
    await publish(small_limit_stack, "request.iris", b"[" + b"1," * LIMIT + b"1]")
    (dead,) = await dead_letters(small_limit_stack, expected=1)
    assert dead.headers["x-toposerve-stage"] == "preprocess"
    assert small_limit_stack.runners["preprocess"].stats.dead_lettered == 1


async def test_a_window_full_of_big_bodies_settles_every_one_without_an_outage_requeue(
        small_limit_stack: Stack) -> None:
    """Twenty bodies just under the limit, all in flight at once: each is parsed, fails its job
    (too many rows), and nothing is requeued as if the broker had gone."""
    ids = [uuid.uuid4() for _ in range(20)]
    body_rows = 45_000  # about 0.98 MB of rows each
    await asyncio.gather(*(publish(small_limit_stack, "request.iris", rows_body(i, body_rows)) for i in ids))
    jobs = await asyncio.gather(*(job_when_done(small_limit_stack, i, timeout=60) for i in ids))
    assert {job["error"]["code"] for job in jobs} == {"too_large"}
    assert all("rows" in job["error"]["message"] for job in jobs)
    stats = small_limit_stack.runners["preprocess"].stats
    assert stats.requeued == 0 and stats.retried == 0


async def test_a_confirm_timeout_while_the_stage_stalled_itself_counts_attempts_not_an_outage(
        small_limit_stack: Stack) -> None:
    """The stage held its own loop (CPU-bound work) while a confirm was due: bounded retries,
    then a failure, never an endless uncounted requeue. A timeout with a free loop is an outage."""
    from toposerve.brokers.connections import PublishRefused
    from toposerve.brokers.messages import Prediction

    settlement = small_limit_stack.runners["predict"].settlement
    runner = small_limit_stack.runners["predict"]
    settlement.outlets.outputs.timeout_s = 1.0
    real_publish_all = settlement.publish_all
    stall = {"seconds": 0.8}

    async def stalled_publish_all(outputs, delivery, **kwargs):
        if any(isinstance(out.body, Prediction) for out in outputs):
            time.sleep(stall["seconds"])  # the loop is held; the confirm "times out" meanwhile
            raise PublishRefused("no confirm for 'prediction.iris' within 1 s", "timeout")
        return await real_publish_all(outputs, delivery, **kwargs)

    settlement.publish_all = stalled_publish_all
    job_id = uuid.uuid4()
    await publish(small_limit_stack, "request.iris", rows_body(job_id, 1))
    job = await job_when_done(small_limit_stack, job_id, timeout=30)
    assert job["status"] == "failed" and job["error"]["code"] == "internal"
    assert "no confirm" in job["error"]["message"]
    assert runner.stats.retried == small_limit_stack.settings.max_attempts - 1 and runner.stats.requeued == 0

    stall["seconds"] = 0.0  # the same timeout with a free loop: the broker is slow or away
    other = uuid.uuid4()
    await publish(small_limit_stack, "request.iris", rows_body(other, 1))
    deadline = time.monotonic() + 10
    while runner.stats.requeued == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert runner.stats.requeued >= 1
    settlement.publish_all = real_publish_all
    assert (await job_when_done(small_limit_stack, other, timeout=15))["status"] == "succeeded"
