"""Train toposerve's demo models and export them to ONNX, deterministically.

Run with ``.venv/bin/python deploy/models/train.py`` (needs the ``train`` extra:
scikit-learn, skl2onnx, onnx, plus onnxruntime and Pillow). It writes next to
itself:

* ``<name>.onnx`` for every model in ``MODEL_SPECS`` and ``manifest.json``
  describing them (input contract, labels, preprocessing, metrics, provenance);
* sample digit images in ``deploy/samples/digits/`` (see ``render_samples``).

Everything is derived from data bundled with scikit-learn (no downloads) with a
fixed, stratified split and fixed seeds, so the committed ``.onnx`` files can be
reproduced byte for byte: ``train.py --check`` retrains in a temporary folder
and fails if any hash differs from the committed manifest.

ONNX contract shared by every model (the serving side relies on it):

* one input ``float_input``: float32 ``[N, n_features]`` (dynamic batch axis);
* output ``label``: int64 ``[N]``, the class *index* into the manifest's labels;
* output ``probabilities``: float32 ``[N, n_classes]`` (``zipmap`` disabled, so
  a plain tensor rather than a list of dicts).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import skl2onnx
import sklearn
from PIL import Image
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.calibration import CalibratedClassifierCV
from sklearn.datasets import load_digits, load_iris
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.naive_bayes import GaussianNB
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import PolynomialFeatures, StandardScaler
from sklearn.svm import SVC

HERE = Path(__file__).resolve().parent
DEFAULT_SAMPLES_DIR = HERE.parent / "samples" / "digits"
MANIFEST_NAME = "manifest.json"

RANDOM_STATE = 0
TEST_SIZE = 0.25
TARGET_OPSET = 15  # old enough for any onnxruntime the project supports (>=1.17)
INPUT_NAME = "float_input"
LABEL_OUTPUT = "label"
PROBABILITIES_OUTPUT = "probabilities"

IRIS_LABELS = ("setosa", "versicolor", "virginica")
IRIS_FEATURES = ("sepal_length_cm", "sepal_width_cm", "petal_length_cm", "petal_width_cm")
DIGIT_LABELS = tuple(str(d) for d in range(10))
DIGIT_FEATURES = tuple(f"pixel_{row}_{col}" for row in range(8) for col in range(8))

# load_digits pixels are ink intensities 0..16 (white ink on black). An 8-bit
# greyscale pixel p (0..255) therefore maps to the feature p * 16 / 255.
DIGIT_MAX = 16
TABULAR_PREPROCESSING: dict[str, Any] = {"kind": "tabular"}
DIGITS_PREPROCESSING: dict[str, Any] = {
    "kind": "image",
    "width": 8,
    "height": 8,
    "mode": "L",
    "resample": "box",
    "scale": DIGIT_MAX / 255,
    "invert": False,
}

# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Split:
    """A dataset after the fixed stratified split; X is float32 throughout."""

    dataset: str
    X_train: np.ndarray
    X_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray


def split_dataset(dataset: str, X: np.ndarray, y: np.ndarray) -> Split:
    # Cast before splitting and fitting so scikit-learn and ONNX Runtime (which
    # only sees float32) are evaluated on exactly the same numbers.
    X_train, X_test, y_train, y_test = train_test_split(
        X.astype(np.float32),
        y.astype(np.int64),
        test_size=TEST_SIZE,
        random_state=RANDOM_STATE,
        stratify=y,
    )
    return Split(dataset, X_train, X_test, y_train, y_test)


def load_splits() -> dict[str, Split]:
    """Both datasets, split once: every model of a dataset shares the same test rows."""
    iris = load_iris()
    digits = load_digits()
    return {
        "iris": split_dataset("sklearn.datasets.load_iris", iris.data, iris.target),
        "digits": split_dataset("sklearn.datasets.load_digits", digits.data, digits.target),
    }


# ------------------------------------------------------------------------- models


def identity_target(y: np.ndarray) -> np.ndarray:
    return y


def one_vs_rest_target(y: np.ndarray, positive: int) -> np.ndarray:
    """Binary target where index 0 is the named class and index 1 is everything else."""
    return np.where(y == positive, 0, 1).astype(np.int64)


def scaled_logreg() -> Pipeline:
    # A label that is the most probable class by construction (softmax of the same scores),
    # unlike an SVC whose decision function and Platt-scaled probabilities can disagree.
    return Pipeline(
        [
            ("scaler", StandardScaler()),
            ("logreg", LogisticRegression(max_iter=1000, random_state=RANDOM_STATE)),
        ]
    )


def quadratic_logreg() -> Pipeline:
    # One-vs-rest for a class in the middle (versicolor lies between the other two) is not
    # linearly separable: pairwise products of the scaled measurements make it so.
    return Pipeline(
        [
            ("scaler", StandardScaler()),
            ("quadratic", PolynomialFeatures(degree=2)),
            ("logreg", LogisticRegression(max_iter=5000, random_state=RANDOM_STATE)),
        ]
    )


def digits_fast_pipeline() -> Pipeline:
    # One matrix multiply at inference: tiny file, microseconds per row.
    return Pipeline(
        [
            ("scaler", StandardScaler()),
            ("logreg", LogisticRegression(max_iter=1000, random_state=RANDOM_STATE)),
        ]
    )


def digits_accurate_pipeline() -> Pipeline:
    # No scaler on purpose: all 64 features share one unit (ink intensity), and
    # standardising would blow up the near-constant border pixels; the raw-pixel
    # RBF SVC is the more accurate (and ~50x larger, slower) of the two. Its
    # probabilities come from a sigmoid calibration fitted on cross-validated
    # decisions, and the label is their argmax, so answer and probabilities agree.
    svc = SVC(kernel="rbf", random_state=RANDOM_STATE)
    return Pipeline([("calibrated_svc", CalibratedClassifierCV(svc, method="sigmoid", cv=5, ensemble=False))])


def iris_naive_bayes() -> Pipeline:
    # A different kind of estimator than version 2 (generative, axis-aligned Gaussians), so the two
    # versions disagree near the class borders: what a canary or a shadow comparison shows.
    return Pipeline([("naive_bayes", GaussianNB())])


def digits_fast_pca_pipeline() -> Pipeline:
    # Version 2 of digits_fast: the scaled pixels projected on 24 principal components first,
    # a smaller logistic regression on fewer inputs.
    return Pipeline(
        [
            ("scaler", StandardScaler()),
            ("pca", PCA(n_components=24, svd_solver="full", random_state=RANDOM_STATE)),
            ("logreg", LogisticRegression(max_iter=1000, random_state=RANDOM_STATE)),
        ]
    )


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    split: str  # key into load_splits()
    labels: tuple[str, ...]
    features: tuple[str, ...]
    preprocessing: Mapping[str, Any]
    build: Callable[[], Pipeline]
    target: Callable[[np.ndarray], np.ndarray]  # dataset targets -> class indices
    # Bumped whenever the trained model changes: cache keys and answers carry it. Version 1
    # of the iris models and digits_accurate were RBF SVCs whose label could contradict
    # their probabilities; version 2 replaced them.
    version: str = "1"
    # The first version of a model is described in manifest.json as <name>.onnx; every later one
    # (VERSION_SPECS) is a pair of files of its own, <name>@<version>.onnx and .json.
    extra_version: bool = False

    @property
    def file_stem(self) -> str:
        return f"{self.name}@{self.version}" if self.extra_version else self.name


def _iris_binary_spec(index: int) -> ModelSpec:
    species = IRIS_LABELS[index]
    return ModelSpec(
        name=f"iris_{species}",
        description=f"Iris one-vs-rest: is this flower an Iris {species}? "
                    "(StandardScaler + degree-2 features + LogisticRegression)",
        split="iris",
        labels=(species, f"not_{species}"),
        features=IRIS_FEATURES,
        preprocessing=TABULAR_PREPROCESSING,
        build=quadratic_logreg,
        target=partial(one_vs_rest_target, positive=index),
        version="2",
    )


MODEL_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="iris",
        description="Iris species from 4 flower measurements in cm (StandardScaler + LogisticRegression)",
        split="iris",
        labels=IRIS_LABELS,
        features=IRIS_FEATURES,
        preprocessing=TABULAR_PREPROCESSING,
        build=scaled_logreg,
        target=identity_target,
        version="2",
    ),
    *(_iris_binary_spec(i) for i in range(len(IRIS_LABELS))),
    ModelSpec(
        name="digits_fast",
        description="Handwritten digit 0-9 from an 8x8 greyscale image; small and fast (StandardScaler + LogisticRegression)",
        split="digits",
        labels=DIGIT_LABELS,
        features=DIGIT_FEATURES,
        preprocessing=DIGITS_PREPROCESSING,
        build=digits_fast_pipeline,
        target=identity_target,
    ),
    ModelSpec(
        name="digits_accurate",
        description="Handwritten digit 0-9 from an 8x8 greyscale image; more accurate, larger and slower "
                    "(RBF SVC, sigmoid-calibrated)",
        split="digits",
        labels=DIGIT_LABELS,
        features=DIGIT_FEATURES,
        preprocessing=DIGITS_PREPROCESSING,
        build=digits_accurate_pipeline,
        target=identity_target,
        version="2",
    ),
)


# Further versions of served models, side by side with the ones above (toposerve serves them as
# canaries, shadows, or after a promotion): same input, labels and preprocessing, other estimator.
VERSION_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="iris",
        description="Iris species from 4 flower measurements in cm (Gaussian naive Bayes)",
        split="iris",
        labels=IRIS_LABELS,
        features=IRIS_FEATURES,
        preprocessing=TABULAR_PREPROCESSING,
        build=iris_naive_bayes,
        target=identity_target,
        version="3",
        extra_version=True,
    ),
    ModelSpec(
        name="digits_fast",
        description="Handwritten digit 0-9 from an 8x8 greyscale image; small and fast "
                    "(StandardScaler + PCA(24) + LogisticRegression)",
        split="digits",
        labels=DIGIT_LABELS,
        features=DIGIT_FEATURES,
        preprocessing=DIGITS_PREPROCESSING,
        build=digits_fast_pca_pipeline,
        target=identity_target,
        version="2",
        extra_version=True,
    ),
)


# --------------------------------------------------------------------------- ONNX


def _convert(pipeline: Pipeline, spec: ModelSpec, classifier: Any) -> onnx.ModelProto:
    return convert_sklearn(
        pipeline,
        name=spec.name,
        initial_types=[(INPUT_NAME, FloatTensorType([None, len(spec.features)]))],
        # zipmap=False: probabilities as a float tensor, not a list of dicts.
        options={type(classifier): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )


def export_onnx(pipeline: Pipeline, spec: ModelSpec) -> bytes:
    """Convert a fitted pipeline to ONNX bytes that are identical from run to run."""
    classifier = pipeline.steps[-1][1]
    with warnings.catch_warnings():
        # skl2onnx's SVC converter reads SVC.probA_/probB_, deprecated with probability=True
        # (not used here: the calibration is CalibratedClassifierCV's).
        warnings.filterwarnings("ignore", message=r"Attribute `prob[AB]_` was deprecated", category=FutureWarning)
        model = _convert(pipeline, spec, classifier)
    # skl2onnx collects opset imports in a set, so their order follows Python's
    # per-process hash seed; sort them. Set the free-text fields explicitly so no
    # default (or a future default) can make the bytes vary.
    opsets = sorted(model.opset_import, key=lambda o: (o.domain, o.version))
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    model.producer_name = "skl2onnx"
    model.producer_version = skl2onnx.__version__
    model.domain = "ai.toposerve"
    model.model_version = int(spec.version)
    model.doc_string = spec.description
    model.graph.name = spec.name
    model.graph.doc_string = ""
    del model.metadata_props[:]
    onnx.helper.set_model_props(
        model, {"toposerve.name": spec.name, "toposerve.labels": json.dumps(list(spec.labels))}
    )
    onnx.checker.check_model(model)
    return model.SerializeToString(deterministic=True)


def onnx_session(model: bytes | Path) -> ort.InferenceSession:
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def run_onnx(session: ort.InferenceSession, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, probabilities = session.run(
        [LABEL_OUTPUT, PROBABILITIES_OUTPUT], {INPUT_NAME: X.astype(np.float32)}
    )
    return np.asarray(labels), np.asarray(probabilities)


def check_contract(session: ort.InferenceSession, spec: ModelSpec) -> None:
    """Fail loudly if the exported graph does not have the I/O the server expects."""
    inputs = [(i.name, i.type, i.shape) for i in session.get_inputs()]
    outputs = {o.name: (o.type, o.shape) for o in session.get_outputs()}
    expected_input = [(INPUT_NAME, "tensor(float)", [None, len(spec.features)])]
    if inputs != expected_input:
        raise RuntimeError(f"{spec.name}: inputs {inputs}, expected {expected_input}")
    expected_outputs = {
        LABEL_OUTPUT: ("tensor(int64)", [None]),
        PROBABILITIES_OUTPUT: ("tensor(float)", [None, len(spec.labels)]),
    }
    if outputs != expected_outputs:
        raise RuntimeError(f"{spec.name}: outputs {outputs}, expected {expected_outputs}")


# ----------------------------------------------------------------------- training


def consistency_grid(dataset: str, split: Split) -> np.ndarray:
    """Inputs spread over what callers send: for iris a 480-row grid over the measured ranges,
    for digits the test images and blends of pairs of them (where classes meet)."""
    if dataset == "iris":
        axes = [np.linspace(4.3, 7.9, 6), np.linspace(2.0, 4.4, 5), np.linspace(1.0, 6.9, 4), np.linspace(0.1, 2.5, 4)]
        return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 4).astype(np.float32)
    rng = np.random.default_rng(RANDOM_STATE)
    a, b = rng.integers(0, len(split.X_test), (2, 500))
    weights = rng.uniform(0.3, 0.7, (500, 1)).astype(np.float32)
    return np.concatenate([split.X_test, weights * split.X_test[a] + (1 - weights) * split.X_test[b]])


@dataclass(frozen=True)
class TrainedModel:
    spec: ModelSpec
    pipeline: Pipeline
    onnx_bytes: bytes
    sklearn_accuracy: float
    onnx_accuracy: float
    train_samples: int
    test_samples: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.onnx_bytes).hexdigest()


def train_model(spec: ModelSpec, split: Split) -> TrainedModel:
    y_train, y_test = spec.target(split.y_train), spec.target(split.y_test)
    pipeline = spec.build()
    pipeline.fit(split.X_train, y_train)
    sklearn_labels = pipeline.predict(split.X_test)
    onnx_bytes = export_onnx(pipeline, spec)

    session = onnx_session(onnx_bytes)
    check_contract(session, spec)
    onnx_labels, onnx_probabilities = run_onnx(session, split.X_test)
    # The served model must be the trained model: same decisions on every test row.
    if not np.array_equal(onnx_labels, sklearn_labels):
        disagree = int(np.sum(onnx_labels != sklearn_labels))
        raise AssertionError(f"{spec.name}: ONNX and scikit-learn disagree on {disagree} test rows")
    if not np.allclose(onnx_probabilities.sum(axis=1), 1.0, atol=1e-4):
        raise AssertionError(f"{spec.name}: ONNX probabilities do not sum to 1")
    # An answer must not contradict itself: the label is the most probable class, on the
    # test rows and on a grid of inputs around them (tests/unit/test_models.py checks it too).
    grid_labels, grid_probabilities = run_onnx(session, consistency_grid(spec.split, split))
    for name, labels, probabilities in (("test rows", onnx_labels, onnx_probabilities),
                                        ("grid", grid_labels, grid_probabilities)):
        contradicting = int(np.sum(labels != probabilities.argmax(axis=1)))
        if contradicting:
            raise AssertionError(f"{spec.name}: the label is not the most probable class on {contradicting} {name}")

    return TrainedModel(
        spec=spec,
        pipeline=pipeline,
        onnx_bytes=onnx_bytes,
        sklearn_accuracy=float(np.mean(sklearn_labels == y_test)),
        onnx_accuracy=float(np.mean(onnx_labels == y_test)),
        train_samples=len(y_train),
        test_samples=len(y_test),
    )


def describe_estimator(pipeline: Pipeline) -> str:
    # scikit-learn's repr only shows non-default parameters, e.g.
    # "StandardScaler() -> SVC(probability=True, random_state=0)".
    return " -> ".join(repr(step) for _, step in pipeline.steps)


def manifest_entry(trained: TrainedModel, split: Split) -> dict[str, Any]:
    spec = trained.spec
    return {
        "name": spec.name,
        "version": spec.version,
        "file": f"{spec.file_stem}.onnx",
        "sha256": trained.sha256,
        "description": spec.description,
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "shape": [None, len(spec.features)],
            "features": list(spec.features),
        },
        "outputs": {"label": LABEL_OUTPUT, "probabilities": PROBABILITIES_OUTPUT},
        "labels": list(spec.labels),
        "preprocessing": dict(spec.preprocessing),
        "metrics": {
            # test_accuracy is measured on what is served (ONNX Runtime); the
            # scikit-learn figure is kept alongside to show they agree.
            "test_accuracy": round(trained.onnx_accuracy, 4),
            "sklearn_test_accuracy": round(trained.sklearn_accuracy, 4),
            "test_samples": trained.test_samples,
            "train_samples": trained.train_samples,
        },
        "training": {
            "dataset": split.dataset,
            "estimator": describe_estimator(trained.pipeline),
            "scikit_learn": sklearn.__version__,
            "skl2onnx": skl2onnx.__version__,
            "target_opset": TARGET_OPSET,
            "random_state": RANDOM_STATE,
            "test_size": TEST_SIZE,
        },
    }


def check_invariants(manifest: Mapping[str, Any]) -> None:
    models = manifest["models"]
    fast = models["digits_fast"]["metrics"]["test_accuracy"]
    accurate = models["digits_accurate"]["metrics"]["test_accuracy"]
    # The fast/accurate pair exists to demonstrate a real trade-off.
    if not accurate > fast:
        raise AssertionError(f"digits_accurate ({accurate}) is not more accurate than digits_fast ({fast})")


def dump_manifest(manifest: Mapping[str, Any]) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def train_all(out_dir: Path) -> dict[str, Any]:
    """Train every model, write ``<name>.onnx`` and the manifest to out_dir (and each further version's
    ``<name>@<version>.onnx`` and ``.json``); return the manifest, further versions under ``versions``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = load_splits()
    entries: dict[str, Any] = {}
    versions: dict[str, Any] = {}
    for spec in (*MODEL_SPECS, *VERSION_SPECS):
        split = splits[spec.split]
        trained = train_model(spec, split)
        (out_dir / f"{spec.file_stem}.onnx").write_bytes(trained.onnx_bytes)
        (versions if spec.extra_version else entries)[spec.file_stem] = manifest_entry(trained, split)
        print(
            f"{spec.file_stem:16s} acc={trained.onnx_accuracy:.4f} "
            f"size={len(trained.onnx_bytes):>7d} B sha256={trained.sha256[:16]}"
        )
    manifest = {"models": entries}
    check_invariants(manifest)
    (out_dir / MANIFEST_NAME).write_text(dump_manifest(manifest), encoding="utf-8")
    for stem, entry in versions.items():
        (out_dir / f"{stem}.json").write_text(dump_manifest(entry), encoding="utf-8")
    return {**manifest, "versions": versions}


