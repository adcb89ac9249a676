"""TF Serving's REST API (the book's synchronous pattern): pure functions between its JSON and
toposerve's inputs and answers. No I/O; api/tf_serving_routes.py serves them.

Request forms (https://www.tensorflow.org/tfx/serving/api_rest, "Predict API"):

- row: ``{"instances": [...]}``, one element per row: a list of floats (tabular), a
  base64 string or ``{"b64": "..."}`` (images), or an object naming the input
  (``{"float_input": [...]}`` / ``{"image": ...}``);
- column: ``{"inputs": ...}``: the input's values (all rows), or ``{"<input>": values}``.

Answers follow the form asked: ``{"predictions": [...]}`` for rows, ``{"outputs": ...}``
for columns. Image models have one output (the label, as the book's TF Hub signature),
so a prediction is the label string; tabular models have three named outputs (label,
class_index, probabilities), so a row's prediction is an object of them and the column
answer an object of lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from toposerve.api.oip_codec import OUTPUT_NAMES, input_name, is_image_model
from toposerve.brokers import RowPrediction
from toposerve.models import ModelManifest

SIGNATURE = "serving_default"
_ALLOWED_KEYS = {"instances", "inputs", "signature_name"}


class TfServingError(Exception):
    """A body TF Serving would refuse (400 INVALID_ARGUMENT); the message names what was wrong."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass
class TfPredictCall:
    form: Literal["row", "column"]
    rows: list[list[float]] | None = None
    images: list[str] | None = None

    @property
    def count(self) -> int:
        return len(self.rows if self.rows is not None else self.images or [])


# -- the bodies, for the OpenAPI document -----------------------------------------------

class TfPredictRequest(BaseModel):
    """TF Serving's predict body: exactly one of ``instances`` (row form) or ``inputs`` (column form)."""

    signature_name: Literal["serving_default"] | None = None
    instances: list | None = Field(default=None, description="Row form: one element per row or image")
    inputs: list | dict | None = Field(default=None, description="Column form: the input's values, or "
                                                                 "{input name: values}")


class TfRowAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    predictions: list[str | dict | None] = Field(description="One per row: the label (image models) or "
                                                             "{label, class_index, probabilities}")


class TfColumnAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    outputs: list[str | None] | dict[str, list] = Field(description="Image models: the labels; tabular models: "
                                                                    "{output name: one value per row}")


class TfStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    error_code: str
    error_message: str


class TfVersionStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str
    state: Literal["AVAILABLE"]
    status: TfStatus


class TfModelStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_version_status: list[TfVersionStatus]


class TfModelMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_spec: dict[str, str]
    metadata: dict[str, dict]


# -- reading a predict body -------------------------------------------------------------

def _image(value: object, where: str) -> str:
    if isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
        return value["b64"]
    if isinstance(value, str):
        return value
    raise TfServingError(f"{where}: expected a base64 image (a string or {{\"b64\": \"...\"}}), "
                         f"got {type(value).__name__}")


def _row(value: object, where: str) -> list[float]:
    if not isinstance(value, list) or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise TfServingError(f"{where}: expected a list of numbers, got {str(value)[:60]!r}")
    return [float(v) for v in value]


def _named(value: object, name: str, where: str) -> object:
    """An element naming the model's input: ``{"<input>": value}`` -> value (``{"b64": ...}`` is a value)."""
    if not isinstance(value, dict) or set(value) == {"b64"}:
        return value
    if set(value) != {name}:
        raise TfServingError(f"{where}: this model has one input, {name!r}; got {sorted(value)}")
    return value[name]


