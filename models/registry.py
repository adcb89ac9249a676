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

import numpy as np
import onnxruntime as ort

from toposerve.models.manifests import (  # noqa: F401 - re-exported: the registry is where callers look
    ImagePreprocessing,
    InputSpec,
    Manifest,
    ModelLoadError,
    ModelManifest,
    Preprocessing,
    TabularPreprocessing,
    load_manifests,
)
from toposerve.models.versions import collect_versions, read_version_manifest, version_manifest_paths


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
    """Every version of every model in ``models_dir``; ``load`` opens (and sha256-checks) one, once."""

    def __init__(self, models_dir: Path, intra_op_threads: int = 1) -> None:
        self.models_dir = models_dir
        self.intra_op_threads = intra_op_threads
        self._loaded: dict[tuple[str, str], LoadedModel] = {}
        self.refused_files: dict[str, str] = {}

    @cached_property
    def manifests(self) -> dict[str, ModelManifest]:
        """Each model's first version (the one ``manifest.json`` describes)."""
        return load_manifests(self.models_dir)

    @cached_property
    def versions(self) -> dict[str, dict[str, ModelManifest]]:
        """Model name -> version -> manifest: ``manifest.json`` and the ``<name>@<version>.json`` files.

        A version file that cannot be read is left out (and kept in ``refused_files`` with the
        reason): a bad file dropped into the directory must not stop the versions that work."""
        extra = []
        for path in version_manifest_paths(self.models_dir):
            try:
                extra.append(read_version_manifest(path))
            except ModelLoadError as exc:
                self.refused_files[path.name] = str(exc)
        return collect_versions(self.manifests, extra)

    def rescan(self) -> dict[str, dict[str, ModelManifest]]:
        """Read the version files again (a version may have been dropped in); loaded sessions stay."""
        self.__dict__.pop("versions", None)
        self.refused_files = {}
        return self.versions

    def manifest(self, name: str, version: str | None = None) -> ModelManifest | None:
        if version is None:
            return self.manifests.get(name)
        return self.versions.get(name, {}).get(version)

    def load(self, name: str, version: str | None = None) -> LoadedModel:
        manifest = self.manifest(name, version)
        if manifest is None:
            known = sorted(self.versions.get(name, {}))
            raise ModelLoadError(f"model {name!r} has no version {version!r} in {self.models_dir} (versions: {known})"
                                 if version is not None and known else
                                 f"model {name!r} is not in {self.models_dir / 'manifest.json'}")
        key = (manifest.name, manifest.version)
        if key not in self._loaded:
            self._loaded[key] = open_model(self.models_dir, manifest, self.intra_op_threads)
        return self._loaded[key]

    def load_all(self, names: list[str]) -> dict[str, LoadedModel]:
        return {name: self.load(name) for name in names}

    def load_versions(self, name: str, versions: list[str]) -> dict[str, LoadedModel]:
        return {version: self.load(name, version) for version in versions}


def open_model(models_dir: Path, manifest: ModelManifest, intra_op_threads: int = 1) -> LoadedModel:
    """An ONNX Runtime session for ``manifest``'s file, refused unless the file is there and has its sha256."""
    path = models_dir / manifest.file
    if not path.is_file():
        raise ModelLoadError(f"model file {path} is missing")
    actual = file_sha256(path)
    if actual != manifest.sha256:
        raise ModelLoadError(f"model file {path} has sha256 {actual}, the manifest says {manifest.sha256}")
    options = ort.SessionOptions()
    # Stages are separate processes on few cores: one thread each avoids oversubscription.
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types for a file it cannot load
        raise ModelLoadError(f"model file {path} does not load in ONNX Runtime: {exc}") from exc
    return LoadedModel(manifest, session)
