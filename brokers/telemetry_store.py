"""Edge telemetry in Redis: one aggregate hash per model, written idempotently by report id.

Key ``{ns}:telemetry:{model}`` (a hash of sums, maxima and per-client fields) lives
``ttl_s`` seconds after the last report. Each report also leaves a marker
``{ns}:telemetry:seen:{id}`` with the same TTL; marker and increments are one Lua
script, so a redelivered or resent report (same id) never counts twice, and a
crash can never leave a report half counted.

``report_delta`` (what a report adds) and ``summarize`` (the hash -> the API's
answer) are pure, so they are tested without Redis.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import redis.asyncio as redis
from pydantic import BaseModel, Field

from toposerve.brokers.telemetry_messages import LATENCY_BUCKETS_MS, N_LATENCY_BUCKETS, Telemetry

# Marker first (SET NX): a report already counted changes nothing. Then sums,
# float sums, maxima, minima, and "latest" fields (a client's model version is the
# one of its most recent window, whatever order reports arrive in). Values travel as
# strings so Lua never reformats a number.
_RECORD_SCRIPT = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
local delta = cjson.decode(ARGV[2])
for _, item in ipairs(delta.latest) do
  local stamp = tonumber(redis.call('HGET', KEYS[1], item[3]))
  if not stamp or tonumber(item[4]) >= stamp then
    redis.call('HSET', KEYS[1], item[1], item[2])
  end
end
for name, value in pairs(delta.incr) do
  redis.call('HINCRBY', KEYS[1], name, value)
end
for name, value in pairs(delta.incrfloat) do
  redis.call('HINCRBYFLOAT', KEYS[1], name, value)
end
for name, value in pairs(delta.max) do
  local current = tonumber(redis.call('HGET', KEYS[1], name))
  if not current or tonumber(value) > current then
    redis.call('HSET', KEYS[1], name, value)
  end
end
for name, value in pairs(delta.min) do
  local current = tonumber(redis.call('HGET', KEYS[1], name))
  if not current or tonumber(value) < current then
    redis.call('HSET', KEYS[1], name, value)
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


@dataclass
class TelemetryDelta:
    """What one report adds to its model's aggregate hash."""

    incr: dict[str, int] = field(default_factory=dict)
    incrfloat: dict[str, float] = field(default_factory=dict)
    max: dict[str, float] = field(default_factory=dict)
    min: dict[str, float] = field(default_factory=dict)
    # (field, value, stamp field, stamp): set field when stamp >= the stored stamp.
    latest: list[tuple[str, str, str, float]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({
            "incr": {k: str(v) for k, v in self.incr.items()},
            "incrfloat": {k: repr(float(v)) for k, v in self.incrfloat.items()},
            "max": {k: repr(float(v)) for k, v in self.max.items()},
            "min": {k: repr(float(v)) for k, v in self.min.items()},
            "latest": [[f, v, s, repr(float(t))] for f, v, s, t in self.latest],
        })


def report_delta(report: Telemetry) -> TelemetryDelta:
    """Pure: the increments a report makes (zero counts are left out)."""
    delta = TelemetryDelta()
    counts = {
        "reports": 1,
        "predictions": report.predictions,
        "errors": report.errors,
        "dropped_reports": report.dropped_reports,
        "dropped_predictions": report.dropped_predictions,
        "latency_count": report.latency_ms.count,
        f"version:{report.model_version}": report.predictions,
        f"client:{report.client_id}:predictions": report.predictions,
        f"client:{report.client_id}:reports": 1,
    }
    counts.update({f"label:{label}": n for label, n in report.labels.items()})
    counts.update({f"bucket:{i}": n for i, n in enumerate(report.latency_ms.buckets)})
    delta.incr = {name: n for name, n in counts.items() if n}
    if report.latency_ms.count:
        delta.incrfloat["latency_sum_ms"] = report.latency_ms.sum_ms
        delta.max["latency_max_ms"] = report.latency_ms.max_ms
    start, end = report.window_start.timestamp(), report.window_end.timestamp()
    delta.min["window_start"] = start
    delta.max["window_end"] = end
    delta.latest.append((f"client:{report.client_id}:version", report.model_version,
                         f"client:{report.client_id}:last_seen", end))
    delta.max[f"client:{report.client_id}:last_seen"] = end
    return delta


class BucketCount(BaseModel):
    le_ms: float | None = Field(description="Upper bound in ms; null for 'slower than every bound'")
    count: int


class LatencySummary(BaseModel):
    count: int = 0
    mean_ms: float | None = None
    max_ms: float | None = None
    p50_ms: float | None = Field(default=None, description="Estimated from the histogram")
    p95_ms: float | None = None
    p99_ms: float | None = None
    buckets: list[BucketCount] = Field(default_factory=list)


class ClientSummary(BaseModel):
    predictions: int = 0
    reports: int = 0
    model_version: str | None = None
    last_seen: datetime | None = Field(default=None, description="End of the client's latest reported window")


class TelemetrySummary(BaseModel):
    """``GET /v1/models/{model}/telemetry``: every report of the model's clients, aggregated."""

    model: str
    reports: int = 0
    predictions: int = 0
    errors: int = 0
    dropped_reports: int = Field(default=0, description="Reports edge clients dropped from a full spool")
    dropped_predictions: int = 0
    labels: dict[str, int] = Field(default_factory=dict)
    versions: dict[str, int] = Field(default_factory=dict, description="Model version -> predictions")
    latency_ms: LatencySummary = Field(default_factory=LatencySummary)
    window_start: datetime | None = None
    window_end: datetime | None = None
    clients: dict[str, ClientSummary] = Field(default_factory=dict)
    expires_in_s: int | None = Field(default=None, description="Seconds until the aggregate expires without reports")


def histogram_quantile(q: float, buckets: list[int], max_ms: float) -> float | None:
    """Pure: the q-quantile from bucket counts, interpolated linearly inside its bucket, never above the max."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    cumulative = 0
    for index, count in enumerate(buckets):
        if count and cumulative + count >= rank:
            upper = min(LATENCY_BUCKETS_MS[index] if index < len(LATENCY_BUCKETS_MS) else max_ms, max_ms)
            lower = min(LATENCY_BUCKETS_MS[index - 1] if index else 0.0, upper)
            return round(lower + (upper - lower) * (rank - cumulative) / count, 3)
        cumulative += count
    return round(max_ms, 3)


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(float(value), UTC)


def summarize(model: str, fields: dict[str, str], ttl_s: int | None = None) -> TelemetrySummary:
    """Pure: the aggregate hash (decoded) -> the summary the API returns."""
    def count(name: str) -> int:
        return int(fields.get(name, 0))

    labels: dict[str, int] = {}
    versions: dict[str, int] = {}
    clients: dict[str, ClientSummary] = {}
    for name, value in fields.items():
        if name.startswith("label:"):
            labels[name.removeprefix("label:")] = int(value)
        elif name.startswith("version:"):
            versions[name.removeprefix("version:")] = int(value)
        elif name.startswith("client:"):
            # Client ids may contain ':'; attribute names never do, so split from the right.
            client_id, _, attribute = name.removeprefix("client:").rpartition(":")
            client = clients.setdefault(client_id, ClientSummary())
            if attribute == "predictions":
                client.predictions = int(value)
            elif attribute == "reports":
                client.reports = int(value)
            elif attribute == "version":
                client.model_version = value
            elif attribute == "last_seen":
                client.last_seen = _time(value)
    buckets = [count(f"bucket:{i}") for i in range(N_LATENCY_BUCKETS)]
    latency_count = count("latency_count")
    max_ms = float(fields["latency_max_ms"]) if "latency_max_ms" in fields else None
    latency = LatencySummary(
        count=latency_count,
        mean_ms=round(float(fields.get("latency_sum_ms", 0)) / latency_count, 3) if latency_count else None,
        max_ms=max_ms,
        buckets=[BucketCount(le_ms=LATENCY_BUCKETS_MS[i] if i < len(LATENCY_BUCKETS_MS) else None, count=n)
                 for i, n in enumerate(buckets)],
    )
    if latency_count and max_ms is not None:
        latency.p50_ms = histogram_quantile(0.50, buckets, max_ms)
        latency.p95_ms = histogram_quantile(0.95, buckets, max_ms)
        latency.p99_ms = histogram_quantile(0.99, buckets, max_ms)
    return TelemetrySummary(
        model=model,
        reports=count("reports"),
        predictions=count("predictions"),
        errors=count("errors"),
        dropped_reports=count("dropped_reports"),
        dropped_predictions=count("dropped_predictions"),
        labels=dict(sorted(labels.items())),
        versions=dict(sorted(versions.items())),
        latency_ms=latency,
        window_start=_time(fields.get("window_start")),
        window_end=_time(fields.get("window_end")),
        clients=dict(sorted(clients.items())),
        expires_in_s=ttl_s if ttl_s is not None and ttl_s >= 0 else None,
    )


class TelemetryStore:
    def __init__(self, client: redis.Redis, namespace: str, ttl_s: int = 7 * 24 * 3600) -> None:
        self.client = client
        self.namespace = namespace
        self.ttl_s = ttl_s
        self._record = client.register_script(_RECORD_SCRIPT)

    def key(self, model: str) -> str:
        return f"{self.namespace}:telemetry:{model}"

    def marker_key(self, report_id: uuid.UUID) -> str:
        return f"{self.namespace}:telemetry:seen:{report_id}"

    async def record(self, report: Telemetry) -> bool:
        """Add a report to its model's aggregate; False when this report id was already counted."""
        written = await self._record(
            keys=[self.key(report.model), self.marker_key(report.id)],
            args=[self.ttl_s, report_delta(report).to_json()],
        )
        return bool(written)

    async def summary(self, model: str) -> TelemetrySummary:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.key(model))
            pipe.ttl(self.key(model))
            raw, ttl = await pipe.execute()
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        return summarize(model, fields, ttl)
