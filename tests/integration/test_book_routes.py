"""The curl commands of the book's READMEs, replayed against the matching profiles.

Shapes follow the reference code (../shared/reference/book-patterns-spec.md, section 12)
with its faults fixed: every row answered, 404 for unknown jobs, 202 while pending,
real health checks, 4xx for bad input.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from tests.integration.conftest import Stack, start_stack
from tests.support.images import b64, sample_images
from toposerve.brokers.settings import Settings


@pytest.fixture
async def stack(settings: Settings, request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    async for started in start_stack(settings, request.param):
        yield started


def sample(index: int = 0) -> tuple[str, str]:
    path, label = sample_images()[index]
    return b64(path.read_bytes()), label


@pytest.mark.parametrize("stack", ["web_single"], indirect=True)
async def test_web_single_book_commands(stack: Stack) -> None:
    client = stack.client
    assert (await client.get("/health")).json() == {"health": "ok"}
    metadata = (await client.get("/metadata")).json()
    assert metadata["data_type"] == "float32" and metadata["data_structure"] == "(1,4)"
    assert metadata["data_sample"] == [[5.1, 3.5, 1.4, 0.2]] and metadata["prediction_structure"] == "(1,3)"
    assert (await client.get("/label")).json() == {"0": "setosa", "1": "versicolor", "2": "virginica"}

    test = (await client.get("/predict/test")).json()
    assert len(test["prediction"]) == 3 and test["prediction"][0] > 0.9
    assert (await client.get("/predict/test/label")).json()["prediction"] == "setosa"

    # curl -X POST -H "Content-Type: application/json" -d '{"data": [[1.0, 2.0, 3.0, 4.0]]}' localhost:8000/predict
    one = await client.post("/predict", json={"data": [[1.0, 2.0, 3.0, 4.0]]})
    assert one.status_code == 200 and len(one.json()["prediction"]) == 3
    # The book answered only the first row of a batch; every row is answered here.
    many = (await client.post("/predict", json={"data": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]})).json()
    assert len(many["predictions"]) == 2 and many["prediction"] == many["predictions"][0]
    labels = (await client.post("/predict/label", json={"data": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]})).json()
    assert labels == {"prediction": "setosa", "predictions": ["setosa", "virginica"]}
    # The book's 500s for a wrong feature count or an empty list are 4xx with the reason.
    bad = await client.post("/predict", json={"data": [[1.0, 2.0, 3.0]]})
    assert bad.status_code == 422 and "expects 4" in bad.json()["error"]["message"]
    assert (await client.post("/predict", json={"data": []})).status_code == 422


@pytest.mark.parametrize("stack", ["asynchronous"], indirect=True)
async def test_asynchronous_book_commands(stack: Stack) -> None:
    client = stack.client
    assert (await client.get("/health")).json() == {"health": "ok"}
    assert isinstance((await client.get("/label")).json(), list)  # the image pattern's label list
    job_id = (await client.get("/predict/test")).json()["job_id"]
    uuid.UUID(job_id)  # a full UUID, not the book's 6 hex digits

    image, label = sample(1)
    # curl -X POST -H "Content-Type: application/json" -d '{"image_data": "'"$(base64 -w0 cat.jpg)"'"}' .../predict
    posted = await client.post("/predict", json={"image_data": image})
    assert posted.status_code == 200
    job_id = posted.json()["job_id"]
    await client.get(f"/v1/jobs/{job_id}", params={"wait": 10})
    result = await client.get(f"/job/{job_id}")
    assert result.status_code == 200 and result.json()[job_id]["prediction"] == label

    unknown = await client.get(f"/job/{uuid.uuid4()}")
    assert unknown.status_code == 404  # the book answered 200 with null
    bad = await client.post("/predict", json={"image_data": "not an image"})
    assert bad.status_code == 422


@pytest.mark.parametrize("stack", ["asynchronous"], indirect=True)
async def test_book_job_route_says_pending_with_202(stack: Stack) -> None:
    await stack.runners["predict"].drain_and_close()
    image, _ = sample(0)
    job_id = (await stack.client.post("/predict", json={"image_data": image})).json()["job_id"]
    pending = await stack.client.get(f"/job/{job_id}")
    assert pending.status_code == 202 and pending.json() == {job_id: {"prediction": ""}}


@pytest.mark.parametrize("stack", ["sync_async"], indirect=True)
async def test_sync_async_book_commands(stack: Stack) -> None:
    client = stack.client
    health_all = (await client.get("/health/all")).json()
    assert health_all == {"preprocess": "ok", "predict_fast": "ok", "predict_accurate": "ok", "store": "ok"}
    test = (await client.get("/predict/test")).json()
    assert set(test) == {"job_id", "digits_fast"} and test["digits_fast"] == "3"
    image, label = sample(2)
    body = (await client.post("/predict", json={"image_data": image})).json()
    assert body["digits_fast"] == label
    await client.get(f"/v1/jobs/{body['job_id']}", params={"wait": 10})
    assert (await client.get(f"/job/{body['job_id']}")).json()[body["job_id"]]["prediction"] == label


def top(probabilities: list[float]) -> int:
    return max(range(len(probabilities)), key=probabilities.__getitem__)


@pytest.mark.parametrize("stack", ["prep_pred"], indirect=True)
async def test_prep_pred_book_commands(stack: Stack) -> None:
    client = stack.client
    metadata = (await client.get("/metadata")).json()
    assert metadata["data_type"] == "str" and metadata["prediction_structure"] == "(1,10)"
    assert (await client.get("/label")).json() == [str(i) for i in range(10)]
    # The book's image patterns answer the softmax as its (1, n_classes) matrix: [[...]].
    test = (await client.get("/predict/test")).json()["prediction"]
    assert len(test) == 1 and len(test[0]) == 10 and top(test[0]) == 3
    assert abs(sum(test[0]) - 1) < 1e-3
    assert (await client.get("/predict/test/label")).json()["prediction"] == "3"
    image, label = sample(3)
    # curl -X POST -H "Content-Type: application/json" -d '{"data": "'"$(base64 -w0 cat.jpg)"'"}' .../predict/label
    assert (await client.post("/predict/label", json={"data": image})).json() == {"prediction": label,
                                                                                   "predictions": [label]}
    answer = (await client.post("/predict", json={"data": image})).json()
    assert len(answer["prediction"]) == 1 and top(answer["prediction"][0]) == int(label)
    assert answer["predictions"] == answer["prediction"]
    bad = await client.post("/predict", json={"data": "bm90IGFuIGltYWdl"})
    assert bad.status_code == 422 and "image" in bad.json()["error"]["message"]


@pytest.mark.parametrize("stack", ["data_cache"], indirect=True)
async def test_data_cache_book_commands(stack: Stack) -> None:
    client = stack.client
    # curl -X POST -H "Content-Type: application/json" -d '{"data": "0000"}' localhost:8000/predict
    # (the book's item ids are its bundled file names; ours are the shipped samples')
    for _ in range(2):  # a miss, then the cached tensor: the same answer
        answer = (await client.post("/predict", json={"data": "digit_7_32x32"})).json()
        assert len(answer["prediction"]) == 1 and len(answer["prediction"][0]) == 10
        assert top(answer["prediction"][0]) == 7
    labelled = (await client.post("/predict/label", json={"data": "digit_7_32x32"})).json()
    assert labelled == {"prediction": "7", "predictions": ["7"]}
    test = (await client.get("/predict/test")).json()["prediction"]
    assert len(test) == 1 and top(test[0]) == 3
    unknown = await client.post("/predict", json={"data": "no_such_item"})
    assert unknown.status_code == 404 and "no_such_item" in unknown.json()["error"]["message"]
    traversal = await client.post("/predict", json={"data": "../../etc/passwd"})  # the book's path traversal
    assert traversal.status_code == 400


@pytest.mark.parametrize("stack", ["prediction_cache"], indirect=True)
async def test_prediction_cache_book_commands(stack: Stack) -> None:
    client = stack.client
    image, label = sample(4)
    first = (await client.post("/predict", json={"data": image})).json()
    again = (await client.post("/predict", json={"data": image})).json()  # answered from the cache
    assert len(first["prediction"]) == 1 and top(first["prediction"][0]) == int(label)
    assert again["prediction"] == first["prediction"]
    assert (await client.post("/predict/label", json={"data": image})).json()["prediction"] == label


@pytest.mark.parametrize("stack", ["synchronous"], indirect=True)
async def test_health_reports_ng_when_a_dependency_is_down(stack: Stack) -> None:
    await stack.ingress.results.client.aclose()
    stack.ingress.results.client.connection_pool.connection_kwargs["port"] = 1  # Redis now unreachable
    response = await stack.client.get("/health")
    assert response.status_code == 503 and response.json()["health"] == "ng"


@pytest.mark.parametrize("stack", ["horizontal_microservice"], indirect=True)
async def test_horizontal_microservice_book_commands(stack: Stack) -> None:
    client = stack.client
    species = ["setosa", "versicolor", "virginica"]
    assert (await client.get("/health/all")).json() == {name: {"health": "ok"} for name in species}
    metadata = (await client.get("/metadata")).json()
    assert metadata["data_structure"] == "(1,4)" and metadata["prediction_structure"] == "(1,2)"
    # curl -X POST -H "Content-Type: application/json" -d '{"data": [[1.0, 2.0, 3.0, 4.0]]}' localhost:9000/predict
    answer = await client.post("/predict", json={"data": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]})
    assert answer.status_code == 200, answer.text  # the book's proxy answers at once, not with a job id
    body = answer.json()
    assert set(body) == set(species)
    for name in species:
        p_species, p_other = body[name]["prediction"]
        assert abs(p_species + p_other - 1) < 1e-6 and len(body[name]["predictions"]) == 2
        assert "status" not in body[name]
    assert body["setosa"]["prediction"][0] > 0.5 > body["virginica"]["prediction"][0]
    assert body["virginica"]["predictions"][1][0] > 0.5  # every row answered, not only the first
    # curl -X POST ... -d '{"data": [[1.0, 2.0, 3.0, 4.0]]}' localhost:9000/predict/label
    labelled = (await client.post("/predict/label", json={"data": [[6.7, 3.0, 5.2, 2.3]]})).json()
    assert labelled["prediction"]["label"] == "virginica"
    per_model = (await client.post("/predict", json={"data": [[6.7, 3.0, 5.2, 2.3]]})).json()
    assert labelled["prediction"]["proba"] == pytest.approx(max(per_model[n]["prediction"][0] for n in species))
    for route in ("/predict/get/test", "/predict/post/test"):
        test = (await client.get(route)).json()
        assert set(test) == set(species) and test["setosa"]["prediction"][0] > 0.5
    bad = await client.post("/predict", json={"data": [[1.0, 2.0]]})
    assert bad.status_code == 422 and "expects 4" in bad.json()["error"]["message"]
