"""``GET /metrics`` (Prometheus text format) and ``GET /asyncapi.json`` (the message contracts)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from toposerve.api.errors import ApiError, error_responses

router = APIRouter()


# Out of the document: Prometheus text for scrapers, not part of the API.
@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/asyncapi.json", responses={
    200: {"description": "The AsyncAPI 3.0 document (JSON)",
          "content": {"application/json": {"schema": {"type": "object"}}}},
    **error_responses({404: "not_found: this ingress was started without an AsyncAPI document"}),
})
async def asyncapi(request: Request) -> Response:
    """The AsyncAPI 3.0 document of this profile's exchanges, routing keys and message schemas."""
    document = request.app.state.asyncapi
    if document is None:
        raise ApiError(404, "not_found", "this ingress was started without an AsyncAPI document")
    return Response(document, media_type="application/json")
