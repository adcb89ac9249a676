"""PreprocessStage: ``request.<model>`` -> ``features.<model>`` (validate, decode, scale).

Data-cache profiles: a request may name an item; the stage loads it from its
sources (a directory, Redis), preprocesses it once and keeps the tensor in Redis,
so the next request for that item skips loading and decoding.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import ClassVar

import numpy as np
from redis.exceptions import RedisError

from toposerve.brokers import Envelope, FailureCode, FeatureCache, InferenceRequest, feature_key, prediction_key
from toposerve.consumers.stage import Outgoing, Stage, outgoing
from toposerve.models import (
    ImagePreprocessing,
    InputError,
    InputLimits,
    ItemSource,
    ModelManifest,
    check_item_id,
    derived_features,
    image_b64_to_features,
    image_to_features,
    open_image,
    rows_to_features,
)

log = logging.getLogger(__name__)


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 3)


class PreprocessStage(Stage):
    kind: ClassVar[str] = "preprocess"
    input_type: ClassVar[type[Envelope]] = InferenceRequest

    def __init__(
        self,
        name: str,
        manifests: dict[str, ModelManifest],
        limits: InputLimits,
        *,
        namespace: str = "toposerve",
        items: list[ItemSource] | None = None,
        feature_cache: FeatureCache | None = None,
        key_predictions: bool = False,
    ) -> None:
        super().__init__(name)
        self.manifests = manifests
        self.limits = limits
        self.namespace = namespace
        self.items = items or []
        self.feature_cache = feature_cache
        # prediction_cache profiles: requests from other publishers get a cache key
        # too, so their answers fill the cache as the ingress's do.
        self.key_predictions = key_predictions

    async def handle(self, message: Envelope) -> list[Outgoing]:
        assert isinstance(message, InferenceRequest)
        manifest = self.manifests.get(message.model)
        if manifest is None:
            raise InputError(f"unknown model {message.model!r}", FailureCode.UNKNOWN_MODEL)
        timings = dict(message.timings)
        if message.instances is not None:
            features = rows_to_features(message.instances, manifest, self.limits)
        elif message.image is not None:
            # Decoding an image is CPU work: keep the event loop free for acks and heartbeats.
            features = await asyncio.to_thread(image_b64_to_features, message.image, manifest, self.limits)
        else:
            features = await self._item_features(message.item_id or "", manifest, timings)
        derived = derived_features(message, features, timings)
        if self.key_predictions and derived.cache_key is None:
            derived.cache_key = prediction_key(self.namespace, manifest.name, manifest.version, features)
        return [outgoing(derived)]

    async def _item_features(self, item_id: str, manifest: ModelManifest, timings: dict[str, float]) -> np.ndarray:
        check_item_id(item_id)  # before any lookup: publishers other than the ingress reach us too
        if not self.items:
            raise InputError("'item_id' needs a data-cache profile; this stage has no item sources")
        if not isinstance(manifest.preprocessing, ImagePreprocessing):
            raise InputError(f"model {manifest.name!r} takes 'instances'; items are images")
        key = feature_key(self.namespace, manifest.name, manifest.version, item_id)
        started = time.perf_counter()
        if self.feature_cache is not None:
            try:
                cached = await self.feature_cache.get(key)
            except RedisError as exc:
                log.warning("feature cache unavailable (%s): loading %s from its source", exc, item_id)
                cached = None
            if cached is not None:
                timings["item_cache_hit_ms"] = _ms(started)
                return cached
        started = time.perf_counter()
        raw = await self._load(item_id)
        timings["item_load_ms"] = _ms(started)
        started = time.perf_counter()
        features = await asyncio.to_thread(
            lambda: image_to_features(open_image(raw, self.limits), manifest.preprocessing))
        timings["item_decode_ms"] = _ms(started)
        if self.feature_cache is not None:
            try:
                await self.feature_cache.put(key, features)
            except RedisError as exc:
                log.warning("feature cache unavailable (%s): %s not cached", exc, item_id)
        return features

    async def _load(self, item_id: str) -> bytes:
        for source in self.items:
            try:
                raw = await source.load(item_id)
            except RedisError as exc:
                log.warning("item source %s unavailable (%s)", source.name, exc)
                continue
            if raw is not None:
                return raw
        names = ", ".join(source.name for source in self.items)
        raise InputError(f"no item {item_id!r} in the data sources ({names})", FailureCode.UNKNOWN_ITEM)
