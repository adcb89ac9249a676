"""The baselines ``toposerve bench`` measures next to a profile answer what the profile would,
so a ratio compares like with like: the FastAPI + Celery recipe on real RabbitMQ and Redis."""

from __future__ import annotations

import asyncio

import httpx

from toposerve.deploy.bench import celery_baseline
from toposerve.producers import run_closed_loop


def test_the_celery_baseline_serves_the_async_shape_on_real_services(amqp_url: str, redis_url: str) -> None:
    env = {"TOPOSERVE_AMQP_URL": amqp_url, "TOPOSERVE_REDIS_URL": redis_url}
    with celery_baseline(env, print) as (url, processes):
        assert set(processes) == {"celery web", "celery worker"}
        submitted = httpx.post(f"{url}/v1/models/iris/predict", json={"instances": [[6.7, 3.0, 5.2, 2.3]]})
        assert submitted.status_code == 202
        job = httpx.get(f"{url}{submitted.headers['location']}", params={"wait": 5}).json()
        assert job["status"] == "succeeded" and job["predictions"][0]["label"] == "virginica"
        summary, errors = asyncio.run(run_closed_loop(
            url, "/v1/models/iris/predict", {"instances": [[5.1, 3.5, 1.4, 0.2]]}, mode="async",
            concurrency=4, duration_s=1.0, warmup_s=0.2))
    assert summary.requests > 0 and summary.errors == 0, errors
