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
import contextlib
import json
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import pytest
import redis.asyncio as redis

from brokers.settings import Settings
from brokers.topology import exchange_name
from tests.conftest import FreshServices
from tests.integration.conftest import Stack, start_stack
from tests.support.processes import WorkerProcess

ROWS = {"setosa": [5.1, 3.5, 1.4, 0.2], "versicolor": [5.9, 3.0, 4.2, 1.5], "virginica": [6.7, 3.0, 5.2, 2.3]}
STAGES = ("preprocess", "predict", "store")


@pytest.fixture
def fault_settings(fresh_services: FreshServices, namespace: str) -> Settings:
    return Settings(amqp_url=fresh_services.amqp_url, redis_url=fresh_services.redis_url, namespace=namespace,
                    max_rows=100, max_body_bytes=256 * 1024, max_image_pixels=1_000_000, drain_timeout_s=5)


@pytest.fixture
def workers(fault_settings: Settings, tmp_path: Path) -> Iterator[dict[str, WorkerProcess]]:
    procs = {stage: WorkerProcess(fault_settings, "asynchronous", stage, tmp_path).start() for stage in STAGES}
    try:
        for proc in procs.values():
            proc.wait_consuming()
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.fixture
async def stack(fault_settings: Settings, workers: dict[str, WorkerProcess]) -> AsyncIterator[Stack]:
    async for stack in start_stack(fault_settings, "asynchronous", stages=[]):
        yield stack


# --------------------------------------------------------------------------- load and bookkeeping


@dataclass
class Sent:
    at: float
    status: int  # 0: the client gave up (a hang)
    seconds: float
    job_id: str | None
    label: str


@dataclass
class Load:
    """Steady load: one POST every ``interval_s``, at most ``max_requests`` and ``max_seconds``."""

    stack: Stack
    interval_s: float = 0.02
    max_requests: int = 1500
    max_seconds: float = 60.0
    client_timeout_s: float = 5.0
    sent: list[Sent] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task | None = None

    def start(self) -> Load:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        started = time.monotonic()
        pending: set[asyncio.Task] = set()
        i = 0
        while not self._stop.is_set() and i < self.max_requests and time.monotonic() - started < self.max_seconds:
            task = asyncio.create_task(self._one(list(ROWS)[i % 3]))
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)
        if pending:
            await asyncio.wait(pending)

    async def _one(self, label: str) -> None:
        at = time.monotonic()
        try:
            response = await asyncio.wait_for(
                self.stack.client.post("/v1/models/iris/predict", json={"instances": [ROWS[label]]}),
                self.client_timeout_s)
        except TimeoutError:
            self.sent.append(Sent(at, 0, time.monotonic() - at, None, label))
            return
        job_id = response.json().get("id") if response.status_code == 202 else None
        self.sent.append(Sent(at, response.status_code, time.monotonic() - at, job_id, label))

    def accepted(self) -> dict[str, str]:
        return {s.job_id: s.label for s in self.sent if s.status == 202 and s.job_id}

    def between(self, start: float, end: float) -> list[Sent]:
        return [s for s in self.sent if start <= s.at and s.at + s.seconds <= end]


class DoneCounter:
    """Counts the store's terminal-write announcements per job id; resubscribes after an outage."""

    def __init__(self, url: str, channel: str) -> None:
        self.url = url
        self.channel = channel
        self.counts: Counter[str] = Counter()
        self._task: asyncio.Task | None = None

    def start(self) -> DoneCounter:
        self._task = asyncio.create_task(self._run())
        return self

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            self.counts[message["data"].decode()] += 1
            except (redis.RedisError, OSError):
                await asyncio.sleep(0.2)
            finally:
                await client.aclose()


