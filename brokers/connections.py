"""Connections (Redis; a plain aio-pika one for what FastStream does not do), and the AMQP
message every toposerve publisher sends (``amqp_message``). Publishing itself: brokers/bus.py.
"""

from __future__ import annotations

import aio_pika
import redis.asyncio as redis
from aio_pika.abc import AbstractRobustConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from toposerve.brokers.amqp_nodes import failover_connection_class, node_urls
from toposerve.brokers.messages import Envelope

JSON = "application/json"


class PublishRefused(RuntimeError):
    """The broker did not accept a message: ``reason`` is ``no_route``, ``rejected`` (a queue
    at its bound, or a nack), ``timeout`` (no confirm in time) or ``unavailable`` (no connection)."""

    def __init__(self, message: str, reason: str = "unavailable") -> None:
        super().__init__(message)
        self.reason = reason


async def connect_amqp(url: str, name: str) -> AbstractRobustConnection:
    """An aio-pika connection, for the two jobs FastStream cannot do: the ingress's reply
    router (many concurrent replies on one queue; FastStream's ``request`` serialises them,
    faststream#1318) and its passive queue checks (api/stage_monitor.py). A robust
    connection reconnects by itself and restores channels, queues and consumers; over
    several node URLs (a cluster), on the next node (brokers/amqp_nodes.py)."""
    urls = node_urls(url)
    if len(urls) == 1:
        return await aio_pika.connect_robust(url, client_properties={"connection_name": name}, timeout=10)
    return await aio_pika.connect_robust(urls[0], client_properties={"connection_name": name}, timeout=10,
                                         connection_class=failover_connection_class(urls))


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
