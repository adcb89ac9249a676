"""The Open Inference Protocol (KServe v2) REST API, on the same messages and topology.

Clients written for Triton, MLServer or KServe (``/v2/...``) talk to every profile.
An infer call becomes the same ``InferenceRequest`` messages as ``POST /v1/.../predict``
(validated by ``Ingress.parse_predict_body``) and is answered synchronously through
the ingress's reply queue, in every mode.

Tensor mapping (README, "Open Inference Protocol"):

- tabular models (iris): one input named like the ONNX input (``float_input``), FP32
  ``[N, n_features]`` (FP16/FP64 and the integer types are converted), data flat or
  nested -> one request with N ``instances``;
- image models (digits): one input ``image``, BYTES ``[N]`` or ``[N, 1]``, each element
  a base64 PNG/JPEG (raw file bytes with Triton's binary tensor data) -> N requests,
  one image each, in flight together;
- outputs: ``label`` (BYTES [N], class names), ``class_index`` (INT64 [N]) and
  ``probabilities`` (FP32 [N, n_classes], row-major).

Errors are the protocol's ``{"error": "<message>"}``: 400 for a bad request, 404 for an
unknown model or version, 413 too large, 503 (with ``Retry-After``) and 504 as in /v1.
"""


from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute

from toposerve.api.admission import ADMITTED
from toposerve.api.body import check_content_type, read_body, read_json
from toposerve.api.entry import queues_on_path
from toposerve.api.errors import ApiError, describe_validation_errors, error_responses
from toposerve.api.health import readiness
from toposerve.api.ingress import FAILURE_STATUS, Ingress
from toposerve.api.openapi import JSON, header_parameter, inline_schema, request_body, success
from toposerve.api.responses import json_response
from toposerve.brokers import Failure, InferenceRequest, Prediction, RowPrediction, redact
from toposerve.models import ModelManifest

log = logging.getLogger(__name__)

from toposerve.api.oip_codec import (
    BINARY_HEADER,
    SERVER_NAME,
    InferCall,
    InferRequest,
    InferResponse,
    ModelInput,
    ModelReady,
    OipError,
    OipErrorBody,
    OipModelMetadata,
    ServerLive,
    ServerMetadata,
    ServerReady,
    infer_outputs,
    input_name,
    model_metadata,
    parse_infer_call,
    parse_json,
    read_model_input,
)


def oip_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": redact(message)}, status=status, headers=headers or None)


def _oip_status(status: int) -> int:
    # The native API's 422 (well-formed JSON, wrong content) is the protocol's 400.
    return 400 if status == 422 else status


