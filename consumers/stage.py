"""What every stage shares: consume, decode, handle, publish with confirms, then ack.

A ``Stage`` only turns one input message into output messages (or raises). The
``StageRunner`` owns the delivery guarantees, so each stage is a few lines:

- ack only after every output was confirmed by the broker (or stored);
- bad input -> a ``Failure`` for that job, acked, never retried;
- an undecodable message -> a ``Failure`` when its id and model can be read,
  otherwise it is dead-lettered with the reason; never redelivered forever;
- an unexpected error -> retried ``max_attempts`` times, then a ``Failure`` and a
  dead letter;
- broker or Redis trouble (``TransientError``) -> requeued after a pause, not
  counted as an attempt, since the message itself is fine;
- a message that kills the process each time it is handled -> dead-lettered after
  a few redeliveries (``RedeliveryGuard``, for classic queues);
- the stage drops work whose deadline passed (``deadline_exceeded``);
- SIGTERM drains: stop consuming, finish and ack what is in flight, exit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from pydantic import ValidationError
from redis.exceptions import RedisError

from toposerve.brokers import (
    INGRESS_APP_ID,
    TRACEPARENT,
    DeadLetterSpec,
    Envelope,
    Failure,
    FailureCode,
    Publisher,
    PublishRefused,
    QueueSpec,
    ResultStore,
    Settings,
    connect_amqp,
    continue_trace,
    current_job,
    current_span,
    declare_dead_letters,
    declare_topology,
    is_terminal,
    open_confirm_channel,
    read_identity,
    trusted_producers,
    url_user,
)
from toposerve.consumers.crash_guard import RedeliveryGuard, Tracked
from toposerve.consumers.liveness import LoopStalls
from toposerve.consumers.metrics import StageMetrics, stage_metrics
from toposerve.models import InputError

log = logging.getLogger(__name__)

ATTEMPTS_HEADER = "x-toposerve-attempts"
REASON_HEADER = "x-toposerve-reason"
# A retry goes straight to the stage's queue, which changes its routing key; the
# original key travels here so a dead letter can be replayed where it came from.
ROUTING_KEY_HEADER = "x-toposerve-routing-key"
# A dead letter that keeps only the head of its body says how long the body was.
TRUNCATED_HEADER = "x-toposerve-truncated-from"
# Bodies above this are parsed one at a time (``StageRunner._decode``).
HEAVY_MESSAGE_BYTES = 256 * 1024
# Of a body refused for its size, this much is kept: enough for its id, model and a look.
SALVAGE_HEAD_BYTES = 64 * 1024


def original_routing_key(delivery: AbstractIncomingMessage) -> str:
    return str((delivery.headers or {}).get(ROUTING_KEY_HEADER) or delivery.routing_key or "unknown")


class TransientError(RuntimeError):
    """A dependency (broker, Redis) is unavailable; the message should be retried later."""


@dataclass
class Outgoing:
    body: Envelope
    routing_key: str


def outgoing(body: Envelope) -> Outgoing:
    return Outgoing(body=body, routing_key=body.routing_key())


@dataclass
class StageStats:
    handled: int = 0
    failed: int = 0
    retried: int = 0
    requeued: int = 0  # put back because a dependency was unavailable (not counted as an attempt)
    dead_lettered: int = 0
    in_flight: set[asyncio.Task] = field(default_factory=set, repr=False)


class Stage(ABC):
    """One step of a topology: an input message type in, output messages out."""

    kind: ClassVar[str]
    input_type: ClassVar[type[Envelope]]
    # Stages that compute drop work whose deadline passed; stages that record
    # outcomes (store) must not, or a late failure would never be recorded.
    honours_deadline: ClassVar[bool] = True
    # Stages that record or join outcomes accept them only from stage accounts (the AMQP
    # user_id RabbitMQ vouches for): a client must not be able to write another's result.
    outcomes_from_stages_only: ClassVar[bool] = False

    def __init__(self, name: str) -> None:
        self.name = name
        # Queues the stage needs besides its own (an aggregate's delay queue for join
        # timeouts); the runner declares them with its own.
        self.extra_queues: list[QueueSpec] = []

    def decode(self, body: bytes) -> Envelope:
        """Parse and validate one message body; raises ``ValidationError``."""
        return self.input_type.model_validate_json(body)

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load what the stage needs (models, connections) before consuming."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Release what ``start`` acquired."""

    def instrument(self, metrics: StageMetrics) -> None:  # noqa: B027 - optional hook
        """Hand the stage its metrics (e.g. the predict stage's batch sizes)."""

    @abstractmethod
    async def handle(self, message: Envelope) -> list[Outgoing]:
        """Work on one message; raise ``InputError`` for bad input, ``TransientError`` for outages."""

    def part_of(self, message: Envelope) -> str | None:
        """Model groups: the member this stage answers for (a failure is then a part's)."""
        return None

    def failure(self, message: Envelope, code: FailureCode, text: str, retryable: bool = False) -> Failure:
        return Failure(
            **message.carried(),
            stage=self.name,
            code=code,
            message=text,
            retryable=retryable,
            part=self.part_of(message),
        )


