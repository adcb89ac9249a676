"""The hot requests, answered in front of FastAPI's routing and middleware stack.

Profiled at 64 concurrent sync callers, a quarter of the ingress's CPU per request went to
matching the route among a dozen routers, solving its dependencies and FastAPI's inner
middlewares, for a route whose inputs are a path segment and a body; FastAPI's own outer
middlewares (server errors, exception telemetry, a body limit the route enforces itself)
cost another twentieth. In async profiles the long poll of a job's result cost as much
again. So ``IngressApp`` answers, before FastAPI sees them:

- a plain ``POST /v1/models/{model}/predict`` for a model this profile serves, with no query
  string: by the very function the FastAPI route calls (``routes_v1.handle_predict``), under
  the same admission bound;
- ``GET /v1/jobs/{id}``, with no query or a plain ``wait`` within its bounds: by the route's
  own function (``routes_v1.get_job``).

With the same error answers. Everything else (other routes, a query such as ``?timeout=``,
a ``wait`` the route would refuse, an unknown model) goes through FastAPI as before, which
also keeps documenting the routes in OpenAPI.

The fast paths run inside the same security, observability and swap hand-over middlewares
as every route (``enable_fast_path`` wraps them in them, sharing their rate limiters): API
keys, rate limits, traces, metrics and a live swap's hold apply to them too.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from toposerve.api.errors import ApiError, api_error_response, unexpected_error_response
from toposerve.api.routes_v1 import MAX_WAIT_S, get_job, handle_predict

log = logging.getLogger(__name__)

_PREDICT = re.compile(r"/v1/models/([^/]+)/predict")
_JOB = re.compile(r"/v1/jobs/([^/]+)")
_WAIT = re.compile(rb"(?:wait=([0-9]+(?:\.[0-9]+)?))?")

# A fast route: answers one request (raising ApiError for the error shape) from the path's match.
FastRoute = Callable[[Any, "re.Match[str]", Request], Awaitable[Response]]


class IngressApp(FastAPI):
    """The ingress's FastAPI application, with the fast paths in front of it."""

    _fast_path: ASGIApp | None = None

    def enable_fast_path(self, wrap: Callable[[ASGIApp], ASGIApp]) -> None:
        """Answer the hot requests here, inside the middlewares ``wrap`` puts around them."""
        self._fast_path = wrap(self._answer)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._fast_path is not None and self._fast_route(scope) is not None:
            scope["app"] = self  # what Starlette sets: the middlewares find the state through it
            await self._fast_path(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def _fast_route(self, scope: Scope) -> tuple[FastRoute, re.Match[str]] | None:
        """The fast route for this request, or None (then FastAPI answers it):

        - ``POST /v1/models/{model}/predict`` with no query string, for a model this profile serves;
        - ``GET /v1/jobs/{id}`` with no query string or only ``wait`` (a plain number within the
          route's bounds: anything else is FastAPI's to refuse with its 422).
        """
        if scope["type"] != "http":
            return None
        method, query = scope["method"], scope.get("query_string", b"")
        if method == "POST" and not query:
            match = _PREDICT.fullmatch(scope["path"])
            ingress = getattr(self.state, "ingress", None) if match is not None else None
            if ingress is not None and match.group(1) in ingress.manifests:  # type: ignore[union-attr]
                return _predict, match  # type: ignore[return-value]
        elif method == "GET" and (match := _JOB.fullmatch(scope["path"])) is not None:
            wait = _WAIT.fullmatch(query)
            if wait is not None and (wait.group(1) is None or float(wait.group(1)) <= MAX_WAIT_S):
                return _job, match
        return None

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Matched again past the middlewares (a few microseconds): a live swap may have switched
        # the profile meanwhile.
        route = self._fast_route(scope)
        try:
            ingress = self.state.ingress
            if route is None:  # its model is no longer served: the route's answer
                ingress.manifest(_PREDICT.fullmatch(scope["path"]).group(1))  # type: ignore[union-attr]
                raise AssertionError("a fast route that is not one")
            handler, match = route
            response = await handler(ingress, match, Request(scope, receive))
        except ApiError as exc:
            response = api_error_response(exc)
        except Exception:
            log.exception("unhandled error")
            response = unexpected_error_response()
        await response(scope, receive, send)


async def _predict(ingress: Any, match: re.Match[str], request: Request) -> Response:
    with ingress.admission():
        return await handle_predict(ingress, match.group(1), request, None)


async def _job(ingress: Any, match: re.Match[str], request: Request) -> Response:
    wait = request.query_params.get("wait")
    return await get_job(match.group(1), request, float(wait) if wait is not None else 0.0)
