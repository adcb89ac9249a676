"""Metrics, trace context and the AsyncAPI document on an in-process asynchronous stack."""

from __future__ import annotations

import asyncio
import re

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Stack, start_stack
from toposerve.brokers.settings import Settings

IRIS_ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(scraped: dict, name: str, **labels: str) -> float | None:
    return scraped.get((name, frozenset(labels.items())))


async def finished(stack: Stack, location: str) -> dict:
    response = await stack.client.get(location, params={"wait": 10})
    assert response.status_code == 200, response.text
    return response.json()


async def test_metrics_traces_and_asyncapi_of_an_async_stack(settings: Settings) -> None:
    async for stack in start_stack(settings, "asynchronous"):
        client = stack.client
        traced = await client.post("/v1/models/iris/predict", json={"instances": IRIS_ROWS},
                                   headers={"traceparent": TRACEPARENT})
        fresh = await client.post("/v1/models/iris/predict", json={"instances": IRIS_ROWS})
        # A malformed traceparent is ignored (a new trace), never the caller's error.
        malformed = await client.post("/v1/models/iris/predict", json={"instances": IRIS_ROWS},
                                      headers={"traceparent": "00-NOT-A-TRACE-01"})
        bad_input = await client.post("/v1/models/iris/predict", json={"instances": [[1.0, 2.0]]})
        unknown = await client.post("/v1/models/nope/predict", json={"instances": IRIS_ROWS})
        assert [r.status_code for r in (traced, fresh, malformed)] == [202, 202, 202]
        assert bad_input.status_code == 422 and unknown.status_code == 404

        # Trace context: the caller's trace id comes back and reaches the job record
        # through preprocess -> predict -> store.
        assert traced.headers["x-trace-id"] == TRACE_ID
        assert re.fullmatch(r"[0-9a-f]{32}", fresh.headers["x-trace-id"])
        assert re.fullmatch(r"[0-9a-f]{32}", malformed.headers["x-trace-id"])
        assert fresh.headers["x-trace-id"] != TRACE_ID
        for response in (traced, fresh, malformed):
            job = await finished(stack, response.headers["location"])
            assert job["status"] == "succeeded"
            assert job["trace_id"] == response.headers["x-trace-id"]

        scrape = await client.get("/metrics")
        assert scrape.status_code == 200
        assert scrape.headers["content-type"].startswith("text/plain")
        scraped = samples(scrape.text)
        assert value(scraped, "toposerve_requests_total", model="iris", status="202") == 3
        assert value(scraped, "toposerve_requests_total", model="iris", status="422") == 1
        assert value(scraped, "toposerve_requests_total", model="unknown", status="404") == 1
        assert value(scraped, "toposerve_request_duration_seconds_count", model="iris", mode="async") == 4
        assert value(scraped, "toposerve_failures_total", code="invalid_input") == 1
        assert value(scraped, "toposerve_failures_total", code="unknown_model") == 1
        assert value(scraped, "toposerve_in_flight_requests") == 0
        assert value(scraped, "toposerve_shed_requests_total") == 0
        assert value(scraped, "toposerve_prediction_cache_requests_total", result="hit") == 0

        # Each stage runner's own registry (what its --metrics-port serves). The store's
        # counters move just after the record it wrote became visible: give them a moment.
        for stage in ("preprocess", "predict", "store"):
            registry = stack.runners[stage].metrics.registry
            for _ in range(100):
                if registry.get_sample_value("toposerve_stage_processing_seconds_count", {"stage": stage}) == 3:
                    break
                await asyncio.sleep(0.02)
            labels = {"stage": stage, "outcome": "handled"}
            assert registry.get_sample_value("toposerve_stage_messages_total", labels) == 3, stage
            assert registry.get_sample_value("toposerve_stage_processing_seconds_count", {"stage": stage}) == 3
            assert registry.get_sample_value("toposerve_stage_queue_seconds_count", {"stage": stage}) == 3
        predict = stack.runners["predict"].metrics.registry
        assert predict.get_sample_value("toposerve_predict_batch_size_sum", {"stage": "predict"}) == 6  # rows
        assert predict.get_sample_value("toposerve_predict_batch_size_count", {"stage": "predict"}) >= 1

        document = (await client.get("/asyncapi.json")).json()
        assert document["asyncapi"].startswith("3.")
        addresses = {channel["address"] for channel in document["channels"].values()}
        assert {"request.iris", "features.iris", "prediction.iris", "failure.iris"} <= addresses
        page = await client.get("/asyncapi")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "toposerve profile" in page.text and "AsyncApiStandalone" in page.text
