"""The message vocabulary: what travels on ``{ns}.inference`` (see DESIGN.md).

Every body is JSON with a pydantic schema, so any AMQP client in any language can
publish a request. Tensors travel as raw little-endian bytes (base64 in JSON) with
dtype and shape; never nested float lists, never pickle.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    TypeAdapter,
    model_validator,
)

from toposerve.brokers.versions import ModelVersion, versioned_key

MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_]{0,63}$"
ModelName = Annotated[str, Field(pattern=MODEL_NAME_PATTERN, description="Model name (routing-key safe)")]
_MODEL_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_]{0,63}")


def _as_utc(value: datetime) -> datetime:
    # Publishers in other languages often send times without a zone; they mean UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _b64decode(value: object) -> object:
    if isinstance(value, str):
        text = value.strip()
        altchars = b"-_" if ("-" in text or "_" in text) else None
        try:
            return base64.b64decode(text + "=" * (-len(text) % 4), altchars=altchars, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"not valid base64: {exc}") from exc
    return value


UtcDatetime = Annotated[datetime, AfterValidator(_as_utc)]
# Standard base64 in JSON (URL-safe is accepted too): what any client's decoder expects.
Base64Bytes = Annotated[
    bytes,
    BeforeValidator(_b64decode),
    PlainSerializer(lambda data: base64.b64encode(data).decode(), return_type=str, when_used="json"),
]


def is_model_name(value: str) -> bool:
    return bool(_MODEL_NAME_RE.fullmatch(value))


def utc_now() -> datetime:
    return datetime.now(UTC)


class Envelope(BaseModel):
    """Fields every message carries: the job id, the model, time bounds and timings."""

    model_config = ConfigDict(extra="ignore")

    kind: str = Field(description="What the message is (each kind below fixes it): the first word of its routing key")
    id: uuid.UUID = Field(description="Job id (UUID4); results are stored under it")
    model: ModelName
    created_at: UtcDatetime = Field(default_factory=utc_now, description="ISO 8601; no zone means UTC")
    deadline: UtcDatetime | None = Field(default=None, description="Absolute time after which the work is dropped")
    batch_id: str | None = Field(default=None, max_length=128)
    timings: dict[str, float] = Field(default_factory=dict, description="Milliseconds spent per stage")
    cache_key: str | None = Field(default=None, max_length=200,
                                  description="Prediction-cache key of the input; the store fills the cache under it")
    version: ModelVersion | None = Field(default=None, description="The model version that is to answer (none: "
                                                                   "the version the stage serves); in the routing key")

    def expired(self, now: datetime | None = None) -> bool:
        return self.deadline is not None and (now or utc_now()) >= self.deadline

    def carried(self) -> dict[str, object]:
        """The envelope fields a stage copies onto the message it derives from this one (not its kind)."""
        return {name: getattr(self, name) for name in Envelope.model_fields if name != "kind"}

    def routing_key(self) -> str:
        """The key this message is published under: ``<kind>.<model>``, or ``<kind>.<model>.v<version>``
        for one version of the model."""
        if self.version is not None:
            return versioned_key(self.kind, self.model, self.version)
        return routing_key(self.kind, self.model)


class InferenceInputs(BaseModel):
    """What a request asks about: exactly one of ``instances``, ``image`` or ``item_id``.

    One rule for both doors: the ingress's HTTP body (``PredictBody``) and the
    ``InferenceRequest`` any AMQP client publishes.
    """

    instances: list[list[float]] | None = Field(default=None, description="Rows of numbers (tabular models)")
    image: str | None = Field(default=None, description="Base64 of a PNG or JPEG file (image models)")
    item_id: str | None = Field(default=None, max_length=256, description="Item to load (data-cache pattern)")

    @model_validator(mode="after")
    def _exactly_one_input(self) -> InferenceInputs:
        given = [name for name in ("instances", "image", "item_id") if getattr(self, name) is not None]
        if len(given) != 1:
            advice = f"; send {' and '.join(given)} in separate requests" if given else ""
            raise ValueError("exactly one of 'instances', 'image' or 'item_id' must be given "
                             f"(got {', '.join(given) or 'none'}){advice}")
        return self


class InferenceRequest(Envelope, InferenceInputs):
    """``request.<model>``: exactly one of ``instances``, ``image`` or ``item_id``."""

    kind: Literal["request"] = "request"


class Tensor(BaseModel):
    """A dense array as raw little-endian bytes; see ``toposerve.models.tensors`` for the codec."""

    dtype: Literal["float32", "float64", "int64", "int32", "uint8"]
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=8)
    data: Base64Bytes


# A W3C traceparent: version-traceid-spanid-flags.
TRACEPARENT_PATTERN = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
MAX_JOBS_PER_MESSAGE = 4096


class JobSlice(BaseModel):
    """One job's share of a message that carries many (coalesced at the ingress): its rows are
    ``rows`` consecutive rows of the tensor, in the order of ``jobs``."""

    id: uuid.UUID = Field(description="The job's id: its answer carries it")
    rows: int = Field(ge=1, description="How many of the tensor's rows are this job's")
    created_at: UtcDatetime
    deadline: UtcDatetime | None = Field(default=None, description="This job's own deadline")
    traceparent: str | None = Field(default=None, pattern=TRACEPARENT_PATTERN, description="This job's trace")
    timings: dict[str, float] = Field(default_factory=dict, max_length=32, description="This job's timings so far")


class Features(Envelope):
    """``features.<model>``: the preprocessed input tensor, one row per input row.

    Many jobs in one message: with ``jobs``, the tensor holds every job's rows in order and
    each job ends on its own (its own answer, deadline and failure); the envelope's ``id`` is
    then the message's, ``deadline`` the latest of the jobs'. The answers to a message with
    ``reply_to`` come back as one ``Outcomes`` message.
    """

    kind: Literal["features"] = "features"
    tensor: Tensor
    jobs: list[JobSlice] | None = Field(default=None, min_length=1, max_length=MAX_JOBS_PER_MESSAGE,
                                        description="Coalesced jobs, one slice of the tensor's rows each")

    @model_validator(mode="after")
    def _slices_cover_the_rows(self) -> Features:
        if self.jobs is None:
            return self
        rows = self.tensor.shape[0] if self.tensor.shape else 0
        if sum(job.rows for job in self.jobs) != rows:
            raise ValueError(f"the jobs' rows add up to {sum(job.rows for job in self.jobs)}; the tensor has {rows}")
        if len({job.id for job in self.jobs}) != len(self.jobs):
            raise ValueError("a job id appears twice in jobs")
        return self

    def job_fields(self, job: JobSlice, carried: dict[str, object] | None = None) -> dict[str, object]:
        """What a message for one of the jobs carries (``carried()``, passed in when known, with the
        job's own id and times)."""
        return {**(self.carried() if carried is None else carried), "id": job.id, "created_at": job.created_at, "deadline": job.deadline,
                "timings": dict(job.timings)}


class RowPrediction(BaseModel):
    label: str | None = Field(description="The most probable class; null only in a partial group answer "
                                          "where no member that answered claims the row")
    class_index: int | None = Field(description="Index of ``label`` in the model's labels (null with it)")
    probabilities: list[float | None] = Field(
        description="One per class, in the order of the model's labels; null for a group member that did not answer")
    scores: dict[str, float] | None = Field(default=None, description="Model groups: the score of each member "
                                                                      "that answered")


class PartResult(BaseModel):
    """One member model's share of a model group's answer."""

    status: Literal["succeeded", "failed", "missing"]
    model_version: str | None = None
    error: str | None = None


class Prediction(Envelope):
    """``prediction.<model>``: one row prediction per input row, in input order."""

    kind: Literal["prediction"] = "prediction"
    model_version: str
    rows: list[RowPrediction]
    part: str | None = Field(default=None, description="Model groups: the member model of this partial answer")
    parts: dict[str, PartResult] | None = Field(default=None, description="Model groups: each member's status")
    partial: bool = Field(default=False, description="Model groups: some members did not answer (see parts)")
    answered_by: str | None = Field(default=None, description="Cascades: the model whose answer this is")

    def routing_key(self) -> str:
        return routing_key(self.kind, self.model, self.part)


class FailureCode(StrEnum):
    INVALID_MESSAGE = "invalid_message"
    INVALID_INPUT = "invalid_input"
    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_ITEM = "unknown_item"
    TOO_LARGE = "too_large"
    INCOMPLETE = "incomplete"  # a model group's members did not all answer, and partial answers are off
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"  # a chunk of a batch its owner (or an operator) cancelled: skipped, not predicted
    INTERNAL = "internal"


class Failure(Envelope):
    """``failure.<model>``: the terminal state of a job that could not be served."""

    kind: Literal["failure"] = "failure"
    stage: str
    code: FailureCode
    message: str
    retryable: bool = False
    part: str | None = Field(default=None, description="Model groups: the member model that failed")

    def routing_key(self) -> str:
        return routing_key(self.kind, self.model, self.part)


class JoinTick(Envelope):
    """``join.<group>``: a model group's join timeout has passed (delivered via a delay queue)."""

    kind: Literal["join"] = "join"


TerminalMessage = Prediction | Failure
Terminal = Annotated[Prediction | Failure, Field(discriminator="kind")]
# Both terminal messages can arrive on one queue; ``kind`` (in every body) tells which.
_TERMINAL = TypeAdapter(Terminal)


def decode_terminal(body: bytes) -> Prediction | Failure:
    """Parse a ``Prediction`` or ``Failure`` body; raises ``ValidationError``."""
    return _TERMINAL.validate_json(body)


class Outcomes(Envelope):
    """The answers to a message that carried many jobs, for its ``reply_to`` queue: one
    terminal message per job (``id`` is the message's, ``correlation_id`` the request's)."""

    kind: Literal["outcomes"] = "outcomes"
    items: list[Terminal] = Field(min_length=1, max_length=MAX_JOBS_PER_MESSAGE)


_REPLY = TypeAdapter(Annotated[Prediction | Failure | Outcomes, Field(discriminator="kind")])


def decode_reply(body: bytes) -> list[Prediction | Failure]:
    """A reply queue's message: one terminal message, or ``Outcomes``; raises ``ValidationError``."""
    reply = _REPLY.validate_json(body)
    return reply.items if isinstance(reply, Outcomes) else [reply]


def published_key(template: str | None, kind: str, model: str) -> str:
    """The routing key of a ``publishes`` template (``{kind}``, ``{model}``); none: ``<kind>.<model>``."""
    return routing_key(kind, model) if template is None else template.format(kind=kind, model=model)


def ttl_until(deadline: datetime | None) -> float | None:
    """A per-message TTL in seconds that ends at ``deadline`` (at least 1 ms: 0 would mean none)."""
    return None if deadline is None else max((deadline - utc_now()).total_seconds(), 0.001)


def routing_key(kind: str, model: str, part: str | None = None) -> str:
    return f"{kind}.{model}" if part is None else f"{kind}.{model}.{part}"


def is_terminal(message: Envelope) -> bool:
    """A job's final answer: a prediction or failure that is not one part of a group's."""
    return isinstance(message, Prediction | Failure) and message.part is None


# Where envelopes put their identity (near the start): for bodies too large to parse.
_HEAD_ID = re.compile(rb'"id"\s*:\s*"([0-9A-Fa-f-]{32,36})"')
_HEAD_MODEL = re.compile(rb'"model"\s*:\s*"([a-z0-9][a-z0-9_]{0,63})"')
IDENTITY_PARSE_LIMIT = 1024 * 1024
IDENTITY_HEAD_BYTES = 64 * 1024


def read_identity(body: bytes) -> tuple[uuid.UUID, str] | None:
    """The ``id`` and ``model`` of a body that is not a valid message (bad, dead-lettered, too large).

    Bodies up to ``IDENTITY_PARSE_LIMIT`` are parsed as JSON; larger ones are only
    searched in their first ``IDENTITY_HEAD_BYTES``, never parsed. None when either is
    missing or unsound.
    """
    if len(body) > IDENTITY_PARSE_LIMIT:
        head = body[:IDENTITY_HEAD_BYTES]
        found_id, found_model = _HEAD_ID.search(head), _HEAD_MODEL.search(head)
        if found_id is None or found_model is None:
            return None
        raw_id, model = found_id.group(1).decode(), found_model.group(1).decode()
    else:
        try:
            data = json.loads(body)
            raw_id, model = str(data["id"]), str(data["model"])
        except (ValueError, TypeError, KeyError):  # UnicodeDecodeError is a ValueError
            return None
    try:
        job_id = uuid.UUID(raw_id)
    except ValueError:
        return None
    return (job_id, model) if is_model_name(model) else None
