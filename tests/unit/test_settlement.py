"""The settlement policy on FastStream's in-memory broker: the real ``StageRunner`` and
``Settlement``, topic routing by ``TestRabbitBroker``; what each kind of delivery ends as.

Fast checks of our own rules. That the rules hold on a real RabbitMQ (confirms, requeues,
redeliveries, crashes) is what the integration and fault tests show.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import ClassVar

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage
from faststream.rabbit import RabbitQueue, TestRabbitBroker
from faststream.rabbit.testing import PatchedMessage

from toposerve.brokers import (
    ATTEMPTS_HEADER,
    REASON_HEADER,
    TRUNCATED_HEADER,
    Envelope,
    Prediction,
    QueueSpec,
    RowPrediction,
    Settings,
    amqp_message,
    dead_exchange,
    inference_exchange,
    make_broker,
    utc_now,
)
from toposerve.consumers import CustomStage, Outgoing, Stage, StageRunner, outgoing, settlement
from toposerve.models import InputError

NS = "t"
STAGE_ACCOUNT = f"{NS}.predict"  # a stage account: its outcomes are trusted
REPLY_QUEUE = "caller-reply-queue"


def prediction(label: str = "setosa", **update) -> Prediction:
    return Prediction(id=uuid.uuid4(), model="iris", model_version="1",
                      rows=[RowPrediction(label=label, class_index=0, probabilities=[0.9, 0.05, 0.05])], **update)


@dataclass
class Bus:
    """What came out: outcomes on the inference exchange, dead letters, and settled deliveries."""

    runner: StageRunner
    broker: TestRabbitBroker
    outcomes: list[tuple[str, dict]] = field(default_factory=list)
    dead: list[tuple[dict, bytes]] = field(default_factory=list)
    acked: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    replies: list[dict] = field(default_factory=list)

    async def publish(self, body: Envelope | bytes, key: str = "scored.iris", user_id: str | None = STAGE_ACCOUNT,
                      **headers: object) -> None:
        message = (amqp_message(body, user_id=user_id, headers=dict(headers)) if isinstance(body, Envelope)
                   else aio_pika.Message(body, user_id=user_id, message_id=str(uuid.uuid4())))
        await self.broker.publish(message, exchange=inference_exchange(NS), routing_key=key)

    def failures(self) -> list[dict]:
        return [body for key, body in self.outcomes if key.startswith("failure.")]


async def start_bus(stage: Stage, monkeypatch: pytest.MonkeyPatch, **settings: object) -> AsyncIterator[Bus]:
    broker = make_broker(Settings(namespace=NS, **settings), "test")
    runner = StageRunner(stage, Settings(namespace=NS, **settings),
                         QueueSpec(name=f"{NS}.p.{stage.name}", binding_keys=["scored.*"]), broker=broker, consume_directly=False)
    async with TestRabbitBroker(broker) as test_broker:
        bus = Bus(runner, test_broker)

        # no_reply: a FastStream handler answers a message's reply_to with what it returns.
        @broker.subscriber(RabbitQueue("outcomes", routing_key="*.iris"), inference_exchange(NS), no_reply=True)
        async def outcome(delivery: AbstractIncomingMessage) -> None:  # the broker's decoder: the delivery
            if not delivery.routing_key.startswith("scored."):
                bus.outcomes.append((delivery.routing_key, orjson.loads(delivery.body)))

        @broker.subscriber(RabbitQueue("dead", routing_key="#"), dead_exchange(NS), no_reply=True)
        async def dead(delivery: AbstractIncomingMessage) -> None:
            bus.dead.append((dict(delivery.headers), delivery.body))

        @broker.subscriber(REPLY_QUEUE, no_reply=True)
        async def reply(delivery: AbstractIncomingMessage) -> None:
            bus.replies.append(orjson.loads(delivery.body))

        # RabbitMQ's default exchange routes a queue's name to that queue (a retry); the
        # in-memory broker does so only for subscribers on the default exchange.
        @broker.subscriber(runner.queue_spec.name, no_reply=True)
        async def retried(delivery: AbstractIncomingMessage) -> None:
            await runner.settlement.settle(delivery)

        async def ack(self, multiple: bool = False) -> None:
            bus.acked.append(self.message_id)

        async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
            bus.requeued.append(self.message_id)

        monkeypatch.setattr(PatchedMessage, "ack", ack)
        monkeypatch.setattr(PatchedMessage, "nack", nack)
        monkeypatch.setattr(settlement, "REQUEUE_PAUSE_S", 0.0)
        await runner.start()
        yield bus
        await runner.drain_and_close()


async def relabel(message: Prediction) -> Prediction:
    if message.rows[0].label == "bad":
        raise InputError("label 'bad' is not for sale")
    if message.rows[0].label == "bug":
        raise RuntimeError("a bug")
    return message.model_copy(update={"rows": [r.model_copy(update={"label": r.label.upper()}) for r in message.rows]})


@pytest.fixture
async def bus(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Bus]:
    async for started in start_bus(CustomStage("labels", relabel), monkeypatch):
        yield started


async def test_output_is_published_then_the_input_acked(bus: Bus) -> None:
    sent = prediction()
    await bus.publish(sent)
    assert [(key, body["rows"][0]["label"]) for key, body in bus.outcomes] == [("prediction.iris", "SETOSA")]
    assert bus.outcomes[0][1]["timings"]["custom_ms"] >= 0
    assert len(bus.acked) == 1 and not bus.requeued and bus.runner.stats.handled == 1


async def test_bad_input_is_a_failure_of_that_job_never_retried(bus: Bus) -> None:
    sent = prediction("bad")
    await bus.publish(sent)
    [failure] = bus.failures()
    assert failure["id"] == str(sent.id) and failure["code"] == "invalid_input"
    assert failure["stage"] == "labels" and "not for sale" in failure["message"]
    assert len(bus.acked) == 1 and bus.runner.stats.retried == 0 and not bus.dead


async def test_an_error_is_retried_then_failed_and_dead_lettered(bus: Bus) -> None:
    sent = prediction("bug")
    await bus.publish(sent)
    # Retries go to the stage's own queue (the in-memory broker delivers them at once).
    assert bus.runner.stats.retried == Settings().max_attempts - 1
    [failure] = bus.failures()
    assert failure["code"] == "internal" and "failed 3 times" in failure["message"] and "a bug" in failure["message"]
    [(headers, body)] = bus.dead
    assert "RuntimeError: a bug" in headers[REASON_HEADER] and orjson.loads(body)["id"] == str(sent.id)
    assert headers[ATTEMPTS_HEADER] == 2
    assert len(bus.acked) == Settings().max_attempts  # every attempt's delivery settled once


async def test_an_undecodable_message_fails_its_job_when_its_id_can_be_read(bus: Bus) -> None:
    job = uuid.uuid4()
    await bus.publish(orjson.dumps({"id": str(job), "model": "iris", "rows": "not rows"}))
    [failure] = bus.failures()
    assert failure["id"] == str(job) and failure["code"] == "invalid_message"
    assert "not a valid Prediction for stage 'labels'" in failure["message"] and "rows" in failure["message"]
    assert len(bus.dead) == 1 and len(bus.acked) == 1


async def test_garbage_is_dead_lettered_with_the_reason(bus: Bus) -> None:
    await bus.publish(b"\xff\x00 not json at all")
    assert not bus.outcomes
    [(headers, body)] = bus.dead
    assert body == b"\xff\x00 not json at all" and "not a valid Prediction" in headers[REASON_HEADER]
    assert len(bus.acked) == 1


async def test_an_outcome_from_a_client_account_is_refused_and_its_job_untouched(bus: Bus) -> None:
    await bus.publish(prediction(), user_id=f"{NS}.client")
    assert not bus.outcomes
    [(headers, _)] = bus.dead
    assert f"account '{NS}.client'" in headers[REASON_HEADER] and len(bus.acked) == 1
    await bus.publish(prediction(), user_id=None)
    assert "did not say who it is" in bus.dead[1][0][REASON_HEADER]


async def test_an_oversized_message_is_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    async for bus in start_bus(CustomStage("labels", relabel), monkeypatch, max_message_bytes=100_000):
        sent = prediction()
        body = orjson.loads(sent.model_dump_json())
        body["rows"] = body["rows"] * 2000  # about 170 kB
        await bus.publish(orjson.dumps(body))
        [failure] = bus.failures()
        assert failure["id"] == str(sent.id) and failure["code"] == "too_large" and "100000" in failure["message"]
        [(headers, kept)] = bus.dead
        assert len(kept) == settlement.SALVAGE_HEAD_BYTES and headers[TRUNCATED_HEADER] > 100_000


async def test_work_past_its_deadline_is_dropped_as_deadline_exceeded(bus: Bus) -> None:
    await bus.publish(prediction(deadline=utc_now() - timedelta(seconds=1)))
    [failure] = bus.failures()
    assert failure["code"] == "deadline_exceeded" and "passed before stage 'labels' started" in failure["message"]


class Unroutable(Stage):
    kind: ClassVar[str] = "custom"
    input_type: ClassVar[type[Envelope]] = Prediction

    async def handle(self, message: Envelope) -> list[Outgoing]:
        return [Outgoing(message, "nowhere.at-all")]


async def test_output_no_queue_takes_is_requeued_not_acked(monkeypatch: pytest.MonkeyPatch) -> None:
    async for bus in start_bus(Unroutable("lost"), monkeypatch):
        await bus.publish(prediction())
        assert len(bus.requeued) == 1 and not bus.acked and bus.runner.stats.requeued == 1


async def test_a_sync_callers_answer_goes_to_its_reply_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    async for bus in start_bus(CustomStage("labels", relabel), monkeypatch):
        sent = prediction()
        await bus.broker.publish(amqp_message(sent, user_id=STAGE_ACCOUNT, reply_to=REPLY_QUEUE),
                                 exchange=inference_exchange(NS), routing_key="scored.iris")
        assert [r["rows"][0]["label"] for r in bus.replies] == ["SETOSA"]
        # ... and the copy on the exchange, for a store.
        assert [key for key, _ in bus.outcomes] == [outgoing(sent).routing_key] == ["prediction.iris"]


class NotTheAnswer(Stage):
    """A predict stage with ``publishes``: its prediction goes on to a post-processor."""

    kind: ClassVar[str] = "predict"
    input_type: ClassVar[type[Envelope]] = Prediction

    async def handle(self, message: Envelope) -> list[Outgoing]:
        return [Outgoing(message, "checked.iris", final=False)]


async def test_an_output_that_is_not_final_does_not_answer_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    async for bus in start_bus(NotTheAnswer("predict"), monkeypatch):
        await bus.broker.publish(amqp_message(prediction(), user_id=STAGE_ACCOUNT, reply_to=REPLY_QUEUE),
                                 exchange=inference_exchange(NS), routing_key="scored.iris")
        assert not bus.replies and [key for key, _ in bus.outcomes] == ["checked.iris"]
