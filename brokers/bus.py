"""The bus on FastStream: one ``RabbitBroker`` per process, the exchanges and queues as FastStream
declares them, and the one way we publish (with confirms; refused publishes raise).

The broker is an object the composition root makes (``make_broker``) and passes in; stages
subscribe to it (consumers/runner.py) and everything that publishes goes through a
``Publisher`` on it. FastStream declares and consumes; the settlement rules (acks, retries,
dead letters) are ours (consumers/settlement.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractQueue
from aio_pika.exceptions import AMQPError, ChannelPreconditionFailed, DeliveryError, PublishError
from faststream.exceptions import SubscriberNotFound
from faststream.rabbit import Channel, ExchangeType, RabbitBroker, RabbitExchange, RabbitQueue
from faststream.rabbit.publisher.producer import AioPikaFastProducerImpl
from faststream.rabbit.response import RabbitPublishCommand
from faststream.response import PublishType

from toposerve.brokers.accounts import url_user
from toposerve.brokers.amqp_nodes import FailoverConnection, failover_connection_class, node_urls
from toposerve.brokers.connections import PublishRefused, amqp_message
from toposerve.brokers.messages import Envelope
from toposerve.brokers.settings import Settings
from toposerve.brokers.topology import (
    DeadLetterSpec,
    QueueSpec,
    dead_exchange_name,
    dead_queue_name,
    exchange_name,
)

log = logging.getLogger(__name__)


def make_broker(settings: Settings | str, name: str, *, connect_timeout_s: float = 10) -> RabbitBroker:
    """A FastStream broker for ``settings.amqp_url`` (or a URL); not connected yet.

    Publisher confirms on (FastStream's default channel), a returned ``mandatory`` publish
    raises, FastStream's per-message log lines off (a stage logs its own). A handler gets the
    delivery itself (aio-pika's ``IncomingMessage``, without FastDepends: ``apply_types``
    off), since the settlement policy needs its headers, redelivery flag and ack; stages parse
    bodies with their own pydantic types, once. FastDepends resolved the handler's message
    parameter in a worker thread per delivery: a thread hop per message, about a tenth of a
    stage's CPU.

    Several node URLs (a cluster): the broker's robust connection fails over between them
    (brokers/amqp_nodes.py).
    """
    urls = node_urls(settings if isinstance(settings, str) else settings.amqp_url)
    broker = RabbitBroker(
        urls[0],
        client_properties={"connection_name": name},
        timeout=connect_timeout_s,
        default_channel=Channel(publisher_confirms=True, on_return_raises=True),
        graceful_timeout=Settings.model_fields["drain_timeout_s"].default if isinstance(settings, str)
        else settings.drain_timeout_s,
        app_id=None,
        logger=None,
        decoder=_the_delivery,
        apply_types=False,
    )
    if len(urls) > 1:
        # FastStream 0.7 connects with aio_pika.connect_robust(**these kwargs) and has no
        # option for a connection class; tests/unit/test_amqp_nodes.py guards this hook.
        broker._connection_kwargs["connection_class"] = failover_connection_class(urls)  # noqa: SLF001
    return broker


async def _the_delivery(message):  # noqa: ANN001, ANN202 - FastStream's RabbitMessage -> aio-pika's
    return message.raw_message


DEFAULT_EXCHANGE = RabbitExchange("")  # a queue's name as the routing key


def inference_exchange(namespace: str) -> RabbitExchange:
    return RabbitExchange(exchange_name(namespace), type=ExchangeType.TOPIC, durable=True)


def dead_exchange(namespace: str) -> RabbitExchange:
    return RabbitExchange(dead_exchange_name(namespace), type=ExchangeType.TOPIC, durable=True)


def rabbit_queue(spec: QueueSpec, namespace: str) -> RabbitQueue:
    """A stage queue as FastStream declares it (bound with its first key; ``declare_topology`` binds the rest)."""
    return RabbitQueue(spec.name, durable=True, arguments=spec.arguments(namespace), routing_key=spec.binding_keys[0])


@dataclass(frozen=True)
class DeclaredTopology:
    exchange: AbstractExchange
    dead_exchange: AbstractExchange
    queues: dict[str, AbstractQueue]


async def declare_topology(broker: RabbitBroker, namespace: str, queues: Sequence[QueueSpec] = (),
                           channel: Channel | None = None, unbound: Collection[str] = ()) -> DeclaredTopology:
    """The exchanges, and ``queues`` bound to every key they consume. Idempotent: every process
    declares what it uses at startup, so the start order of processes does not matter.

    ``channel``: the channel a subscriber will consume these queues on. FastStream keeps a
    declared queue (keyed by the queue, not the channel) and its subscriber consumes on
    that object, so a queue declared on another channel would be consumed without the
    subscriber's prefetch. ``unbound``: queues declared without their bindings (a swap binds them).
    """
    exchange = await broker.declare_exchange(inference_exchange(namespace))
    dead = await broker.declare_exchange(dead_exchange(namespace))
    declared: dict[str, AbstractQueue] = {}
    for spec in queues:
        queue = await broker.config.declarer.declare_queue(rabbit_queue(spec, namespace), channel=channel)
        for key in spec.binding_keys if spec.name not in unbound else ():
            await queue.bind(exchange, routing_key=key)
        declared[spec.name] = queue
    return DeclaredTopology(exchange=exchange, dead_exchange=dead, queues=declared)


async def declare_dead_letters(broker: RabbitBroker, namespace: str, spec: DeadLetterSpec) -> None:
    """Declare ``{ns}.dead`` (bounded by ``spec``) and bind it to the dead-letter exchange.

    On a channel of its own: a queue that exists with other bounds (declared by an older
    release, or by a profile with other bounds) makes the broker close the channel; that
    queue is then kept as it is, with a warning, and nothing else is disturbed.
    """
    # The exchange on the shared channel (FastStream keeps declared exchanges for its
    # publishes, so it must not live on a channel that may close); the queue on its own.
    own = Channel(publisher_confirms=False)  # FastStream tells channels apart by identity
    exchange = await broker.declare_exchange(dead_exchange(namespace))
    try:
        queue = await broker.config.declarer.declare_queue(
            RabbitQueue(dead_queue_name(namespace), durable=True, arguments=spec.arguments()), channel=own)
        await queue.bind(exchange, routing_key="#")
    except ChannelPreconditionFailed as exc:
        log.warning("dead-letter queue %s exists with other bounds than %s; keeping it as it is (%s)",
                    dead_queue_name(namespace), spec.arguments(), exc)


class Publisher:
    """Publishes envelopes (or prepared messages) through ``broker`` and waits for the broker's confirm.

    On the exchange object FastStream declared, on its confirm channel, rather than through
    ``broker.publish``: the same channel, confirms and routing without the per-publish command,
    encoding and middlewares, which cost a stage as much CPU as the publish itself. Under
    FastStream's test broker it goes through the broker's producer, which routes in memory.

    ``exchange`` None: the default exchange (a queue's name as the routing key). Every
    message carries ``user_id`` (the connection's user: RabbitMQ refuses any other, so
    consumers can trust it) and ``app_id`` when set. A message the broker did not take
    (nacked, over a queue bound, routed to no queue with ``mandatory``, no confirm in time)
    raises ``PublishRefused``, so no caller acks its input for output that went nowhere.
    """

    def __init__(self, broker: RabbitBroker, exchange: RabbitExchange | None, timeout_s: float = 10.0,
                 app_id: str | None = None, user_id: str | None = None) -> None:
        self.broker = broker
        self.exchange = exchange
        self.timeout_s = timeout_s
        self.app_id = app_id
        self.user_id = user_id
        self._exchange_obj: AbstractExchange | None = None

    async def publish(
        self,
        body: Envelope,
        routing_key: str,
        *,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        headers: dict[str, object] | None = None,
        persistent: bool = True,
        expiration_s: float | None = None,
        mandatory: bool = True,
    ) -> None:
        message = amqp_message(body, app_id=self.app_id, user_id=self.user_id, reply_to=reply_to,
                               correlation_id=correlation_id, headers=headers, persistent=persistent,
                               expiration_s=expiration_s)
        await self.publish_raw(message, routing_key, mandatory=mandatory)

    async def _target(self) -> AbstractExchange | None:
        """The aio-pika exchange FastStream declared on its confirm channel (robust: it survives
        reconnects); None under FastStream's test broker, whose producer routes in memory."""
        if self._exchange_obj is None and isinstance(self.broker.config.producer, AioPikaFastProducerImpl):
            self._exchange_obj = await self.broker.config.declarer.declare_exchange(
                self.exchange or DEFAULT_EXCHANGE, declare=False)
        return self._exchange_obj

    def _note_confirm(self, acked: bool) -> None:
        """Tell a cluster connection how its publishes fare (brokers/amqp_nodes.py remakes one nacked for good)."""
        connection = self.broker._connection  # noqa: SLF001 - FastStream 0.7 has no public accessor
        if isinstance(connection, FailoverConnection):
            connection.note_confirm(acked)

    async def publish_raw(self, message: aio_pika.Message, routing_key: str, mandatory: bool = True) -> None:
        """``mandatory=False`` is for best-effort copies: a message no queue takes is dropped, not refused."""
        try:
            target = self._exchange_obj if self._exchange_obj is not None else await self._target()
            if target is not None:
                try:
                    await target.publish(message, routing_key, mandatory=mandatory, timeout=self.timeout_s)
                except DeliveryError as exc:
                    self._note_confirm(acked=isinstance(exc, PublishError))  # a return is not a nack
                    raise
                self._note_confirm(acked=True)
            else:
                command = RabbitPublishCommand(message, _publish_type=PublishType.PUBLISH, routing_key=routing_key,
                                               exchange=self.exchange, mandatory=mandatory)
                async with asyncio.timeout(self.timeout_s):
                    await self.broker.config.producer.publish(command)
        except (PublishError, SubscriberNotFound) as exc:  # SubscriberNotFound: FastStream's test broker
            raise PublishRefused(f"no queue is bound to routing key {routing_key!r}", "no_route") from exc
        except DeliveryError as exc:
            raise PublishRefused(f"the broker refused the message for {routing_key!r} (queue full?)",
                                 "rejected") from exc
        except TimeoutError as exc:
            raise PublishRefused(f"no confirm for {routing_key!r} within {self.timeout_s:g} s", "timeout") from exc
        except (AMQPError, ConnectionError, RuntimeError) as exc:
            raise PublishRefused(f"publishing to {routing_key!r} failed: {type(exc).__name__}: {exc}") from exc


@asynccontextmanager
async def publishing(settings: Settings, name: str, queues: Sequence[QueueSpec] = (), *,
                     timeout_s: float = 10.0, app_id: str | None = None) -> AsyncIterator[Publisher]:
    """A connected broker and a ``Publisher`` to the inference exchange, as the settings'
    account; ``queues`` are declared first (so what is published is queued even before
    the stages start). Closed on exit."""
    broker = make_broker(settings, name)
    await broker.connect()
    try:
        await declare_topology(broker, settings.namespace, queues)
        yield Publisher(broker, inference_exchange(settings.namespace), timeout_s=timeout_s, app_id=app_id,
                        user_id=url_user(settings.amqp_url))
    finally:
        await broker.stop()
