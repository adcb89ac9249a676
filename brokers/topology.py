"""Declaring the routing topology on the broker: exchanges, stage queues, bindings.

A profile (deploy/) is turned into ``QueueSpec``s; this module knows nothing about
profiles. Declarations are idempotent, so every process declares what it uses at
startup and the start order of processes does not matter.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue
from aio_pika.exceptions import ChannelPreconditionFailed
from pydantic import BaseModel, Field

log = logging.getLogger(__name__)


def exchange_name(namespace: str) -> str:
    return f"{namespace}.inference"


def dead_exchange_name(namespace: str) -> str:
    return f"{namespace}.dead"


def dead_queue_name(namespace: str) -> str:
    # A queue may share its name with an exchange: they are different kinds of object.
    return f"{namespace}.dead"


def stage_queue_name(namespace: str, profile: str, stage: str) -> str:
    return f"{namespace}.{profile}.{stage}"


class QueueSpec(BaseModel):
    name: str
    binding_keys: list[str] = Field(min_length=1)
    queue_type: Literal["classic", "quorum"] = "classic"
    max_length: int | None = Field(default=None, ge=1, description="Bound; publishes past it are rejected")
    delivery_limit: int | None = Field(default=None, ge=1, description="Quorum queues: deliveries before dead-lettering")
    # Delay queues: messages wait ``message_ttl_ms``, then are dead-lettered to this
    # exchange and routing key (how a join timeout comes back to its aggregate stage).
    message_ttl_ms: int | None = Field(default=None, ge=1)
    dead_letter_exchange: str | None = None
    dead_letter_routing_key: str | None = None

    def arguments(self, namespace: str) -> dict[str, object]:
        args: dict[str, object] = {
            "x-queue-type": self.queue_type,
            # Rejected (requeue=False) and over-limit deliveries go to the dead-letter exchange.
            "x-dead-letter-exchange": self.dead_letter_exchange or dead_exchange_name(namespace),
        }
        if self.dead_letter_routing_key is not None:
            args["x-dead-letter-routing-key"] = self.dead_letter_routing_key
        if self.message_ttl_ms is not None:
            args["x-message-ttl"] = self.message_ttl_ms
        if self.max_length is not None:
            args["x-max-length"] = self.max_length
            args["x-overflow"] = "reject-publish"
        if self.queue_type == "quorum" and self.delivery_limit is not None:
            args["x-delivery-limit"] = self.delivery_limit
        return args


class DeadLetterSpec(BaseModel):
    """Bounds of ``{ns}.dead``: poison or huge messages must not fill the broker's disk or memory.

    Past a bound the oldest dead letters are dropped (``drop-head``), so the newest,
    the ones an operator is looking at, stay listable and replayable.
    """

    max_length: int | None = Field(default=100_000, ge=1, description="Dead letters kept at most")
    max_bytes: int | None = Field(default=256 * 1024 * 1024, ge=1024, description="Bytes of bodies kept at most")

    def arguments(self) -> dict[str, object]:
        args: dict[str, object] = {"x-overflow": "drop-head"}
        if self.max_length is not None:
            args["x-max-length"] = self.max_length
        if self.max_bytes is not None:
            args["x-max-length-bytes"] = self.max_bytes
        return args


async def declare_dead_letters(connection: AbstractConnection, namespace: str, spec: DeadLetterSpec) -> None:
    """Declare ``{ns}.dead`` (bounded by ``spec``) and bind it to the dead-letter exchange.

    On a channel of its own: a queue that exists with other bounds (declared by an older
    release, or by a profile with other bounds) makes the broker close the channel; that
    queue is then kept as it is, with a warning, and nothing else is disturbed.
    """
    channel = await connection.channel()
    try:
        dead_exchange = await channel.declare_exchange(dead_exchange_name(namespace), aio_pika.ExchangeType.TOPIC,
                                                       durable=True)
        queue = await channel.declare_queue(dead_queue_name(namespace), durable=True, arguments=spec.arguments())
        await queue.bind(dead_exchange, routing_key="#")
    except ChannelPreconditionFailed as exc:
        log.warning("dead-letter queue %s exists with other bounds than %s; keeping it as it is (%s)",
                    dead_queue_name(namespace), spec.arguments(), exc)
    finally:
        if not channel.is_closed:
            await channel.close()


@dataclass(frozen=True)
class DeclaredTopology:
    exchange: AbstractExchange
    dead_exchange: AbstractExchange
    queues: dict[str, AbstractQueue]


async def declare_topology(
    channel: AbstractChannel, namespace: str, queues: Sequence[QueueSpec] = ()
) -> DeclaredTopology:
    exchange = await channel.declare_exchange(exchange_name(namespace), aio_pika.ExchangeType.TOPIC, durable=True)
    # The dead-letter queue itself is declared, with its bounds, by the processes that know
    # their profile (``declare_dead_letters``): stages and the ingress.
    dead_exchange = await channel.declare_exchange(
        dead_exchange_name(namespace), aio_pika.ExchangeType.TOPIC, durable=True
    )

    declared: dict[str, AbstractQueue] = {}
    for spec in queues:
        queue = await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments(namespace))
        for key in spec.binding_keys:
            await queue.bind(exchange, routing_key=key)
        declared[spec.name] = queue
    return DeclaredTopology(exchange=exchange, dead_exchange=dead_exchange, queues=declared)
