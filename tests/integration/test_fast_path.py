"""The predict fast path (api/fast_path.py) answers exactly as the FastAPI route does.

A query string sends a request through FastAPI (``?timeout=`` with the profile's default
changes nothing else), so each input is asked both ways and the answers compared."""

from __future__ import annotations

import pytest

from tests.integration.conftest import Stack
from toposerve.api import routes_v1

ROW = [5.1, 3.5, 1.4, 0.2]
CASES = {
    "rows": {"json": {"instances": [ROW, [6.7, 3.0, 5.2, 2.3]]}},
    "not json": {"content": b"{not json"},
    "no input": {"json": {}},
    "two inputs": {"json": {"instances": [ROW], "image": "aGk="}},
    "wrong width": {"json": {"instances": [[1.0, 2.0]]}},
    "not a number": {"json": {"instances": [["a", 1, 2, 3]]}},
    "too many rows": {"json": {"instances": [ROW] * 101}},
    "bad image": {"json": {"image": "not base64!"}},
}


def comparable(response) -> tuple[int, object]:
    body = response.json()
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in ("id", "timings", "created_at", "updated_at")}
    return response.status_code, body


@pytest.mark.parametrize("case", sorted(CASES))
async def test_the_fast_path_and_the_route_give_the_same_answer(sync_stack: Stack, case: str) -> None:
    default = str(sync_stack.ingress.config.spec.timeout_s)
    fast = await sync_stack.client.post("/v1/models/iris/predict", **CASES[case])
    routed = await sync_stack.client.post("/v1/models/iris/predict", params={"timeout": default}, **CASES[case])
    assert comparable(fast) == comparable(routed)
    assert fast.headers.get("content-type") == routed.headers.get("content-type")


async def test_the_fast_path_serves_the_plain_request_and_not_the_rest(
    sync_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    handle = routes_v1.handle_predict

    async def counted(ingress, model, request, timeout):
        seen.append("query" if request.url.query else "plain")
        return await handle(ingress, model, request, timeout)

    monkeypatch.setattr(routes_v1, "handle_predict", counted)  # what the FastAPI route calls
    assert (await sync_stack.client.post("/v1/models/iris/predict", json={"instances": [ROW]},
                                         params={"timeout": "2"})).status_code == 200
    assert (await sync_stack.client.post("/v1/models/iris/predict", json={"instances": [ROW]})).status_code == 200
    assert seen == ["query"]  # the plain one did not go through the route
    unknown = await sync_stack.client.post("/v1/models/nope/predict", json={"instances": [ROW]})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_model"


async def test_the_fast_path_keeps_the_admission_bound(sync_stack: Stack) -> None:
    sync_stack.ingress.config.spec.max_in_flight = 1
    sync_stack.ingress.stats.in_flight = 1  # one request is in flight
    shed = await sync_stack.client.post("/v1/models/iris/predict", json={"instances": [ROW]})
    sync_stack.ingress.stats.in_flight = 0
    assert shed.status_code == 503 and shed.json()["error"]["code"] == "overloaded"


async def test_job_reads_answer_the_same_through_the_fast_path_and_the_route(
    async_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET /v1/jobs/{id} (and ?wait= within bounds) is answered in front of FastAPI; an extra
    query parameter sends it through the route, so each read is asked both ways."""
    from toposerve.api import fast_path

    served: list[str] = []
    job = fast_path._job

    async def counted(ingress, match, request):
        served.append(match.group(1))
        return await job(ingress, match, request)

    monkeypatch.setattr(fast_path, "_job", counted)
    accepted = (await async_stack.client.post("/v1/models/iris/predict", json={"instances": [ROW]})).json()
    done = await async_stack.client.get(accepted["location"], params={"wait": "10"})
    assert done.status_code == 200 and done.json()["status"] == "succeeded"
    unknown = accepted["id"][:-8] + "00000000"  # not this namespace's tag: an unknown job
    for path, query in [(accepted["location"], {}), (accepted["location"], {"wait": "0.5"}),
                        ("/v1/jobs/not-a-uuid", {}), (f"/v1/jobs/{unknown}", {})]:
        fast = await async_stack.client.get(path, params=query)
        routed = await async_stack.client.get(path, params={**query, "via": "route"})
        assert comparable(fast) == comparable(routed), path
    assert len(served) == 5  # the wait, and the four reads above without the extra parameter
    for refused in ("-1", "31", "abc", "1e1", ""):
        before = len(served)
        answer = await async_stack.client.get(accepted["location"], params={"wait": refused})
        if refused == "1e1":  # a number FastAPI reads (10 s): the route serves it, not the fast path
            assert answer.status_code == 200
        else:
            assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_request", refused
        assert len(served) == before  # FastAPI's to answer
