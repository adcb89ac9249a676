"""The Open Inference Protocol (KServe v2) codec: pure functions between the protocol's JSON
(and Triton's binary tensor extension) and toposerve's inputs and answers.

No I/O and no FastAPI: the REST routes (api/oip_routes.py) use it, and so can any other
transport of the protocol. Every problem raises ``OipError`` naming what was wrong.
"""

from __future__ import annotations

import base64
import math
import struct
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from toposerve.api.body import parse_json as parse_json_text
from toposerve.brokers import RowPrediction
from toposerve.models import ImagePreprocessing, ModelManifest

SERVER_NAME = "toposerve"
# Triton's platform name for an ONNX model run by ONNX Runtime ("<project>_<format>").
PLATFORM = "onnxruntime_onnx"
IMAGE_INPUT = "image"
OUTPUT_NAMES = ("label", "class_index", "probabilities")
MAX_SHAPE_RANK = 8
# Triton's binary tensor data extension: the JSON header's length, binary tensors after it.
BINARY_HEADER = "inference-header-content-length"

_FLOAT_TYPES = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
_INT_TYPES = {
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
}
NUMERIC_TYPES: dict[str, type[np.generic]] = {**_FLOAT_TYPES, **_INT_TYPES}
DATATYPES = ("BOOL", *_INT_TYPES, *_FLOAT_TYPES, "BYTES")
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")


# -- the protocol's bodies, for the OpenAPI document ------------------------------------
# The codec reads requests by hand (to name every problem the protocol's way) and builds
# answers as dicts; these models say what both hold. Requests allow unknown keys, as the
# codec ignores them; answers have exactly these keys.

class OipErrorBody(BaseModel):
    """Every error of a /v2 route, and of TF Serving's routes (the same shape), authentication and rate
    limits excepted: those are the API's own shape."""

    model_config = ConfigDict(extra="forbid")

    error: str


class _OipAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerMetadata(_OipAnswer):
    name: str
    version: str
    extensions: list[str]


class ServerLive(_OipAnswer):
    live: bool


class ServerReady(_OipAnswer):
    ready: bool


class ModelReady(_OipAnswer):
    name: str
    ready: bool


class TensorMetadata(_OipAnswer):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size")


class OipModelMetadata(_OipAnswer):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class InferParameters(BaseModel):
    timeout: float | None = Field(default=None, gt=0, description="Microseconds to wait for the answer")


class InputTensorParameters(BaseModel):
    binary_data_size: int | None = Field(
        default=None, ge=0, description="Triton's binary extension: the tensor's bytes follow the JSON")


class InputTensor(BaseModel):
    name: str = Field(description="The model's input: its ONNX input name (tabular) or 'image'")
    shape: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, max_length=MAX_SHAPE_RANK)
    datatype: Literal[DATATYPES]  # type: ignore[valid-type]
    # Absent, not null, with binary data: the codec refuses a null 'data'.
    data: list | SkipJsonSchema[None] = Field(default=None, description="Flat or nested as the shape (row-major); "
                                                                          "absent with binary_data_size")
    parameters: InputTensorParameters | None = None


class RequestedOutput(BaseModel):
    name: Literal[OUTPUT_NAMES]  # type: ignore[valid-type]
    parameters: dict | None = None


class InferRequest(BaseModel):
    """``POST /v2/models/{model}/infer``: one input tensor; with the binary extension
    (``Inference-Header-Content-Length``) this JSON is followed by the tensor's bytes."""

    id: str | None = None
    parameters: InferParameters | None = None
    inputs: list[InputTensor] = Field(min_length=1, description="Exactly one tensor: the model's input")
    outputs: list[RequestedOutput] | None = Field(default=None, description="Outputs to answer (default: all)")


class OutputTensor(_OipAnswer):
    name: Literal[OUTPUT_NAMES]  # type: ignore[valid-type]
    datatype: Literal["BYTES", "INT64", "FP32"]
    shape: list[int]
    data: list[str | int | float]


