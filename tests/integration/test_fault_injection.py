"""Fault injection under a steady load: the broker is SIGKILLed, Redis goes away, and nothing is lost.

Each test has its own RabbitMQ and Redis (``fresh_services``, append-only Redis),
real stage processes (``toposerve worker``) and an in-process ingress. A background
task submits requests continuously (bounded in count and time, loopback only) while
a service is killed and restarted; then every accepted job must end exactly once.
Terminal writes are counted on the store's ``job-done`` channel (the store announces
each write there), so a job written twice would show up as a duplicate.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import pytest

from tests.conftest import FreshServices
from tests.integration.conftest import Stack, start_stack
from tests.support.faults import (
    IRIS_ROWS,
    NO_HANG_S,
    DoneCounter,
    Load,
    check_exactly_once,
    is_ready,
    readyz,
    records,
    wait_until,
)
from tests.support.processes import WorkerProcess, stage_processes
from toposerve.brokers.settings import Settings
from toposerve.brokers.topology import exchange_name

# Kills and restarts services or stage processes: the slow part of the suite (`-m "not fault"` skips it).
pytestmark = pytest.mark.fault

STAGES = ("preprocess", "predict", "store")


@pytest.fixture
def workers(fault_settings: Settings, tmp_path: Path) -> Iterator[dict[str, WorkerProcess]]:
    with stage_processes(fault_settings, "asynchronous", STAGES, tmp_path) as procs:
        yield procs


@pytest.fixture
async def stack(fault_settings: Settings, workers: dict[str, WorkerProcess]) -> AsyncIterator[Stack]:
    async for stack in start_stack(fault_settings, "asynchronous", stages=[]):
        yield stack


@pytest.fixture
async def done(stack: Stack) -> AsyncIterator[DoneCounter]:
    counter = DoneCounter(stack.settings.redis_url, stack.results.done_channel).start()
    await asyncio.sleep(0.2)  # subscribed before any job ends
    try:
        yield counter
    finally:
        await counter.close()


# --------------------------------------------------------------------------- scenarios


async def test_rabbitmq_sigkill_and_restart_loses_nothing(
    stack: Stack, fresh_services: FreshServices, workers: dict[str, WorkerProcess], done: DoneCounter
) -> None:
    load = Load(stack).start()
    try:
        await asyncio.sleep(1.0)
        assert load.accepted(), [s.status for s in load.sent][:5]
        # Freeze the store so finished work piles up in its durable queue: the broker then
        # dies holding persistent messages of accepted jobs (and the store, unacked ones).
        store = workers["store"].process
        assert store is not None
        store.send_signal(signal.SIGSTOP)
        await asyncio.sleep(0.5)
        pending_at_kill = await _pending(stack, list(load.accepted()))
        await asyncio.to_thread(fresh_services.rabbitmq.kill)
        killed_at = time.monotonic()  # after: finding the node's processes takes a moment
        store.send_signal(signal.SIGCONT)
        assert pending_at_kill > 0, "every job had ended before the kill; nothing was tested"
        await asyncio.sleep(1.5)  # the outage; the load keeps coming
        status, body = await readyz(stack)
        assert status == 503 and not body["checks"]["broker"]["ok"], body
        restart_at = time.monotonic()
        await asyncio.to_thread(fresh_services.rabbitmq.restart)
        restarted_at = time.monotonic()

        async def accepting() -> bool:
            return any(s.status == 202 and s.at > restarted_at for s in load.sent)

        recovered = await wait_until(accepting, timeout=30)
        recovered_at = time.monotonic()
        ready_after = await wait_until(lambda: is_ready(stack), timeout=15)
        await asyncio.sleep(1.0)  # new requests keep being served
    finally:
        await load.stop()
    # During the outage (kill .. restart): answered, 503, quickly. Never a hang.
    during = load.between(killed_at + 0.2, restart_at)
    assert during, "no request was sent during the outage"
    assert {s.status for s in during} == {503}, Counter(s.status for s in during)
    slowest = max(s.seconds for s in during)
    assert slowest < NO_HANG_S, f"a POST took {slowest:.2f} s during the outage"
    assert any(s.status == 202 and s.at > recovered_at for s in load.sent), "no request served after recovery"
    # Also while the node boots and the ingress reconnects: 202 or a quick 503, never a hang.
    window = load.between(killed_at, recovered_at)
    assert {s.status for s in window} <= {202, 503}, Counter(s.status for s in window)
    slowest_window = max(s.seconds for s in window)
    assert slowest_window < NO_HANG_S, f"a POST took {slowest_window:.2f} s while the broker came back"
    print(f"\n[fault rabbitmq asynchronous, timeline] jobs pending at the kill={pending_at_kill} "
          f"outage POSTs={len(during)} slowest={slowest:.3f}s "
          f"(kill..recovery: {len(window)} POSTs, slowest {slowest_window:.3f}s) "
          f"broker down {restart_at - killed_at:.1f}s, restart took {restarted_at - restart_at:.1f}s, "
          f"first 202 {recovered:.2f}s after restart, /readyz ok {ready_after:.2f}s later")
    for proc in workers.values():
        assert proc.process is not None and proc.process.poll() is None, proc.log()[-2000:]
    await check_exactly_once(stack, load, done, "rabbitmq asynchronous", recovered)


async def _pending(stack: Stack, ids: list[str]) -> int:
    return sum(1 for r in (await records(stack, ids)).values() if r["status"] == "pending")


async def test_redis_outage_store_requeues_and_results_appear_after(
    stack: Stack, fresh_services: FreshServices, workers: dict[str, WorkerProcess], done: DoneCounter
) -> None:
    load = Load(stack).start()
    direct: list[str] = []
    try:
        await asyncio.sleep(1.5)
        assert load.accepted()
        await asyncio.to_thread(fresh_services.redis.kill)
        killed_at = time.monotonic()
        # Work published by any client during the outage reaches the store, which cannot
        # store it: it must requeue it (not ack it), and store it once Redis is back.
        connection = await aio_pika.connect(stack.settings.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(exchange_name(stack.settings.namespace))
            for i in range(20):
                job_id = str(uuid.uuid4())
                direct.append(job_id)
                body = {"id": job_id, "model": "iris", "instances": [IRIS_ROWS[list(IRIS_ROWS)[i % 3]]]}
                await exchange.publish(aio_pika.Message(json.dumps(body).encode(), message_id=job_id,
                                                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                                       "request.iris")

        async def store_requeued() -> bool:
            return "dependency unavailable" in workers["store"].log()

        await wait_until(store_requeued, timeout=15)
        await asyncio.sleep(2.0)  # a longer outage: the store keeps requeueing, acks nothing
        requeues = workers["store"].log().count("dependency unavailable")
        status, body = await readyz(stack)
        assert status == 503 and not body["checks"]["redis"]["ok"] and body["checks"]["broker"]["ok"], body
        restart_at = time.monotonic()
        await asyncio.to_thread(fresh_services.redis.restart)
        restarted_at = time.monotonic()

        async def accepting() -> bool:
            return any(s.status == 202 and s.at > restarted_at for s in load.sent)

        recovered = await wait_until(accepting, timeout=30)
        await asyncio.sleep(1.0)
    finally:
        await load.stop()
    during = load.between(killed_at + 0.2, restart_at)
    assert during and {s.status for s in during} == {503}, Counter(s.status for s in during)
    slowest = max(s.seconds for s in during)
    assert slowest < NO_HANG_S, f"a POST took {slowest:.2f} s during the Redis outage"
    print(f"\n[fault redis asynchronous, timeline] outage POSTs={len(during)} slowest={slowest:.3f}s "
          f"redis down {restart_at - killed_at:.1f}s, store requeues={requeues}, first 202 {recovered:.2f}s after restart")
    for proc in workers.values():
        assert proc.process is not None and proc.process.poll() is None, proc.log()[-2000:]
    await check_exactly_once(stack, load, done, "redis asynchronous", recovered, extra_ids=direct)
