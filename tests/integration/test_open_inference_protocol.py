"""The Open Inference Protocol (KServe v2) REST API, on real RabbitMQ and Redis.

Requests are written from the specification (kserve/open-inference-protocol,
``inference_rest.md``) and, for binary tensors, Triton's binary tensor data
extension: a client reads the model's metadata, builds tensors from it and reads
the outputs by name. Every profile answers infer synchronously, so both the
``synchronous`` and the ``asynchronous`` profiles are exercised.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import AsyncIterator

import numpy as np
import pytest

from tests.integration.conftest import Stack, start_stack
from tests.support.images import b64, sample_images
from toposerve.brokers.settings import Settings

SETOSA = [5.1, 3.5, 1.4, 0.2]
VIRGINICA = [6.7, 3.0, 5.2, 2.3]
VERSICOLOR = [5.9, 3.0, 4.2, 1.5]
PROFILES = ["synchronous", "asynchronous"]


@pytest.fixture(params=PROFILES)
async def stack(settings: Settings, request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    async for started in start_stack(settings, request.param):
        yield started


async def model_input(stack: Stack, model: str, headers: dict[str, str] | None = None) -> dict:
    """The model's one input, as its metadata describes it (what a generic client does)."""
    response = await stack.client.get(f"/v2/models/{model}", headers=headers)
    assert response.status_code == 200, response.text
    (tensor,) = response.json()["inputs"]
    return tensor


def outputs_by_name(body: dict) -> dict[str, dict]:
    return {output["name"]: output for output in body["outputs"]}


