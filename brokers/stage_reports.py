"""What a stage replica reports about itself every second, through Redis, for the operator's view.

Each stage replica writes one ``StageReport`` (its cumulative counters and histogram
buckets, as its Prometheus registry holds them) under ``{ns}:stage-report:{profile}:{stage}:{replica}``
with a short TTL: a replica that dies stops writing and its report expires, so the
ingress (api/topology_live.py) sees replicas come and go in every deployment
(local, compose, Kubernetes) without knowing their metrics ports. Rates and
percentiles are differences between two reports, computed by the reader.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

# A replica writes every REPORT_INTERVAL_S; its report lives REPORT_TTL_S (missing two beats: gone).
REPORT_INTERVAL_S = 1.0
REPORT_TTL_S = 3


class HistogramCounts(BaseModel):
    """A Prometheus histogram's cumulative state: finite upper bounds, their cumulative counts, and the
    count of every observation (the +Inf bucket)."""

    bounds: list[float] = Field(default_factory=list, max_length=64)
    cumulative: list[float] = Field(default_factory=list, max_length=64)
    count: float = Field(default=0.0, ge=0)
    sum: float = 0.0


class StageReport(BaseModel):
    profile: str = Field(max_length=64)
    stage: str = Field(max_length=64)
    replica: str = Field(max_length=64, description="Replica index, or the pod's name")
    at: float = Field(description="Unix seconds when the report was made")
    # Cumulative message counts by outcome (handled, failed, retried, dead_lettered, untrusted).
    outcomes: dict[str, float] = Field(default_factory=dict, max_length=16)
    processing: HistogramCounts = HistogramCounts()
    batch_size: HistogramCounts = HistogramCounts()
    in_flight: int = Field(default=0, ge=0)


def stage_report_key(namespace: str, profile: str, stage: str, replica: str) -> str:
    return f"{namespace}:stage-report:{profile}:{stage}:{replica}"


def stage_report_pattern(namespace: str, profile: str) -> str:
    """A SCAN pattern of every report of ``profile``'s replicas."""
    return f"{namespace}:stage-report:{profile}:*"
