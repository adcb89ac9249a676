"""The native HTTP API: ``/v1/models``, ``/v1/models/{model}/predict``, ``/v1/jobs/{id}``."""

from __future__ import annotations

import asyncio
import uuid

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from redis.exceptions import RedisError

from api.body import read_json
from api.errors import ApiError
from api.ingress import Ingress
from brokers.results import JobRecord, JobStatus
from consumers.registry import ModelManifest

router = APIRouter(prefix="/v1")

MAX_WAIT_S = 30.0


def ingress_of(request: Request) -> Ingress:
    return request.app.state.ingress


def model_description(manifest: ModelManifest) -> dict:
    return {
        "name": manifest.name,
        "version": manifest.version,
        "sha256": manifest.sha256,
        "description": manifest.description,
        "input": manifest.input.model_dump(),
        "input_kind": "image" if manifest.preprocessing.kind == "image" else "instances",
        "labels": manifest.labels,
        "preprocessing": manifest.preprocessing.model_dump(),
        "metrics": manifest.metrics,
    }


def json_response(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json", headers=headers)


def job_response(record: JobRecord) -> Response:
    status = 202 if record.status is JobStatus.PENDING else 200
    return Response(record.model_dump_json(), status_code=status, media_type="application/json")


@router.get("/models")
async def list_models(request: Request) -> Response:
    ingress = ingress_of(request)
    return json_response({"models": [model_description(m) for m in ingress.manifests.values()]})


@router.get("/models/{model}")
async def describe_model(model: str, request: Request) -> Response:
    return json_response(model_description(ingress_of(request).manifest(model)))


@router.post("/models/{model}/predict", status_code=202)
async def predict(model: str, request: Request) -> Response:
    ingress = ingress_of(request)
    ingress.manifest(model)  # 404 for an unknown model before reading the body
    inference = ingress.parse_predict_body(model, await read_json(request, ingress.settings.max_body_bytes))
    await ingress.submit(inference)
    location = f"/v1/jobs/{inference.id}"
    return json_response(
        {"id": str(inference.id), "status": JobStatus.PENDING.value, "model": model, "location": location},
        status=202,
        headers={"Location": location},
    )


@router.get("/jobs/{job_id}")
async def get_job(
    job_id: str,
    request: Request,
    wait: float = Query(0.0, ge=0, le=MAX_WAIT_S, description="Seconds to wait for a terminal state"),
) -> Response:
    try:
        parsed = uuid.UUID(job_id)
    except ValueError:
        raise ApiError(404, "unknown_job", f"no job {job_id!r}: job ids are UUIDs") from None
    ingress = ingress_of(request)
    loop = asyncio.get_running_loop()
    until = loop.time() + wait
    while True:
        try:
            record = await ingress.results.get(parsed)
        except RedisError as exc:
            raise ApiError(503, "store_unavailable", "the result store is unavailable; retry later",
                           {"Retry-After": "1"}) from exc
        if record is None:
            raise ApiError(404, "unknown_job", f"no job {job_id}: it never existed or its result expired")
        remaining = until - loop.time()
        if record.status is not JobStatus.PENDING or remaining <= 0:
            return job_response(record)
        # Woken by the store's announcement; re-read at least every second regardless.
        await ingress.completions.wait(parsed, min(remaining, 1.0))
