"""Dead-letters a message that keeps killing its stage process (classic queues).

A message that makes a stage *raise* is retried a bounded number of times by the
stage runner. One that kills the process (a crash in a native library, an
out-of-memory kill) never gets that far: the broker hands it to the restarted
process, which dies again, for ever. Quorum queues bound this with
``x-delivery-limit``; classic queues count nothing, so this guard keeps the count
in Redis:

- only redelivered messages pay (two Redis round trips); first deliveries are free;
- a redelivered message's counter goes up before it is handled and is deleted once
  the runner has settled it (acked, retried, or requeued for an outage), so only
  deliveries that never settled, because the process died, add up;
- past ``limit`` the runner dead-letters the message with the reason.

Every message a process held when it died is counted, not only the culprit (the
same as a quorum queue's delivery limit); a limit of a few crashes keeps innocent
neighbours safe unless the stage is crashing over and over. Redis trouble turns
the guard off for that message (fail open): an outage must not stop the stages.
"""

from __future__ import annotations

import hashlib
import logging

import redis.asyncio as redis
from aio_pika.abc import AbstractIncomingMessage
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


class RedeliveryGuard:
    def __init__(self, client: redis.Redis, namespace: str, queue: str, limit: int, ttl_s: int = 86400) -> None:
        self.client = client
        self.prefix = f"{namespace}:unsettled:{queue}:"
        self.limit = limit
        self.ttl_s = ttl_s

    def key(self, delivery: AbstractIncomingMessage) -> str:
        # Publishers need not set a message id; the body then names the message.
        ident = delivery.message_id or hashlib.sha256(delivery.body).hexdigest()
        return self.prefix + ident

    async def enter(self, delivery: AbstractIncomingMessage) -> tuple[str, int] | None:
        """For a redelivered message: (its key, deliveries that never settled, this one included)."""
        if not delivery.redelivered:
            return None
        key = self.key(delivery)
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, self.ttl_s)
                count, _ = await pipe.execute()
        except RedisError as exc:
            log.warning("redelivery count unavailable (%s); handling the message without it", exc)
            return None
        return key, int(count)

    def exceeded(self, count: int) -> bool:
        return count > self.limit

    async def leave(self, key: str) -> None:
        """The delivery was settled: it did not kill the process."""
        try:
            await self.client.delete(key)
        except RedisError as exc:  # the key expires by itself
            log.warning("could not clear a redelivery count (%s)", exc)

    async def close(self) -> None:
        await self.client.aclose()
