"""``telemetry.<model>``: what an edge client reports about the predictions it made locally.

One report covers one window of one model version on one client: how many
predictions, their label distribution, how many inputs failed, and the latency as
a fixed-bucket histogram. Every field is a sum (or a max) so that reports from
any number of clients aggregate exactly on the server; percentiles are computed
from the summed histogram, never averaged. The report's ``id`` (UUID4) is what
makes a resent or redelivered report count once.

Any AMQP client can publish one (routing key ``telemetry.<model>``, persistent,
JSON body as below); ``LATENCY_BUCKETS_MS`` is part of the contract.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from toposerve.brokers.messages import Envelope, UtcDatetime

# Upper bounds (inclusive, milliseconds) of the latency buckets; one more bucket
# counts everything slower than the last bound. Fixed, like Prometheus buckets,
# so histograms from different clients add up.
LATENCY_BUCKETS_MS: tuple[float, ...] = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
N_LATENCY_BUCKETS = len(LATENCY_BUCKETS_MS) + 1

CLIENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
ClientId = Annotated[str, Field(pattern=CLIENT_ID_PATTERN, description="Stable id of the edge client")]
SHA256_PATTERN = r"^[0-9a-f]{64}$"
LabelName = Annotated[str, Field(min_length=1, max_length=64)]
Count = Annotated[int, Field(ge=0, le=10**12)]


def latency_bucket(latency_ms: float) -> int:
    """Pure: index of the bucket a latency falls in (the last index is 'slower than every bound')."""
    for index, bound in enumerate(LATENCY_BUCKETS_MS):
        if latency_ms <= bound:
            return index
    return len(LATENCY_BUCKETS_MS)


class LatencyStats(BaseModel):
    """Latency of the predictions of one window, in milliseconds."""

    model_config = ConfigDict(extra="forbid")

    count: Count = 0
    sum_ms: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    max_ms: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    buckets: list[Count] = Field(
        default_factory=lambda: [0] * N_LATENCY_BUCKETS,
        description=f"Counts per bucket of LATENCY_BUCKETS_MS {list(LATENCY_BUCKETS_MS)} plus one for slower",
    )

    @model_validator(mode="after")
    def _consistent(self) -> LatencyStats:
        if len(self.buckets) != N_LATENCY_BUCKETS:
            raise ValueError(f"buckets must have {N_LATENCY_BUCKETS} counts (bounds {list(LATENCY_BUCKETS_MS)} "
                             f"and one for slower), got {len(self.buckets)}")
        if sum(self.buckets) != self.count:
            raise ValueError(f"buckets add up to {sum(self.buckets)}, but count is {self.count}")
        if self.count == 0 and (self.sum_ms or self.max_ms):
            raise ValueError("sum_ms and max_ms must be 0 when count is 0")
        return self


class Telemetry(Envelope):
    """``telemetry.<model>``: one window of edge predictions of one model version on one client."""

    kind: Literal["telemetry"] = "telemetry"
    client_id: ClientId
    model_version: str = Field(min_length=1, max_length=64)
    model_sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    window_start: UtcDatetime
    window_end: UtcDatetime
    predictions: Count = Field(description="Inputs predicted in the window")
    errors: Count = Field(default=0, description="Inputs the client could not predict (bad images, ...)")
    labels: dict[LabelName, Count] = Field(default_factory=dict, max_length=1024,
                                           description="Predicted label -> count; adds up to 'predictions'")
    latency_ms: LatencyStats = Field(default_factory=LatencyStats)
    # The client's spool is bounded: when it is full its oldest reports are dropped,
    # and the next report carries what was lost, so the server can tell.
    dropped_reports: Count = 0
    dropped_predictions: Count = 0

    @model_validator(mode="after")
    def _consistent(self) -> Telemetry:
        if self.window_end < self.window_start:
            raise ValueError("window_end is before window_start")
        if sum(self.labels.values()) != self.predictions:
            raise ValueError(f"labels add up to {sum(self.labels.values())}, but predictions is {self.predictions}")
        if self.latency_ms.count != self.predictions:
            raise ValueError(f"latency_ms.count is {self.latency_ms.count}, but predictions is {self.predictions}")
        return self