# ------------------------------------------------------------------------ samples


def image_to_features(image: Image.Image, preprocessing: Mapping[str, Any] = DIGITS_PREPROCESSING) -> np.ndarray:
    """The manifest's "image" preprocessing: any Pillow image -> float32 [1, w*h]."""
    width, height = preprocessing["width"], preprocessing["height"]
    resample = Image.Resampling[preprocessing["resample"].upper()]
    small = image.convert(preprocessing["mode"]).resize((width, height), resample)
    pixels = np.asarray(small, dtype=np.float32)
    if preprocessing["invert"]:
        pixels = 255.0 - pixels
    return (pixels * np.float32(preprocessing["scale"])).reshape(1, width * height)


def digit_image(features: np.ndarray) -> Image.Image:
    """An 8x8 mode-L image of a load_digits row (0..16 -> 0..255, black background)."""
    pixels = np.round(features.reshape(8, 8) * 255 / DIGIT_MAX).astype(np.uint8)
    return Image.fromarray(pixels)


@dataclass(frozen=True)
class SampleVariant:
    """How one sample file is rendered: label shown, upscale factor, colour mode, format."""

    label: int
    upscale: int
    mode: str
    image_format: str  # Pillow format name
    suffix: str = ""

    @property
    def size(self) -> int:
        return 8 * self.upscale

    @property
    def filename(self) -> str:
        extension = {"PNG": "png", "JPEG": "jpg"}[self.image_format]
        suffix = f"_{self.suffix}" if self.suffix else ""
        return f"digit_{self.label}_{self.size}x{self.size}{suffix}.{extension}"

    def encode(self, features: np.ndarray) -> bytes:
        # Nearest-neighbour upscaling by an integer factor keeps hard pixel edges,
        # so a BOX downscale recovers the original 8x8 (up to JPEG noise).
        image = digit_image(features).resize((self.size, self.size), Image.Resampling.NEAREST)
        image = image.convert(self.mode)  # L -> P uses a grey palette: lossless
        buffer = io.BytesIO()
        save_options = {"quality": 95} if self.image_format == "JPEG" else {}
        image.save(buffer, format=self.image_format, **save_options)
        return buffer.getvalue()


