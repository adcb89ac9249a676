"""The native HTTP API: ``/v1/models``, ``/v1/models/{model}/predict``, ``/v1/jobs/{id}``.

``predict_router(config)`` adds the predict route per app: what it answers differs by
profile (a job in async profiles, the prediction in sync ones, both in sync_async),
and the OpenAPI document says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from redis.exceptions import RedisError

from toposerve.api.admission import ADMITTED
from toposerve.api.auth import current_owner
from toposerve.api.body import read_json
from toposerve.api.cached_predict import predict_sync_cached, submit_async_cached
from toposerve.api.config import IngressConfig
from toposerve.api.errors import ApiError, error_response, error_responses
from toposerve.api.ingress import FAILURE_STATUS, Ingress, PredictBody
from toposerve.api.openapi import (
    ADMISSION_ERRORS,
    ASYNC_ERRORS,
    BODY_ERRORS,
    INPUT_ERRORS,
    LOCATION,
    SYNC_ERRORS,
    X_REQUEST_TIMEOUT,
    codes,
    json_body,
    success,
    with_fallback,
)
from toposerve.api.responses import json_response
from toposerve.api.schemas import (
    AcceptedJob,
    CachedAcceptedJob,
    ModelDescription,
    ModelList,
    Stats,
    SyncAsyncAnswer,
)
from toposerve.api.tf_serving_codec import tf_model_status
from toposerve.brokers import Failure, InferenceRequest, JobDone, JobRecord, JobStatus, Prediction, issued_by
from toposerve.brokers.callbacks import CallbackSpec
from toposerve.models import ModelManifest

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


def job_response(record: JobRecord) -> Response:
    status = 202 if record.status is JobStatus.PENDING else 200
    return Response(record.model_dump_json(), status_code=status, media_type="application/json")


@router.get("/models", responses={200: success(ModelList, "The models this profile serves")})
async def list_models(request: Request) -> Response:
    ingress = ingress_of(request)
    return json_response({"models": [model_description(m) for m in ingress.manifests.values()]})


@router.get("/models/{model}", responses={200: success(ModelDescription, "The model"),
                                          **error_responses({404: "unknown_model"})})
async def describe_model(model: str, request: Request) -> Response:
    ingress = ingress_of(request)
    manifest = ingress.manifest(model)
    if ingress.config.mode == "sync":
        # TF Serving's clients read this route's model_version_status (the book's synchronous pattern).
        return json_response({**model_description(manifest), **tf_model_status(manifest)})
    return json_response(model_description(manifest))


def requested_timeout(request: Request, timeout: float | None) -> float | None:
    """``?timeout=S`` or the ``X-Request-Timeout: S`` header (seconds)."""
    if timeout is not None:
        return timeout
    header = request.headers.get("x-request-timeout")
    if header is None:
        return None
    try:
        return float(header)
    except ValueError:
        raise ApiError(422, "invalid_request", f"X-Request-Timeout must be seconds, got {header!r}") from None


def outcome_response(outcome: JobRecord | Prediction | Failure) -> Response:
    """A sync answer: 200 with the prediction, or the error shape with the failure's status."""
    if isinstance(outcome, Failure):
        status = FAILURE_STATUS.get(outcome.code, 500)
        return error_response(status, outcome.code.value, outcome.message)
    record = outcome if isinstance(outcome, JobRecord) else JobRecord.from_terminal(outcome)
    return Response(record.model_dump_json(), media_type="application/json")


async def accept_job(ingress: Ingress, inference: InferenceRequest, callback: CallbackSpec | None = None) -> dict:
    if callback is not None:
        await ingress.register_callback(inference.id, callback)
    await ingress.submit_async(inference)
    location = f"/v1/jobs/{inference.id}"
    return {"id": str(inference.id), "status": JobStatus.PENDING.value, "model": inference.model, "location": location}


async def predict(
    model: str,
    request: Request,
    timeout: float | None = Query(None, description="Sync profiles: seconds to wait (default from the profile)"),
) -> Response:
    """Async profiles answer 202 with a job; sync profiles wait for the prediction; sync_async do both."""
    ingress = ingress_of(request)
    ingress.manifest(model)  # 404 for an unknown model before reading the body
    return await handle_predict(ingress, model, request, timeout)


async def predict_version(
    model: str,
    version: str,
    request: Request,
    timeout: float | None = Query(None, description="Sync profiles: seconds to wait (default from the profile)"),
) -> Response:
    """``predict``, answered by one version of the model (404 for a version it does not have)."""
    ingress = ingress_of(request)
    ingress.version_manifest(model, version)  # 404 before reading the body
    return await handle_predict(ingress, model, request, timeout, version)


