"""The FastAPI ingress: ``create_app(settings, config)``; connections live in the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import health, routes_v1
from api.errors import install_error_handlers
from api.ingress import Ingress, IngressConfig
from brokers.settings import Settings


def create_app(settings: Settings, config: IngressConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ingress = Ingress(settings, config)
        await ingress.start()
        app.state.ingress = ingress
        try:
            yield
        finally:
            await ingress.close()

    app = FastAPI(
        title="toposerve",
        version="0.1.0",
        summary=f"Inference ingress, profile {config.profile!r} ({config.mode})",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(routes_v1.router)
    return app
