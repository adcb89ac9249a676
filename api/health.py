"""Liveness and readiness: ``/healthz`` (the process answers) and ``/readyz`` (its dependencies do)."""

from __future__ import annotations

import asyncio

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.ingress import Ingress

router = APIRouter()


@router.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


async def _check_redis(ingress: Ingress) -> tuple[bool, str]:
    try:
        await asyncio.wait_for(ingress.results.client.ping(), timeout=1.0)
    except Exception as exc:  # any failure means "not ready", with the reason shown
        return False, f"{type(exc).__name__}: {exc}"
    return True, "ok"


async def _check_broker(ingress: Ingress) -> tuple[bool, str, dict[str, int]]:
    connection = ingress.connection
    if connection is None or connection.is_closed:
        return False, "not connected", {}
    consumers: dict[str, int] = {}
    try:
        # A passive declare on a short-lived channel: proves the broker answers and
        # tells how many consumers each stage queue has.
        channel = await asyncio.wait_for(connection.channel(publisher_confirms=False), timeout=1.0)
        try:
            for spec in ingress.config.queues:
                queue = await asyncio.wait_for(channel.declare_queue(spec.name, passive=True), timeout=1.0)
                consumers[spec.name] = queue.declaration_result.consumer_count
        finally:
            await channel.close()
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}", consumers
    return True, "ok", consumers


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    ingress: Ingress = request.app.state.ingress
    (redis_ok, redis_detail), (broker_ok, broker_detail, consumers) = await asyncio.gather(
        _check_redis(ingress), _check_broker(ingress)
    )
    models_ok = bool(ingress.manifests)
    ready = redis_ok and broker_ok and models_ok
    body = {
        "ready": ready,
        "checks": {
            "broker": {"ok": broker_ok, "detail": broker_detail},
            "redis": {"ok": redis_ok, "detail": redis_detail},
            "models": {"ok": models_ok, "detail": sorted(ingress.manifests)},
        },
        # Reported, not required: an async profile accepts work before its stages start.
        "stage_consumers": consumers,
    }
    return Response(orjson.dumps(body), status_code=200 if ready else 503, media_type="application/json",
                    headers=None if ready else {"Retry-After": "1"})
