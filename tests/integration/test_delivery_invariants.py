"""Invariants under process death: SIGKILL loses nothing, SIGTERM drains (real processes)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import pytest

from tests.integration.conftest import Stack, start_stack
from tests.support.faults import NO_HANG_S, DoneCounter, summary, wait_for_condition
from tests.support.images import b64, sample_images
from tests.support.processes import WorkerProcess
from toposerve.brokers.settings import Settings

# Kills and restarts services or stage processes: the slow part of the suite (`-m "not fault"` skips it).
pytestmark = pytest.mark.fault

ROWS = {"setosa": [5.1, 3.5, 1.4, 0.2], "versicolor": [5.9, 3.0, 4.2, 1.5], "virginica": [6.7, 3.0, 5.2, 2.3]}
N_JOBS = 1000


@pytest.fixture
async def ingress_only(settings: Settings) -> AsyncIterator[Stack]:
    async for stack in start_stack(settings, "asynchronous", stages=[]):
        yield stack
        if hasattr(stack, "_probe"):
            await stack._probe[0].close()


@pytest.fixture
def workers(settings: Settings, tmp_path: Path) -> Iterator[dict[str, WorkerProcess]]:
    procs = {stage: WorkerProcess(settings, "asynchronous", stage, tmp_path)
             for stage in ("preprocess", "predict", "store")}
    yield procs
    for proc in procs.values():
        proc.stop()


async def submit_jobs(stack: Stack, n: int) -> dict[str, str]:
    """n jobs, each one row of a known species; returns job id -> expected label."""
    labels = list(ROWS)

    async def one(i: int) -> tuple[str, str]:
        label = labels[i % 3]
        response = await stack.client.post("/v1/models/iris/predict", json={"instances": [ROWS[label]]})
        assert response.status_code == 202, response.text
        return response.json()["id"], label

    results = []
    for start in range(0, n, 100):
        results += await asyncio.gather(*(one(i) for i in range(start, min(n, start + 100))))
    return dict(results)


async def statuses(stack: Stack, ids: list[str]) -> dict[str, dict]:
    records = await asyncio.gather(*(stack.results.get(uuid.UUID(i)) for i in ids))
    return {i: r.model_dump(mode="json") for i, r in zip(ids, records, strict=True) if r is not None}


async def wait_until(predicate, timeout: float = 60, interval: float = 0.02) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await predicate():
            return
        await asyncio.sleep(interval)
    raise AssertionError("condition not reached in time")


async def count_done(stack: Stack, ids: list[str]) -> int:
    return sum(1 for r in (await statuses(stack, ids)).values() if r["status"] != "pending")


async def assert_all_succeeded_correctly(stack: Stack, expected: dict[str, str]) -> None:
    ids = list(expected)
    await wait_until(lambda: _all_done(stack, ids), timeout=90, interval=0.2)
    records = await statuses(stack, ids)
    assert len(records) == len(expected)
    for job_id, record in records.items():
        assert record["status"] == "succeeded", record
        assert [p["label"] for p in record["predictions"]] == [expected[job_id]]


async def _all_done(stack: Stack, ids: list[str]) -> bool:
    return await count_done(stack, ids) == len(ids)


@pytest.mark.parametrize("victim", ["preprocess", "predict", "store"])
async def test_sigkill_while_holding_unacked_messages_loses_nothing(
    ingress_only: Stack, workers: dict[str, WorkerProcess], victim: str
) -> None:
    """Every accepted job ends once (counted on the store's job-done announcements), correctly."""
    stack = ingress_only
    done = DoneCounter(stack.settings.redis_url, stack.results.done_channel).start()
    try:
        await _sigkill_victim(stack, workers, victim, done)
    finally:
        await done.close()


async def _sigkill_victim(stack: Stack, workers: dict[str, WorkerProcess], victim: str, done: DoneCounter) -> None:
    # Everything upstream of the victim runs first, so its queue fills with work.
    for stage in ("preprocess", "predict", "store"):
        if stage != victim:
            workers[stage].start()
    for stage in ("preprocess", "predict", "store"):
        if stage != victim:
            await asyncio.to_thread(workers[stage].wait_consuming)
    expected = await submit_jobs(stack, N_JOBS)
    ids = list(expected)

    await wait_until(lambda: _queue_full(stack, victim), timeout=120, interval=0.05)
    workers[victim].start()
    # Kill it as soon as it has taken deliveries: it holds unacked messages then.
    await wait_until(lambda: _queue_taken(stack, victim), timeout=120, interval=0.002)
    workers[victim].kill()
    done_at_kill = await count_done(stack, ids)
    assert done_at_kill < N_JOBS, "the victim finished everything before it was killed; nothing was tested"

    restarted_at = time.monotonic()
    workers[victim].start()
    # Bounded, and not asserted yet: the summary reports what was seen either way.
    ended = await wait_for_condition(lambda: _all_done(stack, ids), timeout=90, interval=0.2)
    recovered_s = None if ended is None else time.monotonic() - restarted_at
    await asyncio.sleep(0.5)  # announcements can lag the records a little
    records = await statuses(stack, ids)
    summary(f"sigkill {victim} asynchronous", sent=N_JOBS, accepted=len(expected),
            completed=sum(1 for r in records.values() if r["status"] == "succeeded"),
            lost=len(ids) - sum(1 for r in records.values() if r["status"] != "pending"),
            duplicated=done.duplicated(ids), recover_s=recovered_s, done_at_kill=done_at_kill)
    await assert_all_succeeded_correctly(stack, expected)
    assert done.duplicated(ids) == 0


async def _queue_taken(stack: Stack, stage: str) -> bool:
    """True once the stage's queue holds fewer ready messages than were sent to it."""
    return await ready_messages(stack, stage) < N_JOBS


async def _queue_full(stack: Stack, stage: str) -> bool:
    """True once every job's message waits in the stage's queue (upstream is done)."""
    return await ready_messages(stack, stage) == N_JOBS


async def ready_messages(stack: Stack, stage: str) -> int:
    channel = await _probe_channel(stack)
    queue = await channel.declare_queue(stack.profile.queue_spec(stack.settings.namespace, stage).name, passive=True)
    return queue.declaration_result.message_count


async def _probe_channel(stack: Stack) -> aio_pika.abc.AbstractChannel:
    # One connection for all probes: a passive declare on it takes about a millisecond.
    if not hasattr(stack, "_probe"):
        connection = await aio_pika.connect(stack.settings.amqp_url)
        stack._probe = (connection, await connection.channel())  # type: ignore[attr-defined]
    return stack._probe[1]  # type: ignore[attr-defined]


async def test_sigterm_drains_in_flight_work_and_exits_cleanly(
    ingress_only: Stack, workers: dict[str, WorkerProcess]
) -> None:
    stack = ingress_only
    for stage in ("preprocess", "store"):
        workers[stage].start()
    for stage in ("preprocess", "store"):
        await asyncio.to_thread(workers[stage].wait_consuming)
    expected = await submit_jobs(stack, N_JOBS)
    await wait_until(lambda: _queue_full(stack, "predict"), timeout=120, interval=0.05)
    workers["predict"].start()
    await wait_until(lambda: _queue_taken(stack, "predict"), timeout=120, interval=0.002)
    code = await asyncio.to_thread(workers["predict"].terminate)
    assert code == 0, workers["predict"].log()
    assert "stopped" in workers["predict"].log()
    # What it took before SIGTERM was finished and acked, or returned to the queue; a
    # second predict process finishes the rest and every job ends exactly once.
    workers["predict"].start()
    await assert_all_succeeded_correctly(stack, expected)


@pytest.mark.parametrize("victim", ["preprocess", "predict"])
@pytest.mark.parametrize("profile_name", ["synchronous", "prep_pred"])
async def test_sync_callers_get_an_answer_or_a_clear_error_when_a_stage_is_killed(
    settings: Settings, tmp_path: Path, profile_name: str, victim: str
) -> None:
    """Sync messages are transient: a killed stage costs in-flight callers a 504 at
    their deadline (never a hang), and the restarted stage serves the next ones."""
    # synchronous publishes rows straight to the predict stage: kill its preprocess
    # stage under image requests, which do pass through it.
    if profile_name == "synchronous" and victim == "predict":
        path, body, expected_label = "/v1/models/iris/predict", {"instances": [ROWS["setosa"]]}, "setosa"
    else:
        image, expected_label = sample_images()[0]
        path, body = "/v1/models/digits_fast/predict", {"image": b64(image.read_bytes())}
    async for stack in start_stack(settings, profile_name, stages=[]):
        procs = {stage: WorkerProcess(settings, profile_name, stage, tmp_path) for stage in stack.profile.stages}
        try:
            for proc in procs.values():
                proc.start()
            for proc in procs.values():
                await asyncio.to_thread(proc.wait_consuming)
            await stack.ingress.monitor.refresh()

            async def caller(stack: Stack = stack) -> list[tuple[int, float, str | None]]:
                calls = []
                for _ in range(40):
                    started = time.monotonic()
                    response = await stack.client.post(path, json=body, params={"timeout": "2"})
                    answer = response.json()["predictions"][0]["label"] if response.status_code == 200 else None
                    calls.append((response.status_code, time.monotonic() - started, answer))
                return calls

            callers = [asyncio.create_task(caller()) for _ in range(8)]
            await asyncio.sleep(0.3)
            procs[victim].kill()
            await asyncio.sleep(0.5)
            restarted_at = time.monotonic()
            procs[victim].start()
            await asyncio.to_thread(procs[victim].wait_consuming)
            consuming_after_s = time.monotonic() - restarted_at
            calls = [call for task in await asyncio.wait_for(asyncio.gather(*callers), 120) for call in task]
            statuses = [status for status, _, _ in calls]
            # Lost: a call answered neither by its deadline (2 s) nor soon after it.
            hung = [seconds for _, seconds, _ in calls if seconds > 2 + NO_HANG_S]
            wrong = [answer for status, _, answer in calls if status == 200 and answer != expected_label]
            assert set(statuses) <= {200, 503, 504}, statuses
            assert statuses.count(200) > 0
            await stack.ingress.monitor.refresh()
            response = await stack.client.post(path, json=body)
            assert response.status_code == 200
            # accepted: published by the ingress (200, or 504 at the deadline); duplicated is not
            # observable over HTTP (one response per call). recover: restart to consuming again.
            summary(f"sigkill {victim} {profile_name}", sent=len(calls),
                    accepted=statuses.count(200) + statuses.count(504), completed=statuses.count(200),
                    lost=len(hung), duplicated=None, recover_s=consuming_after_s,
                    refused_503=statuses.count(503), timed_out_504=statuses.count(504), wrong=len(wrong))
            assert not hung and not wrong, (hung, wrong)
        finally:
            for proc in procs.values():
                proc.stop()
