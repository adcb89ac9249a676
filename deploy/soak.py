"""``toposerve bench --soak``: a profile held at a steady fraction of its capacity, watched for growth.

First a short closed-loop run at concurrency 64 measures capacity; then an open-loop
generator sends requests at ``fraction`` of it (Poisson arrivals are not needed to
see leaks: a fixed rate is easier to read) for ``minutes``. Every ``interval_s`` it
records throughput, p50/p99, errors, the RSS of every process of the profile and the
depth of every stage queue; at the end it flags RSS that grew by more than 20 % from
the first to the last quarter, and queues that kept growing. Runs by hand, not in CI.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aio_pika
import aiohttp
import numpy as np
import orjson
from pydantic import BaseModel

from toposerve.brokers import Settings
from toposerve.deploy.launcher import Say, Supervisor, running_profile
from toposerve.deploy.local_services import free_port
from toposerve.deploy.profile import Profile
from toposerve.producers import one_job, run_closed_loop


class SoakInterval(BaseModel):
    at_s: float
    sent: int
    completed: int
    errors: int
    throughput_rps: float
    p50_ms: float
    p99_ms: float
    rss_mib: dict[str, float]
    queue_depths: dict[str, int]


class SoakReport(BaseModel):
    profile: str
    capacity_rps: float
    target_rps: float
    minutes: float
    intervals: list[SoakInterval]
    flags: list[str]


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def growth_flags(intervals: list[SoakInterval]) -> list[str]:
    """Pure: RSS up > 20 % from the first to the last quarter; queues deeper at the end than ever before."""
    flags: list[str] = []
    if len(intervals) < 4:
        return flags
    quarter = max(1, len(intervals) // 4)
    for name in intervals[0].rss_mib:
        first = np.mean([i.rss_mib.get(name, 0) for i in intervals[:quarter]])
        last = np.mean([i.rss_mib.get(name, 0) for i in intervals[-quarter:]])
        if first > 0 and last > first * 1.2:
            flags.append(f"RSS of {name} grew from {first:.0f} to {last:.0f} MiB")
    for name in intervals[0].queue_depths:
        depths = [i.queue_depths.get(name, 0) for i in intervals]
        if depths[-1] > 100 and depths[-1] >= max(depths[:-1]):
            flags.append(f"queue {name} kept growing (last depth {depths[-1]})")
    return flags


async def _soak(base_url: str, path: str, payload: dict, mode: str, target_rps: float, minutes: float,
                interval_s: float, supervisor: Supervisor, settings: Settings, profile: Profile,
                say: Say) -> list[SoakInterval]:
    body = orjson.dumps(payload)
    latencies: list[float] = []
    counts = {"sent": 0, "completed": 0, "errors": 0}
    intervals: list[SoakInterval] = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    stop_at = start + minutes * 60
    in_flight: set[asyncio.Task] = set()
    connector = aiohttp.TCPConnector(limit=512)
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        connection = await aio_pika.connect(settings.amqp_url)
        channel = await connection.channel()

        async def one() -> None:
            began = loop.time()
            try:
                ok = await one_job(session, path, body, mode)
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                counts["completed"] += 1
                latencies.append(loop.time() - began)
            else:
                counts["errors"] += 1

        async def sample(at: float) -> None:
            depths = {}
            for name in profile.stages:
                queue = await channel.declare_queue(profile.queue_spec(settings.namespace, name).name, passive=True)
                depths[name] = queue.declaration_result.message_count
            window = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
            interval = SoakInterval(
                at_s=round(at, 1), sent=counts["sent"], completed=counts["completed"], errors=counts["errors"],
                throughput_rps=round(counts["completed"] / interval_s, 1),
                p50_ms=round(float(np.percentile(window, 50)), 2), p99_ms=round(float(np.percentile(window, 99)), 2),
                rss_mib={c.name: rss_mib(c.process.pid) for c in supervisor.children if c.process is not None},
                queue_depths=depths,
            )
            intervals.append(interval)
            say(f"soak {interval.at_s:6.0f}s: {interval.throughput_rps:7.1f} req/s, p99 {interval.p99_ms:7.1f} ms, "
                f"errors {interval.errors}, rss {interval.rss_mib}, queues {depths}")
            latencies.clear()
            for key in counts:
                counts[key] = 0

        next_sample = start + interval_s
        step = 1.0 / target_rps
        next_send = start
        while (now := loop.time()) < stop_at:
            if now >= next_send:
                task = asyncio.create_task(one())
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                counts["sent"] += 1
                next_send += step
            if now >= next_sample:
                await sample(now - start)
                next_sample += interval_s
            await asyncio.sleep(max(0.0, min(next_send, next_sample) - loop.time()))
        if in_flight:
            await asyncio.wait(in_flight, timeout=30)
        await connection.close()
    return intervals


def run_soak(profile: Profile, profile_arg: str, settings: Settings, *, model: str, minutes: float,
             fraction: float, interval_s: float, out: Path | None, say: Say) -> SoakReport:
    payload = {"instances": [[5.1, 3.5, 1.4, 0.2]]}
    path = f"/v1/models/{model}/predict"
    with running_profile(profile, profile_arg, settings, "127.0.0.1", free_port(), say) as (base_url, supervisor):
        say("measuring capacity (closed loop, concurrency 64, 15 s) ...")
        capacity, _ = asyncio.run(run_closed_loop(base_url, path, payload, mode=profile.ingress.mode,
                                                  concurrency=64, duration_s=15))
        target = max(1.0, capacity.throughput_rps * fraction)
        say(f"capacity {capacity.throughput_rps:.0f} req/s; soaking at {target:.0f} req/s for {minutes:g} min ...")
        started = time.monotonic()
        intervals = asyncio.run(_soak(base_url, path, payload, profile.ingress.mode, target, minutes, interval_s,
                                      supervisor, settings, profile, say))
        say(f"soak done in {time.monotonic() - started:.0f} s")
    report = SoakReport(profile=profile.name, capacity_rps=capacity.throughput_rps, target_rps=round(target, 1),
                        minutes=minutes, intervals=intervals, flags=growth_flags(intervals))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report.model_dump_json(indent=2))
    return report