async def wait_until(predicate, timeout: float, interval: float = 0.1) -> float:
    """Seconds until ``predicate()`` held; fails after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await predicate():
            return time.monotonic() - started
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not reached within {timeout} s")


async def records(stack: Stack, ids: list[str]) -> dict[str, dict]:
    found = await asyncio.gather(*(stack.results.get(uuid.UUID(i)) for i in ids))
    return {i: r.model_dump(mode="json") for i, r in zip(ids, found, strict=True) if r is not None}


async def all_terminal(stack: Stack, ids: list[str]) -> bool:
    try:
        found = await records(stack, ids)
    except redis.RedisError:
        return False
    return len(found) == len(ids) and all(r["status"] != "pending" for r in found.values())


async def readyz(stack: Stack) -> tuple[int, dict]:
    response = await stack.client.get("/readyz")
    return response.status_code, response.json()


async def check_exactly_once(stack: Stack, load: Load, done: DoneCounter, name: str, recovered_s: float,
                             extra_ids: list[str] = ()) -> None:
    accepted = load.accepted()
    ids = [*accepted, *extra_ids]
    await wait_until(lambda: all_terminal(stack, ids), timeout=60, interval=0.25)
    found = await records(stack, ids)
    completed = sum(1 for r in found.values() if r["status"] == "succeeded")
    lost = len(ids) - len(found) + sum(1 for r in found.values() if r["status"] == "pending")
    # Announcements can lag the records a little; a Redis outage can hide some (never add any).
    await asyncio.sleep(0.5)
    duplicated = sum(c - 1 for i, c in done.counts.items() if i in set(ids) and c > 1)
    print(f"\n[fault {name}] sent={len(load.sent)} accepted={len(accepted)} extra={len(extra_ids)} "
          f"completed={completed} lost={lost} duplicated={duplicated} announced={len(done.counts)} "
          f"recover_s={recovered_s:.2f}")
    assert lost == 0
    assert duplicated == 0
    assert completed == len(ids), [r for r in found.values() if r["status"] != "succeeded"][:3]
    for job_id, label in accepted.items():
        assert [p["label"] for p in found[job_id]["predictions"]] == [label]


# --------------------------------------------------------------------------- scenarios


async def test_rabbitmq_sigkill_and_restart_loses_nothing(
    stack: Stack, fresh_services: FreshServices, workers: dict[str, WorkerProcess]
) -> None:
    done = DoneCounter(stack.settings.redis_url, stack.results.done_channel).start()
    await asyncio.sleep(0.2)
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
        killed_at = time.monotonic()
        await asyncio.to_thread(fresh_services.rabbitmq.kill)
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
        ready_after = await wait_until(lambda: _ready(stack), timeout=15)
        await asyncio.sleep(1.0)  # new requests keep being served
    finally:
        await load.stop()
    try:
        # During the outage (kill .. restart): answered, 503, quickly. Never a hang.
        during = load.between(killed_at + 0.2, restart_at)
        assert during, "no request was sent during the outage"
        assert {s.status for s in during} == {503}, Counter(s.status for s in during)
        slowest = max(s.seconds for s in during)
        assert slowest < 1.0, f"a POST took {slowest:.2f} s during the outage"
        assert any(s.status == 202 and s.at > recovered_at for s in load.sent), "no request served after recovery"
        # Also while the node boots and the ingress reconnects: 202 or a quick 503, never a hang.
        window = load.between(killed_at, recovered_at)
        assert {s.status for s in window} <= {202, 503}, Counter(s.status for s in window)
        slowest_window = max(s.seconds for s in window)
        assert slowest_window < 1.0, f"a POST took {slowest_window:.2f} s while the broker came back"
        print(f"\n[fault rabbitmq] jobs pending at the kill={pending_at_kill} "
              f"outage POSTs={len(during)} slowest={slowest:.3f}s "
              f"(kill..recovery: {len(window)} POSTs, slowest {slowest_window:.3f}s) "
              f"broker down {restart_at - killed_at:.1f}s, restart took {restarted_at - restart_at:.1f}s, "
              f"first 202 {recovered:.2f}s after restart, /readyz ok {ready_after:.2f}s later")
        for proc in workers.values():
            assert proc.process is not None and proc.process.poll() is None, proc.log()[-2000:]
        await check_exactly_once(stack, load, done, "rabbitmq", recovered)
    finally:
        await done.close()


async def _pending(stack: Stack, ids: list[str]) -> int:
    return sum(1 for r in (await records(stack, ids)).values() if r["status"] == "pending")


async def _ready(stack: Stack) -> bool:
    return (await readyz(stack))[0] == 200


async def test_redis_outage_store_requeues_and_results_appear_after(
    stack: Stack, fresh_services: FreshServices, workers: dict[str, WorkerProcess]
) -> None:
    done = DoneCounter(stack.settings.redis_url, stack.results.done_channel).start()
    await asyncio.sleep(0.2)
    load = Load(stack).start()
    direct: list[str] = []
    try:
        await asyncio.sleep(1.5)
        assert load.accepted()
        killed_at = time.monotonic()
        await asyncio.to_thread(fresh_services.redis.kill)
        # Work published by any client during the outage reaches the store, which cannot
        # store it: it must requeue it (not ack it), and store it once Redis is back.
        connection = await aio_pika.connect(stack.settings.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(exchange_name(stack.settings.namespace))
            for i in range(20):
                job_id = str(uuid.uuid4())
                direct.append(job_id)
                body = {"id": job_id, "model": "iris", "instances": [ROWS[list(ROWS)[i % 3]]]}
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
    try:
        during = load.between(killed_at + 0.2, restart_at)
        assert during and {s.status for s in during} == {503}, Counter(s.status for s in during)
        slowest = max(s.seconds for s in during)
        assert slowest < 1.5, f"a POST took {slowest:.2f} s during the Redis outage"
        print(f"\n[fault redis] outage POSTs={len(during)} slowest={slowest:.3f}s "
              f"redis down {restart_at - killed_at:.1f}s, store requeues={requeues}, first 202 {recovered:.2f}s after restart")
        for proc in workers.values():
            assert proc.process is not None and proc.process.poll() is None, proc.log()[-2000:]
        await check_exactly_once(stack, load, done, "redis", recovered, extra_ids=direct)
    finally:
        await done.close()