def parse_tf_predict(data: object, manifest: ModelManifest, max_rows: int) -> TfPredictCall:
    """A parsed JSON body -> the rows or images it holds, or ``TfServingError`` naming the problem."""
    if not isinstance(data, dict):
        raise TfServingError('the body must be a JSON object: {"instances": [...]} or {"inputs": ...}')
    unknown = set(data) - _ALLOWED_KEYS
    if unknown:
        raise TfServingError(f"unknown keys {sorted(unknown)}; a predict body has 'instances' or 'inputs' "
                             "(and optionally 'signature_name')")
    signature = data.get("signature_name")
    if signature not in (None, SIGNATURE):
        raise TfServingError(f"unknown signature_name {signature!r}; this model has {SIGNATURE!r}")
    if ("instances" in data) == ("inputs" in data):
        raise TfServingError("send exactly one of 'instances' (row form) or 'inputs' (column form)")
    name = input_name(manifest)
    image_model = is_image_model(manifest)
    if "instances" in data:
        form: Literal["row", "column"] = "row"
        values = data["instances"]
        if not isinstance(values, list):
            raise TfServingError("'instances' must be a list, one element per row")
        values = [_named(v, name, f"instances[{i}]") for i, v in enumerate(values)]
        where = "instances"
    else:
        form = "column"
        values = _named(data["inputs"], name, "inputs")
        if not isinstance(values, list):
            raise TfServingError(f"'inputs' must be a list of the input's values, or {{{name!r}: [...]}}")
        where = f"inputs[{name!r}]" if isinstance(data["inputs"], dict) else "inputs"
    if not values:
        raise TfServingError(f"{where} is empty: send at least one row")
    if len(values) > max_rows:
        raise TfServingError(f"{len(values)} rows, more than the limit of {max_rows} per request", 413)
    if image_model:
        return TfPredictCall(form, images=[_image(v, f"{where}[{i}]") for i, v in enumerate(values)])
    return TfPredictCall(form, rows=[_row(v, f"{where}[{i}]") for i, v in enumerate(values)])


# -- answers ----------------------------------------------------------------------------

def _outputs(row: RowPrediction) -> dict:
    return {"label": row.label, "class_index": row.class_index, "probabilities": row.probabilities}


def tf_predict_answer(call: TfPredictCall, rows: list[RowPrediction], manifest: ModelManifest) -> dict:
    if is_image_model(manifest):
        labels = [row.label for row in rows]
        return {"predictions": labels} if call.form == "row" else {"outputs": labels}
    if call.form == "row":
        return {"predictions": [_outputs(row) for row in rows]}
    return {"outputs": {name: [_outputs(row)[name] for row in rows] for name in OUTPUT_NAMES}}


def tf_model_status(manifest: ModelManifest) -> dict:
    """``GET /v1/models/{m}``: TF Serving's version status (every served model is AVAILABLE)."""
    return {"model_version_status": [{"version": manifest.version, "state": "AVAILABLE",
                                      "status": {"error_code": "OK", "error_message": ""}}]}


def _tensor_info(name: str, dtype: str, dims: list[int]) -> dict:
    return {"dtype": dtype, "name": f"{SIGNATURE}_{name}:0",
            "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in dims], "unknown_rank": False}}


def tf_model_metadata(manifest: ModelManifest) -> dict:
    """``GET /v1/models/{m}[/versions/{v}]/metadata``: the signature def, as TF Serving shows it."""
    if is_image_model(manifest):
        inputs = {"image": _tensor_info("image", "DT_STRING", [-1])}
        outputs = {"label": _tensor_info("label", "DT_STRING", [-1])}
    else:
        name = manifest.input.name
        inputs = {name: _tensor_info(name, "DT_FLOAT", [-1, manifest.n_features])}
        outputs = {"label": _tensor_info("label", "DT_STRING", [-1]),
                   "class_index": _tensor_info("class_index", "DT_INT64", [-1]),
                   "probabilities": _tensor_info("probabilities", "DT_FLOAT", [-1, len(manifest.labels)])}
    signature = {"inputs": inputs, "outputs": outputs, "method_name": "tensorflow/serving/predict"}
    return {"model_spec": {"name": manifest.name, "signature_name": "", "version": manifest.version},
            "metadata": {"signature_def": {"signature_def": {SIGNATURE: signature}}}}
