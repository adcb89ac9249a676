"""Fault injection for the sync profiles (synchronous, prep_pred): the broker dies, Redis goes away.

Sync requests are transient by design (a caller waits for its answer, nobody would
read it later), so the invariant is about callers: every call gets exactly one
answer, a correct 200, a quick 503 while the broker is away, or a 504 at its
deadline for work that was in flight when the broker died; never a hang. Then the
stages and the ingress reconnect by themselves and calls are answered again.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.conftest import FreshServices
from tests.integration.conftest import Stack, start_stack
from tests.support.faults import (
    NO_HANG_S,
    Load,
    Sent,
    digit_requests,
    iris_requests,
    is_ready,
    readyz,
    summary,
    wait_until,
)
from tests.support.processes import WorkerProcess, stage_processes
from toposerve.brokers.settings import Settings

# Kills and restarts services or stage processes: the slow part of the suite (`-m "not fault"` skips it).
pytestmark = pytest.mark.fault

DEADLINE_S = 2.0
# synchronous: rows (which skip its preprocess stage) and images (which do not).
REQUESTS = {"synchronous": lambda: [*iris_requests(), *digit_requests()[:3]], "prep_pred": digit_requests}


@pytest.fixture(params=sorted(REQUESTS))
def profile_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def stack(fault_settings: Settings, profile_name: str) -> AsyncIterator[Stack]:
    async for stack in start_stack(fault_settings, profile_name, stages=[]):
        yield stack


@pytest.fixture
def workers(stack: Stack, tmp_path: Path) -> Iterator[dict[str, WorkerProcess]]:
    with stage_processes(stack.settings, stack.profile.name, stack.profile.stages, tmp_path) as procs:
        yield procs


async def serving(stack: Stack, workers: dict[str, WorkerProcess]) -> Load:
    await stack.ingress.monitor.refresh()  # it has seen the stages' consumers
    load = Load(stack, REQUESTS[stack.profile.name](), params={"timeout": str(DEADLINE_S)},
                interval_s=0.02, client_timeout_s=DEADLINE_S + 3).start()
    await wait_until(lambda: _answered_after(load, 0.0), timeout=10, interval=0.05)
    return load


async def _answered_after(load: Load, since: float) -> bool:
    return any(s.status == 200 and s.at > since for s in load.sent)


def check_every_caller_answered(load: Load, scenario: str, recovered_s: float, **extra: object) -> None:
    """One answer per call: a correct 200, a 503, or a 504 at the deadline; never a hang."""
    hung = [s for s in load.sent if s.status == 0 or s.seconds > DEADLINE_S + NO_HANG_S]
    wrong = [s for s in load.sent if s.status == 200 and not s.correct]
    other = [s for s in load.sent if s.status not in (0, 200, 503, 504)]  # -1: the call raised
    statuses = load.statuses()
    # accepted: published by the ingress (answered 200, or 504 at the deadline); lost: no answer
    # at all; duplicated: not observable over HTTP (one response per call), shown as n/a.
    summary(f"{scenario} {load.stack.profile.name}", sent=len(load.sent), accepted=statuses[200] + statuses[504],
            completed=statuses[200], lost=len(hung), duplicated=None, recover_s=recovered_s,
            refused_503=statuses[503], timed_out_504=statuses[504], wrong=len(wrong), **extra)
    assert not hung, _describe(hung)
    assert not wrong, _describe(wrong)
    assert not other, _describe(other)


def _describe(sent: list[Sent]) -> str:
    return "; ".join(f"{s.status} after {s.seconds:.2f}s ({s.request.model}: {s.answer!r} for {s.request.label!r})"
                     for s in sent[:5])


async def test_rabbitmq_sigkill_and_restart_sync_callers_always_get_an_answer(
    stack: Stack, workers: dict[str, WorkerProcess], fresh_services: FreshServices
) -> None:
    load = await serving(stack, workers)
    try:
        await asyncio.to_thread(fresh_services.rabbitmq.kill)
        killed_at = time.monotonic()
        await asyncio.sleep(1.5)  # the outage; the load keeps coming
        status, body = await readyz(stack)
        assert status == 503 and not body["checks"]["broker"]["ok"], body
        restart_at = time.monotonic()
        await asyncio.to_thread(fresh_services.rabbitmq.restart)
        restarted_at = time.monotonic()
        recovered = await wait_until(lambda: _answered_after(load, restarted_at), timeout=30, interval=0.05)
        await wait_until(lambda: is_ready(stack), timeout=15)
        await asyncio.sleep(1.0)  # and keep being answered
        served_after = time.monotonic()
        await wait_until(lambda: _answered_after(load, served_after), timeout=5, interval=0.05)
    finally:
        await load.stop()
    during = load.between(killed_at + 0.2, restart_at)
    assert during, "no request was sent during the outage"
    assert set(load.statuses(during)) == {503}, load.statuses(during)
    slowest = max(s.seconds for s in during)
    assert slowest < NO_HANG_S, f"a POST took {slowest:.2f} s during the outage"
    for proc in workers.values():  # they reconnected by themselves
        assert proc.process is not None and proc.process.poll() is None, proc.log()[-2000:]
    check_every_caller_answered(load, "rabbitmq", recovered, outage_posts=len(during),
                                outage_slowest=f"{slowest:.3f}s", broker_down=f"{restart_at - killed_at:.1f}s")


async def test_redis_outage_does_not_stop_sync_answers_and_readyz_reports_it(
    stack: Stack, workers: dict[str, WorkerProcess], fresh_services: FreshServices
) -> None:
    """Redis holds no part of a sync answer, so calls keep being answered; /readyz says the store is away."""
    load = await serving(stack, workers)
    try:
        await asyncio.to_thread(fresh_services.redis.kill)
        killed_at = time.monotonic()
        await asyncio.sleep(1.5)
        status, body = await readyz(stack)
        assert status == 503 and not body["checks"]["redis"]["ok"] and body["checks"]["broker"]["ok"], body
        restart_at = time.monotonic()
        await asyncio.to_thread(fresh_services.redis.restart)
        recovered = await wait_until(lambda: is_ready(stack), timeout=15)
        await asyncio.sleep(0.5)
    finally:
        await load.stop()
    during = load.between(killed_at + 0.2, restart_at)
    assert during and set(load.statuses(during)) == {200}, load.statuses(during)
    check_every_caller_answered(load, "redis", recovered, outage_posts=len(during),
                                redis_down=f"{restart_at - killed_at:.1f}s")



@pytest.fixture
async def synchronous_stack(fault_settings: Settings) -> AsyncIterator[Stack]:
    async for stack in start_stack(fault_settings, "synchronous", stages=[]):
        yield stack


async def test_predict_sigkill_under_coalesced_load_answers_every_caller_once_and_right(
    synchronous_stack: Stack, tmp_path: Path
) -> None:
    """Concurrent callers travel many to a message (api/coalescing.py); killing the predict
    process while such messages are unacked must not lose or mix up any caller's answer."""
    stack = synchronous_stack
    rows = {"setosa": [5.1, 3.5, 1.4, 0.2], "virginica": [6.7, 3.0, 5.2, 2.3], "versicolor": [5.9, 3.0, 4.2, 1.5]}

    async def one(i: int) -> tuple[int, str, str | None]:
        label = list(rows)[i % 3]
        await asyncio.sleep(i * 0.002)  # a burst over ~1.6 s, hundreds in flight at once
        response = await stack.client.post("/v1/models/iris/predict", json={"instances": [rows[label]]},
                                           params={"timeout": "8"})
        answer = response.json()["predictions"][0]["label"] if response.status_code == 200 else None
        return response.status_code, label, answer

    with stage_processes(stack.settings, "synchronous", ["predict"], tmp_path) as procs:
        predict = procs["predict"]
        await stack.ingress.monitor.refresh()
        calls = [asyncio.create_task(one(i)) for i in range(800)]
        await asyncio.sleep(0.4)
        await asyncio.to_thread(predict.kill)
        killed_at, in_flight_at_kill = time.monotonic(), stack.ingress.replies.in_flight
        predict.start()
        await asyncio.to_thread(predict.wait_consuming)
        consuming_again_s = time.monotonic() - killed_at
        results = await asyncio.wait_for(asyncio.gather(*calls), 30)  # a hang fails here
    coalescer = stack.ingress._coalescers["iris"]
    statuses = Counter(status for status, _, _ in results)
    wrong = [(label, answer) for status, label, answer in results if status == 200 and answer != label]
    summary("predict sigkill, coalesced synchronous", sent=len(results),
            accepted=statuses[200] + statuses[504], completed=statuses[200], lost=0, duplicated=None,
            recover_s=consuming_again_s,
            late_replies=stack.ingress.replies.late_replies, messages=coalescer.messages, jobs=coalescer.jobs,
            refused_503=statuses[503], timed_out_504=statuses[504], wrong=len(wrong),
            in_flight_at_kill=in_flight_at_kill)
    assert not wrong, wrong[:5]
    assert set(statuses) <= {200, 503, 504}, statuses
    assert statuses[200] > 0 and in_flight_at_kill > 0 and coalescer.messages < coalescer.jobs
