"""The committed model artifacts (deploy/models) and sample images (deploy/samples/digits).

No services and no scikit-learn needed: only the manifest, the ONNX files,
onnxruntime and Pillow. Regenerate the artifacts with deploy/models/train.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
MODELS_DIR = REPO / "deploy" / "models"
SAMPLES_DIR = REPO / "deploy" / "samples" / "digits"

EXPECTED_MODELS = (
    "iris",
    "iris_setosa",
    "iris_versicolor",
    "iris_virginica",
    "digits_fast",
    "digits_accurate",
)
DIGIT_MODELS = ("digits_fast", "digits_accurate")
SAMPLE_FILES = sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix in {".png", ".jpg"})

# One textbook flower of each species (rows 0, 50 and 100 of the iris data).
IRIS_ROWS = np.array(
    [[5.1, 3.5, 1.4, 0.2], [7.0, 3.2, 4.7, 1.4], [6.3, 3.3, 6.0, 2.5]], dtype=np.float32
)
IRIS_EXPECTED = {
    "iris": [0, 1, 2],
    # binary models: index 0 = the named species, 1 = the rest
    "iris_setosa": [0, 1, 1],
    "iris_versicolor": [1, 0, 1],
    "iris_virginica": [1, 1, 0],
}


def image_features(path: Path, preprocessing: dict[str, Any]) -> np.ndarray:
    """Stand-in for the real preprocessing module: image file -> float32 [1, w*h]."""
    with Image.open(path) as image:
        small = image.convert(preprocessing["mode"]).resize(
            (preprocessing["width"], preprocessing["height"]),
            Image.Resampling[preprocessing["resample"].upper()],
        )
    pixels = np.asarray(small, dtype=np.float32)
    if preprocessing["invert"]:
        pixels = 255.0 - pixels
    return (pixels * preprocessing["scale"]).astype(np.float32).reshape(1, -1)


def sample_label(path: Path) -> int:
    return int(path.stem.split("_")[1])  # digit_<label>_<size>[_<mode>]


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return json.loads((MODELS_DIR / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def sessions(manifest: dict[str, Any]) -> dict[str, ort.InferenceSession]:
    return {
        name: ort.InferenceSession(
            str(MODELS_DIR / entry["file"]), providers=["CPUExecutionProvider"]
        )
        for name, entry in manifest["models"].items()
    }


def test_manifest_lists_every_model_with_its_contract(manifest: dict[str, Any]) -> None:
    assert sorted(manifest["models"]) == sorted(EXPECTED_MODELS)
    for name, entry in manifest["models"].items():
        assert entry["name"] == name
        assert entry["file"] == f"{name}.onnx"
        assert entry["input"]["name"] == "float_input"
        assert entry["input"]["dtype"] == "float32"
        assert entry["input"]["shape"] == [None, len(entry["input"]["features"])]
        assert entry["outputs"] == {"label": "label", "probabilities": "probabilities"}
        assert entry["preprocessing"]["kind"] in {"tabular", "image"}
        assert 0.0 < entry["metrics"]["test_accuracy"] <= 1.0
    assert manifest["models"]["iris"]["labels"] == ["setosa", "versicolor", "virginica"]
    assert manifest["models"]["iris_setosa"]["labels"][0] == "setosa"
    for name in DIGIT_MODELS:
        assert manifest["models"][name]["labels"] == [str(d) for d in range(10)]
        assert manifest["models"][name]["input"]["shape"] == [None, 64]


@pytest.mark.parametrize("name", EXPECTED_MODELS)
def test_file_matches_manifest_sha256(manifest: dict[str, Any], name: str) -> None:
    entry = manifest["models"][name]
    digest = hashlib.sha256((MODELS_DIR / entry["file"]).read_bytes()).hexdigest()
    assert digest == entry["sha256"]


def batch_of_three(manifest: dict[str, Any], name: str) -> tuple[np.ndarray, list[int]]:
    """Three input rows for a model and their expected labels."""
    if name in IRIS_EXPECTED:
        return IRIS_ROWS, IRIS_EXPECTED[name]
    preprocessing = manifest["models"][name]["preprocessing"]
    files = SAMPLE_FILES[:3]
    rows = np.concatenate([image_features(path, preprocessing) for path in files])
    return rows, [sample_label(path) for path in files]


@pytest.mark.parametrize("name", EXPECTED_MODELS)
def test_model_runs_on_a_batch_of_three(
    manifest: dict[str, Any], sessions: dict[str, ort.InferenceSession], name: str
) -> None:
    n_classes = len(manifest["models"][name]["labels"])
    rows, expected = batch_of_three(manifest, name)
    labels, probabilities = sessions[name].run(["label", "probabilities"], {"float_input": rows})
    assert labels.dtype == np.int64 and labels.shape == (3,)
    assert probabilities.dtype == np.float32 and probabilities.shape == (3, n_classes)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert labels.tolist() == expected


def test_accurate_digits_model_is_more_accurate(manifest: dict[str, Any]) -> None:
    metrics = {name: manifest["models"][name]["metrics"] for name in DIGIT_MODELS}
    assert metrics["digits_accurate"]["test_accuracy"] > metrics["digits_fast"]["test_accuracy"]


def test_there_are_samples_in_several_modes() -> None:
    assert len(SAMPLE_FILES) >= 6
    modes = set()
    for path in SAMPLE_FILES:
        with Image.open(path) as image:
            modes.add(image.mode)
    assert {"L", "RGB", "RGBA", "P"} <= modes


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("name", DIGIT_MODELS)
def test_sample_image_is_classified_as_its_label(
    manifest: dict[str, Any], sessions: dict[str, ort.InferenceSession], name: str, path: Path
) -> None:
    features = image_features(path, manifest["models"][name]["preprocessing"])
    assert features.shape == (1, 64)
    labels, _ = sessions[name].run(["label", "probabilities"], {"float_input": features})
    assert int(labels[0]) == sample_label(path)


def consistency_grid(name: str, manifest: dict[str, Any]) -> np.ndarray:
    """Inputs spread over what callers send, where classes meet included."""
    if name in IRIS_EXPECTED:
        # 480 realistic rows over the measured ranges (cm), and the book's [[1, 2, 3, 4]].
        axes = [np.linspace(4.3, 7.9, 6), np.linspace(2.0, 4.4, 5), np.linspace(1.0, 6.9, 4), np.linspace(0.1, 2.5, 4)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 4)
        return np.concatenate([grid, [[1.0, 2.0, 3.0, 4.0], [4.5, 2.2, 5.5, 1.4]]]).astype(np.float32)
    preprocessing = manifest["models"][name]["preprocessing"]
    samples = np.concatenate([image_features(path, preprocessing) for path in SAMPLE_FILES])
    rng = np.random.default_rng(7)
    a, b = rng.integers(0, len(samples), (2, 400))
    weights = rng.uniform(0.2, 0.8, (400, 1)).astype(np.float32)
    blends = weights * samples[a] + (1 - weights) * samples[b]
    noise = rng.uniform(0, 16, (200, 64)).astype(np.float32)
    return np.concatenate([samples, blends, noise]).astype(np.float32)


@pytest.mark.parametrize("name", EXPECTED_MODELS)
def test_the_label_is_always_the_most_probable_class(
    manifest: dict[str, Any], sessions: dict[str, ort.InferenceSession], name: str
) -> None:
    """An answer must not contradict itself, anywhere on a grid of inputs (an RBF SVC's
    decision function and its Platt-scaled probabilities disagreed on about 10 % of iris rows)."""
    grid = consistency_grid(name, manifest)
    labels, probabilities = sessions[name].run(["label", "probabilities"], {"float_input": grid})
    contradicting = np.flatnonzero(labels != probabilities.argmax(axis=1))
    assert contradicting.size == 0, (
        f"{name}: {contradicting.size} of {len(grid)} rows, e.g. {grid[contradicting[0]].tolist()} -> label "
        f"{labels[contradicting[0]]} with probabilities {probabilities[contradicting[0]].round(3).tolist()}")