class StageRunner:
    def __init__(
        self,
        stage: Stage,
        settings: Settings,
        queue: QueueSpec,
        prefetch: int = 64,
        connection_name: str | None = None,
        metrics: StageMetrics | None = None,
        guard: RedeliveryGuard | None = None,
        outcomes_kept: bool = True,
        recorder: ResultStore | None = None,
        dead_letters: DeadLetterSpec | None = None,
    ) -> None:
        self.stage = stage
        self.guard = guard
        # Whether a stage of the profile consumes prediction.*/failure.* (a store, an
        # aggregate). Sync profiles keep no outcomes: there, an outcome without a
        # reply_to (a direct AMQP publish) has nowhere to go and is dropped, not refused.
        self.outcomes_kept = outcomes_kept
        # The first stage of a profile that stores results: it records a request from a
        # publisher other than the ingress as ``pending``, so its id is known at once.
        self.recorder = recorder
        # Prometheus metrics of this stage; its own registry unless the process shares one.
        self.metrics = metrics if metrics is not None else stage_metrics(stage.name)
        stage.instrument(self.metrics)
        self.settings = settings
        self.queue_spec = queue
        self.dead_letters = dead_letters or DeadLetterSpec()
        # The account this process publishes as, and the accounts whose outcomes it accepts:
        # the stage accounts of the namespace, and its own (every role on one account then).
        self.user = url_user(settings.amqp_url)
        self.trusted = trusted_producers(settings.namespace) | ({self.user} if self.user else set())
        self.prefetch = prefetch
        self.connection_name = connection_name or f"toposerve-{stage.name}"
        self.stats = StageStats()
        self.connection: AbstractRobustConnection | None = None
        self._publisher: Publisher | None = None
        self._dead: Publisher | None = None
        self._retry: Publisher | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self.ready = asyncio.Event()
        self._closed = False
        self._heavy = asyncio.Lock()
        self.stalls = LoopStalls()

    async def start(self) -> None:
        await self.stage.start()
        self.connection = await connect_amqp(self.settings.amqp_url, self.connection_name)
        await declare_dead_letters(self.connection, self.settings.namespace, self.dead_letters)
        channel = await open_confirm_channel(self.connection, prefetch=self.prefetch)
        topology = await declare_topology(channel, self.settings.namespace, [self.queue_spec, *self.stage.extra_queues])
        self._publisher = Publisher(topology.exchange, user_id=self.user)
        self._dead = Publisher(topology.dead_exchange, user_id=self.user)
        self._retry = Publisher(channel.default_exchange, user_id=self.user)
        self._queue = topology.queues[self.queue_spec.name]
        self.stalls.start()
        self._consumer_tag = await self._queue.consume(self._on_message)
        self.ready.set()
        log.info("stage %s consuming %s", self.stage.name, self.queue_spec.name)

    async def drain_and_close(self) -> None:
        """Stop taking messages, let in-flight ones finish (they are acked), then close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._queue is not None and self._consumer_tag is not None:
            try:
                # Bounded: on a connection that is reconnecting, a cancel would wait for it.
                await asyncio.wait_for(self._queue.cancel(self._consumer_tag), timeout=5)
            except Exception:  # the connection may already be gone; unacked work is requeued then
                log.warning("could not cancel consumer of %s cleanly", self.queue_spec.name)
        pending = set(self.stats.in_flight)
        if pending:
            log.info("draining %d in-flight messages", len(pending))
            await asyncio.wait(pending, timeout=self.settings.drain_timeout_s)
        await self.stalls.close()
        if self.connection is not None:
            await self.connection.close()
        if self.guard is not None:
            await self.guard.close()
        if self.recorder is not None:
            await self.recorder.client.aclose(close_connection_pool=True)
        await self.stage.stop()

    async def run_until(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.drain_and_close()

    # -- one delivery ---------------------------------------------------------------

    async def _on_message(self, delivery: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.stats.in_flight.add(task)
        try:
            if self.guard is not None and delivery.redelivered:
                await self._process_guarded(self.guard, delivery)
            else:
                await self._process(delivery)
        finally:
            self.stats.in_flight.discard(task)

    async def _process_guarded(self, guard: RedeliveryGuard, delivery: AbstractIncomingMessage) -> None:
        """A redelivered message, on a classic queue: did it kill a process before? (consumers/crash_guard.py)"""
        tracked = await guard.check(original_routing_key(delivery), delivery.body)
        if tracked is None:  # the guard is unavailable: handle it as any message
            await self._process(delivery)
        elif guard.exceeded(tracked) and not self._expired(delivery):
            if await self._dead_letter_crash_loop(delivery, tracked.deaths):
                await guard.leave(tracked)  # settled: the count is no longer needed
        elif tracked.deaths == 0:
            await self._survive(guard, tracked, delivery)
        else:
            async with guard.suspects:  # suspects one at a time: only the culprit is counted again
                await self._survive(guard, tracked, delivery)

    async def _survive(self, guard: RedeliveryGuard, tracked: Tracked, delivery: AbstractIncomingMessage) -> None:
        await guard.enter(tracked)
        try:
            await self._process(delivery)
        finally:
            # Reached unless the process died: settled, requeued, or cut off by a lost
            # connection (which cancels this task). Shielded: the clean-up must not be cancelled.
            await asyncio.shield(guard.leave(tracked))

    def _expired(self, delivery: AbstractIncomingMessage) -> bool:
        """Work past its deadline is dropped as ``deadline_exceeded``, crash loop or not."""
        if not self.stage.honours_deadline:
            return False
        try:
            return self.stage.decode(delivery.body).expired()
        except ValidationError:
            return False

    async def _process(self, delivery: AbstractIncomingMessage) -> None:
        # This hop's span (same trace id, new span id): on its outputs and its log lines.
        headers = delivery.headers
        current_span.set(continue_trace(headers.get(TRACEPARENT) if headers else None))
        if self.stage.outcomes_from_stages_only and delivery.user_id not in self.trusted:
            await self._reject_untrusted(delivery)
            return
        size = len(delivery.body)
        if size > self.settings.max_message_bytes:
            await self._reject_oversized(delivery, size)
            return
        try:
            message = await self._decode(delivery.body)
        except ValidationError as exc:
            await self._reject_undecodable(delivery, exc)
            return

        started = time.perf_counter()
        publishing_since: float | None = None
        current_job.set((str(message.id), message.model, self.stage.name))
        if self.recorder is not None and delivery.app_id != INGRESS_APP_ID:
            await self._record_pending(message)
        self.metrics.queue_seconds.observe(max(time.time() - message.created_at.timestamp(), 0.0))
        try:
            if self.stage.honours_deadline and message.expired():
                outputs = [outgoing(self.stage.failure(message, FailureCode.DEADLINE_EXCEEDED,
                                                       f"the deadline {message.deadline.isoformat()} passed "
                                                       f"before stage {self.stage.name!r} started"))]
            else:
                try:
                    outputs = await self.stage.handle(message)
                except InputError as exc:
                    outputs = [outgoing(self.stage.failure(message, exc.code, exc.message))]
            for out in outputs:
                out.body.timings[f"{self.stage.kind}_ms"] = round((time.perf_counter() - started) * 1000, 3)
            publishing_since = self.stalls.clock()
            await self._publish_all(outputs, delivery)
        except (TransientError, PublishRefused, RedisError, ConnectionError) as exc:
            if (isinstance(exc, PublishRefused) and exc.reason == "timeout" and publishing_since is not None
                    and self._stalled_itself(publishing_since)):
                # Not an outage: this process held its own loop while the confirm waited
                # (CPU-bound work). Count an attempt, so such a message cannot loop for ever.
                log.warning("stage %s: %s while its own event loop was stalled; counting an attempt",
                            self.stage.name, exc)
                await self._retry_or_dead_letter(delivery, message, exc)
                return
            # The message is fine, a dependency is not: requeue after a pause so we do not spin.
            log.warning("stage %s: dependency unavailable (%s); requeueing %s", self.stage.name, exc, message.id)
            self.stats.requeued += 1
            await asyncio.sleep(1.0)
            await self._settle(delivery.nack(requeue=True))
            return
        except Exception as exc:  # a bug or a poison message: bounded retries, then dead-letter
            await self._retry_or_dead_letter(delivery, message, exc)
            return
        self.stats.handled += 1
        self.metrics.handled.inc()
        self.metrics.processing_seconds.observe(time.perf_counter() - started)
        await self._settle(delivery.ack())

    def _stalled_itself(self, publishing_since: float) -> bool:
        """Was this loop held up for most of the publish timeout, since this message's publishing began?"""
        assert self._publisher is not None
        window = self._publisher.timeout_s
        since = max(publishing_since, self.stalls.clock() - window)
        return self.stalls.stalled_s(since) >= window / 2

    async def _decode(self, body: bytes) -> Envelope:
        if len(body) <= HEAVY_MESSAGE_BYTES:
            return self.stage.decode(body)
        # Parsing holds the event loop (pydantic keeps the GIL, so a thread would not help):
        # about 60 ms per MiB of rows. Big bodies are parsed one at a time, so between two of
        # them the loop serves confirms, acks and heartbeats; a prefetch window full of big
        # messages can then never stall it for longer than one parse.
        async with self._heavy:
            await asyncio.sleep(0)
            return self.stage.decode(body)

    async def _reject_untrusted(self, delivery: AbstractIncomingMessage) -> None:
        """An outcome not published by a stage account: forged, or from the wrong door. Its job is
        not touched (that is what a forger would want); the message is dead-lettered with the reason."""
        who = f"account {delivery.user_id!r}" if delivery.user_id else "a publisher that did not say who it is"
        reason = (f"outcomes are accepted only from stage accounts; this message came from {who} "
                  f"(AMQP user_id), so stage {self.stage.name!r} refused it")
        log.warning("stage %s: %s (message %s)", self.stage.name, reason, delivery.message_id)
        self.metrics.untrusted.inc()
        await self._end_and_dead_letter(delivery, None, reason)

    async def _reject_oversized(self, delivery: AbstractIncomingMessage, size: int) -> None:
        """Too large to parse: fail its job (when its id is in the first bytes) and dead-letter its head."""
        limit = self.settings.max_message_bytes
        reason = (f"message is {size} bytes, more than stage {self.stage.name!r}'s limit of {limit} "
                  "(TOPOSERVE_MAX_MESSAGE_BYTES); refused before parsing")
        ident = read_identity(delivery.body)
        failure = None if ident is None else Failure(id=ident[0], model=ident[1], stage=self.stage.name,
                                                     code=FailureCode.TOO_LARGE, message=reason)
        log.warning("stage %s: %s", self.stage.name, reason)
        await self._end_and_dead_letter(delivery, failure, reason, keep_bytes=SALVAGE_HEAD_BYTES)

    async def _record_pending(self, message: Envelope) -> None:
        """Best effort: the job's outcome is stored either way, this only makes it known sooner."""
        assert self.recorder is not None
        try:
            # SET NX: a record that exists (pending, or already ended) is left alone.
            await self.recorder.create_pending(message.id, message.model, message.created_at)
        except RedisError as exc:
            log.warning("could not record job %s as pending (%s); its outcome is stored when it ends",
                        message.id, exc)

    async def _publish_all(self, outputs: list[Outgoing], delivery: AbstractIncomingMessage,
                           best_effort_outcomes: bool = False) -> None:
        assert self._publisher is not None and self._retry is not None
        headers = {k: v for k, v in (delivery.headers or {}).items() if k not in (ATTEMPTS_HEADER, ROUTING_KEY_HEADER)}
        span = current_span.get()
        if span is not None:
            headers[TRACEPARENT] = span.header
        persistent = delivery.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        publishes = []
        for out in outputs:
            terminal = is_terminal(out.body)
            if isinstance(out.body, Failure):
                self.stats.failed += 1
                self.metrics.failed.inc()
                log.info("job failed at stage %s: %s: %s", self.stage.name, out.body.code.value,
                         out.body.message[:500])
            # A sync caller's answer goes to its reply queue; the copy on the exchange is
            # then best-effort (a profile without a store has no queue for it), and so is
            # the reply itself (the caller may have given up and gone).
            best_effort = terminal and (bool(delivery.reply_to) or not self.outcomes_kept or best_effort_outcomes)
            if terminal and not delivery.reply_to and not self.outcomes_kept:
                log.info("job %s ended (%s) with no reply_to, in a profile that keeps no outcomes: not stored",
                         out.body.id, out.body.kind)
            publishes.append(self._publisher.publish(
                out.body, out.routing_key, reply_to=delivery.reply_to, correlation_id=delivery.correlation_id,
                headers=headers, persistent=persistent, mandatory=not best_effort,
            ))
            if terminal and delivery.reply_to:
                publishes.append(self._retry.publish(
                    out.body, delivery.reply_to, correlation_id=delivery.correlation_id or str(out.body.id),
                    persistent=False, mandatory=False,
                ))
        await asyncio.gather(*publishes)

    async def _retry_or_dead_letter(
        self, delivery: AbstractIncomingMessage, message: Envelope, exc: Exception
    ) -> None:
        assert self._retry is not None
        attempts = int((delivery.headers or {}).get(ATTEMPTS_HEADER, 0) or 0) + 1
        reason = f"{type(exc).__name__}: {exc}"
        log.exception("stage %s failed on %s (attempt %d)", self.stage.name, message.id, attempts)
        try:
            if attempts < self.settings.max_attempts:
                retry = self._copy(delivery, {ATTEMPTS_HEADER: attempts,
                                              ROUTING_KEY_HEADER: original_routing_key(delivery)})
                await self._retry.publish_raw(retry, self.queue_spec.name)
                self.stats.retried += 1
                self.metrics.retried.inc()
            else:
                failure = self.stage.failure(
                    message, FailureCode.INTERNAL,
                    f"stage {self.stage.name!r} failed {attempts} times: {reason}",
                )
                await self._publish_all([outgoing(failure)], delivery)
                await self._dead_letter(delivery, reason)
        except PublishRefused:
            await asyncio.sleep(1.0)
            await self._settle(delivery.nack(requeue=True))
            return
        await self._settle(delivery.ack())

    async def _dead_letter_crash_loop(self, delivery: AbstractIncomingMessage, deaths: int) -> bool:
        """Dead-letter a message that killed the stage ``deaths`` times; True once it is settled."""
        reason = (f"stage {self.stage.name!r} died {deaths} times while handling this message, counted from "
                  "its first redelivery (a crash or an out-of-memory kill, not an error it could report); "
                  "dead-lettered so it cannot stop the stage again")
        log.error("stage %s: %s (message %s)", self.stage.name, reason, delivery.message_id)
        try:
            failure = self.stage.failure(self.stage.decode(delivery.body), FailureCode.INTERNAL, reason)
        except ValidationError:
            failure = self._salvaged_failure(delivery, FailureCode.INTERNAL, reason)
        # Best effort: the dead letter is what must not be lost; a topology without a
        # store would otherwise refuse the Failure and loop again.
        return await self._end_and_dead_letter(delivery, failure, reason, best_effort_outcomes=True)

    async def _reject_undecodable(self, delivery: AbstractIncomingMessage, exc: ValidationError) -> None:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()[:5]
        )
        reason = f"message is not a valid {self.stage.input_type.__name__} for stage {self.stage.name!r}: {problems}"
        failure = self._salvaged_failure(delivery, FailureCode.INVALID_MESSAGE, reason[:4000])
        if await self._end_and_dead_letter(delivery, failure, reason):
            log.warning("stage %s: %s", self.stage.name, reason)

    def _salvaged_failure(self, delivery: AbstractIncomingMessage, code: FailureCode, reason: str) -> Failure | None:
        """A ``Failure`` for a message that does not decode, when its ``id`` and ``model`` can be read."""
        ident = read_identity(delivery.body)
        if ident is None:
            return None
        return Failure(id=ident[0], model=ident[1], stage=self.stage.name, code=code, message=reason)

    async def _end_and_dead_letter(self, delivery: AbstractIncomingMessage, failure: Failure | None, reason: str,
                                   best_effort_outcomes: bool = False, keep_bytes: int | None = None) -> bool:
        """End the job with ``failure`` (when whose job it is is known, so its caller learns
        why), dead-letter the message, then ack; True once acked, False when requeued."""
        try:
            if failure is not None:
                await self._publish_all([outgoing(failure)], delivery, best_effort_outcomes=best_effort_outcomes)
            await self._dead_letter(delivery, reason, keep_bytes)
        except PublishRefused:
            await asyncio.sleep(1.0)
            await self._settle(delivery.nack(requeue=True))
            return False
        await self._settle(delivery.ack())
        return True

    async def _dead_letter(self, delivery: AbstractIncomingMessage, reason: str, keep_bytes: int | None = None) -> None:
        """Copy the message to ``{ns}.dead`` with the reason; ``keep_bytes``: keep only the body's head."""
        assert self._dead is not None
        extra: dict[str, object] = {REASON_HEADER: reason[:1000], "x-toposerve-stage": self.stage.name,
                                    "x-toposerve-queue": self.queue_spec.name}
        if keep_bytes is not None and len(delivery.body) > keep_bytes:
            extra[TRUNCATED_HEADER] = len(delivery.body)
        dead = self._copy(delivery, extra, body=delivery.body[:keep_bytes] if keep_bytes is not None else None)
        await self._dead.publish_raw(dead, original_routing_key(delivery))
        self.stats.dead_lettered += 1
        self.metrics.dead_lettered.inc()

    def _copy(self, delivery: AbstractIncomingMessage, extra_headers: dict[str, object],
              body: bytes | None = None) -> aio_pika.Message:
        """The message again (a retry, a dead letter), published by this stage's account."""
        return aio_pika.Message(
            body=delivery.body if body is None else body,
            headers={**(delivery.headers or {}), **extra_headers},
            content_type=delivery.content_type,
            correlation_id=delivery.correlation_id,
            reply_to=delivery.reply_to,
            message_id=delivery.message_id,
            type=delivery.type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            user_id=self.user,
        )

    @staticmethod
    async def _settle(coro) -> None:
        try:
            await coro
        except Exception as exc:  # channel gone: the broker requeues the message itself
            log.warning("could not settle a delivery (%s); the broker will redeliver it", exc)