SAMPLE_VARIANTS: tuple[SampleVariant, ...] = (
    SampleVariant(label=0, upscale=1, mode="L", image_format="PNG"),
    SampleVariant(label=3, upscale=8, mode="RGB", image_format="PNG", suffix="rgb"),
    SampleVariant(label=7, upscale=4, mode="L", image_format="JPEG"),
    SampleVariant(label=5, upscale=2, mode="RGBA", image_format="PNG", suffix="rgba"),
    SampleVariant(label=9, upscale=3, mode="P", image_format="PNG", suffix="palette"),
    SampleVariant(label=2, upscale=1, mode="L", image_format="PNG"),
)


@dataclass(frozen=True)
class RenderedSample:
    variant: SampleVariant
    test_row: int  # row of the digits test split the image was rendered from
    data: bytes


def pick_sample(
    variant: SampleVariant, split: Split, sessions: Sequence[ort.InferenceSession]
) -> RenderedSample:
    """First test-split image of the variant's label that every model gets right
    after an encode -> decode -> preprocess round trip (so the samples are
    demos of the preprocessing, not of model errors)."""
    for row in np.flatnonzero(split.y_test == variant.label):
        data = variant.encode(split.X_test[row])
        features = image_to_features(Image.open(io.BytesIO(data)))
        if all(run_onnx(s, features)[0][0] == variant.label for s in sessions):
            return RenderedSample(variant, int(row), data)
    raise RuntimeError(f"no test image of {variant.label} survives {variant.filename}")


