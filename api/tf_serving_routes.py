"""TF Serving's REST API on the synchronous profiles (the book's synchronous pattern's client).

``POST /v1/models/{m}[/versions/{v}]:predict`` (row and column forms), ``GET
/v1/models/{m}/versions/{v}`` (status) and ``GET /v1/models/{m}[/versions/{v}]/metadata``
(signature def). ``GET /v1/models/{m}`` is the native description, which on these
profiles also carries TF Serving's ``model_version_status`` (api/routes_v1.py).

The calls go through the same path as the Open Inference Protocol's infer (its
``input_jobs`` / ``answer_jobs``); errors are TF Serving's ``{"error": "<message>"}``,
400 for a body it would refuse (the message names what was wrong).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from toposerve.api.admission import ADMITTED
from toposerve.api.body import read_json
from toposerve.api.errors import ApiError, error_responses
from toposerve.api.ingress import Ingress
from toposerve.api.oip_codec import OipErrorBody, input_name
from toposerve.api.oip_routes import OipRoute, answer_jobs, input_jobs
from toposerve.api.openapi import json_body, success
from toposerve.api.responses import json_response
from toposerve.api.tf_serving_codec import (
    TfColumnAnswer,
    TfModelMetadata,
    TfModelStatus,
    TfPredictRequest,
    TfRowAnswer,
    TfServingError,
    parse_tf_predict,
    tf_model_metadata,
    tf_model_status,
    tf_predict_answer,
)
from toposerve.models import ModelManifest

_UNKNOWN = {404: "an unknown model, or a version it does not have"}
_PREDICT_ERRORS = {
    400: "a body TF Serving refuses: not one of instances/inputs, wrong element types, an unknown input name or "
         "signature, malformed JSON; or input the model cannot take (feature count, not an image)",
    404: "an unknown model or version",
    413: "more rows or images than the limit, or a body over the limit",
    415: "not JSON",
    500: "a stage failed to run the model",
    503: "overloaded, no consumer on a stage, the broker unavailable",
    504: "no answer within the deadline",
}


def _ingress(request: Request) -> Ingress:
    return request.app.state.ingress


def _manifest(ingress: Ingress, model: str, version: str | None) -> ModelManifest:
    ingress.manifest(model)  # the API's own 404 for an unknown model
    try:
        return ingress.version_manifest(model, version)
    except ApiError as exc:
        raise ApiError(404, "unknown_version", f"Servable not found for request: Specific({model}, {version}); "
                                               f"{exc.message}") from exc


async def _predict(request: Request, model: str, version: str | None) -> Response:
    ingress = _ingress(request)
    manifest = _manifest(ingress, model, version)
    data = await read_json(request, ingress.settings.max_body_bytes, ingress.settings.body_timeout_s)
    try:
        call = parse_tf_predict(data, manifest, ingress.settings.max_rows)
    except TfServingError as exc:
        raise ApiError(exc.status, "invalid_argument", exc.message) from exc
    jobs = input_jobs(ingress, manifest, call.rows, call.images, input_name(manifest))
    answered = await answer_jobs(ingress, manifest, jobs, ingress.config.spec.timeout_s, version)
    return json_response(tf_predict_answer(call, answered.rows, manifest))


def tf_serving_router() -> APIRouter:
    router = APIRouter(prefix="/v1/models", tags=["tf-serving"], route_class=OipRoute)
    predict_responses = {200: success(TfRowAnswer | TfColumnAnswer, "predictions (row form) or outputs "
                                                                     "(column form)"),
                         **error_responses(_PREDICT_ERRORS, OipErrorBody)}
    predict_body = json_body(TfPredictRequest, "TF Serving's predict body, row ('instances') or column ('inputs') "
                                               "form")
    known = error_responses(_UNKNOWN, OipErrorBody)

    @router.post("/{model}:predict", dependencies=ADMITTED, responses=predict_responses, openapi_extra=predict_body)
    async def tf_predict(model: str, request: Request) -> Response:
        return await _predict(request, model, None)

    @router.post("/{model}/versions/{version}:predict", dependencies=ADMITTED, responses=predict_responses,
                 openapi_extra=predict_body)
    async def tf_predict_version(model: str, version: str, request: Request) -> Response:
        return await _predict(request, model, version)

    @router.get("/{model}/versions/{version}", responses={200: success(TfModelStatus, "The version's status"),
                                                          **known})
    async def tf_version_status(model: str, version: str, request: Request) -> Response:
        return json_response(tf_model_status(_manifest(_ingress(request), model, version)))

    @router.get("/{model}/metadata", responses={200: success(TfModelMetadata, "The signature def"), **known})
    async def tf_metadata(model: str, request: Request) -> Response:
        return json_response(tf_model_metadata(_manifest(_ingress(request), model, None)))

    @router.get("/{model}/versions/{version}/metadata",
                responses={200: success(TfModelMetadata, "The signature def"), **known})
    async def tf_version_metadata(model: str, version: str, request: Request) -> Response:
        return json_response(tf_model_metadata(_manifest(_ingress(request), model, version)))

    return router
