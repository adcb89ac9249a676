"""``GET /metrics`` (Prometheus text format), ``GET /asyncapi.json`` and ``GET /asyncapi``
(the message contracts, as FastStream generates them: JSON, and FastStream's HTML view)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from faststream.specification.asyncapi.site import get_asyncapi_html
from faststream.specification.base import Specification
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from toposerve.api.errors import ApiError, error_responses

router = APIRouter()


@dataclass(frozen=True)
class AsyncApiDocument:
    """A profile's AsyncAPI document, rendered once at startup."""

    json: bytes
    html: str

    @classmethod
    def of(cls, specification: Specification) -> AsyncApiDocument:
        # No "try it out" plugin: it posts through an HTTP route this ingress does not have.
        return cls(json=specification.to_json().encode(),
                   html=get_asyncapi_html(specification, try_it_out_path=None))


def _document(request: Request) -> AsyncApiDocument:
    document = request.app.state.asyncapi
    if document is None:
        raise ApiError(404, "not_found", "this ingress was started without an AsyncAPI document")
    return document


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
    return Response(_document(request).json, media_type="application/json")


# The page is returned as it is; the route's default class stays JSON, so errors are documented as JSON.
@router.get("/asyncapi", responses={
    200: {"description": "The AsyncAPI document as a page (FastStream's view; its scripts load from a CDN)",
          "content": {"text/html": {"schema": {"type": "string"}}}},
    **error_responses({404: "not_found: this ingress was started without an AsyncAPI document"}),
})
async def asyncapi_page(request: Request) -> HTMLResponse:
    """The AsyncAPI document, to read in a browser."""
    return HTMLResponse(_document(request).html)
