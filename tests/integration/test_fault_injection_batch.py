"""Fault injection for the batch profile: the broker dies and Redis goes away mid-batch.

A large batch is in flight (chunks queued for predict, predictions queued for the
store) while small batches keep arriving over HTTP (the steady load). RabbitMQ is
SIGKILLed, or Redis is killed, and restarted; then every accepted batch must end
``succeeded`` with every row predicted once and correctly: chunks are persistent in
durable queues, the store acks a chunk only once it is written, and progress is
counted once per chunk.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as redis

from tests.conftest import FreshServices
from tests.integration.conftest import Stack, start_stack
from tests.support.batches import IRIS_HEADER, iris_rows, onnx_labels, read_results
from tests.support.faults import NO_HANG_S, SteadyLoad, is_ready, readyz, summary, wait_for_condition, wait_until
from tests.support.processes import WorkerProcess, stage_processes
from toposerve.brokers.settings import Settings

# Kills and restarts services or stage processes: the slow part of the suite (`-m "not fault"` skips it).
pytestmark = pytest.mark.fault

BIG_ROWS, SMALL_ROWS, CHUNK_ROWS = 50_000, 20, 10


@pytest.fixture
async def stack(fault_settings: Settings) -> AsyncIterator[Stack]:
    # The preprocess stage runs in-process (batches skip it, single requests need it): a profile
    # is ready only when every stage of it consumes.
    async for stack in start_stack(fault_settings, "batch", stages=["preprocess"]):
        yield stack


@pytest.fixture
def workers(stack: Stack, tmp_path: Path) -> Iterator[dict[str, WorkerProcess]]:
    # Batches skip preprocess: chunks go straight to features.<model>.
    with stage_processes(stack.settings, "batch", ("predict", "store"), tmp_path) as procs:
        yield procs


def csv_body(rows: np.ndarray) -> bytes:
    return ("\n".join([IRIS_HEADER, *(",".join(f"{v:g}" for v in row) for row in rows)]) + "\n").encode()


@dataclass
class Upload:
    at: float
    status: int  # 0: no answer in time (a hang)
    seconds: float
    batch_id: str | None
    rows: np.ndarray


class BatchLoad(SteadyLoad):
    """Small CSV batches over HTTP, one every ``interval_s``: the steady load of the batch profile."""

    def __init__(self, stack: Stack, interval_s: float = 0.1, client_timeout_s: float = 5.0) -> None:
        super().__init__(interval_s)
        self.stack = stack
        self.client_timeout_s = client_timeout_s
        self.uploads: list[Upload] = []

    async def _one(self, i: int) -> None:
        self.uploads.append(await upload(self.stack, iris_rows(SMALL_ROWS, seed=1000 + i), self.client_timeout_s))

    def accepted(self) -> list[Upload]:
        return [u for u in self.uploads if u.status == 202]

    def between(self, start: float, end: float) -> list[Upload]:
        return [u for u in self.uploads if start <= u.at and u.at + u.seconds <= end]


async def upload(stack: Stack, rows: np.ndarray, timeout_s: float = 60.0, chunk_rows: int = CHUNK_ROWS) -> Upload:
    at = time.monotonic()
    try:
        response = await asyncio.wait_for(
            stack.client.post(f"/v1/batches?model=iris&chunk_rows={chunk_rows}", content=csv_body(rows),
                              headers={"content-type": "text/csv"}),
            timeout_s)
    except TimeoutError:
        return Upload(at, 0, time.monotonic() - at, None, rows)
    except Exception:  # recorded, never lost: -1 fails the status checks with the rest
        return Upload(at, -1, time.monotonic() - at, None, rows)
    batch_id = response.json()["id"] if response.status_code == 202 else None
    return Upload(at, response.status_code, time.monotonic() - at, batch_id, rows)


async def batch_status(stack: Stack, batch_id: str) -> dict | None:
    try:
        response = await stack.client.get(f"/v1/batches/{batch_id}")
    except redis.RedisError:
        return None
    return response.json() if response.status_code == 200 else None


async def big_batch_in_flight(stack: Stack, store: WorkerProcess) -> tuple[Upload, dict]:
    """A large batch whose chunks are all queued, with the store frozen (SIGSTOP): nothing of it
    is stored yet, whatever the machine's speed. The caller resumes the store (SIGCONT)."""
    assert store.process is not None
    store.process.send_signal(signal.SIGSTOP)
    big = await upload(stack, iris_rows(BIG_ROWS, seed=7))
    assert big.status == 202 and big.batch_id is not None
    await asyncio.sleep(0.5)  # predict works through the chunks; predictions pile up for the store
    status = await batch_status(stack, big.batch_id)
    assert status is not None and status["chunks_done"] < status["chunks"], status
    return big, status


