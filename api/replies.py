"""Replies for sync callers: one exclusive reply queue per ingress process.

Every sync request is published with ``reply_to`` = this queue and
``correlation_id`` = its job id; the stage that ends the job publishes the terminal
message there, and the matching future resolves. Requests coalesced into one message
(api/coalescing.py) are answered by one ``Outcomes`` message, split here by job id. Many requests are in flight on
one connection at once (FastStream's ``broker.request()`` would serialize them).
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from pydantic import ValidationError

from toposerve.brokers import Failure, Prediction, decode_reply

log = logging.getLogger(__name__)


class ReplyRouter:
    def __init__(self, connection: AbstractRobustConnection, namespace: str,
                 trusted: frozenset[str] | None = None) -> None:
        self.connection = connection
        self.queue_name = f"{namespace}.reply.{uuid.uuid4().hex}"
        # Accounts whose replies are believed (their AMQP user_id): stages. None: any.
        self.trusted = trusted
        self._pending: dict[str, asyncio.Future[Prediction | Failure]] = {}
        # Kept from start(): on Python 3.11 every asyncio.get_running_loop() is a getpid()
        # system call, and this runs twice per sync request.
        self._loop: asyncio.AbstractEventLoop | None = None
        self.late_replies = 0
        self.refused_replies = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        channel = await self.connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=1000)
        # Exclusive + auto-delete: the queue lives exactly as long as this process's connection.
        queue = await channel.declare_queue(self.queue_name, exclusive=True, auto_delete=True)
        await queue.consume(self._on_reply, no_ack=True)

    def expect(self, correlation_id: str) -> asyncio.Future[Prediction | Failure]:
        assert self._loop is not None, "start() first"
        future: asyncio.Future[Prediction | Failure] = self._loop.create_future()
        self._pending[correlation_id] = future
        return future

    async def wait(self, future: asyncio.Future[Prediction | Failure], timeout_s: float) -> Prediction | Failure:
        """The answer ``future`` gets within ``timeout_s``, else ``TimeoutError`` (the future is
        failed, so a late reply counts as late). What ``asyncio.wait_for`` does for a future,
        with one timer and none of its task machinery, on the path every sync request takes."""
        assert self._loop is not None, "start() first"
        timer = self._loop.call_later(timeout_s, _expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    def forget(self, correlation_id: str) -> None:
        self._pending.pop(correlation_id, None)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        if self.trusted is not None and message.user_id not in self.trusted:
            # Not from a stage (the broker already refuses clients this queue; a second lock).
            self.refused_replies += 1
            log.warning("reply from %r refused: replies are accepted from stage accounts only", message.user_id)
            return
        try:
            answers = decode_reply(message.body)
        except ValidationError as exc:
            future = self._pending.pop(message.correlation_id or "", None)
            if future is not None and not future.done():
                future.set_exception(RuntimeError(f"undecodable reply: {exc.error_count()} errors"))
            return
        for answer in answers:
            # One answer: under its request's correlation id; the answers to a coalesced
            # message (``Outcomes``): each under its job's id, which is its request's.
            key = message.correlation_id if len(answers) == 1 and message.correlation_id in self._pending \
                else str(answer.id)
            future = self._pending.pop(key or "", None)
            if future is None or future.done():
                # The caller's deadline passed (it got a 504) or it left: drop the late reply.
                self.late_replies += 1
                continue
            future.set_result(answer)


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
