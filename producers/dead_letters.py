"""Dead letters: list what landed in ``{ns}.dead`` and re-publish it to the inference exchange.

A stage dead-letters a message it cannot decode, or one that kept failing
(``consumers/settlement.py``), with ``x-toposerve-reason``, ``-stage``, ``-queue`` and
``-attempts`` headers; the broker dead-letters rejected or over-limit deliveries
with an ``x-death`` header. Both kinds are listed and replayed the same way.

Listing never removes anything: messages are fetched unacked and go back to the
queue when the channel closes. Replaying publishes a copy with publisher confirms
(``mandatory``, so a routing key no queue takes is refused) and acks the dead letter
only after the confirm: a crash in between leaves the dead letter where it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelNotFoundEntity
from pydantic import BaseModel, ConfigDict, Field

from toposerve.brokers import (
    ATTEMPTS_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    STAGE_HEADER,
    Publisher,
    PublishRefused,
    Settings,
    connect_amqp,
    dead_queue_name,
    declare_topology,
    inference_exchange,
    make_broker,
    read_identity,
    url_user,
)

# Dead-letter bookkeeping that a replayed message must not carry into its new life.
DROPPED_ON_REPLAY = (ATTEMPTS_HEADER, REASON_HEADER, STAGE_HEADER, QUEUE_HEADER, "x-death",
                     "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
                     "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason")


class DeadLetter(BaseModel):
    """One dead letter as it is listed (``toposerve dead list --json``, ``GET /v1/dead-letters``)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    routing_key: str
    job_id: str | None
    message_id: str | None
    reason: str
    stage: str | None
    queue: str | None
    attempts: int | None
    size: int = Field(serialization_alias="bytes", description="Bytes of the body")

    def as_dict(self) -> dict[str, object]:
        return self.model_dump(by_alias=True)


@dataclass
class ReplayReport:
    replayed: list[str]  # job ids (or "-" for messages without one) re-published and acked
    refused: list[tuple[str, str]]  # (job id, why): left in the dead-letter queue
    not_found: list[str]  # requested ids that are not in the dead-letter queue


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def job_id_of(message: AbstractIncomingMessage) -> str | None:
    """The job id in the body (its ``id``); the AMQP message id is the publisher's own and may differ."""
    identity = read_identity(message.body)
    return None if identity is None else str(identity[0])


def original_routing_key(message: AbstractIncomingMessage) -> str | None:
    """The routing key the message had on the inference exchange.

    The stage runner dead-letters under the original key (it carries it across
    retries in a header), and the broker keeps it when it dead-letters itself; a key
    equal to a stage queue's name would mean neither held, so it is not replayable.
    """
    key = message.routing_key or ""
    queue = (message.headers or {}).get(QUEUE_HEADER)
    if not key or (queue is not None and key == _text(queue)):
        return None
    return key


def describe(message: AbstractIncomingMessage) -> DeadLetter:
    headers = message.headers or {}
    reason = headers.get(REASON_HEADER)
    queue = headers.get(QUEUE_HEADER)
    if reason is None:
        # Dead-lettered by the broker itself (rejected, over a delivery limit, expired).
        deaths = headers.get("x-death") or []
        first = deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}
        reason = f"broker: {_text(first.get('reason', 'unknown'))}" if first else "unknown"
        queue = queue or (_text(first["queue"]) if "queue" in first else None)
    attempts = headers.get(ATTEMPTS_HEADER)
    stage = headers.get(STAGE_HEADER)
    return DeadLetter(
        routing_key=original_routing_key(message) or message.routing_key or "",
        job_id=job_id_of(message),
        message_id=message.message_id,
        reason=_text(reason),
        stage=None if stage is None else _text(stage),
        queue=None if queue is None else _text(queue),
        attempts=None if attempts is None else int(attempts),
        size=len(message.body),
    )


