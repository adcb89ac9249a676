"""The book's routes (/health, /metadata, /label, /predict, /predict/label, /predict/test, /job/{id}),
so the curl commands of its READMEs work against the matching profile.

Same shapes as the book's reference code, with its faults fixed: every row of a
batch is answered (``predictions``, next to the book's first-row ``prediction``),
unknown jobs are 404, pending jobs 202, health checks are real, and bad input is a
4xx naming the problem instead of a 500. All of it goes through the same ingress
operations (and so the same queues) as the /v1 API.
"""

from __future__ import annotations

import base64
import uuid
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from redis.exceptions import RedisError

from toposerve.api.admission import ADMITTED
from toposerve.api.auth import current_owner
from toposerve.api.body import read_json
from toposerve.api.book_group_routes import IRIS_SAMPLE, group_router
from toposerve.api.cached_predict import predict_sync_cached
from toposerve.api.config import IngressConfig
from toposerve.api.errors import ApiError, error_response, error_responses
from toposerve.api.health import readiness
from toposerve.api.ingress import FAILURE_STATUS, Ingress
from toposerve.api.openapi import (
    ADMISSION_ERRORS,
    ASYNC_ERRORS,
    BODY_ERRORS,
    INPUT_ERRORS,
    SYNC_ERRORS,
    codes,
    json_body,
    success,
    with_fallback,
)
from toposerve.api.responses import json_response
from toposerve.api.schemas import (
    BookFastJob,
    BookHealthy,
    BookJob,
    BookJobAnswer,
    BookLabels,
    BookMetadata,
    BookPredictBody,
    BookProbabilities,
    BookUnhealthy,
)
from toposerve.brokers import Failure, InferenceRequest, JobRecord, JobStatus, Prediction
from toposerve.models import ImagePreprocessing, ModelManifest


def _ingress(request: Request) -> Ingress:
    return request.app.state.ingress


def _book_manifest(ingress: Ingress) -> ModelManifest:
    return ingress.manifest(ingress.config.book_model or next(iter(ingress.manifests)))


def _is_image(manifest: ModelManifest) -> bool:
    return isinstance(manifest.preprocessing, ImagePreprocessing)


def _book_body_to_native(data: object, manifest: ModelManifest, item_ids: bool = False) -> object:
    """The book's field names (``data``, ``image_data``) -> our ``instances`` / ``image`` / ``item_id``."""
    if not isinstance(data, dict):
        return data  # parse_predict_body explains what is expected
    body = dict(data)
    if "image_data" in body:
        body["image"] = body.pop("image_data")
    if "data" in body:
        # The book's data-cache pattern sends an item id as `data`.
        field = "item_id" if item_ids else "image" if _is_image(manifest) else "instances"
        body[field] = body.pop("data")
    return body


def _sample_body(ingress: Ingress, manifest: ModelManifest) -> dict:
    if not _is_image(manifest):
        return {"instances": IRIS_SAMPLE}
    if ingress.config.sample_image is None:
        raise ApiError(404, "no_sample", "this profile ships no sample image for /predict/test")
    return {"image": base64.b64encode(ingress.config.sample_image.read_bytes()).decode()}


def _sample_request(ingress: Ingress) -> InferenceRequest:
    """The built-in sample (the book's /predict/test input) as a request for the book model."""
    manifest = _book_manifest(ingress)
    return ingress.parse_predict_body(manifest.name, _sample_body(ingress, manifest))


async def parse_book_body(request: Request, ingress: Ingress, manifest: ModelManifest) -> InferenceRequest:
    data = await read_json(request, ingress.settings.max_body_bytes, ingress.settings.body_timeout_s)
    return ingress.parse_predict_body(manifest.name, _book_body_to_native(data, manifest, ingress.config.item_ids))


async def _sync_outcome(ingress: Ingress, inference: InferenceRequest) -> Prediction | JobRecord:
    if ingress.prediction_cache is not None and inference.item_id is None:
        outcome, _ = await predict_sync_cached(ingress, inference, ingress.config.spec.timeout_s)
    else:
        outcome = await ingress.predict_sync(inference, ingress.config.spec.timeout_s)
    if isinstance(outcome, Failure):
        raise ApiError(FAILURE_STATUS.get(outcome.code, 500), outcome.code.value, outcome.message)
    return outcome


def _rows(outcome: Prediction | JobRecord) -> list:
    return outcome.rows if isinstance(outcome, Prediction) else outcome.predictions or []


