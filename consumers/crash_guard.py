"""Dead-letters a message that keeps killing its stage process (classic queues).

A message that makes a stage *raise* is retried a bounded number of times by the
stage runner. One that kills the process (a crash in a native library, an
out-of-memory kill) never gets that far: the broker hands it to the restarted
process, which dies again, for ever. Quorum queues bound this with
``x-delivery-limit``; classic queues count nothing, so this guard keeps a count in
Redis, of the times the process died while a message was being handled:

- only redelivered messages pay (a few Redis round trips); first deliveries are free;
- the count goes up when handling starts and is deleted whenever the process
  survives the delivery (settled, requeued, or cut off by a lost connection): only
  a death leaves it raised;
- a message with a count (it was in flight when a process died) is a *suspect*:
  suspects are handled one at a time, so after the first crash only the message
  that is running when the process dies again gets counted, not the neighbours
  that merely shared its prefetch window;
- past ``limit`` deaths the runner dead-letters the message instead of handling it.

Messages are named by their original routing key and a hash of their body (job ids
are not unique per message: a join receives several parts of one job). Redis
trouble, or a Redis slower than ``timeout_s``, turns the guard off for that message
(fail open): an outage must not stop the stages.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass

import redis.asyncio as redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tracked:
    key: str
    deaths: int  # process deaths while this message was being handled, before this delivery


class RedeliveryGuard:
    def __init__(self, client: redis.Redis, namespace: str, queue: str, limit: int, ttl_s: int = 86400,
                 timeout_s: float = 0.5) -> None:
        self.client = client
        self.prefix = f"{namespace}:unsettled:{queue}:"
        self.limit = limit
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        # One suspect at a time in this process (see the module docstring).
        self.suspects = asyncio.Lock()

    def key(self, routing_key: str, body: bytes) -> str:
        """Pure: the counter's key for one message (its retries share it: same key, same body)."""
        return self.prefix + hashlib.sha256(routing_key.encode() + b"\0" + body).hexdigest()

    async def check(self, routing_key: str, body: bytes) -> Tracked | None:
        """For a redelivered message: how often a process died on it so far (None: Redis unavailable)."""
        key = self.key(routing_key, body)
        deaths = await self._call(self.client.get(key))
        if deaths is _UNAVAILABLE:
            return None
        return Tracked(key, int(deaths or 0))

    def exceeded(self, tracked: Tracked) -> bool:
        return tracked.deaths >= self.limit

    async def enter(self, tracked: Tracked) -> None:
        """Handling starts: if the process dies now, this message is counted."""
        await self._call(self._incr(tracked.key))

    async def leave(self, tracked: Tracked) -> None:
        """The process survived this delivery: nothing counts against the message."""
        await self._call(self.client.delete(tracked.key))

    async def close(self) -> None:
        await self.client.aclose(close_connection_pool=True)

    async def _incr(self, key: str) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, self.ttl_s)
            await pipe.execute()

    async def _call(self, coro):
        try:
            return await asyncio.wait_for(coro, self.timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("crash-loop guard unavailable (%s); handling the message without it", exc or "timeout")
            return _UNAVAILABLE


_UNAVAILABLE = object()
