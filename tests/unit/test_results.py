"""brokers/results.py JobRecord: the terminal record the store writes for a Prediction or a Failure."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from toposerve.brokers.messages import Failure, FailureCode, Prediction, RowPrediction, utc_now
from toposerve.brokers.results import JobDone, JobRecord, JobStatus

ROWS = [RowPrediction(label="setosa", class_index=0, probabilities=[0.97, 0.02, 0.01]),
        RowPrediction(label="virginica", class_index=2, probabilities=[0.01, 0.01, 0.98])]


def test_prediction_becomes_a_succeeded_record() -> None:
    created = datetime.now(UTC) - timedelta(seconds=1.5)
    message = Prediction(id=uuid.uuid4(), model="iris", created_at=created, model_version="1", rows=ROWS,
                         timings={"preprocess_ms": 0.3, "predict_ms": 4.1})
    record = JobRecord.from_terminal(message)
    assert record.status == JobStatus.SUCCEEDED
    assert record.id == message.id and record.model == "iris"
    assert record.created_at == created
    assert record.model_version == "1"
    assert record.predictions == ROWS
    assert record.error is None
    assert record.timings["preprocess_ms"] == 0.3 and record.timings["predict_ms"] == 4.1
    # total_ms: from the job's creation until now.
    assert 1500 <= record.timings["total_ms"] < 1500 + 60_000
    assert record.updated_at >= created
    assert "total_ms" not in message.timings  # the message itself is not modified


def test_failure_becomes_a_failed_record_with_its_error() -> None:
    message = Failure(id=uuid.uuid4(), model="digits_fast", stage="preprocess", code=FailureCode.INVALID_INPUT,
                      message="'image' is not a PNG or JPEG image", timings={"preprocess_ms": 1.0})
    record = JobRecord.from_terminal(message)
    assert record.status == JobStatus.FAILED
    assert record.predictions is None and record.model_version is None
    assert record.error is not None
    assert record.error.code == "invalid_input"
    assert record.error.message == "'image' is not a PNG or JPEG image"
    assert record.error.stage == "preprocess"
    assert record.timings["preprocess_ms"] == 1.0
    assert record.timings["total_ms"] >= 0


@pytest.mark.parametrize("code", list(FailureCode))
def test_every_failure_code_serialises_as_its_string(code: FailureCode) -> None:
    message = Failure(id=uuid.uuid4(), model="iris", stage="predict", code=code, message="m")
    wire = json.loads(JobRecord.from_terminal(message).model_dump_json())
    assert wire["status"] == "failed"
    assert wire["error"] == {"code": code.value, "message": "m", "stage": "predict"}


def test_record_json_round_trip() -> None:
    message = Prediction(id=uuid.uuid4(), model="iris", model_version="1", rows=ROWS)
    record = JobRecord.from_terminal(message)
    assert JobRecord.model_validate_json(record.model_dump_json()) == record


def test_status_text_matches_what_the_redis_finish_script_looks_for() -> None:
    # _FINISH_SCRIPT overwrites a record only if its JSON contains '"status":"pending"' verbatim.
    created = datetime.now(UTC)
    pending = JobRecord(id=uuid.uuid4(), model="iris", status=JobStatus.PENDING, created_at=created)
    assert '"status":"pending"' in pending.model_dump_json()
    finished = JobRecord.from_terminal(Prediction(id=pending.id, model="iris", model_version="1", rows=ROWS))
    assert '"status":"pending"' not in finished.model_dump_json()
    assert '"status":"succeeded"' in finished.model_dump_json()


def test_terminal_message_with_a_naive_created_at_is_refused_or_recorded() -> None:
    body = json.dumps({"id": str(uuid.uuid4()), "model": "iris", "model_version": "1", "rows": [],
                       "created_at": "2024-01-01T00:00:00"})
    try:
        message = Prediction.model_validate_json(body)
    except ValueError:
        return  # refusing it at decode time is a fine answer
    assert JobRecord.from_terminal(message).status == JobStatus.SUCCEEDED


def test_a_job_done_announcement_carries_the_record_to_whoever_may_read_it() -> None:
    record = JobRecord(id=uuid.uuid4(), model="iris", status=JobStatus.SUCCEEDED, created_at=utc_now())
    owned = JobDone.parse(f"{record.id}\nkey-a\n".encode() + record.model_dump_json().encode())
    assert owned.job_id == str(record.id) and owned.owner == "key-a"
    assert owned.record_for("key-a") == record.model_copy(update={"owner": "key-a"})
    assert owned.record_for(None) is not None  # authentication off: every caller reads every job
    assert owned.record_for("key-b") is None  # another key: the caller reads the store (and gets 404)
    unowned = JobDone.parse(f"{record.id}\n\n".encode() + record.model_dump_json().encode())
    assert unowned.owner is None and unowned.record_for("key-b") is not None
    bare = JobDone.parse(str(record.id).encode())  # the id alone: nothing to answer with
    assert bare.job_id == str(record.id) and bare.record_for(None) is None
    assert JobDone.parse(f"{record.id}\n\nnot json".encode()).record_for(None) is None