async def check_every_row_once(stack: Stack, load: BatchLoad, big: Upload, scenario: str, recovered_s: float,
                               **extra: object) -> None:
    batches = [big, *load.accepted()]

    async def all_ended() -> bool:
        statuses = await asyncio.gather(*(batch_status(stack, b.batch_id) for b in batches))
        return all(s is not None and s["state"] != "running" for s in statuses)

    await wait_for_condition(all_ended, timeout=90, interval=0.5)  # reported below, then asserted
    statuses = {b.batch_id: await batch_status(stack, b.batch_id) for b in batches}
    rows_accepted = sum(s["total"] for s in statuses.values())
    rows_done = sum(s["done"] for s in statuses.values())
    # A chunk stored twice would push chunks_done past chunks (the store's script counts
    # each chunk once; this catches it if it did not). Lost: rows not ended after the wait.
    duplicated = sum(max(0, s["chunks_done"] - s["chunks"]) for s in statuses.values())
    lost = sum(s["total"] - s["done"] - s["failed"] for s in statuses.values())
    summary(f"{scenario} batch", sent=len(load.uploads) + 1, accepted=len(batches), completed=sum(
        1 for s in statuses.values() if s["state"] == "succeeded"), lost=lost, duplicated=duplicated,
        recover_s=recovered_s, rows_accepted=rows_accepted, rows_done=rows_done,
        uploads=dict(Counter(u.status for u in load.uploads)), **extra)
    assert duplicated == 0
    assert lost == 0
    for b in batches:
        status = statuses[b.batch_id]
        assert (status["state"], status["done"], status["failed"], status["chunks_done"]) == \
            ("succeeded", len(b.rows), 0, status["chunks"]), status
        lines = await read_results(stack, b.batch_id)
        assert [line["row"] for line in lines] == list(range(len(b.rows)))
        assert [line["label"] for line in lines] == onnx_labels(stack.settings, "iris", b.rows)


def assert_quick_503s(uploads: list[Upload], limit_s: float) -> float:
    assert uploads, "no upload was sent during the outage"
    assert {u.status for u in uploads} == {503}, Counter(u.status for u in uploads)
    slowest = max(u.seconds for u in uploads)
    assert slowest < limit_s, f"an upload took {slowest:.2f} s during the outage"
    return slowest


async def test_rabbitmq_sigkill_mid_batch_loses_no_row(
    stack: Stack, workers: dict[str, WorkerProcess], fresh_services: FreshServices
) -> None:
    load = BatchLoad(stack).start()
    try:
        # The broker dies holding persistent chunks and predictions of the big batch (the
        # store was frozen, so none was stored yet).
        big, at_kill = await big_batch_in_flight(stack, workers["store"])
        await asyncio.to_thread(fresh_services.rabbitmq.kill)
        killed_at = time.monotonic()
        workers["store"].process.send_signal(signal.SIGCONT)
        await asyncio.sleep(1.5)
        status, body = await readyz(stack)
        assert status == 503 and not body["checks"]["broker"]["ok"], body
        restart_at = time.monotonic()
        await asyncio.to_thread(fresh_services.rabbitmq.restart)
        restarted_at = time.monotonic()

        async def accepting() -> bool:
            return any(u.status == 202 and u.at > restarted_at for u in load.uploads)

        recovered = await wait_until(accepting, timeout=30, interval=0.05)
        await wait_until(lambda: is_ready(stack), timeout=15)
        await asyncio.sleep(1.0)
    finally:
        await load.stop()
    slowest = assert_quick_503s(load.between(killed_at + 0.2, restart_at), limit_s=NO_HANG_S)
    assert not [u for u in load.uploads if u.status not in (202, 503)], Counter(u.status for u in load.uploads)
    for proc in workers.values():  # they reconnected by themselves
        assert proc.process is not None and proc.process.poll() is None, proc.log()[-2000:]
    await check_every_row_once(stack, load, big, "rabbitmq", recovered, chunks_done_at_kill=at_kill["chunks_done"],
                               chunks=at_kill["chunks"], outage_slowest=f"{slowest:.3f}s")


async def test_redis_outage_mid_batch_store_requeues_and_loses_no_row(
    stack: Stack, workers: dict[str, WorkerProcess], fresh_services: FreshServices
) -> None:
    load = BatchLoad(stack).start()
    try:
        big, at_kill = await big_batch_in_flight(stack, workers["store"])
        await asyncio.to_thread(fresh_services.redis.kill)
        killed_at = time.monotonic()
        workers["store"].process.send_signal(signal.SIGCONT)  # now it cannot store: it must requeue

        async def store_requeued() -> bool:
            return "dependency unavailable" in workers["store"].log()

        await wait_until(store_requeued, timeout=15)
        await asyncio.sleep(1.5)  # the store keeps requeueing and acks nothing
        status, body = await readyz(stack)
        assert status == 503 and not body["checks"]["redis"]["ok"] and body["checks"]["broker"]["ok"], body
        restart_at = time.monotonic()
        await asyncio.to_thread(fresh_services.redis.restart)
        restarted_at = time.monotonic()

        async def accepting() -> bool:
            return any(u.status == 202 and u.at > restarted_at for u in load.uploads)

        recovered = await wait_until(accepting, timeout=30, interval=0.05)
        await asyncio.sleep(1.0)
    finally:
        await load.stop()
    slowest = assert_quick_503s(load.between(killed_at + 0.2, restart_at), limit_s=NO_HANG_S)
    assert not [u for u in load.uploads if u.status not in (202, 503)], Counter(u.status for u in load.uploads)
    for proc in workers.values():
        assert proc.process is not None and proc.process.poll() is None, proc.log()[-2000:]
    await check_every_row_once(stack, load, big, "redis", recovered, chunks_done_at_kill=at_kill["chunks_done"],
                               store_requeues=workers["store"].log().count("dependency unavailable"),
                               outage_slowest=f"{slowest:.3f}s")
