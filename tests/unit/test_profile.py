"""deploy/profile.py (and brokers/topology.QueueSpec): profiles load, or fail naming file and field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from toposerve.brokers.topology import QueueSpec, dead_exchange_name, stage_queue_name
from toposerve.deploy.profile import (
    PROFILES_DIR,
    PredictSpec,
    PreprocessSpec,
    Profile,
    ProfileError,
    StoreSpec,
    available_profiles,
    load_profile,
)

SHIPPED = PROFILES_DIR / "asynchronous.yaml"
KNOWN_MODELS = {"iris", "iris_setosa", "iris_versicolor", "iris_virginica", "digits_fast", "digits_accurate"}


@pytest.fixture
def base() -> dict:
    return yaml.safe_load(SHIPPED.read_text())


def write(tmp_path: Path, data: dict | str, name: str = "broken.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def load_error(path: Path, **kwargs) -> str:
    with pytest.raises(ProfileError) as info:
        load_profile(str(path), **kwargs)
    message = str(info.value)
    assert str(path) in message
    return message


# --------------------------------------------------------------------------- the shipped profile


def test_shipped_asynchronous_profile_loads_by_name() -> None:
    profile = load_profile("asynchronous", known_models=KNOWN_MODELS)
    assert profile.name == "asynchronous"
    assert profile.ingress.mode == "async"
    assert profile.queue_type == "classic"
    assert set(profile.models) <= KNOWN_MODELS
    assert isinstance(profile.stages["preprocess"], PreprocessSpec)
    assert isinstance(profile.stages["predict"], PredictSpec)
    assert isinstance(profile.stages["store"], StoreSpec)
    assert profile.stages["predict"].consumes == ["features.*"]
    assert profile.stages["store"].consumes == ["prediction.*", "failure.*"]
    assert profile.stages["predict"].max_batch_size >= 1
    assert "asynchronous" in available_profiles()


def test_shipped_profile_loads_by_path_too() -> None:
    assert load_profile(str(SHIPPED)) == load_profile("asynchronous")


def test_every_shipped_profile_is_valid() -> None:
    for name in available_profiles():
        profile = load_profile(name, known_models=KNOWN_MODELS)
        assert profile.name == name  # queue names come from it: keep file and name in step


def test_a_copy_of_the_shipped_profile_in_tmp_path_loads(tmp_path: Path, base: dict) -> None:
    assert load_profile(str(write(tmp_path, base, "copy.yaml"))).model_dump() == load_profile("asynchronous").model_dump()


def test_unknown_profile_name_lists_the_available_ones() -> None:
    with pytest.raises(ProfileError, match="asynchronous") as info:
        load_profile("no_such_pattern")
    assert "no_such_pattern" in str(info.value)


# --------------------------------------------------------------------------- broken profiles


def test_unknown_stage_field(tmp_path: Path, base: dict) -> None:
    base["stages"]["predict"]["max_batch_sise"] = 8
    message = load_error(write(tmp_path, base))
    assert "stages.predict" in message and "max_batch_sise" in message
    assert "Extra inputs are not permitted" in message


def test_unknown_top_level_field(tmp_path: Path, base: dict) -> None:
    base["queue_kind"] = "quorum"
    message = load_error(write(tmp_path, base))
    assert "queue_kind" in message


def test_wrong_stage_kind(tmp_path: Path, base: dict) -> None:
    base["stages"]["store"]["kind"] = "stroe"
    message = load_error(write(tmp_path, base))
    assert "stages.store" in message and "stroe" in message


def test_knob_of_another_kind_is_refused(tmp_path: Path, base: dict) -> None:
    base["stages"]["store"]["max_batch_size"] = 8  # a predict knob on a store stage
    message = load_error(write(tmp_path, base))
    assert "stages.store" in message and "max_batch_size" in message


@pytest.mark.parametrize("field, value", [("replicas", 0), ("replicas", -1), ("replicas", 65), ("prefetch", 0),
                                          ("max_queue_length", 0), ("consumes", [])])
def test_out_of_range_stage_knob(tmp_path: Path, base: dict, field: str, value) -> None:
    base["stages"]["predict"][field] = value
    message = load_error(write(tmp_path, base))
    assert "stages.predict" in message and field in message


def test_replicas_of_the_wrong_type(tmp_path: Path, base: dict) -> None:
    base["stages"]["preprocess"]["replicas"] = "two"
    message = load_error(write(tmp_path, base))
    assert "stages.preprocess" in message and "replicas" in message


@pytest.mark.parametrize("field, value", [("mode", "sometimes"), ("port", 70000), ("result_ttl_s", 0)])
def test_bad_ingress_field(tmp_path: Path, base: dict, field: str, value) -> None:
    base["ingress"][field] = value
    message = load_error(write(tmp_path, base))
    assert f"ingress.{field}" in message


def test_rows_go_through_the_preprocess_stage_unless_a_profile_says_otherwise(base: dict) -> None:
    assert Profile.model_validate(base).ingress.preprocess_tabular_in_ingress is False
    # synchronous and web_single (the same topology, packaged in one process) take the
    # shortcut; prep_pred keeps preprocessing a stage of its own (its point).
    shipped = {name: load_profile(name, known_models=KNOWN_MODELS) for name in available_profiles()}
    assert shipped["synchronous"].ingress.preprocess_tabular_in_ingress
    assert shipped["web_single"].ingress.preprocess_tabular_in_ingress
    assert not shipped["prep_pred"].ingress.preprocess_tabular_in_ingress


def test_features_from_the_ingress_need_a_predict_stage_bound_to_them(tmp_path: Path, base: dict) -> None:
    base["ingress"]["preprocess_tabular_in_ingress"] = True
    base["stages"]["predict"]["consumes"] = ["features.iris"]
    message = load_error(write(tmp_path, base))
    assert "preprocess_tabular_in_ingress" in message
    assert "features.digits_fast" in message and "features.iris" not in message.split("consume")[-1]


@pytest.mark.parametrize("name", ["Asynchronous", "a.b", "with-dash", ""])
def test_bad_profile_name(tmp_path: Path, base: dict, name: str) -> None:
    base["name"] = name
    assert "name" in load_error(write(tmp_path, base))


def test_bad_stage_name(tmp_path: Path, base: dict) -> None:
    base["stages"]["Pre.Process"] = base["stages"].pop("preprocess")
    assert "Pre.Process" in load_error(write(tmp_path, base))


def test_bad_yaml(tmp_path: Path) -> None:
    message = load_error(write(tmp_path, "name: asynchronous\nstages: [unclosed\n"))
    assert "not valid YAML" in message


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"], ids=["empty", "list", "scalar"])
def test_yaml_that_is_not_a_mapping(tmp_path: Path, text: str) -> None:
    assert "(top level)" in load_error(write(tmp_path, text))


def test_missing_required_fields(tmp_path: Path, base: dict) -> None:
    del base["models"]
    del base["stages"]["predict"]["consumes"]
    message = load_error(write(tmp_path, base))
    assert "models" in message and "stages.predict" in message and "consumes" in message


def test_predict_stage_serving_a_model_not_in_models(tmp_path: Path, base: dict) -> None:
    base["stages"]["predict"]["models"] = ["iris", "mnist"]
    message = load_error(write(tmp_path, base))
    assert "'predict'" in message and "models" in message and "mnist" in message
    assert "['mnist']" in message  # only the unknown one is named


def test_unknown_model_against_the_manifest(tmp_path: Path, base: dict) -> None:
    base["models"] = ["iris", "resnet50"]
    base["ingress"].pop("book_model", None)  # it names a model this test drops
    path = write(tmp_path, base)
    assert load_profile(str(path)).models == ["iris", "resnet50"]  # no manifest given: not checked
    message = load_error(path, known_models=KNOWN_MODELS)
    assert "models" in message and "resnet50" in message


def test_empty_models_and_stages(tmp_path: Path, base: dict) -> None:
    broken = copy.deepcopy(base)
    broken["models"] = []
    assert "models" in load_error(write(tmp_path, broken, "a.yaml"))
    broken = copy.deepcopy(base)
    broken["stages"] = {}
    assert "stages" in load_error(write(tmp_path, broken, "b.yaml"))


# --------------------------------------------------------------------------- queues


def test_queue_specs_are_named_namespace_profile_stage(base: dict) -> None:
    profile = Profile.model_validate(base)
    specs = {spec.name: spec for spec in profile.queue_specs("t-1234")}
    assert set(specs) == {"t-1234.asynchronous.preprocess", "t-1234.asynchronous.predict",
                          "t-1234.asynchronous.store"}
    assert specs["t-1234.asynchronous.preprocess"].binding_keys == ["request.*"]
    assert specs["t-1234.asynchronous.predict"].binding_keys == ["features.*"]
    assert specs["t-1234.asynchronous.store"].binding_keys == ["prediction.*", "failure.*"]
    assert stage_queue_name("ns", "p", "s") == "ns.p.s"
    for spec in specs.values():
        arguments = spec.arguments("t-1234")
        assert arguments["x-dead-letter-exchange"] == dead_exchange_name("t-1234") == "t-1234.dead"
        assert arguments["x-queue-type"] == "classic"
        assert "x-max-length" not in arguments and "x-overflow" not in arguments


def test_queue_spec_carries_queue_type_and_max_length(tmp_path: Path, base: dict) -> None:
    base["queue_type"] = "quorum"
    base["stages"]["predict"]["max_queue_length"] = 5000
    profile = load_profile(str(write(tmp_path, base, "quorum.yaml")))
    spec = profile.queue_spec("ns", "predict")
    assert spec.queue_type == "quorum" and spec.max_length == 5000
    arguments = spec.arguments("ns")
    assert arguments["x-queue-type"] == "quorum"
    assert arguments["x-max-length"] == 5000
    assert arguments["x-overflow"] == "reject-publish"
    assert arguments["x-dead-letter-exchange"] == "ns.dead"
    assert "x-max-length" not in profile.queue_spec("ns", "store").arguments("ns")


def test_stage_models_default_to_the_profile_models(base: dict) -> None:
    base["stages"]["predict"]["models"] = ["iris"]
    profile = Profile.model_validate(base)
    assert profile.stage_models("predict") == ["iris"]
    assert profile.stage_models("preprocess") == base["models"]
    del base["stages"]["predict"]["models"]
    assert Profile.model_validate(base).stage_models("predict") == base["models"]


def test_queue_arguments_delivery_limit_only_for_quorum() -> None:
    quorum = QueueSpec(name="ns.p.s", binding_keys=["request.*"], queue_type="quorum", delivery_limit=3)
    assert quorum.arguments("ns") == {"x-queue-type": "quorum", "x-dead-letter-exchange": "ns.dead",
                                      "x-delivery-limit": 3}
    classic = QueueSpec(name="ns.p.s", binding_keys=["request.*"], queue_type="classic", delivery_limit=3)
    assert "x-delivery-limit" not in classic.arguments("ns")
    plain = QueueSpec(name="ns.p.s", binding_keys=["request.*"])
    assert plain.arguments("other") == {"x-queue-type": "classic", "x-dead-letter-exchange": "other.dead"}


@pytest.mark.parametrize("fields", [{"binding_keys": []}, {"binding_keys": ["a"], "max_length": 0},
                                    {"binding_keys": ["a"], "delivery_limit": 0}])
def test_queue_spec_validation(fields: dict) -> None:
    with pytest.raises(ValueError):
        QueueSpec(name="q", **fields)
