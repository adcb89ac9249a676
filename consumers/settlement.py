"""The settlement policy: what happens to one delivery, whatever the stage does with it.

FastStream hands a stage's deliveries over with manual acks (consumers/runner.py); this
module decides how each one ends, so no stage has acking code of its own:

- ack only after every output was confirmed by the broker (or stored);
- bad input -> a ``Failure`` for that job, acked, never retried;
- an undecodable message -> a ``Failure`` when its id and model can be read,
  otherwise it is dead-lettered with the reason; never redelivered forever;
- an outcome from an account that is not a stage's -> dead-lettered, its job untouched;
- a message over ``TOPOSERVE_MAX_MESSAGE_BYTES`` -> refused before parsing (its head kept);
- an unexpected error -> retried ``max_attempts`` times, then a ``Failure`` and a
  dead letter;
- broker or Redis trouble (``TransientError``) -> requeued after a pause, not
  counted as an attempt, since the message itself is fine;
- a message that kills the process each time it is handled -> dead-lettered after
  a few redeliveries (``RedeliveryGuard``, for classic queues);
- the stage drops work whose deadline passed (``deadline_exceeded``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError
from redis.exceptions import RedisError

from toposerve.brokers import (
    ATTEMPTS_HEADER,
    INGRESS_APP_ID,
    QUEUE_HEADER,
    REASON_HEADER,
    ROUTING_KEY_HEADER,
    STAGE_HEADER,
    TRACEPARENT,
    TRUNCATED_HEADER,
    Envelope,
    Failure,
    FailureCode,
    Outcomes,
    Publisher,
    PublishRefused,
    QueueSpec,
    ResultStore,
    Settings,
    continue_trace,
    current_job,
    current_span,
    is_terminal,
    read_identity,
    ttl_until,
)
from toposerve.consumers.crash_guard import RedeliveryGuard, Tracked
from toposerve.consumers.liveness import LoopStalls
from toposerve.consumers.metrics import StageMetrics
from toposerve.consumers.stage import Outgoing, Stage, StageStats, TransientError, outgoing
from toposerve.models import InputError

log = logging.getLogger(__name__)

# Bodies above this are parsed one at a time (``Settlement._decode``).
HEAVY_MESSAGE_BYTES = 256 * 1024
# Of a body refused for its size, this much is kept: enough for its id, model and a look.
SALVAGE_HEAD_BYTES = 64 * 1024
# How long a requeue waits when a dependency is down, so a stage does not spin on it.
REQUEUE_PAUSE_S = 1.0


def _message_id(delivery: AbstractIncomingMessage) -> uuid.UUID:
    try:
        return uuid.UUID(delivery.message_id or "")
    except ValueError:
        return uuid.uuid4()


def sync_ttl_s(body: Envelope, reply_to: str | None) -> float | None:
    """Sync work passed on to the next stage: RabbitMQ drops it once its caller's deadline passed.

    Only for work a caller waits for (``reply_to``): an outcome, or async work, must reach
    the store whatever the time.
    """
    return ttl_until(body.deadline) if reply_to else None


def original_routing_key(delivery: AbstractIncomingMessage) -> str:
    return str((delivery.headers or {}).get(ROUTING_KEY_HEADER) or delivery.routing_key or "unknown")


@dataclass(frozen=True)
class Outlets:
    """Where a stage's messages go: ``outputs`` (the inference exchange), ``dead`` (the
    dead-letter exchange), ``direct`` (the default exchange: retries to its own queue, and
    answers to a caller's reply queue)."""

    outputs: Publisher
    dead: Publisher
    direct: Publisher


@dataclass
class Trust:
    """Whose outcomes a stage accepts: the stage accounts of the namespace (AMQP user_id,
    which RabbitMQ vouches for), and this process's own."""

    accounts: frozenset[str]

    def allows(self, user_id: str | None) -> bool:
        return user_id in self.accounts


class Settlement:
    """Ends every delivery of one stage: ack, nack to requeue, retry, or dead-letter (module doc)."""

    def __init__(
        self,
        stage: Stage,
        settings: Settings,
        queue: QueueSpec,
        outlets: Outlets,
        *,
        metrics: StageMetrics,
        trust: Trust,
        user: str | None = None,
        guard: RedeliveryGuard | None = None,
        outcomes_kept: bool = True,
        recorder: ResultStore | None = None,
        stats: StageStats | None = None,
        stalls: LoopStalls | None = None,
    ) -> None:
        self.stage = stage
        self.settings = settings
        self.queue_spec = queue
        self.outlets = outlets
        self.metrics = metrics
        self.trust = trust
        # The account this process publishes as (retries and dead letters carry it).
        self.user = user
        self.guard = guard
        # Whether a stage of the profile consumes prediction.*/failure.* (a store, an
        # aggregate). Sync profiles keep no outcomes: there, an outcome without a
        # reply_to (a direct AMQP publish) has nowhere to go and is dropped, not refused.
        self.outcomes_kept = outcomes_kept
        # The first stage of a profile that stores results: it records a request from a
        # publisher other than the ingress as ``pending``, so its id is known at once.
        self.recorder = recorder
        self.stats = stats if stats is not None else StageStats()
        self.stalls = stalls if stalls is not None else LoopStalls()
        self._heavy = asyncio.Lock()

    async def settle(self, delivery: AbstractIncomingMessage) -> None:
        """Handle one delivery and end it; never raises (a broken channel leaves it to the broker)."""
        task = asyncio.current_task()
        assert task is not None
        self.stats.in_flight.add(task)
        try:
            if self.guard is not None and delivery.redelivered:
                await self._process_guarded(self.guard, delivery)
            else:
                await self.process(delivery)
        finally:
            self.stats.in_flight.discard(task)

    # -- crash loops ----------------------------------------------------------------

    async def _process_guarded(self, guard: RedeliveryGuard, delivery: AbstractIncomingMessage) -> None:
        """A redelivered message, on a classic queue: did it kill a process before? (consumers/crash_guard.py)"""
        tracked = await guard.check(original_routing_key(delivery), delivery.body)
        if tracked is None:  # the guard is unavailable: handle it as any message
            await self.process(delivery)
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
            await self.process(delivery)
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

    async def _dead_letter_crash_loop(self, delivery: AbstractIncomingMessage, deaths: int) -> bool:
        """Dead-letter a message that killed the stage ``deaths`` times; True once it is settled."""
        reason = (f"stage {self.stage.name!r} died {deaths} times while handling this message, counted from "
                  "its first redelivery (a crash or an out-of-memory kill, not an error it could report); "
                  "dead-lettered so it cannot stop the stage again")
        log.error("stage %s: %s (message %s)", self.stage.name, reason, delivery.message_id)
        try:
            failures = self.stage.failures(self.stage.decode(delivery.body), FailureCode.INTERNAL, reason)
        except ValidationError:
            salvaged = self._salvaged_failure(delivery, FailureCode.INTERNAL, reason)
            failures = [] if salvaged is None else [outgoing(salvaged)]
        # Best effort: the dead letter is what must not be lost; a topology without a
        # store would otherwise refuse the Failure and loop again.
        return await self._end_and_dead_letter(delivery, failures, reason, best_effort_outcomes=True)

    # -- one delivery ---------------------------------------------------------------

    async def process(self, delivery: AbstractIncomingMessage) -> None:
        # This hop's span (same trace id, new span id): on its outputs and its log lines.
        headers = delivery.headers
        current_span.set(continue_trace(headers.get(TRACEPARENT) if headers else None))
        if self.stage.outcomes_from_stages_only and not self.trust.allows(delivery.user_id):
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
            outputs = await self._work(message)
            for out in outputs:
                out.body.timings[f"{self.stage.kind}_ms"] = round((time.perf_counter() - started) * 1000, 3)
            publishing_since = self.stalls.clock()
            await self.publish_all(outputs, delivery)
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
            await self._requeue(delivery)
            return
        except Exception as exc:  # a bug or a poison message: bounded retries, then dead-letter
            await self._retry_or_dead_letter(delivery, message, exc)
            return
        self.stats.handled += 1
        self.metrics.handled.inc()
        self.metrics.processing_seconds.observe(time.perf_counter() - started)
        await self._settle(delivery.ack())

    async def _work(self, message: Envelope) -> list[Outgoing]:
        """The stage's outputs for ``message``; a deadline that passed or bad input become a ``Failure``."""
        if self.stage.honours_deadline and message.expired():
            return self.stage.failures(message, FailureCode.DEADLINE_EXCEEDED, self.stage.too_late(message.deadline))
        try:
            return await self.stage.handle(message)
        except InputError as exc:
            return self.stage.failures(message, exc.code, exc.message)

    def _stalled_itself(self, publishing_since: float) -> bool:
        """Was this loop held up for most of the publish timeout, since this message's publishing began?"""
        window = self.outlets.outputs.timeout_s
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

    async def _record_pending(self, message: Envelope) -> None:
        """Best effort: the job's outcome is stored either way, this only makes it known sooner."""
        assert self.recorder is not None
        try:
            # SET NX: a record that exists (pending, or already ended) is left alone.
            await self.recorder.create_pending(message.id, message.model, message.created_at)
        except RedisError as exc:
            log.warning("could not record job %s as pending (%s); its outcome is stored when it ends",
                        message.id, exc)

    async def publish_all(self, outputs: list[Outgoing], delivery: AbstractIncomingMessage,
                          best_effort_outcomes: bool = False) -> None:
        """Publish ``outputs`` (and a sync caller's answers to its reply queue) and wait for every confirm.

        A sync caller's answers go to its reply queue: one message, or one ``Outcomes`` for a
        message that carried many jobs. Their copies on the exchange are then best effort, and
        left out where no stage keeps outcomes (a sync profile: no queue would take them).
        """
        headers = {k: v for k, v in (delivery.headers or {}).items() if k not in (ATTEMPTS_HEADER, ROUTING_KEY_HEADER)}
        span = current_span.get()
        if span is not None:
            headers[TRACEPARENT] = span.header
        persistent = delivery.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        reply_to = delivery.reply_to
        publishes = []
        answers: list[Envelope] = []
        for out in outputs:
            terminal = out.final and is_terminal(out.body)
            if isinstance(out.body, Failure):
                self.stats.failed += 1
                self.metrics.failed.inc()
                log.info("job %s failed at stage %s: %s: %s", out.body.id, self.stage.name, out.body.code.value,
                         out.body.message[:500])
            if terminal and reply_to:
                answers.append(out.body)
                if not self.outcomes_kept:
                    continue  # nothing would take the copy
            elif terminal and not self.outcomes_kept:
                log.info("job %s ended (%s) with no reply_to, in a profile that keeps no outcomes: not stored",
                         out.body.id, out.body.kind)
            # The copy of a sync answer is best effort, and so is any outcome of a profile
            # without a store (the caller may have given up and gone).
            best_effort = terminal and (bool(reply_to) or not self.outcomes_kept or best_effort_outcomes)
            out_headers = headers if out.traceparent is None else {**headers, TRACEPARENT: out.traceparent}
            publishes.append(self.outlets.outputs.publish(
                out.body, out.routing_key, reply_to=reply_to, correlation_id=delivery.correlation_id,
                headers=out_headers, persistent=persistent, mandatory=not best_effort,
                expiration_s=None if terminal else sync_ttl_s(out.body, reply_to),
            ))
        if answers:
            publishes.append(self._answer(answers, delivery))
        await asyncio.gather(*publishes)

    async def _answer(self, answers: list[Envelope], delivery: AbstractIncomingMessage) -> None:
        """The answers to the reply queue: best effort, the caller may have given up and gone."""
        assert delivery.reply_to
        first = answers[0]
        body: Envelope = first if len(answers) == 1 else Outcomes(id=_message_id(delivery), model=first.model,
                                                                  items=answers)
        await self.outlets.direct.publish(body, delivery.reply_to,
                                          correlation_id=delivery.correlation_id or str(first.id),
                                          persistent=False, mandatory=False)

    # -- what cannot be handled -----------------------------------------------------

    async def _retry_or_dead_letter(
        self, delivery: AbstractIncomingMessage, message: Envelope, exc: Exception
    ) -> None:
        attempts = int((delivery.headers or {}).get(ATTEMPTS_HEADER, 0) or 0) + 1
        reason = f"{type(exc).__name__}: {exc}"
        log.exception("stage %s failed on %s (attempt %d)", self.stage.name, message.id, attempts)
        try:
            if attempts < self.settings.max_attempts:
                retry = self._copy(delivery, {ATTEMPTS_HEADER: attempts,
                                              ROUTING_KEY_HEADER: original_routing_key(delivery)})
                await self.outlets.direct.publish_raw(retry, self.queue_spec.name)
                self.stats.retried += 1
                self.metrics.retried.inc()
            else:
                await self.publish_all(self.stage.failures(
                    message, FailureCode.INTERNAL, f"stage {self.stage.name!r} failed {attempts} times: {reason}",
                ), delivery)
                await self._dead_letter(delivery, reason)
        except PublishRefused:
            await self._requeue(delivery)
            return
        await self._settle(delivery.ack())

    async def _reject_untrusted(self, delivery: AbstractIncomingMessage) -> None:
        """An outcome not published by a stage account: forged, or from the wrong door. Its job is
        not touched (that is what a forger would want); the message is dead-lettered with the reason."""
        who = f"account {delivery.user_id!r}" if delivery.user_id else "a publisher that did not say who it is"
        reason = (f"outcomes are accepted only from stage accounts; this message came from {who} "
                  f"(AMQP user_id), so stage {self.stage.name!r} refused it")
        log.warning("stage %s: %s (message %s)", self.stage.name, reason, delivery.message_id)
        self.metrics.untrusted.inc()
        await self._end_and_dead_letter(delivery, [], reason)

    async def _reject_oversized(self, delivery: AbstractIncomingMessage, size: int) -> None:
        """Too large to parse: fail its job (when its id is in the first bytes) and dead-letter its head."""
        limit = self.settings.max_message_bytes
        reason = (f"message is {size} bytes, more than stage {self.stage.name!r}'s limit of {limit} "
                  "(TOPOSERVE_MAX_MESSAGE_BYTES); refused before parsing")
        ident = read_identity(delivery.body)
        failure = None if ident is None else Failure(id=ident[0], model=ident[1], stage=self.stage.name,
                                                     code=FailureCode.TOO_LARGE, message=reason)
        log.warning("stage %s: %s", self.stage.name, reason)
        await self._end_and_dead_letter(delivery, [] if failure is None else [outgoing(failure)], reason,
                                        keep_bytes=SALVAGE_HEAD_BYTES)

    async def _reject_undecodable(self, delivery: AbstractIncomingMessage, exc: ValidationError) -> None:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()[:5]
        )
        reason = f"message is not a valid {self.stage.input_name()} for stage {self.stage.name!r}: {problems}"
        failure = self._salvaged_failure(delivery, FailureCode.INVALID_MESSAGE, reason[:4000])
        if await self._end_and_dead_letter(delivery, [] if failure is None else [outgoing(failure)], reason):
            log.warning("stage %s: %s", self.stage.name, reason)

    def _salvaged_failure(self, delivery: AbstractIncomingMessage, code: FailureCode, reason: str) -> Failure | None:
        """A ``Failure`` for a message that does not decode, when its ``id`` and ``model`` can be read."""
        ident = read_identity(delivery.body)
        if ident is None:
            return None
        return Failure(id=ident[0], model=ident[1], stage=self.stage.name, code=code, message=reason)

    async def _end_and_dead_letter(self, delivery: AbstractIncomingMessage, failures: list[Outgoing], reason: str,
                                   best_effort_outcomes: bool = False, keep_bytes: int | None = None) -> bool:
        """End the jobs with ``failures`` (when whose jobs they are is known, so their callers
        learn why), dead-letter the message, then ack; True once acked, False when requeued."""
        try:
            if failures:
                await self.publish_all(failures, delivery, best_effort_outcomes=best_effort_outcomes)
            await self._dead_letter(delivery, reason, keep_bytes)
        except PublishRefused:
            await self._requeue(delivery)
            return False
        await self._settle(delivery.ack())
        return True

    async def _dead_letter(self, delivery: AbstractIncomingMessage, reason: str, keep_bytes: int | None = None) -> None:
        """Copy the message to ``{ns}.dead`` with the reason; ``keep_bytes``: keep only the body's head."""
        extra: dict[str, object] = {REASON_HEADER: reason[:1000], STAGE_HEADER: self.stage.name,
                                    QUEUE_HEADER: self.queue_spec.name}
        if keep_bytes is not None and len(delivery.body) > keep_bytes:
            extra[TRUNCATED_HEADER] = len(delivery.body)
        dead = self._copy(delivery, extra, body=delivery.body[:keep_bytes] if keep_bytes is not None else None)
        await self.outlets.dead.publish_raw(dead, original_routing_key(delivery))
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

    async def _requeue(self, delivery: AbstractIncomingMessage) -> None:
        await asyncio.sleep(REQUEUE_PAUSE_S)
        await self._settle(delivery.nack(requeue=True))

    @staticmethod
    async def _settle(coro) -> None:  # noqa: ANN001 - an ack or nack awaitable
        try:
            await coro
        except Exception as exc:  # channel gone: the broker requeues the message itself
            log.warning("could not settle a delivery (%s); the broker will redeliver it", exc)
