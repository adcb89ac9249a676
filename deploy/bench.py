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
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from toposerve.brokers import Settings
from toposerve.deploy.components import models_dir
from toposerve.deploy.launcher import Say, running_profile
from toposerve.deploy.local_services import free_port, port_answers
from toposerve.deploy.profile import Profile
from toposerve.models import InputLimits, ModelRegistry, rows_to_features, to_row_predictions
from toposerve.producers import LatencySummary, run_closed_loop, run_in_process_baseline

IRIS_ROW = [5.1, 3.5, 1.4, 0.2]


class BenchRun(BaseModel):
    target: str
    concurrency: int
    summary: LatencySummary
    error_samples: list[str] = []


class BenchReport(BaseModel):
    profile: str
    mode: str
    model: str
    payload: dict
    started_at: datetime
    machine: dict
    runs: list[BenchRun]


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
def plain_server(say: Say, workers: int | None = None) -> Iterator[str]:
    """The baseline server in a subprocess, one worker per core like a typical deployment."""
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
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def run_bench(
    profile: Profile, profile_arg: str, settings: Settings, *, model: str, concurrencies: list[int],
    duration_s: float, url: str | None, out: Path | None, say: Say, baseline_server: bool = True,
) -> BenchReport:
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

    def load(base_url: str) -> None:
        for target, body in variants:
            for concurrency in concurrencies:
                say(f"{target}: concurrency {concurrency} for {duration_s:.0f}s ...")
                summary, errors = asyncio.run(run_closed_loop(base_url, path, body, mode=profile.ingress.mode,
                                                              concurrency=concurrency, duration_s=duration_s))
                runs.append(BenchRun(target=target, concurrency=concurrency, summary=summary, error_samples=errors))

    if url:
        load(url)
    else:
        with running_profile(profile, profile_arg, settings, "127.0.0.1", free_port(), say) as (base_url, _):
            load(base_url)
    if baseline_server and profile.ingress.mode == "sync":
        with plain_server(say) as base_url:
            for concurrency in concurrencies:
                say(f"plain FastAPI + ONNX Runtime server: concurrency {concurrency} for {duration_s:.0f}s ...")
                summary, errors = asyncio.run(run_closed_loop(base_url, path, payload, mode="sync",
                                                              concurrency=concurrency, duration_s=duration_s))
                runs.append(BenchRun(target="plain_fastapi_ort", concurrency=concurrency, summary=summary,
                                     error_samples=errors))
    say(f"in-process baseline ({model} called directly) for {duration_s:.0f}s ...")
    runs.append(BenchRun(target="in_process", concurrency=1,
                         summary=in_process_baseline(settings, model, duration_s)))
    report = BenchReport(
        profile=profile.name, mode=profile.ingress.mode, model=model, payload=payload,
        started_at=datetime.now(UTC), runs=runs,
        machine={"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report.model_dump(mode="json"), indent=2))
    return report
