"""Trace context parsing, JSON log lines of stage work, stage metrics and the AsyncAPI document (no services)."""

from __future__ import annotations

import io
import json
import logging
import uuid
from typing import ClassVar
from urllib.parse import unquote

import aio_pika
import pytest
import yaml
from click.testing import CliRunner

from toposerve.brokers.logs import JobContextFilter, JsonFormatter
from toposerve.brokers.messages import Envelope, InferenceRequest, routing_key
from toposerve.brokers.settings import Settings
from toposerve.brokers.topology import QueueSpec
from toposerve.brokers.tracing import TRACEPARENT, continue_trace, new_trace, parse_traceparent
from toposerve.consumers import Outgoing, Outlets, Settlement, Stage, Trust
from toposerve.consumers.metrics import stage_metrics
from toposerve.deploy.asyncapi import asyncapi_document, profile_routing_keys, topic_matches
from toposerve.deploy.cli import main
from toposerve.deploy.components import load_checked_profile
from toposerve.models.preprocessing import InputError

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
VALID = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


# -- trace context -----------------------------------------------------------------


def test_a_valid_traceparent_is_parsed() -> None:
    span = parse_traceparent(VALID)
    assert span is not None
    assert (span.trace_id, span.span_id, span.flags) == (TRACE_ID, "00f067aa0ba902b7", "01")
    assert span.header == VALID
    assert parse_traceparent(VALID.encode()) == span


@pytest.mark.parametrize("value", [
    "", "garbage", VALID.upper(), VALID + "-", VALID[:-1], " " + VALID,
    f"00-{'0' * 32}-00f067aa0ba902b7-01",  # all-zero trace id
    f"00-{TRACE_ID}-{'0' * 16}-01",        # all-zero parent id
    f"ff-{TRACE_ID}-00f067aa0ba902b7-01",  # version ff is invalid
    f"0-{TRACE_ID}-00f067aa0ba902b7-01", f"00-{TRACE_ID}-00f067aa0ba902b7-1x", b"\xff" * 60, 42, None,
])
def test_a_bad_traceparent_is_refused(value: object) -> None:
    assert parse_traceparent(value) is None


def test_a_later_version_with_more_fields_keeps_its_ids() -> None:
    span = parse_traceparent(f"01-{TRACE_ID}-00f067aa0ba902b7-01-what-comes-next")
    assert span is not None and span.trace_id == TRACE_ID


def test_each_hop_keeps_the_trace_and_gets_a_new_span() -> None:
    hop = continue_trace(VALID)
    assert hop.trace_id == TRACE_ID and hop.span_id != "00f067aa0ba902b7"
    assert parse_traceparent(hop.header) == hop
    started = continue_trace("00-bad")
    assert started.trace_id != TRACE_ID and started.flags == "01"
    assert parse_traceparent(new_trace().header) is not None


# -- a stage runner on fakes: logs, headers, metrics --------------------------------


class Refusing(Stage):
    kind: ClassVar[str] = "preprocess"
    input_type: ClassVar[type[Envelope]] = InferenceRequest

    async def handle(self, message: Envelope) -> list[Outgoing]:
        raise InputError("row 0 has 2 values, the model expects 4")


class FakePublisher:
    def __init__(self) -> None:
        self.published: list[tuple[Envelope, str, dict]] = []

    async def publish(self, body, routing_key, *, headers=None, **_) -> None:
        self.published.append((body, routing_key, dict(headers or {})))

    async def publish_raw(self, message, routing_key, mandatory=True) -> None:
        self.published.append((message, routing_key, dict(message.headers or {})))


class FakeDelivery:
    def __init__(self, body: bytes, headers: dict) -> None:
        self.body = body
        self.headers = headers
        self.reply_to = None
        self.correlation_id = None
        self.delivery_mode = aio_pika.DeliveryMode.PERSISTENT
        self.routing_key = "request.iris"
        self.acked = False

    async def ack(self) -> None:
        self.acked = True

    async def nack(self, requeue: bool = True) -> None:
        raise AssertionError("not expected")


def runner_on_fakes(stage: Stage) -> tuple[Settlement, FakePublisher]:
    """The settlement policy of ``stage`` publishing into a list."""
    publisher = FakePublisher()
    runner = Settlement(stage, Settings(), QueueSpec(name="t.stage", binding_keys=["request.*"]),
                        Outlets(outputs=publisher, dead=publisher, direct=publisher),  # type: ignore[arg-type]
                        metrics=stage_metrics(stage.name), trust=Trust(frozenset()))
    return runner, publisher


