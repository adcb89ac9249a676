"""PreprocessStage: ``request.<model>`` -> ``features.<model>`` (validate, decode, scale)."""

from __future__ import annotations

import asyncio
from typing import ClassVar

from brokers.messages import Envelope, FailureCode, Features, InferenceRequest
from brokers.tensors import encode_tensor
from consumers.preprocessing import InputError, InputLimits, image_b64_to_features, rows_to_features
from consumers.registry import ModelManifest
from consumers.stage import Outgoing, Stage, outgoing


class PreprocessStage(Stage):
    kind: ClassVar[str] = "preprocess"
    input_type: ClassVar[type[Envelope]] = InferenceRequest

    def __init__(self, name: str, manifests: dict[str, ModelManifest], limits: InputLimits) -> None:
        super().__init__(name)
        self.manifests = manifests
        self.limits = limits

    async def handle(self, message: Envelope) -> list[Outgoing]:
        assert isinstance(message, InferenceRequest)
        manifest = self.manifests.get(message.model)
        if manifest is None:
            raise InputError(f"unknown model {message.model!r}", FailureCode.UNKNOWN_MODEL)
        if message.instances is not None:
            features = rows_to_features(message.instances, manifest, self.limits)
        elif message.image is not None:
            # Decoding an image is CPU work: keep the event loop free for acks and heartbeats.
            features = await asyncio.to_thread(image_b64_to_features, message.image, manifest, self.limits)
        else:
            raise InputError("'item_id' requests need the data_cache profile, which this stage is not part of")
        return [outgoing(Features(
            id=message.id, model=message.model, created_at=message.created_at, deadline=message.deadline,
            batch_id=message.batch_id, timings=message.timings, tensor=encode_tensor(features),
        ))]
