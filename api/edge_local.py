"""The edge client's local HTTP endpoint (``toposerve edge run``): the server's predict API, answered on-device.

``POST /v1/models/{model}/predict`` takes the same body as the ingress
(``PredictBody``) and answers like a sync profile: 200 with the job record
(``predictions``, ``model_version``, ``timings``), or the same error shape and
status codes. An app switches between edge and server inference by its base URL.
Also ``GET /v1/models``, ``GET /v1/models/{model}``, ``GET /healthz``, ``GET /readyz``.

The predictor (producers.edge.EdgeRuntime) is passed in, so this module depends on
nothing but the protocol below.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.responses import Response

from toposerve.api.body import read_json
from toposerve.api.errors import ApiError, install_error_handlers
from toposerve.api.ingress import FAILURE_STATUS, validate_predict_body
from toposerve.api.responses import json_response
from toposerve.api.routes_v1 import model_description
from toposerve.brokers import JobRecord, Prediction
from toposerve.models import InputError, ModelManifest


class LocalPredictor(Protocol):
    def manifest(self, model: str) -> ModelManifest | None: ...

    @property
    def models(self) -> dict[str, object]: ...

    async def predict_async(self, model: str, *, instances: list[list[float]] | None = None,
                            image: str | None = None) -> Prediction: ...


def create_edge_app(
    predictor: LocalPredictor,
    max_body_bytes: int = 8 * 1024 * 1024,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
) -> FastAPI:
    app = FastAPI(title="toposerve edge", version="0.1.0", summary="On-device inference with the server's API",
                  lifespan=lifespan)
    install_error_handlers(app)

    def manifest_of(model: str) -> ModelManifest:
        manifest = predictor.manifest(model)
        if manifest is None:
            served = ", ".join(sorted(predictor.models)) or "none"
            raise ApiError(404, "unknown_model", f"unknown model {model!r}; this edge client serves: {served}")
        return manifest

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        ready = bool(predictor.models)
        return json_response({"ready": ready, "models": sorted(predictor.models)}, 200 if ready else 503)

    @app.get("/v1/models")
    async def list_models() -> Response:
        return json_response({"models": [model_description(manifest_of(name)) for name in sorted(predictor.models)]})

    @app.get("/v1/models/{model}")
    async def describe(model: str) -> Response:
        return json_response(model_description(manifest_of(model)))

    @app.post("/v1/models/{model}/predict")
    async def predict(model: str, request: Request) -> Response:
        manifest_of(model)  # 404 before reading the body, as the ingress does
        body = validate_predict_body(await read_json(request, max_body_bytes), '{"image": "<base64 PNG or JPEG>"}')
        if body.item_id is not None:
            raise ApiError(422, "invalid_input", "'item_id' needs a data-cache profile on a server; "
                                                 "the edge endpoint takes 'instances' or 'image'")
        try:
            prediction = await predictor.predict_async(model, instances=body.instances, image=body.image)
        except InputError as exc:
            raise ApiError(FAILURE_STATUS.get(exc.code, 422), str(exc.code), exc.message) from exc
        return Response(JobRecord.from_terminal(prediction).model_dump_json(), media_type="application/json")

    return app
