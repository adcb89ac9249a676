"""Pydantic models of the native API's bodies, for the OpenAPI document.

The routes build these bodies as plain dicts (one orjson call, no pydantic round trip:
api/responses.py); these models say what those dicts hold, field for field, and
``extra="forbid"`` where a body has exactly these keys, so the schemathesis test
(tests/integration/test_openapi.py) notices when a route and its model drift apart.
Bodies that are a model of their own (``JobRecord``, ``BatchStatus``, ``ModelManifest``,
``TelemetrySummary``) are documented with that model.
"""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from toposerve.api.errors import ErrorDetail
from toposerve.api.ingress import one_of_required
from toposerve.api.tf_serving_codec import TfVersionStatus
from toposerve.brokers import JobError, JobRecord
from toposerve.models.registry import InputSpec, Preprocessing


class _Exact(BaseModel):
    """A body with exactly these keys."""

    model_config = ConfigDict(extra="forbid")


# -- models ------------------------------------------------------------------------------

class ModelDescription(_Exact):
    """``GET /v1/models/{model}``: what a caller needs to send a request."""

    name: str
    version: str
    sha256: str
    description: str
    input: InputSpec
    input_kind: Literal["image", "instances"] = Field(description="The field a predict body fills for this model")
    labels: list[str] = Field(description="Class names, in the order of ``probabilities``")
    preprocessing: Preprocessing
    metrics: dict[str, float | int] = Field(description="Test metrics of the trained model, e.g. accuracy")
    model_version_status: list[TfVersionStatus] | None = Field(
        default=None, description="Sync profiles: TF Serving's version status, for its clients")


class ModelList(_Exact):
    models: list[ModelDescription]


# -- predict -----------------------------------------------------------------------------

class AcceptedJob(_Exact):
    """An async job, accepted and queued: poll ``location``."""

    id: uuid.UUID
    status: Literal["pending"]
    model: str
    location: str = Field(description="``/v1/jobs/{id}``, where the job's record is read")


class CachedAcceptedJob(_Exact):
    """An async job in a prediction-cache profile: ``succeeded`` at once on a cache hit."""

    id: uuid.UUID
    status: Literal["pending", "succeeded"]
    model: str
    location: str = Field(description="``/v1/jobs/{id}``, where the job's record is read")
    cached: bool = Field(description="Answered from the prediction cache")


class FastFailure(_Exact):
    """sync_async: the fast model gave no answer (an error, or the deadline passed)."""

    id: uuid.UUID
    model: str
    status: Literal["failed"]
    error: ErrorDetail


class SyncAsyncAnswer(_Exact):
    """sync_async: the fast model's answer now, and the accurate model's job to poll."""

    fast: JobRecord | FastFailure
    job: AcceptedJob


class OverloadFallback(BaseModel):
    """The profile's ``ingress.overload_fallback`` answer, given instead of a 503 when load is shed."""

    model_config = ConfigDict(extra="allow")

    fallback: Literal[True]
    reason: str = Field(description="Why the request was shed")


# -- process state -----------------------------------------------------------------------

class Health(_Exact):
    status: Literal["ok"]


class Check(_Exact):
    ok: bool
    detail: str


class ModelsCheck(_Exact):
    ok: bool
    detail: list[str] = Field(description="The models this profile serves")


class ReadinessChecks(_Exact):
    broker: Check
    redis: Check
    models: ModelsCheck
    stages: Check


class Readiness(_Exact):
    ready: bool
    checks: ReadinessChecks
    stage_consumers: dict[str, int] = Field(description="Consumers of each stage queue")


class CacheStats(_Exact):
    enabled: bool
    hits: int
    misses: int
    coalesced: int
    errors: int


class ReplyStats(_Exact):
    in_flight: int
    late: int


class LoadStats(_Exact):
    in_flight: int
    max_in_flight: int | None
    shed: int


class CoalescingStats(_Exact):
    messages: int = Field(description="Sync messages published for coalesced requests")
    jobs: int = Field(description="Requests they carried (jobs / messages: requests per message)")


class Stats(_Exact):
    """``GET /v1/stats``: counters of this ingress process."""

    pid: int = Field(description="This process (with ingress.workers: N, each worker answers for itself)")
    prediction_cache: CacheStats
    replies: ReplyStats
    load: LoadStats
    coalescing: CoalescingStats


# -- items and batches -------------------------------------------------------------------

class ItemWritten(_Exact):
    item_id: str
    bytes: int = Field(description="Size of the stored image file")
    ttl_s: int = Field(description="Seconds the item lives")


class BatchAccepted(_Exact):
    """A batch, recorded and every chunk published."""

    id: str
    model: str
    total: int = Field(description="Input rows")
    chunks: int
    bad_rows: int = Field(description="Rows that could not be read; their result lines say why")
    state: Literal["running"]
    location: str = Field(description="``/v1/batches/{id}``: progress")
    results: str = Field(description="``/v1/batches/{id}/results``: one JSON line per input row")


# -- the book's routes -------------------------------------------------------------------

class BookHealthy(_Exact):
    health: Literal["ok"]


class BookUnhealthy(_Exact):
    health: Literal["ng"]
    checks: ReadinessChecks


class BookMetadata(_Exact):
    data_type: str
    data_structure: str
    data_sample: str | list[list[float]]
    prediction_type: str
    prediction_structure: str
    model: str
    version: str
    labels: list[str]


class BookProbabilities(_Exact):
    prediction: list[float | None] | list[list[float | None]] = Field(
        description="The first row's probabilities (the book's field): a list (tabular models), or the "
                    "(1, n_classes) matrix [[...]] (image models, as the book's image patterns answer)")
    predictions: list[list[float | None]] = Field(description="Every row's probabilities")


class BookLabels(_Exact):
    prediction: str | None = Field(description="The first row's label (the book's field)")
    predictions: list[str | None]


class BookJob(_Exact):
    job_id: str


class BookFastJob(BaseModel):
    """sync_async: the accurate model's job, and the fast model's label under the fast model's name."""

    model_config = ConfigDict(extra="allow")

    job_id: str
    error: ErrorDetail | None = Field(default=None, description="Why the fast model gave no label (then null)")


class BookJobEntry(_Exact):
    prediction: str | None = Field(description="The label; empty while pending, null when the job failed")
    predictions: list[str | None] | None = Field(default=None, description="Every row's label")
    error: JobError | None = None


class BookJobAnswer(RootModel[dict[str, BookJobEntry]]):
    """``{"<job id>": {...}}``, as the book's reference code answers."""


class BookPredictBody(BaseModel):
    """The book's field names (``data``, ``image_data``) or the native ones; exactly one input."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=one_of_required(
        "data", "image_data", "instances", "image", "item_id"))

    data: list[list[float]] | str | None = Field(
        default=None, description="Rows of numbers (tabular model), a base64 image (image model), or an item id "
                                  "(data-cache profile)")
    image_data: str | None = Field(default=None, description="Base64 of a PNG or JPEG file")
    instances: list[list[float]] | None = None
    image: str | None = None
    item_id: str | None = None

