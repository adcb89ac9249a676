"""Liveness and readiness: ``/healthz`` (the process answers) and ``/readyz`` (its dependencies do)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from toposerve.api.errors import RETRY_AFTER
from toposerve.api.ingress import Ingress
from toposerve.api.openapi import success
from toposerve.api.responses import json_response
from toposerve.api.schemas import Health, Readiness
from toposerve.brokers import redact

router = APIRouter()


@router.get("/healthz", responses={200: success(Health, "The process answers")})
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


async def _check_redis(ingress: Ingress) -> tuple[bool, str]:
    try:
        await asyncio.wait_for(ingress.results.client.ping(), timeout=1.0)
    except Exception as exc:  # any failure means "not ready", with the reason shown
        return False, redact(f"{type(exc).__name__}: {exc}")
    return True, "ok"


def _check_broker(ingress: Ingress) -> tuple[bool, str, dict[str, int]]:
    connection = ingress.connection
    if connection is None or connection.is_closed:
        return False, "not connected", {}
    monitor = ingress.monitor
    if monitor is None:
        return False, "not started", {}
    # The monitor's last passive declare of every stage queue (refreshed each second).
    if monitor.error is not None:
        return False, redact(monitor.error), monitor.consumers
    return True, "ok", monitor.consumers


async def _check_stages(ingress: Ingress, among: list[str] | None) -> tuple[bool, str]:
    """Every stage queue (of ``among``; None: of the profile) has a consumer."""
    monitor = ingress.monitor
    if monitor is None:
        return False, "not started"
    if monitor.without_consumers(among):
        # The monitor's view is up to a second old: look again before saying "not ready".
        await monitor.refresh()
    idle = monitor.without_consumers(among)
    if monitor.error is not None:
        return False, redact(monitor.error)
    if idle:
        return False, f"no consumer on {', '.join(idle)}"
    return True, "ok"


async def readiness(ingress: Ingress, among: list[str] | None = None) -> tuple[bool, dict]:
    """Ready means a request of each kind this profile serves would be handled now: the broker
    and Redis answer, the models are loaded, and every stage of the topology (or of
    ``among``, the queues one model's requests pass through) is consuming."""
    redis_ok, redis_detail = await _check_redis(ingress)
    stages_ok, stages_detail = await _check_stages(ingress, among)
    broker_ok, broker_detail, consumers = _check_broker(ingress)
    models_ok = bool(ingress.manifests)
    ready = redis_ok and broker_ok and models_ok and stages_ok
    return ready, {
        "ready": ready,
        "checks": {
            "broker": {"ok": broker_ok, "detail": broker_detail},
            "redis": {"ok": redis_ok, "detail": redis_detail},
            "models": {"ok": models_ok, "detail": sorted(ingress.manifests)},
            "stages": {"ok": stages_ok, "detail": stages_detail},
        },
        "stage_consumers": consumers,
    }


@router.get("/readyz", responses={
    200: success(Readiness, "Ready: the broker, Redis, the models and every stage are"),
    503: success(Readiness, "Not ready: see which check failed", RETRY_AFTER),
})
async def readyz(request: Request) -> Response:
    ready, body = await readiness(request.app.state.ingress)
    return json_response(body, 200 if ready else 503, headers=None if ready else {"Retry-After": "1"})
