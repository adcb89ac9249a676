"""A closed-loop HTTP load generator: N workers, each sends its next request when the last one ends.

For async profiles one "request" is the whole job: the POST, then a long-poll of
its result, so latency is what a caller waits for an answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import numpy as np
import orjson
from pydantic import BaseModel

_JSON = {"content-type": "application/json"}


class LatencySummary(BaseModel):
    requests: int
    errors: int
    duration_s: float
    throughput_rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float


def summarize(latencies_s: list[float], errors: int, duration_s: float) -> LatencySummary:
    """Pure: latencies of successful requests -> throughput and percentiles (ms)."""
    if not latencies_s:
        return LatencySummary(requests=0, errors=errors, duration_s=duration_s, throughput_rps=0.0,
                              p50_ms=0.0, p90_ms=0.0, p99_ms=0.0, mean_ms=0.0, max_ms=0.0)
    ms = np.asarray(latencies_s) * 1000
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return LatencySummary(
        requests=len(latencies_s), errors=errors, duration_s=round(duration_s, 3),
        throughput_rps=round(len(latencies_s) / duration_s, 1),
        p50_ms=round(float(p50), 3), p90_ms=round(float(p90), 3), p99_ms=round(float(p99), 3),
        mean_ms=round(float(ms.mean()), 3), max_ms=round(float(ms.max()), 3),
    )


@dataclass
class _Tally:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)


async def one_job(session: aiohttp.ClientSession, path: str, body: bytes, mode: str) -> bool:
    async with session.post(path, data=body, headers=_JSON) as response:
        await response.read()
        if mode != "async":
            return response.status == 200
        if response.status != 202:
            return False
        location = response.headers["location"]
    while True:
        async with session.get(location, params={"wait": "10"}) as result:
            payload = await result.read()
            if result.status == 200:
                return orjson.loads(payload).get("status") == "succeeded"
            if result.status != 202:
                return False


async def run_closed_loop(
    base_url: str, path: str, payload: dict | Callable[[], dict], *, mode: str, concurrency: int,
    duration_s: float, warmup_s: float = 1.0,
    on_window: tuple[Callable[[], None], Callable[[], None]] | None = None,
) -> tuple[LatencySummary, list[str]]:
    """Send requests from ``concurrency`` workers for ``duration_s`` (after a warm-up); summarize.

    ``payload`` is one body for every request, or a function making each request's body
    (e.g. unique inputs, so a prediction cache never hits). ``on_window``: called when the
    measured window opens and when it closes (e.g. to read CPU counters over exactly it).
    """
    # aiohttp, not httpx: at 64 connections httpx's pool costs more CPU than the
    # server under test, and the generator shares the server's cores.
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    fixed = None if callable(payload) else orjson.dumps(payload)
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as session:
        tally = _Tally()
        loop = asyncio.get_running_loop()
        measure_from = loop.time() + warmup_s
        stop_at = measure_from + duration_s
        if on_window is not None:
            loop.call_at(measure_from, on_window[0])
            loop.call_at(stop_at, on_window[1])

        async def worker() -> None:
            while (start := loop.time()) < stop_at:
                try:
                    body = fixed if fixed is not None else orjson.dumps(payload())
                    ok = await one_job(session, path, body, mode)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    ok = False
                    if len(tally.error_samples) < 5:
                        tally.error_samples.append(f"{type(exc).__name__}: {exc}")
                end = loop.time()
                if start < measure_from or end > stop_at:
                    continue  # only requests wholly inside the window count
                if ok:
                    tally.latencies.append(end - start)
                else:
                    tally.errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarize(tally.latencies, tally.errors, duration_s), tally.error_samples


def run_in_process_baseline(run_once, duration_s: float, warmup_s: float = 0.5) -> LatencySummary:
    """The floor: the same model called directly, one request at a time, no broker, no HTTP."""
    deadline = time.perf_counter() + warmup_s
    while time.perf_counter() < deadline:
        run_once()
    latencies: list[float] = []
    start = time.perf_counter()
    stop_at = start + duration_s
    while (before := time.perf_counter()) < stop_at:
        run_once()
        latencies.append(time.perf_counter() - before)
    return summarize(latencies, 0, time.perf_counter() - start)