def _probabilities(prediction: Prediction | JobRecord, manifest: ModelManifest) -> dict:
    rows = [row.probabilities for row in _rows(prediction)]
    # The book's image patterns (prep_pred, data_cache, prediction_cache) answer the softmax as
    # its (1, n_classes) matrix, [[...]]; its iris pattern the first row's list.
    return {"prediction": [rows[0]] if _is_image(manifest) else rows[0], "predictions": rows}


def _labels(prediction: Prediction | JobRecord) -> dict:
    labels = [row.label for row in _rows(prediction)]
    return {"prediction": labels[0], "predictions": labels}


def _metadata(manifest: ModelManifest) -> dict:
    n_labels = len(manifest.labels)
    if _is_image(manifest):
        data = {"data_type": "str", "data_structure": "(1,1)", "data_sample": "base64 encoded image file"}
    else:
        data = {"data_type": "float32", "data_structure": f"(1,{manifest.n_features})", "data_sample": IRIS_SAMPLE}
    return {**data, "prediction_type": "float32", "prediction_structure": f"(1,{n_labels})",
            "model": manifest.name, "version": manifest.version, "labels": manifest.labels}


def _health_all(ingress: Ingress) -> dict:
    consumers = ingress.monitor.consumers if ingress.monitor else {}
    # Queue names end with the stage name: {ns}.{profile}.{stage}
    return {name.rsplit(".", 1)[-1]: "ok" if count > 0 else "ng" for name, count in consumers.items()}


async def _job_entry(ingress: Ingress, job_id: str) -> Response:
    try:
        record = await ingress.results.get_for(uuid.UUID(job_id), current_owner())
    except ValueError:
        record = None
    except RedisError as exc:  # as /v1/jobs answers, not a 500
        raise ApiError(503, "store_unavailable", "the result store is unavailable; retry later",
                       {"Retry-After": "1"}) from exc
    if record is None:
        return error_response(404, "unknown_job", f"no job {job_id}: it never existed or its result expired")
    if record.status is JobStatus.PENDING:
        return json_response({job_id: {"prediction": ""}}, status=202)
    if record.status is JobStatus.FAILED:
        return json_response({job_id: {"prediction": None, "error": record.error.model_dump() if record.error else None}})
    labels = [row.label for row in record.predictions or []]
    return json_response({job_id: {"prediction": labels[0] if labels else None, "predictions": labels}})


_NO_SAMPLE = {404: "no_sample: the profile ships no sample image for its image model"}
_BOOK_BODY = json_body(BookPredictBody, "The book's body: 'data' (rows, a base64 image or an item id, by the model) "
                                       "or 'image_data', or the native predict body's fields")


