"""brokers/messages.py: the message vocabulary (input rule, model names, deadlines)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from toposerve.brokers.messages import (
    Failure,
    FailureCode,
    InferenceRequest,
    Prediction,
    RowPrediction,
    is_model_name,
    routing_key,
)

INPUTS = {"instances": [[5.1, 3.5, 1.4, 0.2]], "image": "iVBORw0KGgo=", "item_id": "item-42"}


def request(**fields) -> InferenceRequest:
    return InferenceRequest(id=uuid.uuid4(), model=fields.pop("model", "iris"), **fields)


# --------------------------------------------------------------------------- exactly one input


@pytest.mark.parametrize("name", list(INPUTS))
def test_any_single_input_is_accepted(name: str) -> None:
    message = request(**{name: INPUTS[name]})
    assert getattr(message, name) == INPUTS[name]
    assert message.kind == "request"


def test_no_input_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"exactly one of .*\(got none\)"):
        request()


@pytest.mark.parametrize(
    "names",
    [("instances", "image"), ("instances", "item_id"), ("image", "item_id"), ("instances", "image", "item_id")],
    ids="+".join,
)
def test_two_or_three_inputs_are_refused_and_named(names: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as info:
        request(**{name: INPUTS[name] for name in names})
    assert f"(got {', '.join(names)})" in str(info.value)


def test_input_rule_also_applies_to_json_from_any_publisher() -> None:
    body = json.dumps({"id": str(uuid.uuid4()), "model": "iris", **INPUTS})
    with pytest.raises(ValidationError, match="exactly one"):
        InferenceRequest.model_validate_json(body)
    body = json.dumps({"id": str(uuid.uuid4()), "model": "iris", "instances": [[1, 2, 3, 4]]})
    assert InferenceRequest.model_validate_json(body).instances == [[1.0, 2.0, 3.0, 4.0]]


def test_empty_instances_is_an_input_given() -> None:
    # The stage says "empty"; the schema must not say "got none".
    assert request(instances=[]).instances == []


def test_envelope_requires_a_uuid_id() -> None:
    with pytest.raises(ValidationError):
        InferenceRequest.model_validate({"id": "../../etc/passwd", "model": "iris", "instances": [[1.0]]})


# --------------------------------------------------------------------------- model names

GOOD_NAMES = ["iris", "digits_fast", "iris_setosa", "0model", "a", "m" * 64]
BAD_NAMES = ["iris.v2", "iris*", "*", "#", "iris#", "Iris", "DIGITS", "", "_iris", "iris-v2", "iris v2",
             "m" * 65, "iris/..", "ïris"]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_routing_safe_model_names_are_accepted(name: str) -> None:
    assert is_model_name(name)
    assert request(model=name, instances=[[1.0]]).model == name
    assert routing_key("request", name) == f"request.{name}"


@pytest.mark.parametrize("name", BAD_NAMES)
def test_model_names_with_dots_wildcards_or_uppercase_are_refused(name: str) -> None:
    assert not is_model_name(name)
    with pytest.raises(ValidationError):
        request(model=name, instances=[[1.0]])


def test_is_model_name_agrees_with_the_schema_on_a_trailing_newline() -> None:
    with pytest.raises(ValidationError):
        request(model="iris\n", instances=[[1.0]])
    assert not is_model_name("iris\n")


# --------------------------------------------------------------------------- deadlines


def test_no_deadline_never_expires() -> None:
    assert not request(instances=[[1.0]]).expired(now=datetime(9999, 1, 1, tzinfo=UTC))


def test_deadline_in_the_past_has_expired_and_in_the_future_not() -> None:
    now = datetime.now(UTC)
    assert request(instances=[[1.0]], deadline=now - timedelta(seconds=1)).expired()
    assert not request(instances=[[1.0]], deadline=now + timedelta(minutes=5)).expired()


def test_deadline_boundary_and_explicit_now() -> None:
    deadline = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    message = request(instances=[[1.0]], deadline=deadline)
    assert not message.expired(now=deadline - timedelta(microseconds=1))
    assert message.expired(now=deadline)
    assert message.expired(now=deadline + timedelta(microseconds=1))


def test_deadline_with_another_timezone_from_json_is_compared_as_an_instant() -> None:
    # 12:00+02:00 is 10:00 UTC.
    body = json.dumps({"id": str(uuid.uuid4()), "model": "iris", "instances": [[1.0]],
                       "deadline": "2030-01-01T12:00:00+02:00"})
    message = InferenceRequest.model_validate_json(body)
    assert message.expired(now=datetime(2030, 1, 1, 10, 0, tzinfo=UTC))
    assert not message.expired(now=datetime(2030, 1, 1, 9, 59, 59, tzinfo=UTC))
    assert message.deadline.utcoffset() == timezone(timedelta(hours=2)).utcoffset(None)


def test_deadline_without_timezone_is_refused_or_handled() -> None:
    body = json.dumps({"id": str(uuid.uuid4()), "model": "iris", "instances": [[1.0]],
                       "deadline": "2000-01-01T00:00:00"})
    try:
        message = InferenceRequest.model_validate_json(body)
    except ValidationError:
        return  # refusing it at decode time is a fine answer
    assert message.expired() is True


def test_created_at_defaults_to_an_aware_utc_now() -> None:
    before = datetime.now(UTC)
    message = request(instances=[[1.0]])
    assert message.created_at.tzinfo is not None
    assert before <= message.created_at <= datetime.now(UTC)


# --------------------------------------------------------------------------- other messages


def test_terminal_messages_round_trip_through_json() -> None:
    job = uuid.uuid4()
    prediction = Prediction(id=job, model="iris", model_version="1",
                            rows=[RowPrediction(label="setosa", class_index=0, probabilities=[0.9, 0.05, 0.05])])
    assert Prediction.model_validate_json(prediction.model_dump_json()) == prediction
    failure = Failure(id=job, model="iris", stage="preprocess", code=FailureCode.INVALID_INPUT, message="bad")
    wire = json.loads(failure.model_dump_json())
    assert wire["code"] == "invalid_input"
    assert wire["kind"] == "failure"
    assert wire["retryable"] is False
    assert Failure.model_validate_json(failure.model_dump_json()) == failure


def test_unknown_fields_from_other_publishers_are_ignored() -> None:
    body = json.dumps({"id": str(uuid.uuid4()), "model": "iris", "instances": [[1.0]], "priority": 5})
    assert not hasattr(InferenceRequest.model_validate_json(body), "priority")
