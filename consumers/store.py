"""StoreStage: ``prediction.*`` and ``failure.*`` -> the job's terminal record in Redis."""

from __future__ import annotations

from typing import ClassVar

from redis.exceptions import RedisError

from brokers.messages import Envelope, Failure, Prediction, decode_terminal
from brokers.results import JobRecord, ResultStore
from consumers.stage import Outgoing, Stage, TransientError


class StoreStage(Stage):
    kind: ClassVar[str] = "store"
    input_type: ClassVar[type[Envelope]] = Prediction
    honours_deadline: ClassVar[bool] = False

    def __init__(self, name: str, results: ResultStore) -> None:
        super().__init__(name)
        self.results = results

    def decode(self, body: bytes) -> Envelope:
        return decode_terminal(body)

    async def stop(self) -> None:
        await self.results.client.aclose()

    async def handle(self, message: Envelope) -> list[Outgoing]:
        assert isinstance(message, Prediction | Failure)
        try:
            await self.results.finish(JobRecord.from_terminal(message))
        except RedisError as exc:
            raise TransientError(f"Redis unavailable: {exc}") from exc
        return []
