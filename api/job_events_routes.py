"""``GET /v1/jobs/{id}/events``: a job's changes pushed as Server-Sent Events.

The stream sends one ``status`` event per change of the job's status (``pending``,
then ``succeeded`` or ``failed``), then one ``outcome`` event holding the job record
(as ``GET /v1/jobs/{id}`` answers it), and closes. Event ids are the event's place in
that sequence (1 pending, 2 the terminal status, 3 the outcome), so a client that
reconnects with ``Last-Event-ID`` (any SSE client does; ``curl -H``) is sent only what
it has not seen, by whichever ingress process answers: the state is the record in
Redis, nothing is kept in the process. Comments (``: ping``) keep idle connections
open through proxies (``TOPOSERVE_SSE_PING_S``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Header, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from toposerve.api.auth import current_owner
from toposerve.api.errors import ApiError, error_responses
from toposerve.api.ingress import Ingress
from toposerve.api.routes_v1 import job_not_found, parse_job_id, wait_for_record
from toposerve.brokers import JobRecord, JobStatus

PENDING_ID, TERMINAL_ID, OUTCOME_ID = 1, 2, 3
RECONNECT_MS = 1000  # what the stream tells clients to wait before reconnecting
_WAIT_CHUNK_S = 30.0  # a long wait, re-checked (the record may expire meanwhile)

# One event of the stream: ``data`` is JSON ({id, status} for status events, the job record
# for the outcome, {code, message} for an error that ends the stream early).
EVENT_SCHEMA = {"type": "object", "required": ["data"], "properties": {
    "event": {"enum": ["status", "outcome", "error"]},
    "id": {"enum": [str(PENDING_ID), str(TERMINAL_ID), str(OUTCOME_ID)]},
    "data": {"type": "string", "contentMediaType": "application/json"},
    "retry": {"type": "integer"},
}}

router = APIRouter(prefix="/v1")


def status_event(record: JobRecord, event_id: int) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps({"id": str(record.id), "status": record.status.value}), event="status",
                           id=str(event_id), retry=RECONNECT_MS)


def events_after(record: JobRecord, last_event_id: int) -> list[ServerSentEvent]:
    """The events ``record``'s state calls for that come after ``last_event_id`` (pure)."""
    if record.status is JobStatus.PENDING:
        return [status_event(record, PENDING_ID)] if last_event_id < PENDING_ID else []
    events = []
    if last_event_id < TERMINAL_ID:
        events.append(status_event(record, TERMINAL_ID))
    if last_event_id < OUTCOME_ID:
        events.append(ServerSentEvent(data=record.model_dump_json(), event="outcome", id=str(OUTCOME_ID)))
    return events


def parse_last_event_id(value: str | None) -> int:
    if value is None or not value.strip():
        return 0
    if not value.strip().isdigit() or int(value) > OUTCOME_ID:
        raise ApiError(400, "invalid_last_event_id", f"Last-Event-ID is {value[:40]!r}; this stream's event ids are "
                                                     f"1 (pending), 2 (terminal status) and 3 (outcome)")
    return int(value)


def error_event(code: str, message: str) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps({"code": code, "message": message}), event="error")


async def job_events(ingress: Ingress, record: JobRecord, last_event_id: int,
                     owner: str | None) -> AsyncIterator[ServerSentEvent]:
    for event in events_after(record, last_event_id):
        yield event
    if record.status is not JobStatus.PENDING:
        return
    seen = max(last_event_id, PENDING_ID)
    while record.status is JobStatus.PENDING:
        try:
            latest = await wait_for_record(ingress, record.id, _WAIT_CHUNK_S, owner)
        except ApiError as exc:  # the store is down: say so; the client reconnects with its Last-Event-ID
            yield error_event(exc.code, exc.message)
            return
        if latest is None:
            yield error_event("job_gone", f"job {record.id}'s record expired before it ended")
            return
        record = latest
    for event in events_after(record, seen):
        yield event


@router.get("/jobs/{job_id}/events", response_class=EventSourceResponse, responses={
    200: {"description": "text/event-stream: status events, then the outcome (the job record); then it closes",
          "content": {"text/event-stream": {"schema": EVENT_SCHEMA}}},
    **error_responses({400: "invalid_last_event_id", 404: "unknown_job: never issued here, or expired",
                       410: "job_gone: issued here, but its record is gone", 503: "store_unavailable"}),
})
async def get_job_events(job_id: str, request: Request,
                         last_event_id: str | None = Header(None, description="Resume after this event id")
                         ) -> EventSourceResponse:
    parsed = parse_job_id(job_id)
    resume_after = parse_last_event_id(last_event_id)
    ingress: Ingress = request.app.state.ingress
    owner = current_owner()
    record = await wait_for_record(ingress, parsed, 0.0, owner)
    if record is None:
        raise job_not_found(ingress, parsed)
    return EventSourceResponse(job_events(ingress, record, resume_after, owner), ping=ingress.settings.sse_ping_s)
