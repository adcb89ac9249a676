"""The predict route under load, in front of FastAPI's routing and middleware stack.

Profiled at 64 concurrent sync callers, a quarter of the ingress's CPU per request went to
matching the route among a dozen routers, solving its dependencies and FastAPI's inner
middlewares, for a route whose inputs are a path segment and a body; FastAPI's own outer
middlewares (server errors, exception telemetry, a body limit the route enforces itself)
cost another twentieth. So a plain ``POST /v1/models/{model}/predict`` for a model this
profile serves, with no query string, is answered by ``IngressApp`` before FastAPI sees it:
by the very function the FastAPI route calls (``routes_v1.handle_predict``), under the same
admission bound and with the same error answers. Everything else (other routes, a query
such as ``?timeout=``, an unknown model) goes through FastAPI as before, which also keeps
documenting the route in OpenAPI.

The fast path runs inside the same security, observability and swap hand-over middlewares
as every route (``enable_fast_path`` wraps it in them, sharing their rate limiters): API
keys, rate limits, traces, metrics and a live swap's hold apply to it too.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from fastapi import FastAPI
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from toposerve.api.errors import ApiError, api_error_response, unexpected_error_response
from toposerve.api.routes_v1 import handle_predict

log = logging.getLogger(__name__)

_PREDICT = re.compile(r"/v1/models/([^/]+)/predict")


class IngressApp(FastAPI):
    """The ingress's FastAPI application, with the predict fast path in front of it."""

    _fast_path: ASGIApp | None = None

    def enable_fast_path(self, wrap: Callable[[ASGIApp], ASGIApp]) -> None:
        """Answer plain predict requests here, inside the middlewares ``wrap`` puts around them."""
        self._fast_path = wrap(self._answer_predict)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._fast_path is not None and self._served_model(scope) is not None:
            scope["app"] = self  # what Starlette sets: the middlewares find the state through it
            await self._fast_path(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def _served_model(self, scope: Scope) -> str | None:
        """The model of a plain predict request for a model this profile serves, else None."""
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("query_string"):
            return None
        match = _PREDICT.fullmatch(scope["path"])
        ingress = getattr(self.state, "ingress", None) if match is not None else None
        if ingress is None or match.group(1) not in ingress.manifests:  # type: ignore[union-attr]
            return None
        return match.group(1)  # type: ignore[union-attr]

    async def _answer_predict(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Read again past the middlewares: a live swap may have switched the profile meanwhile.
        ingress = self.state.ingress
        model = _PREDICT.fullmatch(scope["path"]).group(1)  # type: ignore[union-attr]
        try:
            ingress.manifest(model)  # 404 for a model the profile no longer serves, as the route answers
            with ingress.admission():
                response = await handle_predict(ingress, model, Request(scope, receive), None)
        except ApiError as exc:
            response = api_error_response(exc)
        except Exception:
            log.exception("unhandled error")
            response = unexpected_error_response()
        await response(scope, receive, send)
