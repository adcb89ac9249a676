"""``GET /ui``: the operator's page, server-side rendered, with a small script and no CDN.

The page is a shell (the profile, its sections, the forms); the script (api/ui/app.js)
draws the graph from ``GET /v1/topology/live`` and polls it, and calls the same HTTP
API as curl does (jobs, dead letters, predict), sending the API key typed into the
page. The page and its two files hold no data, so they are served without a key
(api/auth.py, ``OPEN_PREFIXES``); everything they show comes through keyed routes.
"""

from __future__ import annotations

import html
from functools import cache
from pathlib import Path
from string import Template

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from toposerve.api.ingress import Ingress

UI_DIR = Path(__file__).parent / "ui"
UI_PREFIX = "/ui"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}

router = APIRouter(include_in_schema=False)


@cache
def _read(name: str) -> str:
    return (UI_DIR / name).read_text()


def page(profile: str, mode: str, namespace: str, poll_ms: int) -> str:
    """The page for an ingress serving ``profile`` (every value escaped)."""
    return Template(_read("page.html")).substitute(
        profile=html.escape(profile), mode=html.escape(mode), namespace=html.escape(namespace), poll_ms=int(poll_ms))


@router.get(UI_PREFIX)
async def ui(request: Request) -> HTMLResponse:
    ingress: Ingress = request.app.state.ingress
    return HTMLResponse(page(ingress.config.profile, ingress.config.mode, ingress.settings.namespace,
                             ingress.settings.ui_poll_ms),
                        headers={"Cache-Control": "no-store", "Content-Security-Policy":
                                 "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'"})


@router.get(UI_PREFIX + "/{name}")
async def asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        return Response(status_code=404, content=f"no {name} here; the page is at {UI_PREFIX}", media_type="text/plain")
    return Response(_read(name), media_type=media_type)
