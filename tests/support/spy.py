"""A private queue on a test's namespace exchange: it gets a copy of what is published under a key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aio_pika
from aio_pika.abc import AbstractQueue

from toposerve.brokers import Settings
from toposerve.brokers.topology import exchange_name


@asynccontextmanager
async def spy_queue(settings: Settings, binding_key: str) -> AsyncIterator[AbstractQueue]:
    """Bound next to the stages' queues for as long as the block runs (exclusive: gone after)."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(exchange_name(settings.namespace))
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, binding_key)
        yield queue