def samples_readme(samples: Sequence[RenderedSample]) -> str:
    rows = "\n".join(
        f"| `{s.variant.filename}` | {s.variant.size}x{s.variant.size} | {s.variant.mode} "
        f"| {s.variant.image_format} | {s.variant.label} | {s.test_row} |"
        for s in samples
    )
    return f"""# Sample digit images

Generated by `deploy/models/train.py` (`render_samples`); do not edit by hand.

Each image is a real row of the `load_digits` **test split** (stratified,
`test_size={TEST_SIZE}`, `random_state={RANDOM_STATE}`), drawn as white ink on a
black background (pixel = round(v * 255 / 16)), upscaled with nearest-neighbour
and saved in a different size / colour mode / format (JPEG at quality 95), to
exercise the `image` preprocessing of the digits models: decode, convert to
`L`, resize to 8x8 with `BOX`, multiply by 16/255, float32 `[1, 64]`. Both
`digits_fast` and `digits_accurate` predict the true label of every file after
that preprocessing. The true label is the second `_`-separated token of the
file name.

| file | size | mode | format | true label | test-split row |
|------|------|------|--------|------------|----------------|
{rows}
"""


def render_samples(out_dir: Path = DEFAULT_SAMPLES_DIR, models_dir: Path = HERE) -> list[RenderedSample]:
    """Write the sample images and their README to out_dir; models_dir holds the digits ONNX files."""
    split = load_splits()["digits"]
    sessions = [onnx_session(models_dir / f"{name}.onnx") for name in ("digits_fast", "digits_accurate")]
    samples = [pick_sample(variant, split, sessions) for variant in SAMPLE_VARIANTS]
    out_dir.mkdir(parents=True, exist_ok=True)
    for sample in samples:
        (out_dir / sample.variant.filename).write_bytes(sample.data)
    (out_dir / "README.md").write_text(samples_readme(samples), encoding="utf-8")
    return samples


