"""api/entry.py: rows preprocessed in the ingress are what the preprocess stage would publish."""

from __future__ import annotations

import uuid
from datetime import timedelta

import numpy as np
import pytest

from toposerve.api.entry import preprocess_rows, queues_on_path
from toposerve.brokers.cache_keys import prediction_key
from toposerve.brokers.messages import Features, InferenceRequest, utc_now
from toposerve.brokers.topology import QueueSpec
from toposerve.consumers.preprocess import PreprocessStage
from toposerve.deploy.profile import MODELS_DIR
from toposerve.models.preprocessing import InputError, InputLimits
from toposerve.models.registry import load_manifests
from toposerve.models.tensors import decode_tensor

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]


@pytest.fixture(scope="module")
def manifests():
    return load_manifests(MODELS_DIR)


def request(**fields) -> InferenceRequest:
    now = utc_now()
    return InferenceRequest(id=uuid.uuid4(), model="iris", created_at=now, deadline=now + timedelta(seconds=2),
                            instances=ROWS, **fields)


async def test_the_ingress_publishes_what_the_preprocess_stage_would(manifests) -> None:
    sent = request(timings={"queued_ms": 1.0})
    stage = PreprocessStage("preprocess", {"iris": manifests["iris"]}, InputLimits(), key_predictions=True)
    (from_stage,) = await stage.handle(sent)
    from_ingress, features = preprocess_rows(sent, manifests["iris"], InputLimits())

    assert isinstance(from_stage.body, Features) and from_stage.routing_key == "features.iris"
    assert from_ingress.kind == "features" and from_ingress.model == "iris"
    # Same job, same deadline and creation time (the deadline and the total both count from arrival).
    for field in ("id", "model", "created_at", "deadline", "batch_id"):
        assert getattr(from_ingress, field) == getattr(from_stage.body, field), field
    assert from_ingress.tensor == from_stage.body.tensor  # byte for byte
    np.testing.assert_array_equal(decode_tensor(from_ingress.tensor), features)
    # The cache key the stage sets for prediction-cache profiles is the one the ingress derives.
    assert prediction_key("toposerve", "iris", manifests["iris"].version, features) == from_stage.body.cache_key
    # Timings so far are kept; the preprocessing done here is timed under the stage's key.
    assert from_ingress.timings["queued_ms"] == 1.0 and from_ingress.timings["preprocess_ms"] >= 0


def test_bad_rows_raise_the_stage_error(manifests) -> None:
    bad = request()
    bad.instances = [[1.0, 2.0]]
    with pytest.raises(InputError, match="expects 4"):
        preprocess_rows(bad, manifests["iris"], InputLimits())


QUEUES = [
    QueueSpec(name="preprocess", binding_keys=["request.*"]),
    QueueSpec(name="predict", binding_keys=["features.*"]),
    QueueSpec(name="aggregate", binding_keys=["prediction.g.*", "join.g"]),
    QueueSpec(name="store", binding_keys=["prediction.*", "failure.*"]),
    QueueSpec(name="catch_all", binding_keys=["#"]),
    QueueSpec(name="both", binding_keys=["request.x", "features.x"]),
]
ANSWER = ["preprocess", "predict", "aggregate", "catch_all", "both"]


def test_a_request_needs_every_answer_queue() -> None:
    assert queues_on_path(QUEUES, ANSWER, "request") == ANSWER


def test_features_from_the_ingress_skip_only_queues_bound_to_requests_alone() -> None:
    assert queues_on_path(QUEUES, ANSWER, "features") == ["predict", "aggregate", "catch_all", "both"]


def test_an_unknown_kind_or_queue_is_kept_required() -> None:
    assert queues_on_path(QUEUES, ANSWER, "telemetry") == ANSWER
    assert queues_on_path(QUEUES, ["elsewhere"], "features") == ["elsewhere"]
