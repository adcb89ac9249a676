"""brokers/tensors.py: numpy array <-> Tensor (raw little-endian bytes + dtype + shape)."""

from __future__ import annotations

import base64
import json
import uuid

import numpy as np
import pytest
from pydantic import ValidationError

from toposerve.brokers.messages import Features, Tensor
from toposerve.models.tensors import TensorError, decode_tensor, encode_tensor

DTYPES = ["float32", "float64", "int64", "int32", "uint8"]
SHAPES = [(0,), (0, 4), (5,), (2, 3), (2, 3, 4), (1, 64)]


def sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    values = np.arange(count, dtype=np.int64) * 7 - 3
    if np.dtype(dtype).kind == "u":
        values = np.abs(values) % 256
    array = values.astype(dtype).reshape(shape)
    if np.dtype(dtype).kind == "f":
        array = array / 3  # values that are not exact integers
    return array.astype(dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_keeps_values_dtype_and_shape(dtype: str, shape: tuple[int, ...]) -> None:
    array = sample(dtype, shape)
    tensor = encode_tensor(array)
    assert tensor.dtype == dtype
    assert tensor.shape == list(shape)
    assert len(tensor.data) == array.size * np.dtype(dtype).itemsize
    decoded = decode_tensor(tensor)
    assert decoded.dtype == np.dtype(dtype)
    assert decoded.shape == shape
    np.testing.assert_array_equal(decoded, array)


def test_zero_dimensional_array_keeps_its_empty_shape() -> None:
    tensor = encode_tensor(np.array(2.5, dtype=np.float32))
    assert tensor.shape == []
    assert decode_tensor(tensor).shape == ()


def test_zero_dimensional_tensor_from_the_wire_decodes_as_a_scalar() -> None:
    tensor = Tensor(dtype="float32", shape=[], data=np.float32(2.5).tobytes())
    decoded = decode_tensor(tensor)
    assert decoded.shape == ()
    assert decoded == np.float32(2.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_row_tensor_has_no_bytes_and_decodes(dtype: str) -> None:
    tensor = encode_tensor(np.empty((0, 4), dtype=dtype))
    assert tensor.data == b""
    assert tensor.shape == [0, 4]
    assert decode_tensor(tensor).shape == (0, 4)


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "int32"])
def test_big_endian_input_travels_as_little_endian_bytes(dtype: str) -> None:
    values = sample(dtype, (3, 2))
    big = values.astype(np.dtype(dtype).newbyteorder(">"))
    assert big.dtype.byteorder == ">"
    tensor = encode_tensor(big)
    assert tensor.dtype == dtype  # the name, never ">f4"
    assert tensor.data == values.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    assert tensor.data != big.tobytes()
    np.testing.assert_array_equal(decode_tensor(tensor), values)


def test_little_endian_bytes_are_exactly_the_documented_layout() -> None:
    tensor = encode_tensor(np.array([[1.0, -2.0]], dtype=np.float32))
    # 1.0f = 0x3f800000, -2.0f = 0xc0000000, little-endian, row-major.
    assert tensor.data == bytes.fromhex("0000803f000000c0")


def test_non_contiguous_input_is_encoded_in_row_major_order() -> None:
    base = np.arange(12, dtype=np.float64).reshape(3, 4)
    view = base.T[::2]  # transposed and strided: not C-contiguous
    assert not view.flags["C_CONTIGUOUS"]
    tensor = encode_tensor(view)
    assert tensor.shape == [2, 3]
    np.testing.assert_array_equal(decode_tensor(tensor), view)


@pytest.mark.parametrize("delta", [-1, 1, -4])
def test_byte_length_mismatch_is_refused(delta: int) -> None:
    good = encode_tensor(np.ones((2, 3), dtype=np.float32))
    bad = Tensor(dtype="float32", shape=[2, 3], data=good.data[:delta] if delta < 0 else good.data + b"\0")
    with pytest.raises(TensorError) as info:
        decode_tensor(bad)
    message = str(info.value)
    assert f"{len(bad.data)} bytes" in message
    assert "24" in message  # what dtype and shape need


def test_dtype_and_shape_must_agree_with_the_bytes() -> None:
    # 24 bytes are right for float32 [2, 3] but not for float64 [2, 3] (48) ...
    data = np.ones((2, 3), dtype=np.float32).tobytes()
    with pytest.raises(TensorError):
        decode_tensor(Tensor(dtype="float64", shape=[2, 3], data=data))
    # ... and a different shape with the same element count is a legitimate reshape.
    assert decode_tensor(Tensor(dtype="float32", shape=[3, 2], data=data)).shape == (3, 2)


