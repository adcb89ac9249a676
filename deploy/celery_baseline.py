"""The async baseline ``toposerve bench`` measures next to an async profile: the classic
FastAPI + Celery recipe (RabbitMQ broker, Redis result backend, a prefork worker calling
ONNX Runtime), with the same HTTP shape as toposerve's async path, so the same
submit-then-long-poll client drives both.

- ``POST /v1/models/{model}/predict`` -> 202 ``{"id", "status": "pending", "location"}``
- ``GET /v1/jobs/{id}?wait=S`` -> 200 with the result once it is there, else 202

Long-poll: the route reads Celery's result key in Redis every few milliseconds (what a
careful recipe does instead of blocking a thread per waiter on ``AsyncResult.get``).

Run by ``toposerve bench``; by hand: ``python -m toposerve.deploy.celery_baseline worker``
and ``... web --port P`` with ``TOPOSERVE_AMQP_URL`` and ``TOPOSERVE_REDIS_URL`` set.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass

import orjson
import redis.asyncio as aioredis
import uvicorn
from celery import Celery
from celery.signals import worker_process_init
from fastapi import FastAPI, Request
from fastapi.responses import Response

from toposerve.brokers import Settings
from toposerve.deploy.components import models_dir
from toposerve.models import InputLimits, LoadedModel, ModelRegistry, rows_to_features, to_row_predictions

POLL_S = 0.002


def celery_app(amqp_url: str, redis_url: str) -> Celery:
    app = Celery("toposerve_celery_baseline", broker=amqp_url, backend=redis_url)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    task_ignore_result=False, result_expires=3600, worker_prefetch_multiplier=4,
                    broker_connection_retry_on_startup=True)
    app.task(name="predict")(predict)
    return app


@dataclass
class WorkerModels:
    """What one worker process loads at its start (Celery's worker_process_init)."""

    registry: ModelRegistry
    limits: InputLimits
    loaded: dict[str, LoadedModel]


_worker: list[WorkerModels] = []  # owned by the worker process's start, filled once there


@worker_process_init.connect
def _load_models(**_: object) -> None:
    settings = Settings()
    registry = ModelRegistry(models_dir(settings), intra_op_threads=1)
    _worker.append(WorkerModels(registry, InputLimits.of(settings), {}))


def predict(model: str, instances: list[list[float]]) -> dict:
    """The task: the same validation, model call and result shaping as toposerve's stages."""
    models = _worker[0]
    loaded = models.loaded.get(model) or models.loaded.setdefault(model, models.registry.load(model))
    features = rows_to_features(instances, loaded.manifest, models.limits)
    labels, probabilities = loaded.run(features)
    rows = to_row_predictions(labels, probabilities, loaded.manifest.labels)
    return {"status": "succeeded", "model": model, "predictions": [r.model_dump() for r in rows]}


def web_app(amqp_url: str, redis_url: str) -> FastAPI:
    celery = celery_app(amqp_url, redis_url)
    results = aioredis.from_url(redis_url)
    app = FastAPI(title="FastAPI + Celery baseline")

    @app.post("/v1/models/{model}/predict", status_code=202)
    async def submit(model: str, request: Request) -> Response:
        body = orjson.loads(await request.body())
        task = await asyncio.to_thread(celery.send_task, "predict", args=[model, body["instances"]])
        location = f"/v1/jobs/{task.id}"
        return Response(orjson.dumps({"id": task.id, "status": "pending", "location": location}), status_code=202,
                        media_type="application/json", headers={"Location": location})

    @app.get("/v1/jobs/{job_id}")
    async def job(job_id: str, wait: float = 0.0) -> Response:
        deadline = asyncio.get_running_loop().time() + min(wait, 30.0)
        while True:
            raw = await results.get(f"celery-task-meta-{job_id}")
            if raw is not None:
                meta = orjson.loads(raw)
                if meta.get("status") == "SUCCESS":
                    return Response(orjson.dumps(meta["result"]), media_type="application/json")
                return Response(orjson.dumps({"status": "failed", "error": str(meta.get("result"))}),
                                media_type="application/json")
            if asyncio.get_running_loop().time() >= deadline:
                return Response(orjson.dumps({"id": job_id, "status": "pending"}), status_code=202,
                                media_type="application/json")
            await asyncio.sleep(POLL_S)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["worker", "web"])
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--concurrency", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    settings = Settings()
    if args.role == "worker":
        app = celery_app(settings.amqp_url, settings.redis_url)
        app.worker_main(["worker", "--pool", "prefork", "--concurrency", str(args.concurrency),
                         "--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"])
    else:
        uvicorn.run(web_app(settings.amqp_url, settings.redis_url), host="127.0.0.1", port=args.port,
                    log_level="warning", access_log=False)
    sys.exit(0)


if __name__ == "__main__":
    main()