async def handle_predict(ingress: Ingress, model: str, request: Request, timeout: float | None,
                         version: str | None = None) -> Response:
    """A predict request for a served ``model``, admitted: the FastAPI route and the fast path
    (api/fast_path.py) both answer with this. ``version``: the one that is to answer (else the
    model's version policy chooses)."""
    data = await read_json(request, ingress.settings.max_body_bytes, ingress.settings.body_timeout_s)
    callback = ingress.take_callback(data)
    inference = ingress.parse_predict_body(model, data)
    await ingress.versions.route(inference, version)
    mode = ingress.config.mode
    accurate = ingress.accurate_model_for(model) if mode == "sync_async" else None
    cached = ingress.prediction_cache is not None and inference.item_id is None
    if mode == "async":
        if cached:
            record, how = await submit_async_cached(ingress, inference)
            location = f"/v1/jobs/{record.id}"
            body = {"id": str(record.id), "status": record.status.value, "model": model, "location": location,
                    "cached": record.cached}
            return json_response(body, status=202, headers={"Location": location, "X-Cache": how})
        job = await accept_job(ingress, inference, callback)
        return json_response(job, status=202, headers={"Location": job["location"]})
    timeout_s = ingress.timeout_for(requested_timeout(request, timeout))
    if cached and accurate is None:
        outcome, how = await predict_sync_cached(ingress, inference, timeout_s)
        response = outcome_response(outcome)
        response.headers["X-Cache"] = how
        return response
    if accurate is None:
        return outcome_response(await ingress.predict_sync(inference, timeout_s))

    # sync_async: the accurate model's job is accepted first, so its id is returned
    # whatever happens to the fast answer.
    job = await accept_job(ingress, ingress.follow_up_request(inference, accurate), callback)
    fast: dict = {"id": str(inference.id), "model": model, "status": "failed"}
    try:
        outcome = await ingress.predict_sync(inference, timeout_s)
    except ApiError as exc:
        fast["error"] = {"code": exc.code, "message": exc.message}
    else:
        if isinstance(outcome, Prediction):
            fast = JobRecord.from_terminal(outcome).model_dump(mode="json")
        else:
            fast["error"] = {"code": outcome.code.value, "message": outcome.message}
    # 200 when the fast answer is there; 202 when only the accurate job was accepted.
    status = 200 if fast["status"] == "succeeded" else 202
    body = {"fast": fast, "job": job}
    return json_response(body, status=status, headers={"Location": job["location"]})


@router.get("/stats", responses={200: success(Stats, "This process's counters")})
async def stats(request: Request) -> Response:
    """Counters of this ingress process (cache hits and misses, sync replies)."""
    ingress = ingress_of(request)
    replies = ingress.replies
    coalescers = ingress.coalescers()
    return json_response({
        "pid": os.getpid(),
        "prediction_cache": {"enabled": ingress.prediction_cache is not None, "hits": ingress.stats.cache_hits,
                             "misses": ingress.stats.cache_misses, "coalesced": ingress.stats.cache_coalesced,
                             "errors": ingress.stats.cache_errors},
        "replies": {"in_flight": replies.in_flight if replies else 0,
                    "late": replies.late_replies if replies else 0},
        "load": {"in_flight": ingress.stats.in_flight, "max_in_flight": ingress.config.spec.max_in_flight,
                 "shed": ingress.stats.shed},
        "coalescing": {"messages": sum(c.messages for c in coalescers), "jobs": sum(c.jobs for c in coalescers)},
    })


def job_not_found(ingress: Ingress, job_id: uuid.UUID) -> ApiError:
    """410 for an id this namespace issued whose record is gone, 404 for any other."""
    if issued_by(job_id, ingress.settings.namespace, current_owner()):
        return ApiError(410, "job_gone", f"job {job_id} was accepted here, but its record is gone: results live "
                                         f"{ingress.config.spec.result_ttl_s} s, and a result store that keeps "
                                         "nothing on disk loses them when it restarts")
    return ApiError(404, "unknown_job", f"no job {job_id}: it never existed here, or its result expired")


@router.get("/jobs/{job_id}", responses={
    200: success(JobRecord, "The job has ended: succeeded (its predictions) or failed (its error)"),
    202: success(JobRecord, "The job is pending (still so after ?wait=)"),
    **error_responses({404: "unknown_job: never issued here, or expired", 410: "job_gone: issued here, but its "
                       "record is gone", 422: "invalid_request: wait is not a number of seconds from 0 to 30",
                       503: "store_unavailable"}),
})
async def get_job(
    job_id: str,
    request: Request,
    wait: float = Query(0.0, ge=0, le=MAX_WAIT_S, description="Seconds to wait for a terminal state"),
) -> Response:
    parsed = parse_job_id(job_id)
    ingress = ingress_of(request)
    record = await wait_for_record(ingress, parsed, wait, current_owner())
    if record is None:
        raise job_not_found(ingress, parsed)
    return job_response(record)


