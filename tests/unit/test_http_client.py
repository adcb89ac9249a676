"""The HTTP SDK's own logic (producers/http_client.py), against httpx's mock transport:
Retry-After honoured on 503, refusals typed, bodies built. The real server: tests/integration/test_http_client.py."""

from __future__ import annotations

import uuid

import httpx
import pytest

from toposerve.producers.http_client import (
    AsyncClient,
    InvalidRequest,
    NotFound,
    Unavailable,
    error_for,
    predict_body,
    retry_after_s,
)

RECORD = {"id": str(uuid.uuid4()), "model": "iris", "status": "succeeded", "created_at": "2026-01-01T00:00:00Z",
          "model_version": "2", "predictions": [{"label": "setosa", "class_index": 0, "probabilities": [1, 0, 0]}]}


def refusal(status: int, code: str, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(status, json={"error": {"code": code, "message": f"{code} happened"}}, headers=headers)


async def test_503_is_retried_after_retry_after_then_answers() -> None:
    calls = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return refusal(503, "overloaded", "0") if len(calls) <= 2 else httpx.Response(200, json=RECORD)

    async with AsyncClient("http://ingress", transport=httpx.MockTransport(answer)) as client:
        record = await client.predict("iris", rows=[[5.1, 3.5, 1.4, 0.2]])
    assert len(calls) == 3 and record.predictions[0].label == "setosa"


async def test_503_past_the_retries_is_unavailable() -> None:
    calls = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return refusal(503, "no_consumer", "0")

    async with AsyncClient("http://ingress", max_retries=2, transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(Unavailable) as refused:
            await client.predict("iris", rows=[[5.1, 3.5, 1.4, 0.2]])
    assert len(calls) == 3 and refused.value.code == "no_consumer"


def test_refusals_are_typed_with_the_apis_code_and_message() -> None:
    assert isinstance(error_for(refusal(422, "invalid_input")), InvalidRequest)
    missing = error_for(refusal(404, "unknown_model"))
    assert isinstance(missing, NotFound) and missing.code == "unknown_model" and "happened" in missing.message
    tf_shape = error_for(httpx.Response(400, json={"error": "bad"}))  # the /v2 and TF Serving shape
    assert isinstance(tf_shape, InvalidRequest) and tf_shape.message == "bad"


def test_retry_after_is_bounded_and_defaults() -> None:
    assert retry_after_s(httpx.Response(503, headers={"Retry-After": "2"})) == 2.0
    assert retry_after_s(httpx.Response(503, headers={"Retry-After": "9999"})) == 30.0
    assert retry_after_s(httpx.Response(503, headers={"Retry-After": "Wed, 21 Oct 2015"})) == 1.0


def test_a_body_has_exactly_one_input() -> None:
    assert predict_body([[1.0]], None, None) == {"instances": [[1.0]]}
    assert predict_body(None, b"\x89PNG", None) == {"image": "iVBORw=="}
    with pytest.raises(ValueError, match="exactly one"):
        predict_body([[1.0]], b"x", None)
    with pytest.raises(ValueError, match="exactly one"):
        predict_body(None, None, None)
