"""What a stage is: one input message type in, output messages out (or an exception).

A ``Stage`` only turns one input message into output messages. Everything about the
delivery (acks after confirms, failures, retries, dead letters, deadlines) is the
settlement policy's (consumers/settlement.py); the bus is FastStream's (consumers/runner.py).
So each stage is a few lines, and a user's own (``kind: custom``, consumers/custom.py) too.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar

from toposerve.brokers import Envelope, Failure, FailureCode, Features, QueueSpec
from toposerve.consumers.metrics import StageMetrics


class TransientError(RuntimeError):
    """A dependency (broker, Redis) is unavailable; the message should be retried later."""


@dataclass
class Outgoing:
    body: Envelope
    routing_key: str
    # False: a prediction on its way to a post-processing stage (a predict stage with
    # ``publishes``), not the job's answer: no sync caller is answered with it.
    final: bool = True
    # The job's own trace, when the input carried many jobs (each with its own traceparent).
    traceparent: str | None = None


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

    def input_name(self) -> str:
        """The input type, as error messages name it."""
        return self.input_type.__name__

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

    def failures(self, message: Envelope, code: FailureCode, text: str, retryable: bool = False) -> list[Outgoing]:
        """The job's ``Failure``; one per job for a message that carries many (``Features.jobs``)."""
        if not (isinstance(message, Features) and message.jobs):
            return [outgoing(self.failure(message, code, text, retryable))]
        return [Outgoing(Failure(**message.job_fields(job), stage=self.name, code=code, message=text,
                                 retryable=retryable), f"failure.{message.model}", traceparent=job.traceparent)
                for job in message.jobs]

    def too_late(self, deadline: datetime) -> str:
        """Why a job whose deadline passed was not started here."""
        return f"the deadline {deadline.isoformat()} passed before stage {self.name!r} started"

    def failure(self, message: Envelope, code: FailureCode, text: str, retryable: bool = False) -> Failure:
        return Failure(
            **message.carried(),
            stage=self.name,
            code=code,
            message=text,
            retryable=retryable,
            part=self.part_of(message),
        )
