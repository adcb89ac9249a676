"""A message that kills its stage process each time is dead-lettered, not redelivered for ever,
and the healthy messages that were in flight with it are not.

The predict stage here is a real process that exits (``os._exit``, as a native
crash would) on a poison row; the test plays the supervisor and restarts it, the
way ``toposerve up``, compose or Kubernetes would.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.integration.conftest import Stack, start_stack
from tests.integration.test_direct_amqp import dead_letters
from tests.support.crashing_worker import CRASH_EXIT_CODE, POISON
from tests.support.processes import WorkerProcess
from toposerve.brokers.connections import connect_redis
from toposerve.brokers.settings import Settings
from toposerve.consumers.crash_guard import RedeliveryGuard
from toposerve.deploy.local_services import free_port

# Kills and restarts services or stage processes: the slow part of the suite (`-m "not fault"` skips it).
pytestmark = pytest.mark.fault

LIMIT = 2


async def job(stack: Stack, job_id: str) -> dict:
    return (await stack.client.get(f"/v1/jobs/{job_id}")).json()


async def submit(stack: Stack, row: list[float]) -> str:
    response = await stack.client.post("/v1/models/iris/predict", json={"instances": [row]})
    assert response.status_code == 202, response.text
    return response.json()["id"]


async def test_a_message_that_keeps_killing_its_stage_is_dead_lettered_and_its_neighbours_succeed(
    settings: Settings, tmp_path: Path
) -> None:

    settings = settings.model_copy(update={"max_crash_redeliveries": LIMIT})
    async for stack in start_stack(settings, "asynchronous", stages=["preprocess", "store"]):
        # All queued before the stage starts, so they are in flight together (one prefetch window).
        before = [await submit(stack, [5.1, 3.5, 1.4, 0.2]) for _ in range(10)]
        poison_id = await submit(stack, [POISON, 3.0, 1.4, 0.2])
        after = [await submit(stack, [6.7, 3.0, 5.2, 2.3]) for _ in range(10)]
        await asyncio.sleep(0.5)  # preprocess has turned them into features for the predict queue
        predict = WorkerProcess(settings, "asynchronous", "predict", tmp_path, module="tests.support.crashing_worker")
        crashes = 0
        deadline = time.monotonic() + 90
        try:
            while (await job(stack, poison_id))["status"] == "pending":
                assert time.monotonic() < deadline and crashes <= 2 * LIMIT + 2, \
                    f"still crash-looping after {crashes} crashes:\n{predict.log()[-3000:]}"
                if predict.process is None or predict.process.poll() is not None:
                    if predict.process is not None:
                        assert predict.process.returncode == CRASH_EXIT_CODE, predict.log()[-3000:]
                        crashes += 1
                    predict.start()  # the supervisor's restart
                await asyncio.sleep(0.05)
            record = await job(stack, poison_id)
            assert record["status"] == "failed" and record["error"]["code"] == "internal", record
            assert f"died {LIMIT} times while handling this message" in record["error"]["message"]
            # The first delivery is not counted (nothing was known of it); then LIMIT counted deaths.
            assert crashes == LIMIT + 1
            # Every healthy neighbour ends succeeded: none was dead-lettered along with the poison.
            ids = [*before, *after]
            while any(r["status"] == "pending" for r in await asyncio.gather(*(job(stack, i) for i in ids))):
                assert time.monotonic() < deadline, predict.log()[-3000:]
                await asyncio.sleep(0.1)
            records = [await job(stack, i) for i in ids]
            assert [r["status"] for r in records] == ["succeeded"] * len(ids), [r for r in records if "error" in r][:2]
            assert [r["predictions"][0]["label"] for r in records] == ["setosa"] * 10 + ["virginica"] * 10
            dead = await dead_letters(stack, expected=2, timeout=1.0)  # asks for 2: must find just 1
            assert [m.message_id for m in dead] == [poison_id]
            assert f"died {LIMIT} times" in dead[0].headers["x-toposerve-reason"]
            assert dead[0].routing_key == "features.iris"
            # The stage that dead-lettered it is alive and serves the next requests.
            assert predict.process is not None and predict.process.poll() is None
            good_id = await submit(stack, [5.1, 3.5, 1.4, 0.2])
            while (record := await job(stack, good_id))["status"] == "pending" and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert record["status"] == "succeeded", record
            assert predict.process.poll() is None
            print(f"\n[fault crash-loop asynchronous] crashes={crashes} neighbours={len(ids)} "
                  f"neighbours_succeeded={len(ids)} dead_letters={len(dead)}")
        finally:
            predict.stop()


def delivery(body: bytes = b"{}", redelivered: bool = True) -> SimpleNamespace:
    return SimpleNamespace(redelivered=redelivered, body=body, routing_key="features.iris", headers={})


async def test_the_guard_counts_deaths_per_message_and_forgets_a_survived_delivery(
    redis_url: str, namespace: str
) -> None:
    guard = RedeliveryGuard(connect_redis(redis_url), namespace, "q", limit=2)
    try:
        tracked = await guard.check("features.iris", b"{}")
        assert tracked is not None and tracked.deaths == 0
        await guard.enter(tracked)  # the process dies here: nothing leaves
        assert (await guard.check("features.iris", b"{}")).deaths == 1
        await guard.enter(tracked)
        assert guard.exceeded(await guard.check("features.iris", b"{}"))
        assert 0 < await guard.client.ttl(tracked.key) <= guard.ttl_s
        await guard.leave(tracked)  # survived: the count is gone
        assert (await guard.check("features.iris", b"{}")).deaths == 0
        # Messages are told apart by routing key and body, not by the job id they share.
        assert guard.key("prediction.iris", b"part 1") != guard.key("prediction.iris", b"part 2")
        assert guard.key("prediction.iris", b"x") != guard.key("failure.iris", b"x")
    finally:
        await guard.close()
    # Redis away: the guard steps aside (fail open) instead of stopping the stage.
    away = RedeliveryGuard(connect_redis(f"redis://127.0.0.1:{free_port()}/0"), namespace, "q", limit=2)
    try:
        assert await away.check("features.iris", str(uuid.uuid4()).encode()) is None
    finally:
        await away.close()
