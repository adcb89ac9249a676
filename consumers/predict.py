"""PredictStage: ``features.<model>`` -> ``prediction.<model>`` with ONNX Runtime and micro-batching."""

from __future__ import annotations

import asyncio
from typing import ClassVar

import numpy as np

from toposerve.brokers import Envelope, FailureCode, Features, Prediction
from toposerve.consumers.batching import MicroBatcher
from toposerve.consumers.metrics import StageMetrics
from toposerve.consumers.stage import Outgoing, Stage, outgoing
from toposerve.models import (
    InputError,
    LoadedModel,
    ModelRegistry,
    TensorError,
    check_features,
    decode_tensor,
    to_row_predictions,
)


class PredictStage(Stage):
    kind: ClassVar[str] = "predict"
    input_type: ClassVar[type[Envelope]] = Features

    def __init__(
        self,
        name: str,
        registry: ModelRegistry,
        models: list[str],
        max_batch_size: int = 64,
        max_batch_delay_ms: float = 2.0,
        max_rows: int = 10_000,
        groups: dict[str, str] | None = None,
        cascade: tuple[float, str] | None = None,
        publishes: str | None = None,
    ) -> None:
        super().__init__(name)
        # A routing-key template ({model}) for predictions that a post-processing stage
        # (``kind: custom``) turns into the job's answer; None: ``prediction.<model>``, final.
        self.publishes = publishes
        self.registry = registry
        self.model_names = models
        # Scatter-gather: features for a group are answered by this stage's member model.
        self.groups = groups or {}
        # Cascade: (threshold, next model): less confident answers go on to the next model.
        self.cascade = cascade
        self.max_rows = max_rows
        self.models: dict[str, LoadedModel] = {}
        self.batcher = MicroBatcher(self._run, max_batch_size=max_batch_size, max_batch_delay_ms=max_batch_delay_ms)

    async def start(self) -> None:
        # Load (and sha256-check) every model before taking a message; in a thread, so the
        # event loop keeps turning (the liveness heartbeat) while a large model loads.
        self.models = await asyncio.to_thread(self.registry.load_all, self.model_names)

    async def stop(self) -> None:
        await self.batcher.close()

    def instrument(self, metrics: StageMetrics) -> None:
        self.batcher.observe_batch = metrics.batch_size.observe

    def _run(self, model: str, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.models[model].run(features)

    def part_of(self, message: Envelope) -> str | None:
        return self.groups.get(message.model)

    async def handle(self, message: Envelope) -> list[Outgoing]:
        assert isinstance(message, Features)
        part = self.part_of(message)
        loaded = self.models.get(part or message.model)
        if loaded is None:
            raise InputError(f"model {message.model!r} is not served by stage {self.name!r}",
                             FailureCode.UNKNOWN_MODEL)
        try:
            array = decode_tensor(message.tensor)
        except TensorError as exc:
            raise InputError(str(exc), FailureCode.INVALID_MESSAGE) from exc
        features = check_features(array, loaded.manifest, self.max_rows)
        class_indices, probabilities = await self.batcher.submit(loaded.manifest.name, features)
        if self.cascade is not None and part is None:
            threshold, next_model = self.cascade
            if float(probabilities.max(axis=1).min()) < threshold:
                # Not sure enough about every row: the next model answers instead (same job).
                return [outgoing(message.model_copy(update={"model": next_model}))]
        prediction = Prediction(
            **message.carried(), model_version=loaded.manifest.version, part=part,
            answered_by=loaded.manifest.name,
            rows=to_row_predictions(class_indices, probabilities, loaded.manifest.labels),
        )
        if self.publishes is not None:
            return [Outgoing(prediction, self.publishes.format(kind=prediction.kind, model=prediction.model),
                             final=False)]
        return [outgoing(prediction)]