class DeadLetters:
    """A connection to the broker for listing and replaying one namespace's dead letters."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Browsing is basic.get on a channel of our own, whose close puts back what was not
        # acked: FastStream has no such thing, so browsing is on aio-pika; replays are
        # published through FastStream, like every other publish.
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._broker = make_broker(settings, "toposerve-dead-letters")
        self._publisher = Publisher(self._broker, inference_exchange(settings.namespace),
                                    user_id=url_user(settings.amqp_url))

    async def __aenter__(self) -> DeadLetters:
        self._connection = await connect_amqp(self.settings.amqp_url, "toposerve-dead-letters-browse")
        await self._broker.connect()
        await declare_topology(self._broker, self.settings.namespace)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()
        await self._broker.stop()

    async def _channel(self):
        """A channel and ``{ns}.dead`` as it is (passive: its bounds belong to the profile)."""
        assert self._connection is not None
        channel = await self._connection.channel()
        try:
            queue = await channel.declare_queue(dead_queue_name(self.settings.namespace), passive=True)
        except ChannelNotFoundEntity:  # no stage ever ran in this namespace: no dead letters
            channel = await self._connection.channel()
            queue = None
        return channel, queue

    async def count(self) -> int:
        channel, queue = await self._channel()
        try:
            return 0 if queue is None else queue.declaration_result.message_count or 0
        finally:
            await channel.close()

    async def list(self, limit: int | None = None) -> list[DeadLetter]:
        """Up to ``limit`` dead letters, oldest first; all stay in the queue."""
        channel, queue = await self._channel()
        try:
            total = 0 if queue is None else queue.declaration_result.message_count or 0
            wanted = total if limit is None else min(limit, total)
            found: list[DeadLetter] = []
            while len(found) < wanted:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                found.append(describe(message))
            return found
        finally:
            await channel.close()  # every unacked get goes back to the queue

    async def replay(self, ids: Iterable[str] | None = None) -> ReplayReport:
        """Re-publish the dead letters with these job ids or message ids (``None``: all of them)."""
        publisher = self._publisher

        async def republish(message: AbstractIncomingMessage) -> str | None:
            key = original_routing_key(message)
            if key is None:
                return "its original routing key cannot be known"
            try:
                await publisher.publish_raw(replay_copy(message), key)
            except PublishRefused as exc:
                return str(exc)
            return None

        return await self._settle(ids, republish)

    async def discard(self, ids: Iterable[str]) -> ReplayReport:
        """Remove the dead letters with these job ids or message ids for good (``replayed`` lists them)."""

        async def drop(message: AbstractIncomingMessage) -> str | None:
            return None

        return await self._settle(list(ids), drop)

    async def _settle(self, ids: Iterable[str] | None, act) -> ReplayReport:
        """``act`` on each wanted dead letter; ack the ones it returns no refusal for (after it is done)."""
        wanted = None if ids is None else set(ids)
        channel, queue = await self._channel()
        report = ReplayReport(replayed=[], refused=[], not_found=[])
        seen: set[str] = set()
        try:
            # Only what is there now: a replayed message that dies again is not replayed twice.
            total = 0 if queue is None else queue.declaration_result.message_count or 0
            for _ in range(total):
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                job_id = job_id_of(message)
                names = {job_id, message.message_id} - {None}
                if wanted is not None and not names & wanted:
                    continue  # left unacked: back to the queue when the channel closes
                seen |= names or {"-"}
                refusal = await act(message)
                if refusal is not None:
                    report.refused.append((job_id or "-", refusal))
                    continue
                await message.ack()  # only after the broker confirmed the copy
                report.replayed.append(job_id or "-")
        finally:
            await channel.close()
        if wanted is not None:
            report.not_found = sorted(wanted - seen)
        return report


def replay_copy(message: AbstractIncomingMessage) -> aio_pika.Message:
    """The dead letter as it was first published, without the dead-letter bookkeeping.

    ``reply_to`` is dropped: a synchronous caller gave up long ago.
    """
    headers = {k: v for k, v in (message.headers or {}).items() if k not in DROPPED_ON_REPLAY}
    return aio_pika.Message(
        body=message.body,
        headers=headers,
        content_type=message.content_type,
        correlation_id=message.correlation_id,
        message_id=message.message_id,
        type=message.type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
