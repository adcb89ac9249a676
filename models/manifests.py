"""Model manifests: what a model expects (input, labels, preprocessing) and which file holds it.

Committed next to the ONNX files by ``deploy/models/train.py``; pydantic at the boundary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from toposerve.brokers.versions import ModelVersion


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
    version: ModelVersion = "1"  # a manifest without one is version 1
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