# -------------------------------------------------------------------------- check


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare_hashes(committed: Mapping[str, Any], fresh: Mapping[str, Any]) -> list[str]:
    """Differences between two manifests' model sets and sha256s (empty: identical)."""
    old, new = committed.get("models", {}), fresh.get("models", {})
    problems = [f"{name}: in the committed manifest only" for name in sorted(old.keys() - new.keys())]
    problems += [f"{name}: not in the committed manifest" for name in sorted(new.keys() - old.keys())]
    problems += [
        f"{name}: sha256 {old[name]['sha256']} (committed) != {new[name]['sha256']} (retrained)"
        for name in sorted(old.keys() & new.keys())
        if old[name]["sha256"] != new[name]["sha256"]
    ]
    return problems


def check_files(manifest: Mapping[str, Any], models_dir: Path) -> list[str]:
    """Committed ONNX files that are missing or do not hash to the manifest's sha256."""
    problems = []
    for name, entry in sorted(manifest.get("models", {}).items()):
        path = models_dir / entry["file"]
        if not path.is_file():
            problems.append(f"{name}: {path} is missing")
        elif sha256_of(path) != entry["sha256"]:
            problems.append(f"{name}: {path} does not match the manifest's sha256")
    return problems


def committed_versions(models_dir: Path) -> dict[str, Any]:
    """The further versions' manifests committed in models_dir (``<name>@<version>.json``), by file stem."""
    return {path.stem: json.loads(path.read_text(encoding="utf-8"))
            for path in sorted(models_dir.glob("*@*.json"))}