def assert_oip_error(response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    return body["error"]


# -- health and metadata ----------------------------------------------------------------------

async def test_health_and_server_metadata(stack: Stack) -> None:
    client = stack.client
    live = await client.get("/v2/health/live")
    assert live.status_code == 200 and live.json()["live"] is True
    ready = await client.get("/v2/health/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    server = (await client.get("/v2")).json()
    assert isinstance(server["name"], str) and server["name"]
    assert isinstance(server["version"], str) and server["version"]
    assert isinstance(server["extensions"], list)
    model = await client.get("/v2/models/iris/ready")
    assert model.status_code == 200 and model.json() == {"name": "iris", "ready": True}
    assert_oip_error(await client.get("/v2/models/no_such_model/ready"), 404)


async def test_model_metadata(stack: Stack) -> None:
    client = stack.client
    iris = (await client.get("/v2/models/iris")).json()
    assert iris["name"] == "iris" and isinstance(iris["platform"], str)
    assert iris["versions"] and all(isinstance(v, str) for v in iris["versions"])
    (tensor,) = iris["inputs"]
    assert tensor["datatype"] == "FP32" and tensor["shape"] == [-1, 4] and tensor["name"]
    outputs = {o["name"]: o for o in iris["outputs"]}
    assert outputs["label"]["datatype"] == "BYTES" and outputs["label"]["shape"] == [-1]
    assert outputs["probabilities"] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}

    digits = (await client.get("/v2/models/digits_fast")).json()
    (tensor,) = digits["inputs"]
    assert tensor["datatype"] == "BYTES" and tensor["shape"][0] == -1
    assert {o["name"]: o for o in digits["outputs"]}["probabilities"]["shape"] == [-1, 10]

    # The versioned forms answer for an existing version, 404 for another.
    version = iris["versions"][0]
    assert (await client.get(f"/v2/models/iris/versions/{version}")).json() == iris
    assert (await client.get(f"/v2/models/iris/versions/{version}/ready")).status_code == 200
    assert_oip_error(await client.get("/v2/models/iris/versions/999"), 404)
    assert_oip_error(await client.get("/v2/models/no_such_model"), 404)


# -- inference ----------------------------------------------------------------------------------

async def test_infer_iris_flat_nested_and_converted(stack: Stack) -> None:
    client = stack.client
    name = (await model_input(stack, "iris"))["name"]
    rows = [SETOSA, VIRGINICA, VERSICOLOR]
    flat = [value for row in rows for value in row]
    requests = [
        {"id": "flat-42", "inputs": [{"name": name, "shape": [3, 4], "datatype": "FP32", "data": flat}]},
        {"id": "nested", "inputs": [{"name": name, "shape": [3, 4], "datatype": "FP32", "data": rows}]},
        {"id": "fp64", "parameters": {"tag": "x"},
         "inputs": [{"name": name, "shape": [3, 4], "datatype": "FP64", "data": flat, "parameters": {}}]},
    ]
    for request in requests:
        response = await client.post("/v2/models/iris/infer", json=request)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model_name"] == "iris" and body["id"] == request["id"]
        assert isinstance(body["model_version"], str)
        outputs = outputs_by_name(body)
        assert outputs["label"]["datatype"] == "BYTES" and outputs["label"]["shape"] == [3]
        assert outputs["label"]["data"] == ["setosa", "virginica", "versicolor"]
        assert outputs["class_index"]["datatype"] == "INT64" and outputs["class_index"]["data"] == [0, 2, 1]
        probabilities = outputs["probabilities"]
        assert probabilities["datatype"] == "FP32" and probabilities["shape"] == [3, 3]
        matrix = np.asarray(probabilities["data"]).reshape(probabilities["shape"])
        assert np.allclose(matrix.sum(axis=1), 1.0, atol=1e-4)
        assert matrix.argmax(axis=1).tolist() == [0, 2, 1]

    # Integers are numbers too; the versioned path infers the same way; no id: one is made up.
    version = (await client.get("/v2/models/iris")).json()["versions"][0]
    response = await client.post(f"/v2/models/iris/versions/{version}/infer", json={
        "inputs": [{"name": name, "shape": [1, 4], "datatype": "INT64", "data": [7, 3, 5, 2]}]})
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == version and response.json()["id"]
    assert outputs_by_name(response.json())["label"]["shape"] == [1]


async def test_infer_digits_with_base64_images(stack: Stack) -> None:
    client = stack.client
    name = (await model_input(stack, "digits_fast"))["name"]
    samples = [(b64(path.read_bytes()), label) for path, label in sample_images()]
    image, label = samples[0]
    response = await client.post("/v2/models/digits_fast/infer", json={
        "id": "one", "inputs": [{"name": name, "shape": [1], "datatype": "BYTES", "data": [image]}]})
    assert response.status_code == 200, response.text
    assert outputs_by_name(response.json())["label"]["data"] == [label]

    # A batch of every sample, shape [N, 1] with nested data: answered in order.
    response = await client.post("/v2/models/digits_accurate/infer", json={
        "inputs": [{"name": name, "shape": [len(samples), 1], "datatype": "BYTES",
                    "data": [[image] for image, _ in samples]}]})
    assert response.status_code == 200, response.text
    outputs = outputs_by_name(response.json())
    assert outputs["label"]["data"] == [label for _, label in samples]
    assert outputs["probabilities"]["shape"] == [len(samples), 10]
    assert len(outputs["probabilities"]["data"]) == len(samples) * 10


async def test_the_outputs_filter(stack: Stack) -> None:
    name = (await model_input(stack, "iris"))["name"]
    inputs = [{"name": name, "shape": [2, 4], "datatype": "FP32", "data": [SETOSA, VIRGINICA]}]
    response = await stack.client.post("/v2/models/iris/infer",
                                       json={"inputs": inputs, "outputs": [{"name": "probabilities"}]})
    assert response.status_code == 200, response.text
    (only,) = response.json()["outputs"]
    assert only["name"] == "probabilities" and only["shape"] == [2, 3]
    response = await stack.client.post("/v2/models/iris/infer", json={
        "inputs": inputs, "outputs": [{"name": "label", "parameters": {"binary_data": False}}, {"name": "class_index"}]})
    assert [o["name"] for o in response.json()["outputs"]] == ["label", "class_index"]
    assert response.json()["outputs"][0]["data"] == ["setosa", "virginica"]
    assert_oip_error(await stack.client.post("/v2/models/iris/infer", json={
        "inputs": inputs, "outputs": [{"name": "logits"}]}), 400)


async def test_concurrent_infer_calls_get_their_own_answers(stack: Stack) -> None:
    name = (await model_input(stack, "iris"))["name"]
    rows = {"setosa": SETOSA, "virginica": VIRGINICA, "versicolor": VERSICOLOR}

    async def one(index: int, label: str) -> tuple[str, str]:
        response = await stack.client.post("/v2/models/iris/infer", json={
            "id": f"req-{index}", "inputs": [{"name": name, "shape": [1, 4], "datatype": "FP32", "data": rows[label]}]})
        assert response.status_code == 200, response.text
        return response.json()["id"], outputs_by_name(response.json())["label"]["data"][0]

    labels = [list(rows)[i % 3] for i in range(60)]
    answers = await asyncio.gather(*(one(i, label) for i, label in enumerate(labels)))
    assert answers == [(f"req-{i}", label) for i, label in enumerate(labels)]


# -- what the protocol calls a failed request ----------------------------------------------------

async def test_bad_requests_are_400_with_an_error_string(stack: Stack) -> None:
    client = stack.client
    name = (await model_input(stack, "iris"))["name"]
    image_name = (await model_input(stack, "digits_fast"))["name"]

    def iris(**changes: object) -> dict:
        return {"inputs": [{"name": name, "shape": [1, 4], "datatype": "FP32", "data": SETOSA, **changes}]}

    cases: dict[str, dict] = {
        "datatype BOOL": iris(datatype="BOOL", data=[True, False, True, False]),
        "datatype FP17": iris(datatype="FP17"),
        "datatype BYTES for a numeric model": iris(datatype="BYTES", data=["a", "b", "c", "d"]),
        "shape product != data length": iris(shape=[2, 4]),
        "shape [N, 3]": iris(shape=[1, 3], data=SETOSA[:3]),
        "shape [4]": iris(shape=[4]),
        "negative shape": iris(shape=[-1, 4]),
        "shape not a list": iris(shape="1,4"),
        "nested data not matching the shape": iris(shape=[2, 4], data=[SETOSA, SETOSA[:3], [1.0]]),
        "data not a list": iris(data="5.1,3.5,1.4,0.2"),
        "data with a string": iris(data=[5.1, "3.5", 1.4, 0.2]),
        "non-integer for INT32": iris(datatype="INT32", data=[5.1, 3.5, 1.4, 0.2]),
        "unknown input name": iris(name="not_the_input"),
        "two inputs": {"inputs": iris()["inputs"] * 2},
        "missing inputs": {"id": "x"},
        "empty inputs": {"inputs": []},
        "no data": {"inputs": [{"name": name, "shape": [1, 4], "datatype": "FP32"}]},
        "id not a string": {"id": 42, **iris()},
        "outputs not a list": {"outputs": "label", **iris()},
        "a JSON array body": [iris()],  # type: ignore[dict-item]
        "image: FP32 features": {"inputs": [{"name": image_name, "shape": [1, 64], "datatype": "FP32",
                                             "data": [0.0] * 64}]},
        "image: not base64": {"inputs": [{"name": image_name, "shape": [1], "datatype": "BYTES",
                                          "data": ["not base64 !!"]}]},
        "image: not an image": {"inputs": [{"name": image_name, "shape": [1], "datatype": "BYTES",
                                            "data": [base64.b64encode(b"hello world").decode()]}]},
    }
    for case, body in cases.items():
        response = await client.post("/v2/models/iris/infer" if "image" not in case
                                     else "/v2/models/digits_fast/infer", json=body)
        assert response.status_code == 400, (case, response.status_code, response.text)
        assert isinstance(response.json().get("error"), str), (case, response.text)

    # Bodies a JSON encoder would not produce.
    raw_cases = {
        "malformed JSON": b'{"inputs": [',
        "NaN": json.dumps(iris(data=[5.1, float("nan"), 1.4, 0.2])).encode(),
        "Infinity": json.dumps(iris(data=[5.1, float("inf"), 1.4, 0.2])).encode(),
        "empty body": b"",
    }
    for case, raw in raw_cases.items():
        response = await client.post("/v2/models/iris/infer", content=raw,
                                     headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (case, response.status_code, response.text)
        assert_oip_error(response, 400)

    assert_oip_error(await client.post("/v2/models/no_such_model/infer", json=iris()), 404)
    assert_oip_error(await client.post("/v2/models/iris/versions/999/infer", json=iris()), 404)


# -- Triton's binary tensor data extension (what tritonclient sends by default) ------------------

def binary_request(header: dict, *tensors: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(tensors), {"Inference-Header-Content-Length": str(len(head)),
                                      "Content-Type": "application/octet-stream"}


def serialize_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


async def test_binary_tensor_data(stack: Stack) -> None:
    name = (await model_input(stack, "iris"))["name"]
    tensor = np.asarray([SETOSA, VIRGINICA], dtype="<f4").tobytes()
    content, headers = binary_request({
        "inputs": [{"name": name, "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": len(tensor)}}],
        "outputs": [{"name": "label", "parameters": {"binary_data": False}}],
    }, tensor)
    response = await stack.client.post("/v2/models/iris/infer", content=content, headers=headers)
    assert response.status_code == 200, response.text
    assert outputs_by_name(response.json())["label"]["data"] == ["setosa", "virginica"]

    image_name = (await model_input(stack, "digits_fast"))["name"]
    samples = sample_images()[:3]
    data = serialize_bytes([path.read_bytes() for path, _ in samples])
    content, headers = binary_request({
        "inputs": [{"name": image_name, "shape": [3], "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(data)}}]}, data)
    response = await stack.client.post("/v2/models/digits_accurate/infer", content=content, headers=headers)
    assert response.status_code == 200, response.text
    assert outputs_by_name(response.json())["label"]["data"] == [label for _, label in samples]

    # A size that does not match the shape is a 400, as is binary data nobody claims.
    content, headers = binary_request({
        "inputs": [{"name": name, "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 32}}]},
        tensor)
    assert_oip_error(await stack.client.post("/v2/models/iris/infer", content=content, headers=headers), 400)
    content, headers = binary_request({
        "inputs": [{"name": name, "shape": [1, 4], "datatype": "FP32", "data": SETOSA}]}, b"\x00" * 8)
    assert_oip_error(await stack.client.post("/v2/models/iris/infer", content=content, headers=headers), 400)


# -- deadlines and readiness ---------------------------------------------------------------------

async def test_a_timeout_parameter_too_short_to_meet_is_a_504(stack: Stack) -> None:
    name = (await model_input(stack, "iris"))["name"]
    response = await stack.client.post("/v2/models/iris/infer", json={
        "parameters": {"timeout": 1},  # microseconds, as in Triton
        "inputs": [{"name": name, "shape": [1, 4], "datatype": "FP32", "data": SETOSA}]})
    assert_oip_error(response, 504)


async def test_without_a_predict_consumer_the_server_is_not_ready_and_infer_is_503(stack: Stack) -> None:
    await stack.runners["predict"].drain_and_close()
    await stack.ingress.monitor.refresh()
    ready = await stack.client.get("/v2/health/ready")
    assert ready.status_code == 400 and ready.json()["ready"] is False
    assert (await stack.client.get("/v2/models/iris/ready")).status_code == 400
    assert (await stack.client.get("/v2/health/live")).status_code == 200
    name = (await model_input(stack, "iris"))["name"]
    response = await stack.client.post("/v2/models/iris/infer", json={
        "inputs": [{"name": name, "shape": [1, 4], "datatype": "FP32", "data": SETOSA}]})
    assert "predict" in assert_oip_error(response, 503)
    assert response.headers["retry-after"] == "1"