async def test_a_failed_jobs_log_line_carries_job_id_and_trace_id_in_json() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(JobContextFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("toposerve.consumers.settlement")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        runner, publisher = runner_on_fakes(Refusing("preprocess"))
        job_id = uuid.uuid4()
        request = InferenceRequest(id=job_id, model="iris", instances=[[1.0, 2.0]])
        delivery = FakeDelivery(request.model_dump_json().encode(), {TRACEPARENT: VALID, "x-other": "kept"})
        await runner.process(delivery)  # type: ignore[arg-type]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)

    assert delivery.acked
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    failed = [line for line in lines if "failed" in line["message"]]
    assert failed, lines
    line = failed[0]
    assert line["job_id"] == str(job_id) and line["trace_id"] == TRACE_ID
    assert line["model"] == "iris" and line["stage"] == "preprocess" and line["level"] == "INFO"
    assert {"time", "logger", "message"} <= set(line)

    # The failure goes on with the same trace id under a new span id, other headers kept.
    [(body, key, headers)] = publisher.published
    assert key == routing_key("failure", "iris")
    out = parse_traceparent(headers[TRACEPARENT])
    assert out is not None and out.trace_id == TRACE_ID and out.span_id != "00f067aa0ba902b7"
    assert headers["x-other"] == "kept"

    registry = runner.metrics.registry
    for outcome, expected in (("handled", 1), ("failed", 1), ("retried", 0), ("dead_lettered", 0)):
        assert registry.get_sample_value("toposerve_stage_messages_total",
                                         {"stage": "preprocess", "outcome": outcome}) == expected


def test_plain_logs_stay_the_default() -> None:
    assert Settings().log_format == "plain"
    assert Settings(log_format="json").log_format == "json"


# -- AsyncAPI --------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "key", "matches"), [
    ("request.*", "request.iris", True), ("request.*", "request.iris.x", False),
    ("prediction.#", "prediction.g.m", True), ("#", "a.b", True), ("features.iris", "features.digits", False),
])
def test_topic_matching(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches


def _resolve(document: dict, ref: str) -> object:
    node: object = document
    # A JSON pointer in a URI fragment: percent-encoded ('*' is %2A), then ~1 and ~0.
    for part in ref.removeprefix("#/").split("/"):
        node = node[unquote(part).replace("~1", "/").replace("~0", "~")]  # type: ignore[index]
    return node


def test_the_asyncapi_document_of_the_asynchronous_profile() -> None:
    settings = Settings()
    profile = load_checked_profile("asynchronous", settings)
    result = CliRunner().invoke(main, ["asyncapi", "--profile", "asynchronous", "--format", "yaml"])
    assert result.exit_code == 0, result.output
    document = yaml.safe_load(result.output)
    assert document == json.loads(json.dumps(asyncapi_document(profile, settings)))
    assert document["asyncapi"] == "3.0.0"

    keys = {f"{kind}.{model}" for kind in ("request", "features", "prediction", "failure") for model in profile.models}
    assert set(profile_routing_keys(profile)) == keys
    # A channel per routing key someone publishes, and per stage binding, on the inference exchange.
    channels = document["channels"]
    sent = {c["address"] for c in channels.values() if c["bindings"]["amqp"]["is"] == "routingKey"}
    assert sent == keys
    bound = {name: c["bindings"]["amqp"]["queue"]["name"] for name, c in channels.items()
             if c["bindings"]["amqp"]["is"] == "queue"}
    assert bound == {"preprocess.receive.request.*": "toposerve.asynchronous.preprocess",
                     "predict.receive.features.*": "toposerve.asynchronous.predict",
                     "store.receive.prediction.*": "toposerve.asynchronous.store",
                     "store.receive.failure.*": "toposerve.asynchronous.store"}
    assert all(c["bindings"]["amqp"]["exchange"]["name"] == "toposerve.inference" for c in channels.values()
               if c["bindings"]["amqp"]["is"] == "routingKey")
    schema = document["components"]["schemas"]["InferenceRequest"]
    assert {"id", "model", "instances", "image", "item_id"} <= set(schema["properties"])

    # Who sends what and who receives it; each payload is the type the stage validates with.
    operations = document["operations"]
    assert {"ingress.send.request.iris", "preprocess.receive.request.*", "predict.send.prediction.iris",
            "store.receive.failure.*"} <= set(operations)
    assert {op["action"] for name, op in operations.items() if ".receive." in name} == {"receive"}

    def payload(channel: str) -> object:
        [message] = channels[channel]["messages"].values()
        return _resolve(document, _resolve(document, message["$ref"])["payload"]["$ref"])

    assert payload("ingress.send.request.iris")["title"] == "InferenceRequest"
    assert payload("predict.receive.features.*")["title"] == "Features"
    assert payload("store.receive.prediction.*")["title"] == "Prediction"
    assert payload("store.receive.failure.*")["title"] == "Failure"
    refs = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(document)
    assert refs
    for ref in refs:
        assert _resolve(document, ref) is not None, ref


def test_the_asyncapi_document_says_the_synchronous_ingress_publishes_rows_as_features() -> None:
    settings = Settings()
    document = asyncapi_document(load_checked_profile("synchronous", settings), settings)
    operations = document["operations"]
    # Rows (iris) are preprocessed in the ingress; images still go through the preprocess stage.
    assert {"ingress.send.features.iris", "ingress.send.request.iris", "preprocess.receive.request.*",
            "predict.receive.features.*"} <= set(operations)
    assert "ingress.send.features.digits_fast" not in operations
    assert "preprocess.send.features.digits_fast" in operations
    assert "features.<model>" in document["info"]["description"]
    asynchronous = asyncapi_document(load_checked_profile("asynchronous", settings), settings)
    assert not any(name.startswith("ingress.send.features.") for name in asynchronous["operations"])


def test_a_post_processor_is_in_the_document() -> None:
    settings = Settings()
    document = asyncapi_document(load_checked_profile("post_processing", settings), settings)
    operations = document["operations"]
    assert {"predict.send.scored.iris", "labels.receive.scored.*", "labels.send.prediction.iris",
            "store.receive.prediction.*"} <= set(operations)


def test_a_stage_metrics_port_serves_the_runners_registry() -> None:
    import httpx

    from toposerve.consumers.metrics import serve_metrics

    runner, _ = runner_on_fakes(Refusing("preprocess"))
    runner.metrics.handled.inc(2)
    server = serve_metrics(runner.metrics.registry, 0)
    try:
        response = httpx.get(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    assert response.status_code == 200
    assert 'toposerve_stage_messages_total{outcome="handled",stage="preprocess"} 2.0' in response.text
    assert "toposerve_predict_batch_size_bucket" in response.text
