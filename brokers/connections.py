"""AMQP and Redis connections, and the one way we publish messages.

``Publisher`` always publishes with confirms and ``mandatory``: a message the
broker did not take (nacked, over a queue bound, or routed to no queue) raises
``PublishRefused``, so a caller never acks its input for output that went nowhere.
"""

from __future__ import annotations

import aio_pika
import redis.asyncio as redis
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from aio_pika.exceptions import AMQPError, DeliveryError, PublishError
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from toposerve.brokers.messages import Envelope

JSON = "application/json"


class PublishRefused(RuntimeError):
    """The broker did not accept a message: ``reason`` is ``no_route``, ``rejected`` (a queue
    at its bound, or a nack), ``timeout`` (no confirm in time) or ``unavailable`` (no connection)."""

    def __init__(self, message: str, reason: str = "unavailable") -> None:
        super().__init__(message)
        self.reason = reason


async def connect_amqp(url: str, name: str) -> AbstractRobustConnection:
    # A robust connection reconnects by itself and restores channels, queues and consumers.
    return await aio_pika.connect_robust(url, client_properties={"connection_name": name}, timeout=10)


async def open_confirm_channel(connection: AbstractRobustConnection, prefetch: int | None = None) -> AbstractChannel:
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    if prefetch is not None:
        await channel.set_qos(prefetch_count=prefetch)
    return channel


def connect_redis(url: str, max_connections: int = 64) -> redis.Redis:
    # A blocking pool: under a burst, callers wait briefly for a connection instead of
    # failing with "Too many connections" (what the default pool does past its size).
    # Short timeouts: a Redis outage must become a clear error, never a hang.
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=5,
        socket_timeout=5, socket_connect_timeout=1, health_check_interval=15,
    )
    # Few, short retries: with Redis down a request must learn it in about a second,
    # not after the client's default back-off.
    return redis.Redis(connection_pool=pool, retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2))


# The AMQP app-id of what the ingress publishes. A request without it came from another
# publisher, which wrote no ``pending`` record: the first stage writes one (StageRunner).
INGRESS_APP_ID = "toposerve-ingress"


def amqp_message(
    body: Envelope,
    *,
    app_id: str | None = None,
    user_id: str | None = None,
    reply_to: str | None = None,
    correlation_id: str | None = None,
    headers: dict[str, object] | None = None,
    persistent: bool = True,
    expiration_s: float | None = None,
) -> aio_pika.Message:
    return aio_pika.Message(
        body=body.model_dump_json().encode(),
        content_type=JSON,
        message_id=str(body.id),
        type=body.kind,
        # Async and batch work must survive a broker restart; a sync caller who waits
        # would time out anyway, so its messages skip the disk.
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT,
        expiration=expiration_s,
        reply_to=reply_to,
        correlation_id=correlation_id,
        headers=headers or {},
        app_id=app_id,
        # The publishing account; RabbitMQ refuses a user_id that is not the connection's
        # own, so consumers can trust it (brokers/accounts.py: results only stages write).
        user_id=user_id,
    )


class Publisher:
    """Publishes envelopes to the inference exchange and waits for the broker's confirm.

    ``user_id``: the connection's user, set on every message it publishes (None: not set).
    """

    def __init__(self, exchange: AbstractExchange, timeout_s: float = 10.0, app_id: str | None = None,
                 user_id: str | None = None) -> None:
        self.exchange = exchange
        self.timeout_s = timeout_s
        self.app_id = app_id
        self.user_id = user_id

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

    async def publish_raw(self, message: aio_pika.Message, routing_key: str, mandatory: bool = True) -> None:
        """``mandatory=False`` is for best-effort copies: a message no queue takes is dropped, not refused."""
        try:
            await self.exchange.publish(message, routing_key, mandatory=mandatory, timeout=self.timeout_s)
        except PublishError as exc:
            raise PublishRefused(f"no queue is bound to routing key {routing_key!r}", "no_route") from exc
        except DeliveryError as exc:
            raise PublishRefused(f"the broker refused the message for {routing_key!r} (queue full?)",
                                 "rejected") from exc
        except TimeoutError as exc:
            raise PublishRefused(f"no confirm for {routing_key!r} within {self.timeout_s:g} s", "timeout") from exc
        except (AMQPError, ConnectionError, RuntimeError) as exc:
            raise PublishRefused(f"publishing to {routing_key!r} failed: {type(exc).__name__}: {exc}") from exc
