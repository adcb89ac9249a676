"""Edge telemetry: count local predictions into a window, and forward spooled reports to the broker.

``TelemetryWindow`` is a plain accumulator (one model version, one client); its
``to_report`` makes the ``Telemetry`` message. ``forward`` publishes what a spool
holds with publisher confirms and removes from the spool exactly the reports the
broker confirmed (routed to the telemetry queue and persisted). An unreachable
broker, or one where no telemetry stage has declared its queue yet, leaves
everything in the spool for the next attempt.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from toposerve.brokers import (
    N_LATENCY_BUCKETS,
    LatencyStats,
    Publisher,
    PublishRefused,
    Telemetry,
    inference_exchange,
    latency_bucket,
    make_broker,
    routing_key,
    utc_now,
)
from toposerve.producers.edge_spool import Spool

PUBLISH_CHUNK = 100


@dataclass
class TelemetryWindow:
    model: str
    model_version: str
    model_sha256: str | None
    started: datetime = field(default_factory=utc_now)
    predictions: int = 0
    errors: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    latency_sum_ms: float = 0.0
    latency_max_ms: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * N_LATENCY_BUCKETS)

    def record(self, labels: list[str], latency_ms: float) -> None:
        """One call that predicted ``labels`` (one per input row) in ``latency_ms``."""
        latency_ms = max(latency_ms, 0.0)
        for label in labels:
            self.predictions += 1
            self.labels[label] = self.labels.get(label, 0) + 1
            self.latency_sum_ms += latency_ms
            self.latency_max_ms = max(self.latency_max_ms, latency_ms)
            self.buckets[latency_bucket(latency_ms)] += 1

    def record_error(self) -> None:
        self.errors += 1

    @property
    def empty(self) -> bool:
        return self.predictions == 0 and self.errors == 0

    def to_report(self, client_id: str, ended: datetime | None = None) -> Telemetry:
        return Telemetry(
            id=uuid.uuid4(),
            model=self.model,
            client_id=client_id,
            model_version=self.model_version,
            model_sha256=self.model_sha256,
            window_start=self.started,
            window_end=max(ended or utc_now(), self.started),
            predictions=self.predictions,
            errors=self.errors,
            labels=dict(self.labels),
            latency_ms=LatencyStats(count=self.predictions, sum_ms=round(self.latency_sum_ms, 3),
                                    max_ms=round(self.latency_max_ms, 3), buckets=list(self.buckets)),
        )


@dataclass(frozen=True)
class ForwardResult:
    sent: int
    pending: int
    error: str | None = None


async def forward(spool: Spool, amqp_url: str, namespace: str, connect_timeout_s: float = 3.0,
                  publish_timeout_s: float = 10.0) -> ForwardResult:
    """Publish the spooled reports; remove the confirmed ones. Never raises for an unreachable broker."""
    reports = await asyncio.to_thread(spool.pending)
    if not reports:
        return ForwardResult(0, 0)
    try:
        # A one-shot attempt, retried by the caller's next round.
        broker = make_broker(amqp_url, "toposerve-edge", connect_timeout_s=connect_timeout_s)
        await asyncio.wait_for(broker.connect(), connect_timeout_s + 1)
    except Exception as exc:  # refused, unreachable, bad credentials: all mean "later"
        return ForwardResult(0, len(reports), f"broker unreachable ({type(exc).__name__}: {exc})")
    confirmed: set[uuid.UUID] = set()
    error: str | None = None
    try:
        # Passive: the server owns the topology; a client never creates it.
        await broker.config.declarer.declare_exchange(inference_exchange(namespace), declare=False)
        publisher = Publisher(broker, inference_exchange(namespace), timeout_s=publish_timeout_s)
        for start in range(0, len(reports), PUBLISH_CHUNK):
            chunk = reports[start:start + PUBLISH_CHUNK]
            outcomes = await asyncio.gather(
                *(publisher.publish(r, routing_key("telemetry", r.model)) for r in chunk), return_exceptions=True)
            for report, outcome in zip(chunk, outcomes, strict=True):
                if outcome is None:
                    confirmed.add(report.id)
                elif error is None:
                    error = str(outcome) if isinstance(outcome, PublishRefused) else repr(outcome)
            if error is not None:
                break
    except Exception as exc:  # the exchange is missing (no server yet), or the connection dropped
        error = error or f"{type(exc).__name__}: {exc}"
    finally:
        try:
            await asyncio.wait_for(broker.stop(), 5)
        except Exception:  # noqa: BLE001 - closing a broken connection may fail; nothing to keep
            pass
    removed = await asyncio.to_thread(spool.remove, confirmed)
    left = await asyncio.to_thread(spool.stats)
    return ForwardResult(sent=removed, pending=left.pending, error=error)
