"""Which Server-Sent Events a job's state calls for after a Last-Event-ID (api/job_events_routes.py)."""

from __future__ import annotations

import json
import uuid

import pytest

from toposerve.api.errors import ApiError
from toposerve.api.job_events_routes import events_after, parse_last_event_id
from toposerve.brokers import JobError, JobRecord, JobStatus, utc_now


def record(status: JobStatus, **fields: object) -> JobRecord:
    return JobRecord(id=uuid.uuid4(), model="iris", status=status, created_at=utc_now(), **fields)


def shape(events: list) -> list[tuple[str, str, str]]:
    return [(e.event, e.id, json.loads(e.data)["status"]) for e in events]


def test_pending_is_one_status_event_sent_once() -> None:
    pending = record(JobStatus.PENDING)
    assert shape(events_after(pending, 0)) == [("status", "1", "pending")]
    assert events_after(pending, 1) == []


def test_a_failed_job_is_its_status_then_its_outcome_with_the_error() -> None:
    failed = record(JobStatus.FAILED, error=JobError(code="invalid_input", message="expects 4 features"))
    events = events_after(failed, 0)
    assert shape(events) == [("status", "2", "failed"), ("outcome", "3", "failed")]
    assert json.loads(events[1].data)["error"]["code"] == "invalid_input"
    assert shape(events_after(failed, 2)) == [("outcome", "3", "failed")]
    assert events_after(failed, 3) == []


@pytest.mark.parametrize("value", ["x", "-1", "4", "1.5", "9" * 50])
def test_a_last_event_id_not_of_this_stream_is_refused_naming_it(value: str) -> None:
    with pytest.raises(ApiError) as refused:
        parse_last_event_id(value)
    assert refused.value.status == 400 and "Last-Event-ID" in refused.value.message


def test_no_last_event_id_starts_at_the_beginning() -> None:
    assert parse_last_event_id(None) == 0 and parse_last_event_id(" ") == 0 and parse_last_event_id("2") == 2
