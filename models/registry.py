"""The model registry: manifests (what a model expects) and ONNX sessions (how it runs).

The manifest is committed next to the ONNX files by ``deploy/models/train.py``.
Loading a model checks the file's sha256 against the manifest, so a swapped or
corrupted file is refused instead of served.
"""

from __future__ import annotations

import hashlib
import time
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, Field


class TabularPreprocessing(BaseModel):
    kind: Literal["tabular"] = "tabular"


class ImagePreprocessing(BaseModel):
    """How images become features; must match how the model was trained."""

    kind: Literal["image"] = "image"
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    mode: Literal["L"] = "L"
    resample: Literal["box", "bilinear", "nearest", "lanczos"] = "box"
    scale: float = Field(gt=0, description="feature = pixel (0..255) * scale")
    invert: bool = False


Preprocessing = Annotated[TabularPreprocessing | ImagePreprocessing, Field(discriminator="kind")]


class InputSpec(BaseModel):
    name: str
    dtype: Literal["float32"]
    shape: list[int | None]
    features: list[str]


class ModelManifest(BaseModel):
    name: str
    version: str
    file: str
    sha256: str
    description: str = ""
    input: InputSpec
    outputs: dict[str, str]
    labels: list[str]
    preprocessing: Preprocessing
    metrics: dict[str, float | int] = Field(default_factory=dict)
    training: dict[str, object] = Field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return len(self.input.features)


class Manifest(BaseModel):
    models: dict[str, ModelManifest]


class ModelLoadError(RuntimeError):
    pass


def load_manifests(models_dir: Path) -> dict[str, ModelManifest]:
    path = models_dir / "manifest.json"
    try:
        return Manifest.model_validate_json(path.read_bytes()).models
    except OSError as exc:
        raise ModelLoadError(f"cannot read the model manifest {path}: {exc}") from exc


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class LoadedModel:
    """An ONNX Runtime session with its manifest; ``run`` is safe to call from a worker thread."""

    def __init__(self, manifest: ModelManifest, session: ort.InferenceSession) -> None:
        self.manifest = manifest
        self.session = session
        self._outputs = [manifest.outputs["label"], manifest.outputs["probabilities"]]

    def run(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class indices [N] and probabilities [N, n_classes] for a float32 batch [N, n_features]."""
        labels, probabilities = self.session.run(self._outputs, {self.manifest.input.name: features})
        return np.asarray(labels, dtype=np.int64), np.asarray(probabilities, dtype=np.float32)

    def seconds_per_run(self, rows: int, repeats: int = 5) -> float:
        """The median time of a run on ``rows`` rows of zeros, after one warm-up run (which also
        spares the first caller ONNX Runtime's first-run setup)."""
        features = np.zeros((rows, self.manifest.n_features), dtype=np.float32)  # what check_features admits
        self.run(features)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            self.run(features)
            times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2]


class ModelRegistry:
    def __init__(self, models_dir: Path, intra_op_threads: int = 1) -> None:
        self.models_dir = models_dir
        self.intra_op_threads = intra_op_threads
        self._loaded: dict[str, LoadedModel] = {}

    @cached_property
    def manifests(self) -> dict[str, ModelManifest]:
        return load_manifests(self.models_dir)

    def manifest(self, name: str) -> ModelManifest | None:
        return self.manifests.get(name)

    def load(self, name: str) -> LoadedModel:
        if name in self._loaded:
            return self._loaded[name]
        manifest = self.manifests.get(name)
        if manifest is None:
            raise ModelLoadError(f"model {name!r} is not in {self.models_dir / 'manifest.json'}")
        path = self.models_dir / manifest.file
        if not path.is_file():
            raise ModelLoadError(f"model file {path} is missing")
        actual = file_sha256(path)
        if actual != manifest.sha256:
            raise ModelLoadError(f"model file {path} has sha256 {actual}, the manifest says {manifest.sha256}")
        options = ort.SessionOptions()
        # Stages are separate processes on few cores: one thread each avoids oversubscription.
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        loaded = LoadedModel(manifest, session)
        self._loaded[name] = loaded
        return loaded

    def load_all(self, names: list[str]) -> dict[str, LoadedModel]:
        return {name: self.load(name) for name in names}
