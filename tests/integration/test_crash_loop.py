"""A message that kills its stage process each time is dead-lettered, not redelivered for ever.

The predict stage here is a real process that exits (``os._exit``, as a native
crash would) on a poison row; the test plays the supervisor and restarts it, the
way ``toposerve up``, compose or Kubernetes would.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from brokers.settings import Settings
from tests.integration.conftest import Stack, start_stack
from tests.integration.test_direct_amqp import dead_letters
from tests.support.crashing_worker import CRASH_EXIT_CODE, POISON
from tests.support.processes import WorkerProcess


async def job(stack: Stack, job_id: str) -> dict:
    return (await stack.client.get(f"/v1/jobs/{job_id}")).json()


async def test_a_message_that_keeps_killing_its_stage_is_dead_lettered(settings: Settings, tmp_path: Path) -> None:
    settings = settings.model_copy(update={"max_crash_redeliveries": 2})
    async for stack in start_stack(settings, "asynchronous", stages=["preprocess", "store"]):
        predict = WorkerProcess(settings, "asynchronous", "predict", tmp_path, module="tests.support.crashing_worker")
        response = await stack.client.post("/v1/models/iris/predict", json={"instances": [[POISON, 3.0, 1.4, 0.2]]})
        assert response.status_code == 202
        poison_id = response.json()["id"]
        crashes = 0
        try:
            while (await job(stack, poison_id))["status"] == "pending":
                assert crashes <= 6, f"still crash-looping after {crashes} crashes:\n{predict.log()[-3000:]}"
                if predict.process is None or predict.process.poll() is not None:
                    if predict.process is not None:
                        assert predict.process.returncode == CRASH_EXIT_CODE, predict.log()[-3000:]
                        crashes += 1
                    predict.start()  # the supervisor's restart
                await asyncio.sleep(0.05)
            record = await job(stack, poison_id)
            assert record["status"] == "failed" and record["error"]["code"] == "internal", record
            assert "died 3 times while handling this message" in record["error"]["message"]
            # The first delivery and two redeliveries killed it; the third redelivery was dead-lettered.
            assert crashes == 3
            dead = await dead_letters(stack, expected=1)
            assert len(dead) == 1 and "died 3 times" in dead[0].headers["x-toposerve-reason"]
            assert dead[0].routing_key == "features.iris"
            # The stage that dead-lettered it is alive and serves the next requests.
            assert predict.process is not None and predict.process.poll() is None
            response = await stack.client.post("/v1/models/iris/predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]})
            good_id = response.json()["id"]
            deadline = time.monotonic() + 20
            while (record := await job(stack, good_id))["status"] == "pending" and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert record["status"] == "succeeded" and record["predictions"][0]["label"] == "setosa", record
            assert predict.process.poll() is None
        finally:
            predict.stop()


async def test_the_guard_counts_only_redeliveries_that_never_settled(redis_url: str, namespace: str) -> None:
    from types import SimpleNamespace

    from brokers.connections import connect_redis
    from consumers.crash_guard import RedeliveryGuard
    from deploy.local_services import free_port

    guard = RedeliveryGuard(connect_redis(redis_url), namespace, "q", limit=2)
    try:
        first = SimpleNamespace(redelivered=False, message_id="m1", body=b"{}")
        assert await guard.enter(first) is None  # first deliveries cost nothing
        again = SimpleNamespace(redelivered=True, message_id="m1", body=b"{}")
        key, count = await guard.enter(again)
        assert count == 1 and not guard.exceeded(count)
        assert (await guard.enter(again))[1] == 2  # the process died: it was never left
        assert guard.exceeded((await guard.enter(again))[1])
        await guard.leave(key)  # settled: the count starts again
        assert (await guard.enter(again))[1] == 1
        anonymous = SimpleNamespace(redelivered=True, message_id=None, body=b"some body")
        assert (await guard.enter(anonymous))[0] != key  # named by its body's hash
        assert 0 < await guard.client.ttl(key) <= guard.ttl_s
    finally:
        await guard.close()
    # Redis away: the guard steps aside (fail open) instead of stopping the stage.
    away = RedeliveryGuard(connect_redis(f"redis://127.0.0.1:{free_port()}/0"), namespace, "q", limit=2)
    try:
        assert await away.enter(SimpleNamespace(redelivered=True, message_id="m", body=b"")) is None
    finally:
        await away.close()
