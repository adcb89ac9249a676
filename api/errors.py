"""One error shape for every failure: ``{"error": {"code": ..., "message": ...}}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from toposerve.api.responses import json_response
from toposerve.brokers import redact

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(description="What went wrong, for programs: e.g. invalid_input, unknown_model, overloaded")
    message: str = Field(description="What went wrong, for people: names the field, value or limit")


class ErrorBody(BaseModel):
    """The body of every error of the API (the Open Inference Protocol's /v2 routes have their own)."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "string"}}}


def error_responses(codes: dict[int, str], model: type[BaseModel] = ErrorBody) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route's error statuses: status -> the error codes it answers with.

    Written per route, from what the route (and what it calls) raises, so the spec
    lists what really comes back; 503s carry ``Retry-After``.
    """
    return {status: {"model": model, "description": description,
                     **({"headers": RETRY_AFTER} if status == 503 else {})}
            for status, description in codes.items()}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    # No connection URL's password in an answer, whatever exception text a message quotes.
    return json_response({"error": {"code": code, "message": redact(message)}}, status, headers)


def describe_validation_errors(errors: list[dict]) -> str:
    parts = []
    for err in errors[:10]:
        location = ".".join(str(part) for part in err.get("loc", ()) if part != "body") or "body"
        parts.append(f"{location}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


_STATUS_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type"}


def api_error_response(exc: ApiError) -> Response:
    """What a caller gets for ``exc``: its error shape, or the profile's fallback answer."""
    fallback = getattr(exc, "fallback", None)
    if fallback is not None:
        # The profile's degraded answer instead of an error (the circuit-break pattern).
        return json_response({**fallback, "fallback": True, "reason": exc.message}, headers={"X-Fallback": "true"})
    return error_response(exc.status, exc.code, exc.message, exc.headers)


def unexpected_error_response() -> Response:
    """A bug, not the caller's fault: logged whole (by the caller of this), told little."""
    return error_response(500, "internal", "internal error; the server log has the details")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        return api_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        return error_response(422, "invalid_request", describe_validation_errors(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return unexpected_error_response()
