"""The Open Inference Protocol codec (api/oip_codec.py): pure, so tested without an app or a broker."""

from __future__ import annotations

import base64
import struct

import numpy as np
import pytest

from toposerve.api.oip_codec import (
    InferCall,
    OipError,
    infer_outputs,
    input_name,
    model_metadata,
    parse_infer_call,
    parse_json,
    read_model_input,
)
from toposerve.brokers import RowPrediction
from toposerve.deploy.profile import MODELS_DIR
from toposerve.models import load_manifests

MANIFESTS = load_manifests(MODELS_DIR)
IRIS, DIGITS = MANIFESTS["iris"], MANIFESTS["digits_fast"]
PNG = b"\x89PNG\r\n\x1a\n" + b"rest of a file"


def call(tensor: dict) -> InferCall:
    return parse_infer_call({"inputs": [tensor]})


def iris_tensor(**overrides: object) -> dict:
    return {"name": input_name(IRIS), "datatype": "FP32", "shape": [2, 4],
            "data": [5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3]} | overrides


def test_metadata_names_the_inputs_and_outputs_the_codec_reads_and_writes() -> None:
    iris, digits = model_metadata(IRIS), model_metadata(DIGITS)
    assert iris["inputs"] == [{"name": IRIS.input.name, "datatype": "FP32", "shape": [-1, 4]}]
    assert digits["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in iris["outputs"]] == ["label", "class_index", "probabilities"]


def test_rows_flat_or_nested_give_the_same_rows() -> None:
    flat = read_model_input(call(iris_tensor()), IRIS, None, max_rows=10)
    nested = read_model_input(call(iris_tensor(data=[[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]])), IRIS, None, 10)
    assert flat.rows == nested.rows
    assert np.allclose(flat.rows, [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]])


def test_binary_tensor_data_is_read_little_endian() -> None:
    values = np.array([[5.1, 3.5, 1.4, 0.2]], dtype="<f4")
    tensor = iris_tensor(shape=[1, 4], parameters={"binary_data_size": values.nbytes})
    del tensor["data"]
    got = read_model_input(call(tensor), IRIS, values.tobytes(), max_rows=10)
    assert np.allclose(got.rows, values.astype(np.float64))


def test_binary_bytes_elements_are_length_prefixed_and_files_become_base64() -> None:
    chunk = struct.pack("<I", len(PNG)) + PNG + struct.pack("<I", 4) + b"aGk="
    tensor = {"name": "image", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(chunk)}}
    got = read_model_input(call(tensor), DIGITS, chunk, max_rows=10)
    assert got.images == [base64.b64encode(PNG).decode(), "aGk="]


@pytest.mark.parametrize(("tensor", "binary", "words"), [
    (iris_tensor(datatype="BYTES"), None, ["takes FP32"]),
    (iris_tensor(shape=[2, 3]), None, ["shape [2, 3]", "[N, 4]"]),
    (iris_tensor(shape=[3, 4]), None, ["holds 12 elements", "has 8"]),
    (iris_tensor(data=[5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, "x"]), None, ["element 7", "not a number"]),
    (iris_tensor(datatype="INT8", data=[1, 2, 3, 4, 5, 6, 7, 300]), None, ["out of range for INT8"]),
    (iris_tensor(datatype="FP99"), None, ["unknown datatype 'FP99'"]),
    (iris_tensor(name="x"), None, ["unknown input 'x'"]),
    (iris_tensor(shape=[20, 4], data=[1.0] * 80), None, ["more than the limit of 10"]),
    (iris_tensor(parameters={"binary_data_size": 4}), None, ["no Inference-Header-Content-Length"]),
    (iris_tensor(), b"1234", ["binary data follow the JSON"]),
    ({"name": "image", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "b"]}, None, ["[N] or [N, 1]"]),
])
def test_wrong_tensors_are_refused_naming_what_is_wrong(tensor: dict, binary: bytes | None,
                                                        words: list[str]) -> None:
    manifest = DIGITS if tensor["name"] == "image" else IRIS
    with pytest.raises(OipError) as info:
        read_model_input(call(tensor), manifest, binary, max_rows=10)
    for word in words:
        assert word in info.value.message
    if "limit" in words[0]:
        assert info.value.status == 413


@pytest.mark.parametrize(("body", "words"), [
    ([], ["must be a JSON object"]),
    ({}, ["'inputs' is missing"]),
    ({"inputs": []}, ["non-empty array"]),
    ({"inputs": [1]}, ["inputs[0] must be an object"]),
    ({"inputs": [{}], "id": 5}, ["'id' must be a string"]),
    ({"inputs": [{}], "parameters": {"timeout": -1}}, ["positive number of microseconds"]),
    ({"inputs": [{}], "outputs": [{"name": "logits"}]}, ["unknown output 'logits'"]),
    ({"inputs": [{}], "outputs": [{"name": "label", "parameters": {"classification": 3}}]},
     ["classification extension"]),
])
def test_wrong_requests_are_refused_naming_what_is_wrong(body: object, words: list[str]) -> None:
    with pytest.raises(OipError) as info:
        parse_infer_call(body)
    for word in words:
        assert word in info.value.message


@pytest.mark.parametrize(("raw", "words"), [(b"  ", ["empty"]), (b"{", ["not valid JSON"]), (b"\xff", ["UTF-8"])])
def test_json_header_errors(raw: bytes, words: list[str]) -> None:
    with pytest.raises(OipError) as info:
        parse_json(raw)
    assert all(word in info.value.message for word in words)


def test_outputs_are_the_requested_tensors_in_the_protocols_shapes() -> None:
    rows = [RowPrediction(label="setosa", class_index=0, probabilities=[0.9, 0.05, 0.05]),
            RowPrediction(label="virginica", class_index=2, probabilities=[0.1, 0.1, 0.8])]
    every = infer_outputs(rows, 3, None)
    assert [t["name"] for t in every] == ["label", "class_index", "probabilities"]
    assert every[2] == {"name": "probabilities", "datatype": "FP32", "shape": [2, 3],
                        "data": [0.9, 0.05, 0.05, 0.1, 0.1, 0.8]}
    assert infer_outputs(rows, 3, ["class_index"]) == [
        {"name": "class_index", "datatype": "INT64", "shape": [2], "data": [0, 2]}]
