"""``toposerve bench``: start a profile, load it at each concurrency, compare with baselines.

Figures, not assertions: the load generator shares the machine's cores with the
server, so read ratios against the baselines measured in the same run.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel

from toposerve.brokers import Settings
from toposerve.deploy.components import models_dir
from toposerve.deploy.launcher import Say, running_profile
from toposerve.deploy.local_services import free_port, port_answers
from toposerve.deploy.proc_cpu import CpuMeter, pid_listening_on
from toposerve.deploy.proc_cpu import available as proc_cpu_available
from toposerve.deploy.profile import Profile
from toposerve.models import InputLimits, ModelRegistry, rows_to_features, to_row_predictions
from toposerve.producers import LatencySummary, run_closed_loop, run_in_process_baseline

IRIS_ROW = [5.1, 3.5, 1.4, 0.2]
PLAIN = "plain_fastapi_ort"  # the plain FastAPI + ONNX Runtime server (deploy/baseline_server.py)
CELERY = "fastapi_celery"  # FastAPI + Celery, RabbitMQ broker, Redis backend (deploy/celery_baseline.py)


class BenchRun(BaseModel):
    target: str
    concurrency: int
    repetition: int = 0
    summary: LatencySummary
    # CPU milliseconds per answered request, per process (role), over the measured window.
    cpu_ms_per_request: dict[str, float] = {}
    error_samples: list[str] = []


class BenchMedian(BaseModel):
    """One target at one concurrency: medians over the interleaved repetitions."""

    target: str
    concurrency: int
    repetitions: int
    throughput_rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_ms_per_request: dict[str, float]
    cpu_ms_total: float | None
    # req/s over the baseline's at the same concurrency: the plain server (sync), Celery (async)
    ratio_to_baseline: float | None = None


class BenchReport(BaseModel):
    profile: str
    mode: str
    model: str
    payload: dict
    started_at: datetime
    machine: dict
    runs: list[BenchRun]
    medians: list[BenchMedian] = []


def in_process_baseline(settings: Settings, model: str, duration_s: float) -> LatencySummary:
    """The same validation, model call and result shaping as the pipeline, in one process."""
    registry = ModelRegistry(models_dir(settings), intra_op_threads=settings.ort_intra_op_threads)
    loaded = registry.load(model)
    limits = InputLimits.of(settings)

    def once() -> None:
        features = rows_to_features([IRIS_ROW], loaded.manifest, limits)
        labels, probabilities = loaded.run(features)
        to_row_predictions(labels, probabilities, loaded.manifest.labels)

    return run_in_process_baseline(once, duration_s)


@contextmanager
def plain_server(say: Say, workers: int | None = None) -> Iterator[tuple[str, int]]:
    """The baseline server in a subprocess, one worker per core like a typical deployment:
    its URL and its pid (its workers are its children)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "toposerve.deploy.baseline_server", "--port", str(port),
                                "--workers", str(workers or os.cpu_count() or 1)])
    try:
        deadline = time.monotonic() + 30
        while not port_answers("127.0.0.1", port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the baseline server did not start")
            time.sleep(0.1)
        time.sleep(1.0)  # every worker has imported the app
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@contextmanager
def celery_baseline(env: dict[str, str], say: Say) -> Iterator[tuple[str, dict[str, list[int]]]]:
    """FastAPI + Celery (deploy/celery_baseline.py): a prefork worker (one process per core)
    and the web app, on the given RabbitMQ and Redis; its URL and its processes."""
    port = free_port()
    base = [sys.executable, "-m", "toposerve.deploy.celery_baseline"]
    child_env = {**os.environ, **{k: v for k, v in env.items() if k in ("TOPOSERVE_AMQP_URL", "TOPOSERVE_REDIS_URL")}}
    worker = subprocess.Popen([*base, "worker", "--concurrency", str(os.cpu_count() or 1)], env=child_env)
    web = subprocess.Popen([*base, "web", "--port", str(port)], env=child_env)
    try:
        deadline = time.monotonic() + 60
        url = f"http://127.0.0.1:{port}"
        while not _celery_answers(url):
            if worker.poll() is not None or web.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the FastAPI + Celery baseline did not start")
            time.sleep(0.3)
        yield url, {"celery web": [web.pid], "celery worker": [worker.pid]}
    finally:
        for process in (web, worker):
            process.terminate()
        for process in (web, worker):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


def _celery_answers(url: str) -> bool:
    """One job through the baseline, end to end (its worker has loaded the model)."""
    try:
        submitted = httpx.post(f"{url}/v1/models/iris/predict", json={"instances": [IRIS_ROW]}, timeout=2)
        result = httpx.get(f"{url}{submitted.headers['location']}", params={"wait": 2}, timeout=5)
        return result.status_code == 200 and result.json().get("status") == "succeeded"
    except (httpx.HTTPError, KeyError, ValueError):
        return False


@dataclass
class Target:
    """Something the load generator drives: a URL and the processes whose CPU it costs."""

    name: str
    url: str
    body: dict | Callable[[], dict]
    mode: str
    processes: dict[str, list[int]] = field(default_factory=dict)


def service_processes(env: dict[str, str]) -> dict[str, list[int]]:
    """RabbitMQ's and Redis's processes, found by the ports of the URLs the profile uses."""
    found: dict[str, list[int]] = {}
    for role, variable in (("rabbitmq", "TOPOSERVE_AMQP_URL"), ("redis", "TOPOSERVE_REDIS_URL")):
        url = urlsplit(env.get(variable) or "")
        if url.hostname in ("127.0.0.1", "localhost", "::1") and url.port:
            pid = pid_listening_on(url.port)
            if pid is not None:
                found[role] = [pid]
    return found


def measure(target: Target, path: str, concurrency: int, duration_s: float, repetition: int) -> BenchRun:
    """One closed-loop run; CPU read from /proc for every process of the target, and the generator's."""
    meter = CpuMeter({**target.processes, "load generator": [os.getpid()]})
    window: dict[str, float] = {}

    def close_window() -> None:
        window.update(meter.stop())

    summary, errors = asyncio.run(run_closed_loop(
        target.url, path, target.body, mode=target.mode, concurrency=concurrency, duration_s=duration_s,
        on_window=(meter.start, close_window) if proc_cpu_available() else None))
    answered = max(summary.requests, 1)
    cpu = {role: round(seconds * 1000 / answered, 4) for role, seconds in window.items()}
    return BenchRun(target=target.name, concurrency=concurrency, repetition=repetition, summary=summary,
                    cpu_ms_per_request=cpu, error_samples=errors)


def medians_of(runs: list[BenchRun]) -> list[BenchMedian]:
    """Pure: the median of each (target, concurrency) over its repetitions, and its ratio to the plain server."""
    groups: dict[tuple[str, int], list[BenchRun]] = {}
    for run in runs:
        groups.setdefault((run.target, run.concurrency), []).append(run)
    medians = []
    for (target, concurrency), group in groups.items():
        roles = sorted({role for run in group for role in run.cpu_ms_per_request})
        cpu = {role: round(statistics.median(r.cpu_ms_per_request.get(role, 0.0) for r in group), 4) for role in roles}
        server_cpu = [sum(v for k, v in r.cpu_ms_per_request.items() if k != "load generator") for r in group]
        medians.append(BenchMedian(
            target=target, concurrency=concurrency, repetitions=len(group),
            throughput_rps=round(statistics.median(r.summary.throughput_rps for r in group), 1),
            p50_ms=round(statistics.median(r.summary.p50_ms for r in group), 3),
            p99_ms=round(statistics.median(r.summary.p99_ms for r in group), 3),
            errors=sum(r.summary.errors for r in group), cpu_ms_per_request=cpu,
            cpu_ms_total=round(statistics.median(server_cpu), 4) if roles else None))
    baselines = {m.concurrency: m.throughput_rps for m in medians if m.target in (PLAIN, CELERY)}
    for m in medians:
        if m.target not in (PLAIN, CELERY) and baselines.get(m.concurrency):
            m.ratio_to_baseline = round(m.throughput_rps / baselines[m.concurrency], 3)
    return medians


def run_bench(
    profile: Profile, profile_arg: str, settings: Settings, *, model: str, concurrencies: list[int],
    duration_s: float, url: str | None, out: Path | None, say: Say, baseline_server: bool = True,
    repeat: int = 1,
) -> BenchReport:
    """Every target up at once, measured in turn: ``repeat`` rounds of (each concurrency x each target)."""
    payload = {"instances": [IRIS_ROW]}
    path = f"/v1/models/{model}/predict"
    runs: list[BenchRun] = []

    # With a prediction cache, measure both paths in the same run: one repeated input
    # (every request after the first is a hit) and fresh random inputs (all misses).
    variants: list[tuple[str, dict | Callable[[], dict]]] = [(profile.name, payload)]
    if profile.ingress.prediction_cache_ttl_s:
        rng = random.Random(0)
        variants = [(f"{profile.name} (hits)", payload),
                    (f"{profile.name} (misses)", lambda: {"instances": [[round(rng.uniform(4, 8), 6) for _ in IRIS_ROW]]})]

    with ExitStack() as stack:
        if url:
            env = {"TOPOSERVE_AMQP_URL": settings.amqp_url, "TOPOSERVE_REDIS_URL": settings.redis_url}
            services = service_processes(env)
            targets = [Target(name, url, body, profile.ingress.mode, services) for name, body in variants]
        else:
            base_url, supervisor = stack.enter_context(
                running_profile(profile, profile_arg, settings, "127.0.0.1", free_port(), say))
            env = supervisor.env
            services = service_processes(env)
            processes = {child.name: [child.process.pid] for child in supervisor.children if child.process}
            targets = [Target(name, base_url, body, profile.ingress.mode, processes | services)
                       for name, body in variants]
        if baseline_server and profile.ingress.mode == "sync":
            plain_url, plain_pid = stack.enter_context(plain_server(say))
            targets.append(Target(PLAIN, plain_url, payload, "sync", {"plain server": [plain_pid]}))
        if baseline_server and profile.ingress.mode == "async":
            # The same RabbitMQ and Redis as the profile: measured in turn, their CPU is the target's.
            celery_url, celery_pids = stack.enter_context(celery_baseline(env, say))
            targets.append(Target(CELERY, celery_url, payload, "async", {**celery_pids, **services}))
        for repetition in range(repeat):
            for concurrency in concurrencies:
                for target in targets:
                    say(f"[{repetition + 1}/{repeat}] {target.name}: concurrency {concurrency} "
                        f"for {duration_s:.0f}s ...")
                    runs.append(measure(target, path, concurrency, duration_s, repetition))
    say(f"in-process baseline ({model} called directly) for {duration_s:.0f}s ...")
    runs.append(BenchRun(target="in_process", concurrency=1,
                         summary=in_process_baseline(settings, model, duration_s)))
    report = BenchReport(
        profile=profile.name, mode=profile.ingress.mode, model=model, payload=payload,
        started_at=datetime.now(UTC), runs=runs, medians=medians_of(runs),
        machine={"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report.model_dump(mode="json"), indent=2))
    return report