def parse_job_id(job_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(job_id)
    except ValueError:
        raise ApiError(404, "unknown_job", f"no job {job_id!r}: job ids are UUIDs") from None


async def wait_for_record(ingress: Ingress, job_id: uuid.UUID, wait_s: float, owner: str | None) -> JobRecord | None:
    """The job's record as soon as it is terminal, or as it is after ``wait_s`` (pending, or None
    when there is none): woken by the store's announcements, re-read at least every second.
    A 503 when the store cannot be read."""
    loop = asyncio.get_running_loop()
    until = loop.time() + wait_s
    while True:
        with ingress.completions.watch(job_id) as announced:
            try:
                record = await ingress.results.get_for(job_id, owner)
            except RedisError as exc:
                raise ApiError(503, "store_unavailable", "the result store is unavailable; retry later",
                               {"Retry-After": "1"}) from exc
            remaining = until - loop.time()
            # A job published straight to the exchange has no record until its first stage
            # takes it: with ``wait``, wait for it to appear as for it to end.
            if (record is None and remaining <= 0) or (record is not None and (
                    record.status is not JobStatus.PENDING or remaining <= 0)):
                return record
            # Woken by the store's announcement, which carries the record (no second read);
            # re-read at least every second regardless.
            with contextlib.suppress(TimeoutError):
                done = JobDone.parse(await asyncio.wait_for(asyncio.shield(announced), min(remaining, 1.0)))
                record = done.record_for(owner)
                if record is not None and record.status is not JobStatus.PENDING:
                    return record


def predict_responses(config: IngressConfig) -> dict[int | str, dict]:
    """What ``predict`` answers in this profile's mode."""
    if config.mode == "async":
        accepted = CachedAcceptedJob if config.spec.prediction_cache_ttl_s else AcceptedJob
        answers = {202: success(accepted, "Accepted: poll the job at Location", LOCATION)}
        errors = ASYNC_ERRORS
    elif config.mode == "sync":
        answers = {200: success(JobRecord, "The prediction (status succeeded)")}
        errors = SYNC_ERRORS
    else:
        answers = {
            200: success(SyncAsyncAnswer | JobRecord, "The fast model's answer and the accurate model's job (a "
                         "model with no accurate counterpart answers as in a sync profile)", LOCATION),
            202: success(SyncAsyncAnswer, "Only the accurate model's job: the fast answer failed", LOCATION),
        }
        errors = codes(ASYNC_ERRORS, SYNC_ERRORS)
    # ?timeout= is parsed as a number in every mode, and only read (so bounded) where there is a sync answer.
    invalid_timeout = {422: "invalid_request: ?timeout= is not a number" + (
        "" if config.mode == "async" else ", or not positive, or more than ingress.max_timeout_s")}
    return with_fallback(config, {**answers, **error_responses(
        codes(BODY_ERRORS, INPUT_ERRORS, errors, ADMISSION_ERRORS, invalid_timeout))})


def predict_router(config: IngressConfig) -> APIRouter:
    """``POST /v1/models/{model}/predict``, documented for ``config``'s profile."""
    predict_routes = APIRouter(prefix="/v1")
    # status_code only names the main answer in the document: the route returns its Response itself.
    predict_routes.post(
        "/models/{model}/predict", status_code=202 if config.mode == "async" else 200, dependencies=ADMITTED,
        responses=predict_responses(config),
        openapi_extra=json_body(PredictBody, "Exactly one input: rows of numbers (tabular models), a base64 image "
                                "(image models) or an item id (data-cache profiles). A JSON body sent as "
                                "application/x-www-form-urlencoded (curl -d) is read as JSON; gzip and deflate "
                                "Content-Encoding are accepted.", [X_REQUEST_TIMEOUT]),
    )(predict)
    predict_routes.post(
        "/models/{model}/versions/{version}/predict", status_code=202 if config.mode == "async" else 200,
        dependencies=ADMITTED, responses=predict_responses(config),
        openapi_extra=json_body(PredictBody, "As POST /v1/models/{model}/predict, answered by this version of the "
                                "model (404 for a version it does not have)", [X_REQUEST_TIMEOUT]),
    )(predict_version)
    return predict_routes
