"""consumers/custom.py and the profile's ``kind: custom``: what a user gets told when their
handler or profile is wrong, and what their handler's return values become."""

from __future__ import annotations

import uuid

import pytest

from toposerve.brokers import Failure, FailureCode, Features, InferenceRequest, Prediction, RowPrediction
from toposerve.consumers import CustomStage, HandlerError, load_handler
from toposerve.deploy.accounts import profile_accounts
from toposerve.deploy.profile import Profile, ProfileError, load_profile


def prediction() -> Prediction:
    return Prediction(id=uuid.uuid4(), model="iris", model_version="1",
                      rows=[RowPrediction(label="setosa", class_index=0, probabilities=[1.0, 0.0, 0.0])])


@pytest.mark.parametrize(("path", "words"), [
    ("no_colon", "must be 'module:function'"),
    ("no_such_module_anywhere:handle", "cannot import 'no_such_module_anywhere'"),
    ("toposerve.deploy.examples.iris_labels:nope", "has no 'nope'"),
    ("toposerve.deploy.examples.iris_labels:REVIEW_BELOW", "is not callable"),
])
def test_a_handler_that_cannot_be_loaded_is_named_with_the_reason(path: str, words: str) -> None:
    with pytest.raises(HandlerError, match=words):
        load_handler(path)


def untyped(message):  # noqa: ANN001, ANN201 - on purpose
    return None


def takes_a_dict(message: dict) -> None:
    return None


def takes_nothing() -> None:
    return None


@pytest.mark.parametrize(("handler", "words"), [
    (untyped, "annotate its first parameter"),
    (takes_a_dict, "must be one of toposerve's message types"),
    (takes_nothing, "takes no parameter"),
])
def test_a_handler_must_say_what_it_takes(handler, words: str) -> None:
    with pytest.raises(HandlerError, match=words):
        CustomStage("mine", handler)


def both(message: Prediction | Failure) -> None:
    return None


def test_a_union_of_outcomes_decodes_either_and_only_stage_outcomes_are_trusted() -> None:
    stage = CustomStage("mine", both)
    assert stage.input_name() == "Prediction | Failure" and stage.outcomes_from_stages_only
    failure = Failure(id=uuid.uuid4(), model="iris", stage="predict", code=FailureCode.INTERNAL, message="x")
    assert isinstance(stage.decode(failure.model_dump_json().encode()), Failure)
    assert isinstance(stage.decode(prediction().model_dump_json().encode()), Prediction)

    def on_requests(message: InferenceRequest) -> None:
        return None

    assert not CustomStage("mine", on_requests).outcomes_from_stages_only


async def test_return_values_become_outputs_under_their_own_key_or_the_template() -> None:
    def fan_out(message: Prediction) -> list[Prediction]:  # a plain def: run in a thread
        return [message, message]

    async def nothing(message: Prediction) -> None:
        return None

    async def wrong(message: Prediction) -> dict:
        return {"label": "x"}

    sent = prediction()
    assert [o.routing_key for o in await CustomStage("a", fan_out).handle(sent)] == ["prediction.iris"] * 2
    assert await CustomStage("b", nothing).handle(sent) == []
    templated = await CustomStage("c", fan_out, publishes="audited.{kind}.{model}").handle(sent)
    assert {o.routing_key for o in templated} == {"audited.prediction.iris"}
    with pytest.raises(TypeError, match="returned a dict"):
        await CustomStage("d", wrong).handle(sent)


def profile(**predict: object) -> dict:
    return {"name": "mine", "models": ["iris"], "stages": {
        "preprocess": {"kind": "preprocess", "consumes": ["request.*"]},
        "predict": {"kind": "predict", "consumes": ["features.*"], **predict},
        "rules": {"kind": "custom", "handler": "toposerve.deploy.examples.iris_labels:handle",
                  "consumes": ["scored.*"]},
        "store": {"kind": "store", "consumes": ["prediction.*", "failure.*"]}}}


def test_predictions_published_where_no_stage_listens_are_refused_at_load() -> None:
    Profile.model_validate(profile(publishes="scored.{model}"))
    with pytest.raises(ValueError, match="publishes elsewhere.iris, which no other stage consumes"):
        Profile.model_validate(profile(publishes="elsewhere.{model}"))
    with pytest.raises(ValueError, match="publishes"):
        Profile.model_validate(profile(publishes="{model}.scored"))  # the first word must be literal


def test_the_shipped_post_processing_profile_and_its_accounts() -> None:
    shipped = load_profile("post_processing")
    assert shipped.stages["labels"].kind == "custom"
    accounts = {a.role: a for a in profile_accounts("ns", shipped)}
    predict_writes = accounts["predict"].broker.topics[0].write
    custom_writes = accounts["custom"].broker.topics[0].write
    assert "scored" in predict_writes and "prediction" in custom_writes and "failure" in custom_writes
    with pytest.raises(ProfileError):
        load_profile("no_such_profile_here")


def test_features_and_requests_are_inputs_too() -> None:
    def enrich(message: Features) -> Features:
        return message

    assert CustomStage("enrich", enrich).input_name() == "Features"
