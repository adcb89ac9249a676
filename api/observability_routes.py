"""``GET /metrics`` (Prometheus text format) and ``GET /asyncapi.json`` (the message contracts)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from toposerve.api.errors import ApiError

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/asyncapi.json")
async def asyncapi(request: Request) -> Response:
    """The AsyncAPI 3.0 document of this profile's exchanges, routing keys and message schemas."""
    document = request.app.state.asyncapi
    if document is None:
        raise ApiError(404, "not_found", "this ingress was started without an AsyncAPI document")
    return Response(document, media_type="application/json")