def test_element_limit_is_checked_before_the_bytes() -> None:
    tensor = Tensor(dtype="uint8", shape=[10, 10], data=bytes(100))
    assert decode_tensor(tensor, max_elements=100).shape == (10, 10)
    with pytest.raises(TensorError, match="more than the limit of 99"):
        decode_tensor(tensor, max_elements=99)


def test_absurd_shape_is_refused_without_allocating() -> None:
    tensor = Tensor(dtype="float64", shape=[10**9, 10**9], data=b"")
    with pytest.raises(TensorError, match="limit"):
        decode_tensor(tensor)


@pytest.mark.parametrize("shape", [[0, 10**30], [10**30, 0], [1, 0, 2**70]])
def test_a_zero_dimension_beside_a_huge_one_is_refused_not_overflowed(shape: list[int]) -> None:
    with pytest.raises(TensorError, match="dimension over the limit"):
        decode_tensor(Tensor(dtype="float32", shape=shape, data=b""))


@pytest.mark.parametrize(
    "fields",
    [
        {"dtype": "float16", "shape": [1], "data": b"\0\0"},
        {"dtype": "object", "shape": [1], "data": b"\0"},
        {"dtype": "float32", "shape": [-1], "data": b""},
        {"dtype": "float32", "shape": [1] * 9, "data": b"\0\0\0\0"},
    ],
    ids=["float16", "object", "negative-dim", "nine-dims"],
)
def test_tensor_schema_refuses_what_the_codec_does_not_support(fields: dict) -> None:
    with pytest.raises(ValidationError):
        Tensor(**fields)


def test_encoding_an_unsupported_dtype_fails_loudly() -> None:
    with pytest.raises(ValidationError):
        encode_tensor(np.ones(3, dtype=np.float16))


# --------------------------------------------------------------------------- on the wire


def _b64_any_alphabet(text: str) -> bytes:
    return base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)


def test_features_json_round_trip_carries_tensor_bytes_as_base64() -> None:
    array = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)
    features = Features(id=uuid.uuid4(), model="iris", timings={"preprocess_ms": 0.25}, tensor=encode_tensor(array))
    body = features.model_dump_json()
    wire = json.loads(body)
    assert wire["kind"] == "features"
    assert wire["tensor"]["dtype"] == "float32"
    assert wire["tensor"]["shape"] == [2, 4]
    # Raw bytes in base64: a string, never a nested list of floats.
    assert isinstance(wire["tensor"]["data"], str)
    assert _b64_any_alphabet(wire["tensor"]["data"]) == array.astype("<f4").tobytes()
    assert "5.1" not in json.dumps(wire["tensor"])  # (not the whole body: a timestamp may hold "5.1")

    back = Features.model_validate_json(body)
    assert back.id == features.id
    assert back.model == "iris"
    assert back.created_at == features.created_at
    assert back.timings == {"preprocess_ms": 0.25}
    assert back.tensor == features.tensor
    np.testing.assert_array_equal(decode_tensor(back.tensor), array)


def test_features_published_by_another_client_with_standard_base64_decode() -> None:
    # Bytes chosen so that standard base64 needs '+' and '/'.
    raw = bytes([0xFB, 0xFF, 0xBF, 0xFE, 0xEF, 0xBE, 0xFF, 0xFF])
    array = np.frombuffer(raw, dtype="<f4").reshape(1, 2)
    data = base64.b64encode(raw).decode()
    assert "+" in data and "/" in data
    body = json.dumps({"id": str(uuid.uuid4()), "model": "iris",
                       "tensor": {"dtype": "float32", "shape": [1, 2], "data": data}})
    features = Features.model_validate_json(body)
    assert features.tensor.data == raw
    np.testing.assert_array_equal(decode_tensor(features.tensor), array)


def test_tensor_bytes_in_json_are_standard_base64() -> None:
    raw = bytes([0xFB, 0xFF, 0xBF, 0xFE, 0xEF, 0xBE, 0xFF, 0xFF])
    tensor = Tensor(dtype="float32", shape=[1, 2], data=raw)
    data = json.loads(tensor.model_dump_json())["data"]
    assert data == base64.b64encode(raw).decode()
