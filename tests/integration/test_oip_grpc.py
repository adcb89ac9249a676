"""The Open Inference Protocol over gRPC, with tritonclient (from PyPI) as the client: iris (FP32)
and digits (BYTES images) on a sync profile, the job ids on an async one, and wrong datatypes and
shapes refused with INVALID_ARGUMENT naming the problem."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from tests.integration.conftest import Stack, start_stack
from tests.support.images import sample_images
from toposerve.brokers.settings import Settings
from toposerve.deploy.local_services import free_port

ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)


@contextlib.asynccontextmanager
async def grpc_stack(settings: Settings, profile: str) -> AsyncIterator[tuple[Stack, grpcclient.InferenceServerClient]]:
    """A stack whose ingress serves gRPC, and a tritonclient for it; both closed however the test ends
    (left to the garbage collector, a gRPC channel outliving its event loop crashes the process)."""
    port = free_port()
    stacks = start_stack(settings.model_copy(update={"grpc_port": port}), profile)
    async with contextlib.aclosing(stacks):
        stack = await anext(stacks)
        client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{port}")
        try:
            yield stack, client
        finally:
            await client.close()


def tensor(name: str, values: np.ndarray, datatype: str) -> grpcclient.InferInput:
    infer_input = grpcclient.InferInput(name, list(values.shape), datatype)
    infer_input.set_data_from_numpy(values)
    return infer_input


async def refused(client: grpcclient.InferenceServerClient, model: str, infer_input) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        await client.infer(model, [infer_input])
    return caught.value


async def test_sync_profile_answers_iris_and_digits_and_refuses_wrong_tensors(settings: Settings) -> None:
    async with grpc_stack(settings, "synchronous") as (_, client):
        assert await client.is_server_live() and await client.is_server_ready()
        assert await client.is_model_ready("iris")
        assert (await client.get_server_metadata()).name == "toposerve"
        metadata = await client.get_model_metadata("iris")
        name = metadata.inputs[0].name
        assert metadata.inputs[0].datatype == "FP32" and list(metadata.inputs[0].shape) == [-1, 4]
        assert [o.name for o in metadata.outputs] == ["label", "class_index", "probabilities"]

        result = await client.infer("iris", [tensor(name, ROWS, "FP32")], request_id="req-1")
        assert result.get_response().id == "req-1"
        assert result.as_numpy("label").tolist() == [b"setosa", b"virginica"]
        assert result.as_numpy("class_index").tolist() == [0, 2]
        probabilities = result.as_numpy("probabilities")
        assert probabilities.shape == (2, 3) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-3)
        only = await client.infer("iris", [tensor(name, ROWS[:1], "FP32")],
                                  outputs=[grpcclient.InferRequestedOutput("label")])
        assert [o.name for o in only.get_response().outputs] == ["label"]

        samples = sample_images()[:3]
        images = np.array([path.read_bytes() for path, _ in samples], dtype=np.object_)
        digits = await client.infer("digits_fast", [tensor("image", images, "BYTES")])
        assert digits.as_numpy("label").tolist() == [label.encode() for _, label in samples]

        # Wrong datatype, wrong shape, wrong input name, unknown model: the codec's messages.
        wrong_type = await refused(client, "iris", tensor(name, np.array([[b"a", b"b", b"c", b"d"]],
                                                                          dtype=np.object_), "BYTES"))
        assert wrong_type.status() == "StatusCode.INVALID_ARGUMENT" and "FP32" in wrong_type.message()
        wrong_shape = await refused(client, "iris", tensor(name, ROWS[:, :3].copy(), "FP32"))
        assert wrong_shape.status() == "StatusCode.INVALID_ARGUMENT" and "4" in wrong_shape.message()
        wrong_name = await refused(client, "iris", tensor("petals", ROWS, "FP32"))
        assert wrong_name.status() == "StatusCode.INVALID_ARGUMENT" and name in wrong_name.message()
        not_an_image = await refused(client, "digits_fast", tensor("image", np.array([b"hello"], dtype=np.object_),
                                                                    "BYTES"))
        assert not_an_image.status() == "StatusCode.INVALID_ARGUMENT" and "element 0" in not_an_image.message()
        floats_for_images = await refused(client, "digits_fast", tensor("image", ROWS, "FP32"))
        assert floats_for_images.status() == "StatusCode.INVALID_ARGUMENT"
        unknown = await refused(client, "nope", tensor(name, ROWS, "FP32"))
        assert unknown.status() == "StatusCode.NOT_FOUND" and "nope" in unknown.message()


async def test_async_profile_answers_the_job_ids(settings: Settings) -> None:
    async with grpc_stack(settings, "asynchronous") as (stack, client):
        name = (await client.get_model_metadata("iris")).inputs[0].name
        result = await client.infer("iris", [tensor(name, ROWS, "FP32")])
        response = result.get_response()
        assert list(response.outputs) == []
        job_id = response.parameters["job_id"].string_param
        record = (await stack.client.get(f"/v1/jobs/{job_id}", params={"wait": 10})).json()
        assert record["status"] == "succeeded"
        assert [row["label"] for row in record["predictions"]] == ["setosa", "virginica"]
        images = np.array([path.read_bytes() for path, _ in sample_images()[:2]], dtype=np.object_)
        ids = (await client.infer("digits_fast", [tensor("image", images, "BYTES")])).get_response()
        assert len(ids.parameters["job_ids"].string_param.split(",")) == 2
