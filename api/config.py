"""What the ingress runs with: the profile's ``ingress`` section, and what the rest of the profile decides for it.

The composition root (deploy/) validates the profile once, then hands its
``IngressSpec`` over unchanged inside an ``IngressConfig``; nothing here re-copies
the spec's fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from toposerve.brokers import DeadLetterSpec, QueueSpec, VersionPolicy


class IngressSpec(BaseModel):
    """A profile's ``ingress`` section, validated once by the profile and handed to the ingress as it is."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["async", "sync", "sync_async"] = "async"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    result_ttl_s: int = Field(default=3600, ge=1, description="How long job results live in Redis")
    timeout_s: float = Field(default=5.0, gt=0, le=3600, description="Sync: default seconds to wait")
    max_timeout_s: float = Field(default=60.0, gt=0, le=3600, description="Sync: cap on a caller's timeout")
    book_model: str | None = Field(default=None, description="Model of the book-compatible routes")
    sync_async: dict[str, str] = Field(default_factory=dict, description="fast model -> accurate model")
    # web_single: the ingress and every stage in one process (the book's single container).
    single_process: bool = False
    # prediction_cache: seconds a cached answer lives (None: no prediction cache).
    prediction_cache_ttl_s: int | None = Field(default=None, ge=1)
    # Load shedding: predict requests in flight per ingress process (None: unbounded),
    # and the answer given instead of 503 when shedding (None: 503 + Retry-After).
    max_in_flight: int | None = Field(default=None, ge=1)
    overload_fallback: dict | None = None
    # Tabular input: the ingress already turns rows into the float32 tensor to validate
    # them, so with this on it publishes that tensor as Features straight to
    # features.<model> (same reply address, deadline and trace), skipping a broker hop
    # and the preprocess stage. Images and item ids still go request.<model> ->
    # preprocess: decoding them is the costly work a preprocess stage scales out.
    preprocess_tabular_in_ingress: bool = Field(
        default=False, description="Tabular rows: publish features.<model> from the ingress, skip the preprocess stage")
    # Coalescing (api/coalescing.py): sync requests whose rows the ingress preprocessed, for
    # the same model, that arrive while a publish is in flight (or within the window) travel
    # as one message of up to this many jobs; 1 sends every request as a message of its own.
    coalesce_max_jobs: int = Field(default=64, ge=1, le=4096,
                                   description="Sync rows: jobs per coalesced message (1: no coalescing)")
    coalesce_window_ms: float = Field(default=0.0, ge=0, le=100,
                                      description="Sync rows: how long a request waits for others (0: only while a "
                                                  "publish is in flight)")
    # Sync answers readable later: the profile gets a store stage (deploy/profile.py), every
    # sync answer is also stored, for this many seconds, and ``GET /v1/jobs/{id}`` answers for
    # it; an outcome of a direct AMQP publish with no reply_to is stored instead of dropped.
    keep_sync_answers_s: int | None = Field(
        default=None, ge=1, le=7 * 24 * 3600,
        description="Sync: also store answers this many seconds, readable at /v1/jobs/{id} (None: not stored)")
    # HTTP work (parsing, validation, JSON) is the ingress's cost per request; one Python
    # process uses one core. N processes share the port (SO_REUSEPORT: the kernel spreads
    # connections), each with its own broker connection and reply queue.
    workers: int = Field(default=1, ge=1, le=64,
                         description="Ingress processes sharing the port, each with its own reply queue")

    @model_validator(mode="after")
    def _kept_answers_are_sync(self) -> IngressSpec:
        if self.keep_sync_answers_s is not None and self.mode != "sync":
            raise ValueError("keep_sync_answers_s is for mode: sync (the other modes store every job already)")
        return self

    @model_validator(mode="after")
    def _one_process_runs_the_stages(self) -> IngressSpec:
        if self.single_process and self.workers > 1:
            raise ValueError("single_process runs every stage inside the ingress process: workers must be 1 "
                             "(scale a single-process profile by running more copies of it)")
        return self


class StageOutline(BaseModel):
    """One stage as the operator's view draws it (deploy/ derives it from the profile)."""

    kind: str
    queue: str
    replicas: int = Field(ge=1)
    consumes: list[str]
    publishes: list[str] = Field(default_factory=list, description="Routing keys (patterns) its outputs take")
    stores: list[str] = Field(default_factory=list, description="What it keeps in Redis (jobs, joins, ...)")


class IngressConfig(BaseModel):
    """The ingress's configuration: ``spec`` as the profile gave it, plus what follows from the profile's stages."""

    profile: str
    spec: IngressSpec = IngressSpec()
    models: list[str]
    models_dir: Path
    # Version policies (canary, shadow) of the models that have one; ``serve`` resolved.
    versions: dict[str, VersionPolicy] = Field(default_factory=dict)
    queues: list[QueueSpec] = Field(default_factory=list)
    # Model groups (scatter-gather): name -> member models; requested like a model.
    groups: dict[str, list[str]] = Field(default_factory=dict)
    # The queues of the stages a sync answer goes through (preprocess, predict, aggregate).
    answer_queues: list[str] = Field(default_factory=list)
    # data_cache profiles: requests may name an item instead of sending data.
    item_ids: bool = False
    # ... and items may be written to Redis, living this long (None: no Redis item source).
    item_ttl_s: int | None = None
    # A stage stores outcomes (a store): then sync answers are readable at /v1/jobs too,
    # and belong to the key that asked, like async jobs.
    outcomes_kept: bool = False
    # The profile has a batch_store stage (POST /v1/batches); if not, the shipped profiles
    # that do, named in the refusal.
    batches: bool = False
    batch_profiles: list[str] = Field(default_factory=list)
    # The image /predict/test sends for image models (the book's bundled cat.jpg).
    sample_image: Path | None = None
    # Bounds of the namespace's dead-letter queue, declared by the ingress too.
    dead_letters: DeadLetterSpec = DeadLetterSpec()
    # Every stage of the profile, in its order: the operator's view (api/topology_graph.py).
    stages: dict[str, StageOutline] = Field(default_factory=dict)

    @property
    def mode(self) -> Literal["async", "sync", "sync_async"]:
        return self.spec.mode

    @property
    def book_model(self) -> str:
        """The model the book-compatible routes (/predict, /metadata, ...) serve."""
        return self.spec.book_model or self.models[0]
