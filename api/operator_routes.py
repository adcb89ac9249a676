"""The operator's JSON: ``GET /v1/topology/live`` and the dead letters (list, replay, discard).

The page at ``/ui`` (api/ui_routes.py) polls these, and scripts can too. The same API
keys as every other route apply (api/auth.py); acting on dead letters (replay,
discard) also needs a key whose id is in ``TOPOSERVE_OPERATOR_KEY_IDS`` (any caller
when authentication is off), listing them any valid key.
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from toposerve.api.auth import current_owner
from toposerve.api.errors import ApiError, error_responses
from toposerve.api.ingress import Ingress
from toposerve.api.openapi import success
from toposerve.api.responses import json_response
from toposerve.api.topology_graph import topology_graph
from toposerve.api.topology_live import LiveTopology, LiveTopologySampler
from toposerve.producers import DeadLetters
from toposerve.producers.dead_letters import DeadLetter, ReplayReport

router = APIRouter(prefix="/v1")


class DeadLetterIds(BaseModel):
    ids: list[str] = Field(min_length=1, max_length=1000, description="Job ids or AMQP message ids")


class DeadLetterList(BaseModel):
    total: int
    letters: list[DeadLetter]
    may_act: bool = Field(description="Whether this caller may replay or discard (an operator key)")


class DeadLetterReport(BaseModel):
    done: list[str] = Field(description="Replayed (or discarded) job ids")
    refused: list[dict[str, str]]
    not_found: list[str]


def _ingress(request: Request) -> Ingress:
    return request.app.state.ingress


def sampler_for(request: Request) -> LiveTopologySampler:
    """The app's sampler for the profile it serves now (a new one after a swap switched it)."""
    ingress = _ingress(request)
    sampler: LiveTopologySampler | None = getattr(request.app.state, "topology_sampler", None)
    if sampler is None or sampler.graph.profile != ingress.config.profile:
        settings = ingress.settings
        sampler = LiveTopologySampler(topology_graph(ingress.config, settings.namespace), settings.namespace,
                                      settings.amqp_url, settings.management_url)
        request.app.state.topology_sampler = sampler
    return sampler


@router.get("/topology/live", responses={200: success(LiveTopology, "The profile's graph with live figures")})
async def live_topology(request: Request) -> Response:
    """The running profile as a graph (ingress, exchange, queues, stages, stores) with live figures and flags."""
    ingress = _ingress(request)
    metrics = getattr(request.app.state, "metrics", None)
    view = await sampler_for(request).view(ingress.connection, ingress.results.client,
                                           metrics.registry if metrics is not None else None, ingress.stats)
    return Response(view.model_dump_json(), media_type="application/json")


def may_operate(request: Request) -> bool:
    caller = current_owner()
    return caller is None or caller in _ingress(request).settings.operator_ids()


def _operator(request: Request) -> None:
    if not may_operate(request):
        raise ApiError(403, "forbidden", "acting on dead letters needs an operator key (its id in "
                                         "TOPOSERVE_OPERATOR_KEY_IDS); this key may only list them")


_BROKER_DOWN = {503: "broker_unavailable: the broker cannot be reached"}


def _unavailable(exc: Exception) -> ApiError:
    return ApiError(503, "broker_unavailable", f"the broker cannot be reached ({type(exc).__name__}); retry later",
                    {"Retry-After": "1"})


@router.get("/dead-letters", responses={200: success(DeadLetterList, "The oldest dead letters (none removed)"),
                                        **error_responses({422: "invalid_request: limit is not 1 to 1000",
                                                           **_BROKER_DOWN})})
async def list_dead_letters(request: Request, limit: int = Query(50, ge=1, le=1000)) -> Response:
    """The namespace's dead letters with their reason, oldest first; listing removes nothing."""
    try:
        async with DeadLetters(_ingress(request).settings) as letters:
            total, found = await letters.count(), await letters.list(limit)
    except (OSError, ConnectionError) as exc:
        raise _unavailable(exc) from exc
    return json_response({"total": total, "letters": [letter.as_dict() for letter in found],
                          "may_act": may_operate(request)})


def _report(report: ReplayReport) -> Response:
    return json_response({"done": report.replayed, "refused": [{"id": i, "why": w} for i, w in report.refused],
                          "not_found": report.not_found})


_ACT_ERRORS = error_responses({403: "forbidden: not an operator key", 422: "invalid_request: ids missing",
                               **_BROKER_DOWN})


async def _act(request: Request, ids: list[str], replay: bool) -> Response:
    _operator(request)
    try:
        async with DeadLetters(_ingress(request).settings) as letters:
            return _report(await (letters.replay(ids) if replay else letters.discard(ids)))
    except (OSError, ConnectionError) as exc:
        raise _unavailable(exc) from exc


@router.post("/dead-letters/replay", responses={200: success(DeadLetterReport, "What was replayed"), **_ACT_ERRORS})
async def replay_dead_letters(body: DeadLetterIds, request: Request) -> Response:
    """Re-publish these dead letters under their original routing key (each acked after its confirm)."""
    return await _act(request, body.ids, replay=True)


@router.post("/dead-letters/discard", responses={200: success(DeadLetterReport, "What was discarded"), **_ACT_ERRORS})
async def discard_dead_letters(body: DeadLetterIds, request: Request) -> Response:
    """Remove these dead letters for good."""
    return await _act(request, body.ids, replay=False)
