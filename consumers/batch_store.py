"""BatchStoreStage: ``prediction.*`` / ``failure.*`` of batch chunks -> the batch's results in Redis.

A message whose ``batch_id`` names a recorded batch and whose id is one of its chunk
ids (``toposerve.brokers.batches.chunk_id``) is written as that chunk's outcome, and the batch's
counters move in the same Lua script, once per chunk (a redelivery counts nothing).
Any other message (an ordinary job of the batch profile's HTTP ingress) is stored as
a job record, exactly as the ``store`` stage does.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import orjson
from pydantic import Field
from redis.exceptions import RedisError

from toposerve.brokers import (
    BatchStore,
    Envelope,
    Failure,
    JobRecord,
    Prediction,
    ResultStore,
    RowPrediction,
    decode_terminal,
    encode_chunk_error,
    encode_chunk_result,
)
from toposerve.brokers.callbacks import CallbackSender
from toposerve.consumers.stage import Outgoing, Stage, TransientError

log = logging.getLogger(__name__)


class BatchStoreStage(Stage):
    kind: ClassVar[str] = "batch_store"
    input_type: ClassVar[type[Envelope]] = Prediction
    honours_deadline: ClassVar[bool] = False
    outcomes_from_stages_only: ClassVar[bool] = True

    def __init__(self, name: str, batches: BatchStore, results: ResultStore,
                 callbacks: CallbackSender | None = None) -> None:
        super().__init__(name)
        self.batches = batches
        self.results = results
        self.callbacks = callbacks
        self.duplicates = 0

    def decode(self, body: bytes) -> Envelope:
        """Batch chunk predictions skip building one pydantic object per row (the store's main cost)."""
        try:
            fast = _decode_chunk_prediction(body)
        except (ValueError, TypeError, KeyError):
            fast = None
        return fast if fast is not None else decode_terminal(body)

    async def stop(self) -> None:
        if self.callbacks is not None:
            await self.callbacks.close()
        await self.results.client.aclose()
        if self.batches.client is not self.results.client:
            await self.batches.client.aclose()

    async def handle(self, message: Envelope) -> list[Outgoing]:
        assert isinstance(message, Prediction | Failure)
        try:
            if message.batch_id and message.part is None and await self._store_chunk(message):
                return []
            if isinstance(message, ChunkPrediction):  # not a chunk after all: an ordinary job's rows
                message = message.full()
            await self.results.finish(JobRecord.from_terminal(message))
        except RedisError as exc:
            raise TransientError(f"Redis unavailable: {exc}") from exc
        return []

    async def _store_chunk(self, message: Prediction | Failure) -> bool:
        assert message.batch_id is not None
        manifest = await self.batches.manifest(message.batch_id, cached=True)
        if manifest is None:
            return False
        index = self.batches.chunk_index(manifest, message.id)
        if index is None:
            return False
        if isinstance(message, ChunkPrediction):
            payload = encode_chunk_result(message.model_version, message.class_indices, message.probabilities)
            ok, failed = len(message.class_indices), 0
        elif isinstance(message, Prediction):
            payload = encode_chunk_result(
                message.model_version,
                [row.class_index for row in message.rows],
                [row.probabilities for row in message.rows],
            )
            ok, failed = len(message.rows), 0
        else:
            meta = await self.batches.chunk_meta(manifest.id, index)
            sent = meta.sent if meta is not None else len(manifest.chunk_range(index))
            payload = encode_chunk_error(str(message.code), message.message, message.stage)
            ok, failed = 0, sent
        if not await self.batches.complete_chunk(manifest.id, index, payload, ok, failed):
            self.duplicates += 1
            log.info("batch %s chunk %d was already stored (a redelivery); counted once", manifest.id, index)
        if self.callbacks is not None:  # a redelivery too: the registration is taken once
            await self._call_back_when_complete(manifest.id)
        return True

    async def _call_back_when_complete(self, batch_id: str) -> None:
        """The batch's webhook, with its status, once its last chunk is in (whichever replica sees it
        first: the registration is taken once)."""
        assert self.callbacks is not None
        status = await self.batches.status(batch_id)
        if status is None or status.state == "running":
            return
        await self.callbacks.send(batch_id, status.model_dump_json().encode(),
                                  lambda delivery: self.batches.record_callback(batch_id, delivery))


class ChunkPrediction(Prediction):
    """A ``Prediction`` whose rows were read as two plain lists (class indices, probabilities)."""

    class_indices: list[int] = Field(default_factory=list, exclude=True)
    probabilities: list[list[float]] = Field(default_factory=list, exclude=True)
    raw_rows: list[dict] = Field(default_factory=list, exclude=True, repr=False)

    def full(self) -> Prediction:
        data = self.model_dump(exclude={"rows", "kind"})
        return Prediction(**data, rows=[RowPrediction.model_validate(row) for row in self.raw_rows])


def _decode_chunk_prediction(body: bytes) -> ChunkPrediction | None:
    data = orjson.loads(body)
    if not isinstance(data, dict) or data.get("kind") != "prediction" or not data.get("batch_id") \
            or data.get("part") is not None:
        return None
    rows = data.pop("rows")
    if not isinstance(rows, list):
        return None
    indices = [row["class_index"] for row in rows]
    probabilities = [row["probabilities"] for row in rows]
    # The checks pydantic would make, on whole lists at once.
    if not all(type(i) is int for i in indices) or not all(type(p) is list for p in probabilities):
        return None
    if not all(type(v) in (float, int) for p in probabilities for v in p):
        return None
    message = ChunkPrediction.model_validate({**data, "rows": []})
    message.class_indices, message.probabilities, message.raw_rows = indices, probabilities, rows
    return message
