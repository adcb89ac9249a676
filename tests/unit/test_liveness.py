"""A stage's liveness: /healthz on its metrics port says whether its event loop still turns."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry

from toposerve.consumers.liveness import LoopHeartbeat, LoopStalls
from toposerve.consumers.metrics import serve_metrics


def test_the_heartbeat_goes_stale_after_its_limit() -> None:
    now = [100.0]
    heartbeat = LoopHeartbeat(stale_after_s=30, clock=lambda: now[0])
    assert heartbeat.alive() and heartbeat.age_s() == 0
    now[0] += 30
    assert heartbeat.alive()
    now[0] += 0.5
    assert not heartbeat.alive()


async def test_healthz_answers_from_its_thread_503_while_the_loop_is_blocked_and_200_after() -> None:
    heartbeat = LoopHeartbeat(interval_s=0.05, stale_after_s=1.0)
    heartbeat.start()
    server = serve_metrics(CollectorRegistry(), 0, heartbeat=heartbeat)
    url = f"http://127.0.0.1:{server.server_port}/healthz"
    try:
        await asyncio.sleep(0.1)
        assert (await asyncio.to_thread(httpx.get, url, timeout=5)).status_code == 200
        seen: list[httpx.Response] = []
        probe = threading.Thread(target=lambda: (time.sleep(1.3), seen.append(httpx.get(url, timeout=5))))
        probe.start()
        time.sleep(1.8)  # the event loop is stuck: no beat, but the probe is answered
        probe.join()
        assert seen[0].status_code == 503 and seen[0].json()["status"] == "stuck", seen[0].text
        assert seen[0].json()["event_loop_seconds_since_beat"] > 1.0
        await asyncio.sleep(0.2)  # the loop turns again
        response = await asyncio.to_thread(httpx.get, url, timeout=5)
        assert response.status_code == 200 and response.json()["status"] == "ok"
        # Every other path is still the metrics.
        metrics = await asyncio.to_thread(httpx.get, url.replace("/healthz", "/metrics"), timeout=5)
        assert metrics.status_code == 200 and "text/plain" in metrics.headers["content-type"]
    finally:
        server.shutdown()
        server.server_close()
        await heartbeat.close()


def test_without_a_heartbeat_healthz_is_just_another_metrics_path() -> None:
    server = serve_metrics(CollectorRegistry(), 0)
    try:
        response = httpx.get(f"http://127.0.0.1:{server.server_port}/healthz", timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    assert response.status_code == 200 and "text/plain" in response.headers["content-type"]


def test_stalls_are_summed_over_the_window_asked_about() -> None:
    now = [100.0]
    stalls = LoopStalls(clock=lambda: now[0])
    stalls._last_wake = now[0]  # the watcher has just woken: nothing is stalling now
    stalls.record(ended=90.0, lasted=2.0)  # long before the window
    stalls.record(ended=99.0, lasted=3.0)  # began at 96: only its part after 97 counts
    stalls.record(ended=99.5, lasted=0.5)
    assert stalls.stalled_s(since=97.0) == pytest.approx(2.0 + 0.5)
    assert stalls.stalled_s(since=99.9) == 0.0


async def test_a_blocked_loop_is_measured_and_a_free_one_is_not() -> None:
    stalls = LoopStalls(tick_s=0.02)
    stalls.start()
    try:
        since = stalls.clock()
        await asyncio.sleep(0.3)
        assert stalls.stalled_s(since) < 0.1
        since = stalls.clock()
        time.sleep(0.5)  # a CPU-bound parse, say: the loop cannot turn
        await asyncio.sleep(0.1)
        assert 0.35 < stalls.stalled_s(since) < 0.7
    finally:
        await stalls.close()
