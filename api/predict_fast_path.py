"""The predict route under load, without FastAPI's routing and dependency solving.

Profiled at 64 concurrent sync callers, a quarter of the ingress's CPU per request went to
matching the route among a dozen routers, solving its dependencies and FastAPI's inner
middlewares, for a route whose inputs are a path segment and a body. So a plain
``POST /v1/models/{model}/predict`` for a model this profile serves, with no query
string, is answered here: by the very function the FastAPI route calls
(``routes_v1.handle_predict``), under the same admission bound and with the same error
answers. Everything else (other routes, a query such as ``?timeout=``, an unknown model)
goes through FastAPI as before, which also keeps documenting the route in OpenAPI.

It sits inside the security and observability middlewares: API keys, rate limits,
traces and metrics hold for it as for every route.
"""

from __future__ import annotations

import logging
import re

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from toposerve.api.errors import ApiError, api_error_response, unexpected_error_response
from toposerve.api.routes_v1 import handle_predict

log = logging.getLogger(__name__)

_PREDICT = re.compile(r"/v1/models/([^/]+)/predict")


class PredictFastPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = (_PREDICT.fullmatch(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST"
                 and not scope.get("query_string") else None)
        ingress = getattr(scope["app"].state, "ingress", None) if match is not None else None
        if ingress is None or match.group(1) not in ingress.manifests:  # type: ignore[union-attr]
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            with ingress.admission():
                response = await handle_predict(ingress, match.group(1), request, None)  # type: ignore[union-attr]
        except ApiError as exc:
            response = api_error_response(exc)
        except Exception:
            log.exception("unhandled error")
            response = unexpected_error_response()
        await response(scope, receive, send)
