"""A Python client for publishing straight to a running profile, on FastStream.

    from toposerve.producers import InferenceClient

    async with InferenceClient(Settings(amqp_url=..., namespace="toposerve")) as client:
        answer = await client.predict("iris", instances=[[5.1, 3.5, 1.4, 0.2]])   # wait for it
        job_id = await client.submit("iris", instances=[[6.7, 3.0, 5.2, 2.3]])     # or not

``predict`` publishes an ``InferenceRequest`` with RabbitMQ's direct reply-to and waits for
the job's terminal ``Prediction`` or ``Failure`` (any profile: the stage that ends the job
answers the reply address). ``submit`` only publishes; in a profile that stores outcomes the
job's record appears under its id (``GET /v1/jobs/{id}`` on the ingress, or
``poll(job_id)`` here when the client knows the ingress's URL). ``SyncInferenceClient`` is
the same for code without an event loop.

Every request carries the client account's AMQP user_id (``toposerve accounts url client``);
answers are accepted only from stage accounts, as the ingress does.

Why not FastStream's ``broker.request()``: it serialises concurrent requests of one broker
(faststream#1318). Here one FastStream subscriber on the direct reply-to pseudo-queue routes
every answer to its waiting caller by correlation id, so requests run concurrently.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any, TypeVar

import httpx
from aio_pika.abc import AbstractIncomingMessage
from faststream import AckPolicy
from faststream.rabbit import RabbitQueue

from toposerve.brokers import (
    Failure,
    FailureCode,
    InferenceRequest,
    JobRecord,
    Prediction,
    Publisher,
    PublishRefused,
    Settings,
    decode_terminal,
    inference_exchange,
    make_broker,
    routing_key,
    trusted_producers,
    url_user,
    utc_now,
)
from toposerve.producers.loop_thread import LoopThread

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
T = TypeVar("T")


class ClientError(RuntimeError):
    """The request could not be published, or no answer came in time (the message says which)."""


class InferenceClient:
    """Publishes ``InferenceRequest``s to ``settings.namespace``'s exchange (module doc)."""

    def __init__(self, settings: Settings | None = None, *, ingress_url: str | None = None,
                 publish_timeout_s: float = 10.0) -> None:
        self.settings = settings or Settings()
        # Where ``poll`` reads job records (the ingress); a client account has no Redis.
        self.ingress_url = ingress_url
        self.broker = make_broker(self.settings, "toposerve-client")
        self.publisher = Publisher(self.broker, inference_exchange(self.settings.namespace),
                                   timeout_s=publish_timeout_s, user_id=url_user(self.settings.amqp_url))
        own = url_user(self.settings.amqp_url)
        self.trusted = trusted_producers(self.settings.namespace) | ({own} if own else set())
        self._waiting: dict[str, asyncio.Future[Prediction | Failure]] = {}
        # Direct reply-to: consumed without acks, on the channel requests are published on
        # (FastStream's default channel), as RabbitMQ requires.
        self.broker.subscriber(RabbitQueue(DIRECT_REPLY_TO, declare=False), ack_policy=AckPolicy.ACK_FIRST,
                               no_reply=True, include_in_schema=False)(self._on_answer)

    async def __aenter__(self) -> InferenceClient:
        await self.broker.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for future in self._waiting.values():
            future.cancel()
        await self.broker.stop()

    async def _on_answer(self, raw: AbstractIncomingMessage) -> None:  # the broker's decoder gives the delivery
        future = self._waiting.get(raw.correlation_id or "")
        if future is None or future.done():
            return  # an answer nobody waits for any more (timed out)
        if raw.user_id not in self.trusted:
            return  # not from a stage: ignored, the real answer may still come
        try:
            future.set_result(decode_terminal(raw.body))
        except ValueError as exc:
            future.set_exception(ClientError(f"the answer to job {raw.correlation_id} does not decode: {exc}"))

    def request(self, model: str, *, instances: list[list[float]] | None = None, image: str | None = None,
                item_id: str | None = None, deadline_s: float | None = None) -> InferenceRequest:
        """The message ``submit``/``predict`` publish (validated here: a wrong one raises ValidationError)."""
        deadline = utc_now() + timedelta(seconds=deadline_s) if deadline_s else None
        return InferenceRequest(id=uuid.uuid4(), model=model, instances=instances, image=image, item_id=item_id,
                                deadline=deadline)

    async def submit(self, model: str, **inputs: Any) -> uuid.UUID:
        """Publish a request (persistent) and return its job id without waiting."""
        message = self.request(model, **inputs)
        await self._publish(message, persistent=True)
        return message.id

    async def predict(self, model: str, *, timeout_s: float = 30.0, **inputs: Any) -> Prediction | Failure:
        """Publish a request and wait for its terminal message; ``ClientError`` after ``timeout_s``."""
        message = self.request(model, deadline_s=inputs.pop("deadline_s", timeout_s), **inputs)
        correlation = str(message.id)
        future: asyncio.Future[Prediction | Failure] = asyncio.get_running_loop().create_future()
        self._waiting[correlation] = future
        try:
            # Not persistent: a caller who waits would give up before a broker restart ends.
            await self._publish(message, persistent=False, reply_to=DIRECT_REPLY_TO, correlation_id=correlation,
                                expiration_s=timeout_s)
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError as exc:
            raise ClientError(f"no answer to job {message.id} within {timeout_s:g} s") from exc
        finally:
            self._waiting.pop(correlation, None)

    async def poll(self, job_id: uuid.UUID | str, wait_s: float = 0.0) -> JobRecord | None:
        """The job's record from the ingress (None: not known there); ``wait_s``: wait for it to end."""
        if self.ingress_url is None:
            raise ClientError("poll needs the ingress's URL (InferenceClient(ingress_url=...))")
        async with httpx.AsyncClient(base_url=self.ingress_url, timeout=wait_s + 10) as http:
            response = await http.get(f"/v1/jobs/{job_id}", params={"wait": wait_s} if wait_s else None)
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            raise ClientError(f"GET /v1/jobs/{job_id}: {response.status_code} {response.text[:500]}")
        return JobRecord.model_validate(response.json())

    async def _publish(self, message: InferenceRequest, **options: Any) -> None:
        try:
            await self.publisher.publish(message, routing_key("request", message.model), **options)
        except PublishRefused as exc:
            code = FailureCode.UNKNOWN_MODEL.value if exc.reason == "no_route" else exc.reason
            raise ClientError(f"request for {message.model!r} was not taken ({code}): {exc}") from exc


class SyncInferenceClient:
    """``InferenceClient`` for code without an event loop: its loop runs in a thread of its own."""

    def __init__(self, settings: Settings | None = None, **options: Any) -> None:
        self._thread = LoopThread("toposerve-client")
        self._client = InferenceClient(settings, **options)
        self._run(self._client.__aenter__())

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._thread.run(coroutine)

    def __enter__(self) -> SyncInferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._thread.stop(self._client.close)

    def submit(self, model: str, **inputs: Any) -> uuid.UUID:
        return self._run(self._client.submit(model, **inputs))

    def predict(self, model: str, *, timeout_s: float = 30.0, **inputs: Any) -> Prediction | Failure:
        return self._run(self._client.predict(model, timeout_s=timeout_s, **inputs))

    def poll(self, job_id: uuid.UUID | str, wait_s: float = 0.0) -> JobRecord | None:
        return self._run(self._client.poll(job_id, wait_s))
