"""AggregateStage: joins a model group's partial answers into one (scatter-gather).

A group request is published once; each member's predict stage answers with
``prediction.<group>.<member>`` (or ``failure.<group>.<member>``). This stage keeps
the parts in Redis (brokers/joins.py) and publishes one combined answer on
``prediction.<group>`` when every member has answered, or when the group's join
timeout passes (a tick that comes back through a delay queue, so no replica has
to stay alive to keep the timer) with the parts that arrived and each part's status.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import TypeAdapter
from redis.exceptions import RedisError

from toposerve.brokers import (
    Envelope,
    Failure,
    FailureCode,
    JoinStore,
    JoinTick,
    PartResult,
    Prediction,
    QueueSpec,
    RowPrediction,
    decode_terminal,
    exchange_name,
)
from toposerve.consumers.stage import Outgoing, Stage, TransientError, outgoing

_INPUT = TypeAdapter(Prediction | Failure | JoinTick)


def combine(
    message: Envelope, members: list[str], species: list[str], parts: dict[str, Prediction | Failure], stage: str,
    partial_answers: bool = False,
) -> Prediction | Failure:
    """Pure: members' parts -> the group's answer.

    Each row's label is the species of the most confident member. With every member
    answered that is the answer. When some did not: with ``partial_answers`` off the
    job fails (``incomplete``); on, the answer says ``partial``, the missing members'
    probabilities are null (never an invented 0), and a row is labelled only when a
    member that answered claims it (class-0 probability of at least 0.5), else its
    label is null: the member that did not answer may be the one it belongs to.
    """
    status: dict[str, PartResult] = {}
    answered: dict[str, Prediction] = {}
    for member in members:
        part = parts.get(member)
        if isinstance(part, Prediction):
            answered[member] = part
            status[member] = PartResult(status="succeeded", model_version=part.model_version)
        elif isinstance(part, Failure):
            status[member] = PartResult(status="failed", error=f"{part.code.value}: {part.message}")
        else:
            status[member] = PartResult(status="missing", error="no answer within the join timeout")
    fields = {**message.carried(), "part": None}
    summary = "; ".join(f"{m}: {s.status}" + (f" ({s.error})" if s.error else "")
                        for m, s in status.items() if s.status != "succeeded")
    if not answered:
        return Failure(**fields, stage=stage, code=FailureCode.INTERNAL, message=f"no member model answered: {summary}")
    partial = len(answered) < len(members)
    if partial and not partial_answers:
        return Failure(**fields, stage=stage, code=FailureCode.INCOMPLETE,
                       message=f"{len(members) - len(answered)} of {len(members)} member models did not answer "
                               f"({summary}); this group does not give partial answers")
    first = next(iter(answered.values()))
    rows = []
    for index in range(len(first.rows)):
        # Members are binary with class 0 = their species (see deploy/models/manifest.json).
        scores = {m: p.rows[index].probabilities[0] for m, p in answered.items()}
        best = max(scores, key=scores.__getitem__)
        claimed = not partial or scores[best] >= 0.5
        rows.append(RowPrediction(label=species[members.index(best)] if claimed else None,
                                  class_index=members.index(best) if claimed else None,
                                  probabilities=[scores.get(m) for m in members], scores=scores))
    version = "+".join(f"{m}:{p.model_version}" for m, p in answered.items())
    return Prediction(**fields, model_version=version, rows=rows, parts=status, partial=partial)


def delay_queue(namespace: str, stage_queue: str, group: str, join_timeout_s: float) -> QueueSpec:
    """Holds each job's timeout tick for the join timeout, then routes it to ``join.<group>``."""
    return QueueSpec(
        name=f"{stage_queue}.delay",
        binding_keys=[f"join-wait.{group}"],
        message_ttl_ms=max(1, int(join_timeout_s * 1000)),
        dead_letter_exchange=exchange_name(namespace),
        dead_letter_routing_key=f"join.{group}",
    )


class AggregateStage(Stage):
    kind: ClassVar[str] = "aggregate"
    input_type: ClassVar[type[Envelope]] = Prediction
    honours_deadline: ClassVar[bool] = False  # a join must end even when its caller has gone
    outcomes_from_stages_only: ClassVar[bool] = True

    def __init__(self, name: str, group: str, members: list[str], species: list[str], joins: JoinStore,
                 extra_queues: list[QueueSpec], partial_answers: bool = False) -> None:
        super().__init__(name)
        self.partial_answers = partial_answers
        self.group = group
        self.members = members
        self.species = species
        self.joins = joins
        self.extra_queues = extra_queues

    def decode(self, body: bytes) -> Envelope:
        return _INPUT.validate_json(body)

    async def stop(self) -> None:
        await self.joins.client.aclose()

    async def handle(self, message: Envelope) -> list[Outgoing]:
        try:
            return await self._handle(message)
        except RedisError as exc:
            raise TransientError(f"Redis unavailable: {exc}") from exc

    async def _handle(self, message: Envelope) -> list[Outgoing]:
        outputs: list[Outgoing] = []
        if isinstance(message, Prediction | Failure):
            if message.part not in self.members:
                return []  # not one of this group's members: nothing to join
            first = await self.joins.add_part(message.id, message.part, message.model_dump_json())
            if first:
                tick = JoinTick(**{**message.carried(), "model": self.group})
                outputs.append(Outgoing(body=tick, routing_key=f"join-wait.{self.group}"))
        parts = {m: decode_terminal(raw.encode()) for m, raw in (await self.joins.parts(message.id)).items()}
        timed_out = isinstance(message, JoinTick)
        if not timed_out and len(parts) < len(self.members):
            return outputs
        combined = combine(message, self.members, self.species, parts, self.name, self.partial_answers)
        decider = "tick" if timed_out else f"part:{message.part}"
        decision = await self.joins.decide(message.id, combined.model_dump_json(), decider)
        if decision.ours:  # another input decided and publishes (or its redelivery will)
            outputs.append(outgoing(decode_terminal(decision.answer.encode())))
        return outputs
