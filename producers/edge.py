"""Local inference on an edge client: cached models, the server's own preprocessing, telemetry windows.

Nothing here needs a network. Inputs become features with the very functions the
server's ingress and preprocess stage use (``toposerve.models.preprocessing``), the model
is loaded by the same registry (sha256 checked), and outputs become
``RowPrediction``s with the predict stage's ``to_row_predictions``, so an edge
answer equals the server's for the same input and model version.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toposerve.brokers import CLIENT_ID_PATTERN, FailureCode, Prediction, Telemetry, utc_now
from toposerve.models import (
    ImagePreprocessing,
    InputError,
    InputLimits,
    LoadedModel,
    ModelLoadError,
    ModelManifest,
    image_b64_to_features,
    image_to_features,
    open_image,
    rows_to_features,
    to_row_predictions,
)
from toposerve.producers.durable_files import fsync_dir
from toposerve.producers.edge_cache import CachePointer, EdgeError, ModelCache
from toposerve.producers.edge_telemetry import TelemetryWindow


def client_id_of(root: Path) -> str:
    """This client's stable id, made once per cache directory (a UUID; no hardware ids)."""
    path = root / "client_id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    root.mkdir(parents=True, exist_ok=True)
    temp = root / f".client_id.{uuid.uuid4().hex}"
    temp.write_text(f"edge-{uuid.uuid4()}\n")
    try:
        os.link(temp, path)  # fails if another process made one first: then that one is ours
        fsync_dir(root)
    except FileExistsError:
        pass
    finally:
        temp.unlink(missing_ok=True)
    return path.read_text().strip()


@dataclass(frozen=True)
class EdgeModel:
    pointer: CachePointer
    loaded: LoadedModel

    @property
    def manifest(self) -> ModelManifest:
        return self.loaded.manifest


def load_cached(cache: ModelCache, intra_op_threads: int = 1) -> EdgeModel:
    pointer = cache.current()
    if pointer is None:
        raise EdgeError(f"no cached model {cache.model!r} in {cache.root}; fetch it first with: "
                        f"toposerve edge pull --server URL --model {cache.model}")
    try:
        loaded = cache.registry(pointer, intra_op_threads).load(cache.model)
    except ModelLoadError as exc:
        raise EdgeError(f"the cached model {cache.model!r} cannot be loaded ({exc}); pull it again with --force") \
            from exc
    return EdgeModel(pointer, loaded)


class EdgeRuntime:
    """The models an edge client serves, and the telemetry of what it predicted with them.

    Safe to call from worker threads: a model swap replaces one dict entry (calls in
    flight finish on the version they started with), and windows change under a lock.
    """

    def __init__(self, cache_root: Path, client_id: str, limits: InputLimits | None = None,
                 intra_op_threads: int = 1) -> None:
        if not re.fullmatch(CLIENT_ID_PATTERN, client_id):
            raise EdgeError(f"client id {client_id!r} is not valid (letters, digits, '_.:-', at most 128)")
        self.cache_root = cache_root
        self.client_id = client_id
        self.limits = limits or InputLimits()
        self.intra_op_threads = intra_op_threads
        self._models: dict[str, EdgeModel] = {}
        self._windows: dict[str, TelemetryWindow] = {}
        self._finished: list[Telemetry] = []
        self._lock = threading.Lock()

    # -- models -------------------------------------------------------------------------

    def cache(self, model: str) -> ModelCache:
        return ModelCache(self.cache_root, model)

    def load(self, model: str) -> EdgeModel:
        """Load (or reload) the cache's current version of ``model``."""
        edge = load_cached(self.cache(model), self.intra_op_threads)
        self._models[model] = edge
        return edge

    def reload_if_changed(self, model: str) -> bool:
        pointer = self.cache(model).current()
        loaded = self._models.get(model)
        if pointer is None or (loaded is not None and loaded.pointer.sha256 == pointer.sha256):
            return False
        self.load(model)
        return True

    @property
    def models(self) -> dict[str, EdgeModel]:
        return dict(self._models)

    def manifest(self, model: str) -> ModelManifest | None:
        edge = self._models.get(model)
        return None if edge is None else edge.manifest

    def _model(self, model: str) -> EdgeModel:
        edge = self._models.get(model)
        if edge is None:
            served = ", ".join(sorted(self._models)) or "none"
            raise InputError(f"unknown model {model!r}; this edge client serves: {served}", FailureCode.UNKNOWN_MODEL)
        return edge

    # -- predicting ---------------------------------------------------------------------

    def predict(self, model: str, *, instances: list[list[float]] | None = None, image: str | None = None,
                image_bytes: bytes | None = None) -> Prediction:
        """One request, as the server's pipeline would answer it; raises ``InputError`` for bad input."""
        edge = self._model(model)
        created = utc_now()
        started = time.perf_counter()
        try:
            features = self._features(edge.manifest, instances, image, image_bytes)
        except InputError:
            self._record(model, edge, None, 0.0)
            raise
        preprocessed = time.perf_counter()
        class_indices, probabilities = edge.loaded.run(features)
        rows = to_row_predictions(class_indices, probabilities, edge.manifest.labels)
        done = time.perf_counter()
        self._record(model, edge, [row.label for row in rows], (done - started) * 1000)
        return Prediction(
            id=uuid.uuid4(), model=model, created_at=created, model_version=edge.pointer.version, rows=rows,
            timings={"preprocess_ms": round((preprocessed - started) * 1000, 3),
                     "predict_ms": round((done - preprocessed) * 1000, 3)},
        )

    async def predict_async(self, model: str, *, instances: list[list[float]] | None = None,
                            image: str | None = None) -> Prediction:
        # Decoding and ONNX Runtime release the GIL: a worker thread keeps the event loop free.
        return await asyncio.to_thread(self.predict, model, instances=instances, image=image)

    def _features(self, manifest: ModelManifest, instances: list[list[float]] | None, image: str | None,
                  image_bytes: bytes | None) -> np.ndarray:
        if instances is not None:
            return rows_to_features(instances, manifest, self.limits)
        if image is not None:
            return image_b64_to_features(image, manifest, self.limits)
        if image_bytes is not None:
            if not isinstance(manifest.preprocessing, ImagePreprocessing):
                raise InputError(f"model {manifest.name!r} takes 'instances' (rows of numbers), not an image")
            return image_to_features(open_image(image_bytes, self.limits), manifest.preprocessing)
        raise InputError("send 'instances' or 'image'")

    # -- telemetry ----------------------------------------------------------------------

    def _record(self, model: str, edge: EdgeModel, labels: list[str] | None, latency_ms: float) -> None:
        with self._lock:
            window = self._windows.get(model)
            if window is None or window.model_sha256 != edge.pointer.sha256:
                # A new version starts a new window: a report covers one version.
                if window is not None and not window.empty:
                    self._finished.append(window.to_report(self.client_id))
                window = self._windows[model] = TelemetryWindow(model, edge.pointer.version, edge.pointer.sha256)
            if labels is None:
                window.record_error()
            else:
                window.record(labels, latency_ms)

    def take_reports(self) -> list[Telemetry]:
        """Close every window that saw something and return its report (and any closed earlier)."""
        with self._lock:
            reports, self._finished = self._finished, []
            for model, window in list(self._windows.items()):
                if not window.empty:
                    reports.append(window.to_report(self.client_id))
                    del self._windows[model]
        return reports