def book_router(config: IngressConfig) -> APIRouter:
    mode = config.mode
    router = APIRouter(tags=["book-compatible"])

    def admitted(answer: dict[int | str, dict], *errors: dict[int, str]) -> dict[int | str, dict]:
        """An admitted route's responses: ``answer``, ``errors``, and what admission adds."""
        return with_fallback(config, {**answer, **error_responses(codes(ADMISSION_ERRORS, *errors))})

    # What a sync answer's failure can be: the input refused, or a stage's failure.
    sync_errors = codes(INPUT_ERRORS, SYNC_ERRORS)
    probabilities = {200: success(BookProbabilities, "The probabilities of each class, per row")}
    labels = {200: success(BookLabels, "The label of each row")}

    @router.get("/health", responses={200: success(BookHealthy, "Ready"),
                                      503: success(BookUnhealthy, "Not ready: see which check failed")})
    async def health(request: Request) -> Response:
        ready, body = await readiness(_ingress(request))
        return json_response({"health": "ok"} if ready else {"health": "ng", "checks": body["checks"]},
                     status=200 if ready else 503)

    group = config.book_model in config.groups
    if group:
        # The horizontal microservice: its proxy's routes, answered synchronously in any mode.
        router.include_router(group_router(config, parse_book_body, _BOOK_BODY))
    else:
        @router.get("/health/all", responses={200: success(dict[str, Literal["ok", "ng"]],
                                                           "Each stage: ok when its queue has a consumer")})
        async def health_all(request: Request) -> Response:
            return json_response(_health_all(_ingress(request)))

        @router.get("/metadata", responses={200: success(BookMetadata, "The book model's input and output")})
        async def metadata(request: Request) -> Response:
            return json_response(_metadata(_book_manifest(_ingress(request))))

    @router.get("/label", responses={200: success(list[str] | dict[str, str], "The book model's labels: a list "
                                                  "(image models) or class index -> label (tabular models)")})
    async def label(request: Request) -> Response:
        manifest = _book_manifest(_ingress(request))
        # The book's image patterns answer a list, its iris pattern a dict by class index.
        return json_response(manifest.labels if _is_image(manifest) else {str(i): n for i, n in enumerate(manifest.labels)})

    if group:
        return router  # its predict routes are the proxy's, above
    if mode == "sync":

        @router.get("/predict/test", dependencies=ADMITTED, responses=admitted(probabilities, _NO_SAMPLE, SYNC_ERRORS))
        async def predict_test(request: Request) -> Response:
            ingress = _ingress(request)
            return json_response(_probabilities(await _sync_outcome(ingress, _sample_request(ingress)),
                                                _book_manifest(ingress)))

        @router.get("/predict/test/label", dependencies=ADMITTED, responses=admitted(labels, _NO_SAMPLE, SYNC_ERRORS))
        async def predict_test_label(request: Request) -> Response:
            ingress = _ingress(request)
            return json_response(_labels(await _sync_outcome(ingress, _sample_request(ingress))))

        @router.post("/predict", dependencies=ADMITTED, responses=admitted(probabilities, BODY_ERRORS, sync_errors),
                     openapi_extra=_BOOK_BODY)
        async def predict(request: Request) -> Response:
            ingress = _ingress(request)
            manifest = _book_manifest(ingress)
            inference = await parse_book_body(request, ingress, manifest)
            return json_response(_probabilities(await _sync_outcome(ingress, inference), manifest))

        @router.post("/predict/label", dependencies=ADMITTED, responses=admitted(labels, BODY_ERRORS, sync_errors),
                     openapi_extra=_BOOK_BODY)
        async def predict_label(request: Request) -> Response:
            ingress = _ingress(request)
            inference = await parse_book_body(request, ingress, _book_manifest(ingress))
            return json_response(_labels(await _sync_outcome(ingress, inference)))

    else:
        # sync_async: a failed fast answer is a 202 with its error, so only the job's submission can fail.
        if mode == "async":
            job_answer = {200: success(BookJob, "Accepted: poll /job/{job_id}")}
        else:
            job_answer = {200: success(BookFastJob, "The accurate model's job, and the fast model's label"),
                          202: success(BookFastJob, "The accurate model's job; the fast model gave no label")}

        async def _submit(ingress: Ingress, inference: InferenceRequest) -> Response:
            if mode == "async":
                await ingress.submit_async(inference)
                return json_response({"job_id": str(inference.id)})
            # sync_async: the accurate job first, then the fast answer under the fast model's name.
            fast_model = inference.model
            job = ingress.follow_up_request(inference, ingress.accurate_model_for(fast_model) or fast_model)
            await ingress.submit_async(job)
            try:
                fast = await _sync_outcome(ingress, inference)
            except ApiError as exc:
                return json_response({"job_id": str(job.id), fast_model: None,
                              "error": {"code": exc.code, "message": exc.message}}, status=202)
            return json_response({"job_id": str(job.id), fast_model: _rows(fast)[0].label})

        @router.get("/predict/test", dependencies=ADMITTED, responses=admitted(job_answer, _NO_SAMPLE, ASYNC_ERRORS))
        async def predict_test_job(request: Request) -> Response:
            ingress = _ingress(request)
            return await _submit(ingress, _sample_request(ingress))

        @router.post("/predict", dependencies=ADMITTED, openapi_extra=_BOOK_BODY,
                     responses=admitted(job_answer, BODY_ERRORS, INPUT_ERRORS, ASYNC_ERRORS))
        async def predict_job(request: Request) -> Response:
            ingress = _ingress(request)
            return await _submit(ingress, await parse_book_body(request, ingress, _book_manifest(ingress)))

        @router.get("/job/{job_id}", responses={
            200: success(BookJobAnswer, "The job has ended: its label, or its error"),
            202: success(BookJobAnswer, "The job is pending"),
            **error_responses({404: "unknown_job", 503: "store_unavailable"}),
        })
        async def job(job_id: str, request: Request) -> Response:
            return await _job_entry(_ingress(request), job_id)

    return router