class PartialAnswer(_OipAnswer):
    partial: Literal[True]
    missing_members: str = Field(description="Comma-separated members of the model group that did not answer")


class InferResponse(_OipAnswer):
    model_name: str
    model_version: str
    id: str
    outputs: list[OutputTensor]
    parameters: PartialAnswer | None = Field(default=None, description="Only for a partial model-group answer")


class OipError(Exception):
    """A request the protocol layer refuses before anything is queued."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def is_image_model(manifest: ModelManifest) -> bool:
    return isinstance(manifest.preprocessing, ImagePreprocessing)


def input_name(manifest: ModelManifest) -> str:
    return IMAGE_INPUT if is_image_model(manifest) else manifest.input.name


def model_metadata(manifest: ModelManifest) -> dict:
    if is_image_model(manifest):
        inputs = [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]}]
    else:
        inputs = [{"name": manifest.input.name, "datatype": "FP32", "shape": [-1, manifest.n_features]}]
    return {
        "name": manifest.name,
        "versions": [manifest.version],
        "platform": PLATFORM,
        "inputs": inputs,
        "outputs": [
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "class_index", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(manifest.labels)]},
        ],
    }


@dataclass
class InferCall:
    id: str | None
    timeout_us: float | None
    inputs: list[dict]
    outputs: list[str] | None  # None: every output


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_json(raw: bytes) -> object:
    if not raw.strip():
        raise OipError("the JSON header of the request is empty")
    try:
        return parse_json_text(raw)
    except ValueError as exc:
        raise OipError(str(exc).replace("the body", "the request", 1)) from exc


def parse_infer_call(data: object) -> InferCall:
    if not isinstance(data, dict):
        raise OipError('the request must be a JSON object such as {"inputs": [{"name": ..., "shape": [...], '
                       '"datatype": ..., "data": [...]}]}')
    request_id = data.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise OipError(f"'id' must be a string, got {type(request_id).__name__}")
    parameters = data.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise OipError("'parameters' must be an object")
    timeout_us = (parameters or {}).get("timeout")
    if timeout_us is not None and not (_is_number(timeout_us) and timeout_us > 0):
        raise OipError(f"parameters.timeout must be a positive number of microseconds, got {timeout_us!r}")
    inputs = data.get("inputs")
    if inputs is None:
        raise OipError("'inputs' is missing: send one input tensor")
    if not isinstance(inputs, list) or not inputs:
        raise OipError("'inputs' must be a non-empty array of input tensors")
    for index, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise OipError(f"inputs[{index}] must be an object with name, shape, datatype and data")
    outputs = data.get("outputs")
    names: list[str] | None = None
    if outputs is not None:
        if not isinstance(outputs, list):
            raise OipError("'outputs' must be an array of {\"name\": ...} objects")
        names = []
        for index, wanted in enumerate(outputs):
            name = wanted.get("name") if isinstance(wanted, dict) else None
            if not isinstance(name, str):
                raise OipError(f"outputs[{index}] must be an object with a string 'name'")
            if name not in OUTPUT_NAMES:
                raise OipError(f"unknown output {name!r}; this model produces {', '.join(OUTPUT_NAMES)}")
            out_params = wanted.get("parameters") or {}
            if not isinstance(out_params, dict):
                raise OipError(f"outputs[{index}].parameters must be an object")
            if "classification" in out_params:
                raise OipError("the classification extension is not supported; request 'label', "
                               "'class_index' or 'probabilities'")
            if name not in names:
                names.append(name)
    return InferCall(request_id, float(timeout_us) if timeout_us is not None else None, inputs, names)


def _shape(tensor: dict, name: str) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_SHAPE_RANK:
        raise OipError(f"input {name!r}: 'shape' must be an array of 1 to {MAX_SHAPE_RANK} dimensions")
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise OipError(f"input {name!r}: shape {shape} must hold non-negative integers")
    return shape


def _flatten(data: object, shape: list[int], name: str) -> list:
    """Row-major elements of ``data``, flat or nested exactly as ``shape``."""
    if not isinstance(data, list):
        raise OipError(f"input {name!r}: 'data' must be a JSON array, got {type(data).__name__}")
    if not any(isinstance(item, list) for item in data):
        flat = data
    else:
        flat = []

        def walk(node: object, depth: int) -> None:
            if depth == len(shape):
                if isinstance(node, list):
                    raise OipError(f"input {name!r}: 'data' is nested deeper than shape {shape}")
                flat.append(node)
                return
            if not isinstance(node, list) or len(node) != shape[depth]:
                raise OipError(f"input {name!r}: nested 'data' does not match shape {shape}")
            for child in node:
                walk(child, depth + 1)

        walk(data, 0)
    expected = math.prod(shape)
    if len(flat) != expected:
        raise OipError(f"input {name!r}: shape {shape} holds {expected} elements, 'data' has {len(flat)}")
    return flat


def _numbers(flat: list, datatype: str, name: str) -> np.ndarray:
    integer = datatype in _INT_TYPES
    for index, value in enumerate(flat):
        if not _is_number(value) or (integer and not isinstance(value, int)):
            raise OipError(f"input {name!r}: element {index} is {value!r}, not "
                           f"{'an integer' if integer else 'a number'} ({datatype})")
    if integer:
        info = np.iinfo(NUMERIC_TYPES[datatype])
        for index, value in enumerate(flat):
            if not info.min <= value <= info.max:
                raise OipError(f"input {name!r}: element {index} ({value}) is out of range for {datatype}")
    return np.asarray(flat, dtype=np.float64)


def _binary_numbers(chunk: bytes, datatype: str, count: int, name: str) -> np.ndarray:
    dtype = np.dtype(NUMERIC_TYPES[datatype]).newbyteorder("<")
    if len(chunk) != count * dtype.itemsize:
        raise OipError(f"input {name!r}: {len(chunk)} bytes of binary data, shape and {datatype} "
                       f"need {count * dtype.itemsize}")
    return np.frombuffer(chunk, dtype=dtype).astype(np.float64)


def _binary_strings(chunk: bytes, count: int, name: str) -> list[bytes]:
    """Triton's BYTES serialization: each element is a 4-byte little-endian length, then the bytes."""
    elements, offset = [], 0
    while offset < len(chunk):
        if offset + 4 > len(chunk):
            raise OipError(f"input {name!r}: binary BYTES data is truncated")
        (length,) = struct.unpack_from("<I", chunk, offset)
        offset += 4
        if offset + length > len(chunk):
            raise OipError(f"input {name!r}: binary BYTES data is truncated")
        elements.append(chunk[offset:offset + length])
        offset += length
    if len(elements) != count:
        raise OipError(f"input {name!r}: the shape holds {count} elements, the binary data has {len(elements)}")
    return elements


