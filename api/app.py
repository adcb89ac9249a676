"""The FastAPI ingress: ``create_app(settings, config)``; connections live in the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

from faststream.specification.base import Specification
from prometheus_client import CollectorRegistry

from toposerve.api import (
    book_routes,
    edge_routes,
    health,
    items_routes,
    job_events_routes,
    oip_routes,
    operator_routes,
    routes_v1,
    ui_routes,
    version_routes,
)
from toposerve.api.auth import SecurityMiddleware, security_options
from toposerve.api.batch_routes import router as batch_router
from toposerve.api.batch_routes import submit_router
from toposerve.api.config import IngressConfig
from toposerve.api.errors import install_error_handlers
from toposerve.api.fast_path import IngressApp
from toposerve.api.ingress import Ingress
from toposerve.api.live_profile import HandoverGate, IngressSwitch, LiveProfileSource
from toposerve.api.metrics import IngressMetrics, ObservabilityMiddleware
from toposerve.api.observability_routes import AsyncApiDocument
from toposerve.api.observability_routes import router as observability_router
from toposerve.api.openapi import install_openapi
from toposerve.api.tf_serving_routes import tf_serving_router
from toposerve.brokers import Settings


class Companion(Protocol):
    """Something that runs inside the ingress process (web_single: the stages)."""

    async def start(self) -> None: ...

    async def drain_and_close(self) -> None: ...


def create_app(settings: Settings, config: IngressConfig, companions: Sequence[Companion] = (),
               registry: CollectorRegistry | None = None, asyncapi: Callable[[], Specification] | None = None,
               follow: LiveProfileSource | None = None) -> IngressApp:
    """``registry``: where the process's metrics live (web_single shares it with its stages);
    ``asyncapi``: makes the profile's AsyncAPI document, served at /asyncapi.json and /asyncapi;
    ``follow``: the namespace's live profile, which the app switches to when a swap moves it
    (api/live_profile.py; None: it serves ``config`` until it stops)."""

    @asynccontextmanager
    async def lifespan(app: IngressApp) -> AsyncIterator[None]:
        metrics = IngressMetrics(registry if registry is not None else CollectorRegistry())
        app.state.metrics = metrics
        app.state.asyncapi = AsyncApiDocument.of(asyncapi()) if asyncapi is not None else None
        for companion in companions:
            await companion.start()
        ingress = Ingress(settings, config)
        await ingress.start()
        app.state.ingress = ingress
        metrics.watch(ingress)
        grpc_server = None
        if settings.grpc_port is not None:
            if security["keys"].enabled:
                # Refused rather than served open: the gRPC port does not check API keys.
                raise RuntimeError("TOPOSERVE_GRPC_PORT is set with API keys on, but the gRPC port does not "
                                   "check API keys; unset one of them")
            # Imported only when served: grpcio and tritonclient's messages cost every other ingress nothing.
            from toposerve.api.oip_grpc import start_grpc_server

            grpc_server = await start_grpc_server(lambda: app.state.ingress, settings.grpc_host, settings.grpc_port)
        switch = None
        if follow is not None:
            def rewatch(old: Ingress, new: Ingress) -> None:
                metrics.unwatch()
                metrics.watch(new)

            switch = IngressSwitch(app, ingress, follow, build=lambda config: Ingress(settings, config),
                                   on_switch=rewatch, hold_limit_s=config.spec.max_timeout_s)
            switch.start()
            app.state.switch = switch
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(5)
            metrics.unwatch()
            if switch is not None:
                await switch.close()
            await app.state.ingress.close()
            for companion in companions:
                await companion.drain_and_close()

    app = IngressApp(
        title="toposerve",
        version="0.1.0",
        summary=f"Inference ingress, profile {config.profile!r} ({config.mode})",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    # API keys and the rate limit (both optional), inside the observability middleware so
    # refused requests are traced and counted too.
    security = security_options(settings)
    # Work is held while a swap hands over (innermost of ours: inside security and observability).
    app.add_middleware(HandoverGate)
    app.add_middleware(SecurityMiddleware, **security)
    install_openapi(app, api_keys=security["keys"].enabled, rate_limited=security["limiter"] is not None)
    app.add_middleware(ObservabilityMiddleware)
    # The same three around the predict fast path (sharing the limiters: one budget per caller).
    app.enable_fast_path(lambda fast: ObservabilityMiddleware(SecurityMiddleware(HandoverGate(fast), **security)))
    # Routes whose answers depend on the profile (its mode, its overload fallback) are built
    # for it. Predict first: routes are matched in order, and it is the one under load.
    app.include_router(routes_v1.predict_router(config))
    app.include_router(observability_router)
    app.include_router(health.router)
    app.include_router(routes_v1.router)
    app.include_router(version_routes.router)
    app.include_router(job_events_routes.router)
    app.include_router(edge_routes.router)
    app.include_router(book_routes.book_router(config))
    if config.mode == "sync":
        app.include_router(tf_serving_router())
    app.include_router(oip_routes.router)
    app.include_router(submit_router(config))
    app.include_router(batch_router)
    app.include_router(items_routes.router)
    app.include_router(operator_routes.router)
    app.include_router(ui_routes.router)
    return app
