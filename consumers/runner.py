"""A stage on FastStream: the broker connects and declares, the settlement policy ends each delivery.

``StageRunner`` is the one place a stage meets the bus. It makes (or is handed) a
``RabbitBroker``, declares the stage's queue and bindings on a channel with the stage's
prefetch, and hands every delivery to ``Settlement`` (consumers/settlement.py), which acks
only after the confirms of the outputs.

How deliveries arrive, two ways with the same settlement:

- ``consume_directly`` (the default): aio-pika's ``queue.consume`` on the queue object
  FastStream declared. FastStream's consume pipeline (its context, middlewares and handler
  wrapper) cost a stage 0.2-0.25 ms of CPU per message on top of 0.5 ms for everything
  else, which this path does without (measured: README, "Benchmarks").
- a FastStream subscriber with ``AckPolicy.MANUAL`` (FastStream never acks for us), for
  FastStream's in-memory ``TestRabbitBroker``, which routes only to subscribers.

SIGTERM drains: the stage stops taking messages, lets the ones in flight end as usual
(acked), then the connection closes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from faststream import AckPolicy
from faststream.rabbit import Channel, RabbitBroker

from toposerve.brokers import (
    DeadLetterSpec,
    Publisher,
    QueueSpec,
    ResultStore,
    Settings,
    dead_exchange,
    declare_dead_letters,
    declare_topology,
    inference_exchange,
    make_broker,
    rabbit_queue,
    trusted_producers,
    url_user,
)
from toposerve.consumers.crash_guard import RedeliveryGuard
from toposerve.consumers.liveness import LoopStalls
from toposerve.consumers.metrics import StageMetrics, stage_metrics
from toposerve.consumers.settlement import Outlets, Settlement, Trust
from toposerve.consumers.stage import Stage, StageStats

log = logging.getLogger(__name__)


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
        broker: RabbitBroker | None = None,
        consume_directly: bool = True,
        bind: bool = True,
    ) -> None:
        self.stage = stage
        # False: its queue is declared unbound (a swap's standby stage; the swap binds it).
        self.bind = bind
        self.settings = settings
        self.queue_spec = queue
        self.prefetch = prefetch
        self.dead_letters = dead_letters or DeadLetterSpec()
        # Prometheus metrics of this stage; its own registry unless the process shares one.
        self.metrics = metrics if metrics is not None else stage_metrics(stage.name)
        stage.instrument(self.metrics)
        self.broker = broker if broker is not None else make_broker(settings, connection_name or f"toposerve-{stage.name}")
        self.consume_directly = consume_directly
        self.stats = StageStats()
        self.stalls = LoopStalls()
        self.ready = asyncio.Event()
        # The account this process publishes as, and the accounts whose outcomes it accepts:
        # the stage accounts of the namespace, and its own (every role on one account then).
        user = url_user(settings.amqp_url)
        namespace = settings.namespace
        self.settlement = Settlement(
            stage, settings, queue,
            Outlets(outputs=Publisher(self.broker, inference_exchange(namespace), user_id=user),
                    dead=Publisher(self.broker, dead_exchange(namespace), user_id=user),
                    direct=Publisher(self.broker, None, user_id=user)),
            metrics=self.metrics,
            trust=Trust(frozenset(trusted_producers(namespace) | ({user} if user else set()))),
            user=user, guard=guard, outcomes_kept=outcomes_kept, recorder=recorder,
            stats=self.stats, stalls=self.stalls,
        )
        self._subscriber: Any = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._closed = False

    @property
    def guard(self) -> RedeliveryGuard | None:
        return self.settlement.guard

    @property
    def recorder(self) -> ResultStore | None:
        return self.settlement.recorder

    async def start(self) -> None:
        await self.stage.start()
        await self.broker.connect()
        namespace = self.settings.namespace
        await declare_dead_letters(self.broker, namespace, self.dead_letters)
        channel = Channel(prefetch_count=self.prefetch)
        topology = await declare_topology(self.broker, namespace, [self.queue_spec, *self.stage.extra_queues],
                                          channel=channel,
                                          unbound=() if self.bind else (self.queue_spec.name,))
        self.stalls.start()
        if self.consume_directly:
            self._queue = topology.queues[self.queue_spec.name]
            self._consumer_tag = await self._queue.consume(self.settlement.settle)
        else:
            self._subscribe(channel)
            await self.broker.start()
        self.ready.set()
        log.info("stage %s consuming %s", self.stage.name, self.queue_spec.name)

    def _subscribe(self, channel: Channel) -> None:
        settlement = self.settlement

        async def on_delivery(delivery: AbstractIncomingMessage) -> None:  # the broker's decoder gives it
            await settlement.settle(delivery)

        self._subscriber = self.broker.subscriber(
            rabbit_queue(self.queue_spec, self.settings.namespace), inference_exchange(self.settings.namespace),
            channel=channel,
            # Our settlement policy acks, after the confirms; FastStream must not.
            ack_policy=AckPolicy.MANUAL,
            # Messages carry the caller's reply_to; the stage answers it itself.
            no_reply=True,
            title=f"{self.stage.name}:consume",
        )
        self._subscriber(on_delivery)

    async def backlog(self) -> int:
        """How many messages wait in the stage's queue now (a passive declare)."""
        channel = await self.broker.config.channel_manager.get_channel()
        queue = await channel.declare_queue(self.queue_spec.name, passive=True)
        return queue.declaration_result.message_count or 0

    async def drain_and_close(self) -> None:
        """Stop taking messages, let in-flight ones finish (they are acked), then close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            # Bounded: on a connection that is reconnecting, a cancel would wait for it.
            if self._queue is not None and self._consumer_tag is not None:
                await asyncio.wait_for(self._queue.cancel(self._consumer_tag), timeout=5)
            elif self._subscriber is not None:  # waits (graceful_timeout) for running handlers, then cancels
                await asyncio.wait_for(self._subscriber.stop(), timeout=self.settings.drain_timeout_s + 5)
        except Exception as exc:  # the connection may already be gone; unacked work is requeued then
            log.warning("could not cancel consumer of %s cleanly (%s: %s)", self.queue_spec.name,
                        type(exc).__name__, exc)
        pending = set(self.stats.in_flight)
        if pending:
            log.info("draining %d in-flight messages", len(pending))
            await asyncio.wait(pending, timeout=self.settings.drain_timeout_s)
        await self.stalls.close()
        try:
            await self.broker.stop()
        except Exception as exc:  # noqa: BLE001 - closing a broken connection; nothing left to keep
            log.warning("closing the broker connection of %s failed (%s)", self.stage.name, exc)
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