def check(models_dir: Path) -> list[str]:
    """Retrain into a temporary folder and compare with what is committed in models_dir."""
    committed = json.loads((models_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    committed_extra = {"models": committed_versions(models_dir)}
    with tempfile.TemporaryDirectory(prefix="toposerve-train-") as tmp:
        fresh = train_all(Path(tmp))
    fresh_extra = {"models": fresh.pop("versions")}
    return (check_files(committed, models_dir) + compare_hashes(committed, fresh)
            + check_files(committed_extra, models_dir) + compare_hashes(committed_extra, fresh_extra))


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=HERE, help="folder for the .onnx files and manifest.json (default: %(default)s)"
    )
    parser.add_argument(
        "--samples-out",
        type=Path,
        default=DEFAULT_SAMPLES_DIR,
        help="folder for the sample digit images (default: %(default)s)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="retrain in a temporary folder and exit 1 if any sha256 differs from the manifest in --out",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check:
        problems = check(args.out)
        for problem in problems:
            print(f"MISMATCH {problem}", file=sys.stderr)
        print("check failed" if problems else "check passed: retrained models are byte-identical")
        return 1 if problems else 0
    train_all(args.out)
    for sample in render_samples(args.samples_out, models_dir=args.out):
        print(f"sample {sample.variant.filename} (test row {sample.test_row})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
