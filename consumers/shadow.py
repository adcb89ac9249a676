"""ShadowStage: a copy of every ``features.<model>`` job, run on the serving and the shadow version, compared.

Its queue is a second binding on the model's features keys, so the shadow sees what the predict
stage sees, through the topology, and answers nobody: it returns no message (nothing reaches a
caller's reply queue), it records per job whether the two versions agreed (brokers/shadow_store.py).
The serving version's labels are recomputed here on the same rows (the same file and input, so the
same answer as the caller got) rather than joined from the predict stage's answer, which sync
profiles send only to the caller; so both versions are also timed on the same machine, side by side.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import ClassVar

import numpy as np
from redis.exceptions import RedisError

from toposerve.brokers import Envelope, Features, ShadowComparison, ShadowStore, VersionPolicy, choose_version
from toposerve.consumers.predict import load_checked_version
from toposerve.consumers.stage import Outgoing, Stage, TransientError
from toposerve.models import (
    InputError,
    LoadedModel,
    ModelLoadError,
    ModelRegistry,
    TensorError,
    check_features,
    decode_tensor,
)

log = logging.getLogger(__name__)


def labels_of(loaded: LoadedModel, features: np.ndarray) -> tuple[list[str], float]:
    """The version's label per row, and the milliseconds it took."""
    started = time.perf_counter()
    indices, _ = loaded.run(features)
    return [loaded.manifest.labels[i] for i in indices], (time.perf_counter() - started) * 1000


class ShadowStage(Stage):
    kind: ClassVar[str] = "shadow"
    input_type: ClassVar[type[Envelope]] = Features
    # Never a deadline Failure: a caller must only ever get the serving version's answer.
    honours_deadline: ClassVar[bool] = False

    def __init__(self, name: str, registry: ModelRegistry, policies: dict[str, VersionPolicy], store: ShadowStore,
                 max_rows: int = 10_000) -> None:
        super().__init__(name)
        self.registry = registry
        self.policies = {model: policy for model, policy in policies.items() if policy.shadow is not None}
        self.store = store
        self.max_rows = max_rows
        self.loaded: dict[tuple[str, str], LoadedModel] = {}

    async def start(self) -> None:
        def load() -> dict[tuple[str, str], LoadedModel]:
            loaded = {}
            for model, policy in self.policies.items():
                serving = self.registry.load(model, policy.serve)
                loaded[(model, policy.serve or serving.manifest.version)] = serving
                for version in self.registry.versions[model]:
                    try:
                        loaded[(model, version)] = load_checked_version(self.registry, serving, version)
                    except ModelLoadError as exc:
                        if version == policy.shadow:
                            raise
                        log.warning("stage %s does not load %s@%s: %s", self.name, model, version, exc)
            return loaded
        self.loaded = await asyncio.to_thread(load)

    async def stop(self) -> None:
        await self.store.client.aclose()

    async def handle(self, message: Envelope) -> list[Outgoing]:
        assert isinstance(message, Features)
        policy = self.policies.get(message.model)
        if policy is None or policy.shadow is None:
            return []
        serve_version = message.version or (choose_version(policy.serve, policy.canary, message.id)
                                             if policy.serve is not None else None)  # as the predict stage does
        if serve_version == policy.shadow or serve_version is None:
            return []  # a job for the shadow version itself: nothing to compare it with
        serving, shadow = self.loaded.get((message.model, serve_version)), self.loaded[(message.model, policy.shadow)]
        if serving is None:
            return []
        try:
            jobs = self._jobs(message, serving)
        except (InputError, TensorError):
            return []  # the predict stage fails this job; the shadow has nothing to say
        comparisons = []
        for job_id, features in jobs:
            serve_labels, serve_ms = labels_of(serving, features)
            shadow_labels, shadow_ms = labels_of(shadow, features)
            comparisons.append(ShadowComparison(
                id=job_id, model=message.model, serve_version=serve_version, shadow_version=policy.shadow,
                agreed=serve_labels == shadow_labels, serve_labels=serve_labels, shadow_labels=shadow_labels,
                serve_ms=round(serve_ms, 4), shadow_ms=round(shadow_ms, 4), inputs=features.tolist()))
        try:
            for comparison in comparisons:
                await self.store.record(comparison)
        except RedisError as exc:
            raise TransientError(f"Redis unavailable: {exc}") from exc
        return []

    def _jobs(self, message: Features, serving: LoadedModel) -> list[tuple[uuid.UUID, np.ndarray]]:
        """Each job's id and checked rows (a coalesced message carries many)."""
        array = decode_tensor(message.tensor)
        if not message.jobs:
            return [(message.id, check_features(array, serving.manifest, self.max_rows))]
        jobs, start = [], 0
        for job in message.jobs:
            jobs.append((job.id, check_features(array[start:start + job.rows], serving.manifest, self.max_rows)))
            start += job.rows
        return jobs