def image_text(element: bytes) -> str:
    """A binary BYTES element: the image file itself, or its base64 text."""
    if element.startswith(_IMAGE_MAGIC):
        return base64.b64encode(element).decode()
    try:
        return element.decode("ascii")
    except UnicodeDecodeError:
        return base64.b64encode(element).decode()  # the ingress says what is wrong with it


@dataclass
class ModelInput:
    rows: list[list[float]] | None = None  # tabular
    images: list[str] | None = None  # image models: base64 files


def read_model_input(call: InferCall, manifest: ModelManifest, binary: bytes | None, max_rows: int) -> ModelInput:
    expected_name = input_name(manifest)
    if len(call.inputs) != 1:
        names = [t.get("name") for t in call.inputs]
        raise OipError(f"model {manifest.name!r} takes one input ({expected_name!r}), got {len(names)}: {names}")
    tensor = call.inputs[0]
    name = tensor.get("name")
    if not isinstance(name, str):
        raise OipError("inputs[0] has no string 'name'")
    if name != expected_name:
        raise OipError(f"unknown input {name!r}; model {manifest.name!r} takes {expected_name!r}")
    datatype = tensor.get("datatype")
    if datatype not in DATATYPES:
        raise OipError(f"input {name!r}: unknown datatype {datatype!r}; the protocol's datatypes are "
                       f"{', '.join(DATATYPES)}")
    shape = _shape(tensor, name)
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise OipError(f"input {name!r}: 'parameters' must be an object")
    binary_size = parameters.get("binary_data_size")
    count = math.prod(shape)

    chunk: bytes | None = None
    if binary_size is not None:
        if binary is None:
            raise OipError(f"input {name!r} has binary_data_size but the request has no "
                           "Inference-Header-Content-Length header (binary tensor data)")
        if not isinstance(binary_size, int) or isinstance(binary_size, bool) or binary_size != len(binary):
            raise OipError(f"input {name!r}: binary_data_size is {binary_size!r}, "
                           f"{len(binary)} bytes of binary data follow the JSON")
        chunk = binary
    else:
        if binary:
            raise OipError(f"{len(binary)} bytes of binary data follow the JSON, but no input has binary_data_size")
        if "data" not in tensor:
            raise OipError(f"input {name!r} has no 'data'")

    if is_image_model(manifest):
        if datatype != "BYTES":
            raise OipError(f"input {name!r}: datatype {datatype}; model {manifest.name!r} takes BYTES "
                           "(base64 PNG or JPEG files), shape [N] or [N, 1]")
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
            raise OipError(f"input {name!r}: shape {shape}; model {manifest.name!r} takes [N] or [N, 1] images")
        if shape[0] > max_rows:
            raise OipError(f"input {name!r} has {shape[0]} images, more than the limit of {max_rows}", 413)
        if chunk is not None:
            return ModelInput(images=[image_text(e) for e in _binary_strings(chunk, count, name)])
        flat = _flatten(tensor["data"], shape, name)
        for index, value in enumerate(flat):
            if not isinstance(value, str):
                raise OipError(f"input {name!r}: element {index} is not a string (base64 of a PNG or JPEG file)")
        if not flat:
            raise OipError(f"input {name!r} is empty: send at least one image")
        return ModelInput(images=flat)

    features = manifest.n_features
    if datatype not in NUMERIC_TYPES:
        raise OipError(f"input {name!r}: datatype {datatype}; model {manifest.name!r} takes FP32 "
                       "(FP16, FP64 and integer types are converted)")
    if len(shape) != 2 or shape[1] != features:
        raise OipError(f"input {name!r}: shape {shape}; model {manifest.name!r} takes [N, {features}] "
                       f"({', '.join(manifest.input.features)})")
    if shape[0] == 0:
        raise OipError(f"input {name!r} is empty: send at least one row")
    if shape[0] > max_rows:
        raise OipError(f"input {name!r} has {shape[0]} rows, more than the limit of {max_rows}", 413)
    if chunk is not None:
        values = _binary_numbers(chunk, datatype, count, name)
    else:
        values = _numbers(_flatten(tensor["data"], shape, name), datatype, name)
    finite = np.isfinite(values)
    if not finite.all():
        index = int(np.argmin(finite))
        raise OipError(f"input {name!r}: element {index} is {values[index]}; every value must be a finite number")
    return ModelInput(rows=values.reshape(shape).tolist())


# A partial model-group answer in tensors: an undecided row's label and class, and a member's
# missing probability (JSON has no NaN, and 0 would be an invented probability).
UNDECIDED_LABEL = ""
MISSING = -1


def infer_outputs(rows: list[RowPrediction], n_classes: int, wanted: list[str] | None) -> list[dict]:
    n = len(rows)
    tensors = {
        "label": {"name": "label", "datatype": "BYTES", "shape": [n],
                  "data": [UNDECIDED_LABEL if r.label is None else r.label for r in rows]},
        "class_index": {"name": "class_index", "datatype": "INT64", "shape": [n],
                        "data": [MISSING if r.class_index is None else r.class_index for r in rows]},
        "probabilities": {"name": "probabilities", "datatype": "FP32", "shape": [n, n_classes],
                          "data": [MISSING if p is None else p for r in rows for p in r.probabilities]},
    }
    return [tensors[name] for name in (wanted or OUTPUT_NAMES)]