class OipRoute(APIRoute):
    """Renders every failure of an OIP route as ``{"error": "<message>"}``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except OipError as exc:
                return oip_error(exc.status, exc.message)
            except ApiError as exc:
                return oip_error(_oip_status(exc.status), exc.message, exc.headers)
            except RequestValidationError as exc:
                return oip_error(400, describe_validation_errors(list(exc.errors())))
            except Exception:
                log.exception("unhandled error in an Open Inference Protocol route")
                return oip_error(500, "internal error; the server log has the details")

        return guarded


router = APIRouter(prefix="/v2", tags=["open-inference-protocol"], route_class=OipRoute)


def _ingress(request: Request) -> Ingress:
    return request.app.state.ingress


def oip_manifest(ingress: Ingress, model: str, version: str | None) -> ModelManifest:
    ingress.manifest(model)  # the API's own 404 for an unknown model
    try:
        return ingress.version_manifest(model, version)
    except ApiError as exc:
        raise OipError(exc.message, 404) from exc


async def oip_ready(ingress: Ingress, model: str | None = None) -> bool:
    """/readyz's checks; for one model, over the stage queues its requests pass through (not a
    preprocess queue that rows preprocessed in the ingress skip)."""
    among = None
    if model is not None:
        queues = ingress.config.queues
        among = queues_on_path(queues, [q.name for q in queues], ingress.entry_kind(model))
    ready, _ = await readiness(ingress, among)
    return ready


# -- health and metadata ------------------------------------------------------------------

def oip_errors(codes: dict[int, str]) -> dict[int | str, dict]:
    return error_responses(codes, OipErrorBody)


_UNKNOWN = {404: "an unknown model, or a version it does not have"}
_NOT_READY = "Not ready (the protocol's answer: a 4xx)"


@router.get("", responses={200: success(ServerMetadata, "The server")})
async def server_metadata(request: Request) -> Response:
    return json_response({"name": SERVER_NAME, "version": request.app.version, "extensions": []})


@router.get("/health/live", responses={200: success(ServerLive, "The server answers")})
async def server_live() -> Response:
    return json_response({"live": True})


@router.get("/health/ready", responses={200: success(ServerReady, "Ready"), 400: success(ServerReady, _NOT_READY)})
async def server_ready(request: Request) -> Response:
    # The protocol: 200 means ready, a 4xx means not ready.
    ready = await oip_ready(_ingress(request))
    return json_response({"ready": ready}, status=200 if ready else 400)


async def _model_ready(request: Request, model: str, version: str | None) -> Response:
    ingress = _ingress(request)
    manifest = oip_manifest(ingress, model, version)
    ready = await oip_ready(ingress, manifest.name)
    return json_response({"name": manifest.name, "ready": ready}, status=200 if ready else 400)


_MODEL_READY = {200: success(ModelReady, "Ready"), 400: success(ModelReady, _NOT_READY), **oip_errors(_UNKNOWN)}


@router.get("/models/{model}/ready", responses=_MODEL_READY)
async def model_ready(model: str, request: Request) -> Response:
    return await _model_ready(request, model, None)


@router.get("/models/{model}/versions/{version}/ready", responses=_MODEL_READY)
async def model_version_ready(model: str, version: str, request: Request) -> Response:
    return await _model_ready(request, model, version)


_MODEL_META = {200: success(OipModelMetadata, "The model's inputs and outputs"), **oip_errors(_UNKNOWN)}


@router.get("/models/{model}", responses=_MODEL_META)
async def model_meta(model: str, request: Request) -> Response:
    return json_response(model_metadata(oip_manifest(_ingress(request), model, None)))


@router.get("/models/{model}/versions/{version}", responses=_MODEL_META)
async def model_version_meta(model: str, version: str, request: Request) -> Response:
    return json_response(model_metadata(oip_manifest(_ingress(request), model, version)))


# -- reading an inference request ---------------------------------------------------------

async def read_infer_body(request: Request, max_bytes: int, timeout_s: float) -> tuple[object, bytes | None]:
    """The JSON request, and the binary tensor data after it (Triton's extension) if any."""
    declared = request.headers.get(BINARY_HEADER)
    if declared is None:
        return await read_json(request, max_bytes, timeout_s), None
    raw = await read_body(request, max_bytes, timeout_s)
    if not declared.strip().isdigit() or int(declared) > len(raw):
        raise OipError(f"Inference-Header-Content-Length is {declared!r}, the body has {len(raw)} bytes")
    split = int(declared)
    if split == len(raw):
        check_content_type(request)  # the whole body is the JSON request
    return parse_json(raw[:split]), raw[split:]


# -- inference ------------------------------------------------------------------------------

def input_jobs(ingress: Ingress, manifest: ModelManifest, rows: list[list[float]] | None,
               images: list[str] | None, name: str) -> list[InferenceRequest]:
    """The requests a protocol's call becomes: all rows in one request, or one request per image
    (an image's problem named by its index in input ``name``). Shared by the TF Serving routes."""
    if rows is not None:
        return [ingress.parse_predict_body(manifest.name, {"instances": rows})]
    jobs = []
    for index, image in enumerate(images or []):
        try:
            jobs.append(ingress.parse_predict_body(manifest.name, {"image": image}))
        except ApiError as exc:
            raise ApiError(exc.status, exc.code, f"input {name!r} element {index}: {exc.message}",
                           exc.headers) from exc
    return jobs


@dataclass
class SyncAnswer:
    """The rows of a call's jobs answered synchronously, in order."""

    rows: list[RowPrediction]
    model_version: str
    missing: set[str]  # members of a model group that did not answer


async def answer_jobs(ingress: Ingress, manifest: ModelManifest, jobs: list[InferenceRequest],
                      timeout_s: float, version: str | None = None) -> SyncAnswer:
    """Every job through the ingress's reply queue, in flight together; a failure is raised as its 4xx/5xx.
    ``version``: the one named by the call (else the model's version policy chooses)."""
    for job in jobs:
        await ingress.versions.route(job, version)
    outcomes = await asyncio.gather(*(ingress.predict_sync(job, timeout_s) for job in jobs), return_exceptions=True)
    answer = SyncAnswer(rows=[], model_version=manifest.version, missing=set())
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
        if isinstance(outcome, Failure):
            raise ApiError(FAILURE_STATUS.get(outcome.code, 500), outcome.code.value, outcome.message)
        assert isinstance(outcome, Prediction)
        answer.rows.extend(outcome.rows)
        answer.model_version = outcome.model_version
        if outcome.partial:
            answer.missing |= {member for member, part in (outcome.parts or {}).items() if part.status != "succeeded"}
    return answer


async def infer_answer(ingress: Ingress, manifest: ModelManifest, call: InferCall, model_input: ModelInput,
                       version: str | None = None) -> dict:
    """An infer call answered synchronously, as the protocol's response (shared by REST and gRPC)."""
    timeout_s = ingress.timeout_for(None if call.timeout_us is None else call.timeout_us / 1e6)
    jobs = input_jobs(ingress, manifest, model_input.rows, model_input.images, input_name(manifest))
    answered = await answer_jobs(ingress, manifest, jobs, timeout_s, version)
    answer = {
        "model_name": manifest.name,
        "model_version": answered.model_version,
        "id": call.id if call.id is not None else str(jobs[0].id),
        "outputs": infer_outputs(answered.rows, len(manifest.labels), call.outputs),
    }
    if answered.missing:
        # A model group answered without some members: said here, and -1 / "" in the tensors.
        answer["parameters"] = {"partial": True, "missing_members": ",".join(sorted(answered.missing))}
    return answer


async def _infer(request: Request, model: str, version: str | None) -> Response:
    ingress = _ingress(request)
    manifest = oip_manifest(ingress, model, version)
    data, binary = await read_infer_body(request, ingress.settings.max_body_bytes, ingress.settings.body_timeout_s)
    call = parse_infer_call(data)
    model_input = read_model_input(call, manifest, binary, ingress.settings.max_rows)
    return json_response(await infer_answer(ingress, manifest, call, model_input, version))


_INFER_RESPONSES = {
    200: success(InferResponse, "The outputs, one row per input row or image"),
    **oip_errors({
        400: "a request the protocol refuses (the message names the field), malformed JSON, or input the model "
             "cannot take (the native API's 422s)",
        404: "an unknown model, or a version it does not have; an unknown item",
        408: "the body did not arrive in time (the connection is closed)",
        413: "more rows or images than the limit, an image too large, or a body over the limit",
        415: "a content type other than JSON, or an unknown Content-Encoding",
        500: "a stage failed to run the model",
        502: "members of a model group did not answer",
        503: "overloaded, no consumer on a stage, the broker or the store unavailable",
        504: "no answer within the deadline",
    }),
}
_INFER_BODY = request_body(
    {JSON: {"schema": inline_schema(InferRequest)},
     # Triton's binary tensor data: the JSON request (its length in Inference-Header-Content-Length), then bytes.
     "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    "The inference request (JSON), or with Triton's binary extension the JSON followed by the tensor's bytes",
    [header_parameter("Inference-Header-Content-Length", "The length of the JSON request when binary tensor "
                      "data follows it", {"type": "integer", "minimum": 0})])


@router.post("/models/{model}/infer", dependencies=ADMITTED, responses=_INFER_RESPONSES, openapi_extra=_INFER_BODY)
async def infer(model: str, request: Request) -> Response:
    return await _infer(request, model, None)


@router.post("/models/{model}/versions/{version}/infer", dependencies=ADMITTED, responses=_INFER_RESPONSES,
             openapi_extra=_INFER_BODY)
async def infer_version(model: str, version: str, request: Request) -> Response:
    return await _infer(request, model, version)
