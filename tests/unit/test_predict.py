"""consumers/predict.py: model outputs -> row predictions, and wire features -> model input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from toposerve.brokers.messages import FailureCode, RowPrediction
from toposerve.models.outputs import to_row_predictions
from toposerve.models.preprocessing import InputError, check_features
from toposerve.models.registry import ModelManifest, load_manifests

MODELS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "models"
LABELS = ["setosa", "versicolor", "virginica"]


@pytest.fixture(scope="module")
def iris() -> ModelManifest:
    return load_manifests(MODELS_DIR)["iris"]


# --------------------------------------------------------------------------- to_row_predictions


def test_one_row_prediction_per_row_in_order() -> None:
    indices = np.array([2, 0, 1], dtype=np.int64)
    probabilities = np.array([[0.1, 0.2, 0.7], [0.8, 0.1, 0.1], [0.2, 0.5, 0.3]], dtype=np.float32)
    predictions = to_row_predictions(indices, probabilities, LABELS)
    assert [p.label for p in predictions] == ["virginica", "setosa", "versicolor"]
    assert [p.class_index for p in predictions] == [2, 0, 1]
    assert all(isinstance(p, RowPrediction) for p in predictions)
    assert all(type(p.class_index) is int for p in predictions)


def test_probabilities_are_plain_floats_rounded_to_6_places() -> None:
    # float32 0.1 is 0.10000000149...; rounded it must be exactly the float 0.1.
    probabilities = np.array([[0.1, 0.2, 0.7], [0.12345678, 0.87654322, 0.0]], dtype=np.float32)
    predictions = to_row_predictions(np.array([2, 1]), probabilities, LABELS)
    assert predictions[0].probabilities == [0.1, 0.2, 0.7]
    assert predictions[1].probabilities == [0.123457, 0.876543, 0.0]
    assert all(type(v) is float for p in predictions for v in p.probabilities)
    assert '"probabilities":[0.1,0.2,0.7]' in predictions[0].model_dump_json()


def test_no_rows_give_no_predictions() -> None:
    assert to_row_predictions(np.empty(0, dtype=np.int64), np.empty((0, 3), dtype=np.float32), LABELS) == []


def test_mismatched_output_lengths_are_an_error_not_a_silent_truncation() -> None:
    with pytest.raises(ValueError):
        to_row_predictions(np.array([0, 1]), np.array([[1.0, 0.0, 0.0]], dtype=np.float32), LABELS)


def test_binary_model_labels() -> None:
    predictions = to_row_predictions(np.array([1, 0]), np.array([[0.3, 0.7], [0.9, 0.1]]), ["setosa", "not_setosa"])
    assert [p.label for p in predictions] == ["not_setosa", "setosa"]


# --------------------------------------------------------------------------- check_features


def test_good_float32_features_pass_unchanged(iris) -> None:
    array = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)
    features = check_features(array, iris, max_rows=10)
    assert features.dtype == np.float32
    np.testing.assert_array_equal(features, array)


@pytest.mark.parametrize("dtype", ["float64", "int64", "int32", "uint8"])
def test_other_dtypes_are_converted_to_float32(iris, dtype: str) -> None:
    array = np.array([[5, 3, 1, 0], [6, 3, 5, 2]], dtype=dtype)
    features = check_features(array, iris, max_rows=10)
    assert features.dtype == np.float32
    np.testing.assert_array_equal(features, array.astype(np.float32))


def test_float64_precision_is_rounded_to_float32(iris) -> None:
    array = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float64)
    assert check_features(array, iris, max_rows=1).tolist() == array.astype(np.float32).tolist()


@pytest.mark.parametrize("shape", [(4,), (1, 3), (1, 5), (2, 2, 4), (1, 64), ()], ids=str)
def test_wrong_shape_is_an_invalid_message(iris, shape: tuple[int, ...]) -> None:
    with pytest.raises(InputError) as info:
        check_features(np.zeros(shape, dtype=np.float32), iris, max_rows=10)
    assert info.value.code == FailureCode.INVALID_MESSAGE
    assert f"{list(shape)}" in info.value.message and "[N, 4]" in info.value.message


def test_zero_rows_is_an_invalid_message(iris) -> None:
    with pytest.raises(InputError, match="no rows") as info:
        check_features(np.zeros((0, 4), dtype=np.float32), iris, max_rows=10)
    assert info.value.code == FailureCode.INVALID_MESSAGE


def test_too_many_rows_is_too_large(iris) -> None:
    check_features(np.zeros((5, 4), dtype=np.float32), iris, max_rows=5)
    with pytest.raises(InputError, match="6 rows") as info:
        check_features(np.zeros((6, 4), dtype=np.float32), iris, max_rows=5)
    assert info.value.code == FailureCode.TOO_LARGE


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_an_invalid_message(iris, value: float) -> None:
    array = np.ones((3, 4), dtype=np.float32)
    array[2, 1] = value
    with pytest.raises(InputError, match="NaN or infinite") as info:
        check_features(array, iris, max_rows=10)
    assert info.value.code == FailureCode.INVALID_MESSAGE


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_float64_beyond_float32_range_is_refused_not_turned_into_inf(iris) -> None:
    array = np.array([[1e300, 1.0, 1.0, 1.0]], dtype=np.float64)
    with pytest.raises(InputError) as info:
        check_features(array, iris, max_rows=10)
    assert info.value.code == FailureCode.INVALID_MESSAGE
