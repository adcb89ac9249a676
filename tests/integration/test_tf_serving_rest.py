"""TF Serving's REST API on the synchronous profile: the book's synchronous client, both
request forms (row ``instances``, column ``inputs``), model status and metadata."""

from __future__ import annotations

from tests.integration.conftest import Stack
from tests.support.images import b64, sample_images

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]


def images(count: int) -> tuple[list[str], list[str]]:
    samples = sample_images()[:count]
    return [b64(path.read_bytes()) for path, _ in samples], [label for _, label in samples]


async def test_book_rest_client_command(sync_stack: Stack) -> None:
    # The book's client: POST /v1/models/<model>:predict {"inputs": {"image": [<urlsafe b64>]}}
    encoded, labels = images(3)
    urlsafe = [image.replace("+", "-").replace("/", "_") for image in encoded]
    response = await sync_stack.client.post("/v1/models/digits_accurate:predict", json={"inputs": {"image": urlsafe}})
    assert response.status_code == 200, response.text
    assert response.json() == {"outputs": labels}


async def test_row_and_column_forms(sync_stack: Stack) -> None:
    client = sync_stack.client
    encoded, labels = images(2)
    for body in ({"instances": encoded}, {"instances": [{"b64": e} for e in encoded]},
                 {"instances": [{"image": {"b64": e}} for e in encoded]}, {"signature_name": "serving_default",
                                                                          "instances": [{"image": e} for e in encoded]}):
        answer = await client.post("/v1/models/digits_fast:predict", json=body)
        assert answer.status_code == 200 and answer.json() == {"predictions": labels}, (body, answer.text)
    answer = await client.post("/v1/models/digits_fast:predict", json={"inputs": encoded})
    assert answer.json() == {"outputs": labels}

    rows = (await client.post("/v1/models/iris:predict", json={"instances": ROWS})).json()["predictions"]
    assert [row["label"] for row in rows] == ["setosa", "virginica"]
    assert [row["class_index"] for row in rows] == [0, 2] and all(len(row["probabilities"]) == 3 for row in rows)
    named = (await client.post("/v1/models/iris:predict",
                               json={"instances": [{"float_input": row} for row in ROWS]})).json()
    assert named == {"predictions": rows}
    for body in ({"inputs": ROWS}, {"inputs": {"float_input": ROWS}}):
        columns = (await client.post("/v1/models/iris:predict", json=body)).json()
        assert columns == {"outputs": {"label": ["setosa", "virginica"], "class_index": [0, 2],
                                       "probabilities": [row["probabilities"] for row in rows]}}
    version = (await client.get("/v1/models/iris")).json()["version"]
    versioned = await client.post(f"/v1/models/iris/versions/{version}:predict", json={"instances": ROWS})
    assert versioned.json() == {"predictions": rows}


async def test_status_and_metadata(sync_stack: Stack) -> None:
    client = sync_stack.client
    described = (await client.get("/v1/models/digits_accurate")).json()
    version = described["version"]
    assert described["model_version_status"] == [
        {"version": version, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]
    assert (await client.get(f"/v1/models/digits_accurate/versions/{version}")).json() == {
        "model_version_status": described["model_version_status"]}
    # curl localhost:8501/v1/models/inception_v3/versions/0/metadata
    metadata = (await client.get(f"/v1/models/digits_accurate/versions/{version}/metadata")).json()
    assert metadata["model_spec"] == {"name": "digits_accurate", "signature_name": "", "version": version}
    signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["inputs"]["image"]["dtype"] == "DT_STRING"
    assert signature["outputs"]["label"]["tensor_shape"]["dim"] == [{"size": "-1", "name": ""}]
    assert (await client.get("/v1/models/digits_accurate/metadata")).json() == metadata
    iris = (await client.get("/v1/models/iris/metadata")).json()["metadata"]["signature_def"]["signature_def"]
    assert iris["serving_default"]["inputs"]["float_input"]["tensor_shape"]["dim"][1]["size"] == "4"
    missing = await client.get("/v1/models/digits_accurate/versions/999/metadata")
    assert missing.status_code == 404 and "999" in missing.json()["error"]


WRONG_BODIES = [
    ("iris", {"instances": ROWS, "inputs": ROWS}, "exactly one of"),
    ("iris", {}, "exactly one of"),
    ("iris", {"instances": ROWS, "extra": 1}, "unknown keys ['extra']"),
    ("iris", {"instances": ROWS, "signature_name": "other"}, "signature_name 'other'"),
    ("iris", {"instances": []}, "empty"),
    ("iris", {"instances": "5.1"}, "must be a list"),
    ("iris", {"instances": [[5.1, "a", 1.4, 0.2]]}, "instances[0]: expected a list of numbers"),
    ("iris", {"instances": [{"petal": [1, 2, 3, 4]}]}, "one input, 'float_input'"),
    ("iris", {"instances": [[5.1, 3.5, 1.4]]}, "expects 4"),
    ("digits_fast", {"inputs": {"image": [42]}}, "inputs['image'][0]: expected a base64 image"),
    ("digits_fast", {"instances": ["bm90IGFuIGltYWdl"]}, "element 0"),
]


async def test_wrong_bodies_are_400_naming_the_problem(sync_stack: Stack) -> None:
    for model, body, says in WRONG_BODIES:  # one stack for all: each case is a request
        response = await sync_stack.client.post(f"/v1/models/{model}:predict", json=body)
        assert response.status_code == 400, (body, response.text)
        assert says in response.json()["error"], (body, response.text)


    # (too many rows: tests/integration/test_security.py)
    unknown = await sync_stack.client.post("/v1/models/nope:predict", json={"instances": ROWS})
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]
