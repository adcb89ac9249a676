"""The ingress's OpenAPI document: what routes declare their bodies and errors with, and what
only the assembled app knows (API keys, rate limits), added to the document FastAPI builds.

The routes read their bodies by hand (api/body.py: size limits, gzip, clear errors), so
FastAPI sees no body parameter: each route declares its request body here, from a
pydantic model, and its error statuses from what it raises (``error_responses``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from toposerve.api.auth import is_open
from toposerve.api.config import IngressConfig
from toposerve.api.errors import RETRY_AFTER
from toposerve.api.schemas import OverloadFallback

JSON = "application/json"
BINARY_SCHEMA = {"type": "string", "format": "binary"}
LOCATION = {"Location": {"description": "Where the created resource is read", "schema": {"type": "string"}}}
X_REQUEST_TIMEOUT = {
    "name": "X-Request-Timeout", "in": "header", "required": False, "schema": {"type": "number"},
    "description": "Sync answers: seconds to wait (as ?timeout=; the query wins)",
}

# Error statuses shared by routes, as status -> the codes they come with (joined by ``codes``).
BODY_ERRORS = {
    400: "invalid_json: malformed, empty or not UTF-8; invalid_body: a broken gzip/deflate body; client_disconnected",
    408: "request_timeout: the body did not arrive in time (the connection is closed)",
    413: "body_too_large",
    415: "unsupported_media_type: not JSON, or a Content-Encoding other than gzip and deflate",
}
INPUT_ERRORS = {
    400: "invalid_item_id",
    404: "unknown_model",
    413: "too_large: rows, image pixels or bytes",
    422: "invalid_request: none or both inputs, wrong types, unknown fields; invalid_input: wrong feature count, "
         "NaN/inf, empty rows, not base64, not a PNG/JPEG, truncated image, the wrong input kind for the model",
}
ADMISSION_ERRORS = {503: "overloaded: at ingress.max_in_flight, or a queue at its bound (answered with the "
                         "profile's overload_fallback instead, when it sets one)"}
ASYNC_ERRORS = {503: "store_unavailable, broker_unavailable"}
SYNC_ERRORS = {
    404: "unknown_item (data-cache profiles)",
    422: "invalid_message",
    500: "internal: a stage failed to run the model",
    502: "incomplete: members of a model group did not answer",
    503: "no_consumer: a stage on the request's path is down; broker_unavailable; store_unavailable",
    504: "deadline_exceeded",
}


def codes(*groups: Mapping[int, str]) -> dict[int, str]:
    """Error groups merged: the codes of one status joined."""
    merged: dict[int, str] = {}
    for group in groups:
        for status, text in group.items():
            merged[status] = f"{merged[status]}; {text}" if status in merged else text
    return dict(sorted(merged.items()))


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` resolved in place.

    A request body declared through ``openapi_extra`` is copied into the document as
    it is, where ``#/$defs/...`` would point at the document's root; our request models
    are not recursive, so resolving them in place is finite.
    """
    schema = model.model_json_schema(mode="validation")
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                siblings = {key: resolve(value) for key, value in node.items() if key != "$ref"}
                return {**resolve(definitions[ref.removeprefix("#/$defs/")]), **siblings}
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


def request_body(content: Mapping[str, dict[str, Any]], description: str,
                 parameters: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its body itself (``content``: media type -> media object)."""
    extra: dict[str, Any] = {"requestBody": {"required": True, "description": description, "content": dict(content)}}
    if parameters:
        extra["parameters"] = list(parameters)  # FastAPI appends these to the ones it found
    return extra


def json_body(model: type[BaseModel], description: str, parameters: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    return request_body({JSON: {"schema": inline_schema(model)}}, description, parameters)


def header_parameter(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """A header a route reads by hand (FastAPI only documents the ones it parses)."""
    return {"name": name, "in": "header", "required": False, "schema": schema or {"type": "string"},
            "description": description}


def success(model: Any, description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"model": model, "description": description, **({"headers": headers} if headers else {})}


def with_fallback(config: IngressConfig, responses: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    """An admitted route's responses, with the 200 the profile's overload fallback is answered with (if it has one)."""
    if config.spec.overload_fallback is None:
        return responses
    ok = dict(responses.get(200) or {"description": "The profile's overload fallback (load was shed)"})
    ok["model"] = OverloadFallback if "model" not in ok else ok["model"] | OverloadFallback
    return {**responses, 200: ok}


# -- what FastAPI cannot know -------------------------------------------------------------

_SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}
_ERROR_REF = {JSON: {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}


def _drop_unfailing_validation(spec: dict[str, Any]) -> None:
    """Remove the 422 FastAPI adds to every operation with parameters, where validation cannot fail.

    A string path parameter takes any URL segment, and the headers in the document are
    read by the routes themselves (``header_parameter``: FastAPI parses none), so an
    operation with only those never answers FastAPI's ``HTTPValidationError``. Every
    other operation declares its own 422 (our error shape), and then FastAPI adds none;
    one that forgot keeps FastAPI's, which the OpenAPI test refuses.
    """
    def unfailing(parameter: dict[str, Any]) -> bool:
        return parameter["in"] == "header" or (parameter["in"] == "path"
                                               and parameter.get("schema", {}).get("type") == "string")

    for item in spec.get("paths", {}).values():
        for operation in item.values():
            response = operation.get("responses", {}).get("422", {})
            if "HTTPValidationError" in str(response) and all(map(unfailing, operation.get("parameters", []))):
                del operation["responses"]["422"]
    schemas = spec.get("components", {}).get("schemas", {})
    if "HTTPValidationError" not in str(spec.get("paths")):
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)


def _document_security(spec: dict[str, Any], api_keys: bool, rate_limited: bool) -> None:
    """What api/auth.py's middleware answers on every path that is not open, before any route runs."""
    refusals: dict[str, dict[str, Any]] = {}
    if api_keys:
        spec.setdefault("components", {})["securitySchemes"] = _SECURITY_SCHEMES
        refusals["401"] = {"description": "unauthenticated: no API key", "content": _ERROR_REF,
                           "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}}
        refusals["403"] = {"description": "forbidden: the API key is not valid", "content": _ERROR_REF}
    if api_keys or rate_limited:
        limits = [*(["too many invalid API keys from this address"] if api_keys else []),
                  *(["more requests per second than the rate limit"] if rate_limited else [])]
        refusals["429"] = {"description": f"rate_limited: {'; '.join(limits)}", "content": _ERROR_REF,
                           "headers": RETRY_AFTER}
    for path, item in spec.get("paths", {}).items():
        if is_open(path):
            continue
        for operation in item.values():
            if api_keys:
                operation["security"] = [{"bearer": []}, {"apiKey": []}]  # either one
            responses = operation.setdefault("responses", {})
            for status, response in refusals.items():
                responses.setdefault(status, response)


def install_openapi(app: FastAPI, *, api_keys: bool, rate_limited: bool) -> None:
    """``app.openapi()`` (and /openapi.json): FastAPI's document, finished as above, built once."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = build()
            _drop_unfailing_validation(spec)
            _document_security(spec, api_keys, rate_limited)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customize the document
