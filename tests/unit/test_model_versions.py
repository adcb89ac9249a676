"""Model versions without services: the canary choice, version policies in profiles, the registry's versions."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from toposerve.brokers import CanarySpec, Features, Settings, VersionPolicy, canary_bucket, choose_version
from toposerve.deploy.components import load_checked_profile
from toposerve.deploy.profile import PROFILES_DIR, ProfileError, load_profile
from toposerve.models import ModelLoadError, ModelRegistry, encode_tensor, signature_problems

MODELS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "models"


@pytest.mark.parametrize("percent", [1, 10, 50, 97.5])
def test_the_canary_takes_its_percent_of_job_ids(percent: float) -> None:
    ids = [uuid.uuid4() for _ in range(40_000)]
    canary = CanarySpec(version="3", percent=percent)
    share = 100 * sum(choose_version("2", canary, i) == "3" for i in ids) / len(ids)
    assert abs(share - percent) < 0.75


def test_the_choice_is_the_same_for_the_same_id_and_without_a_canary_the_served_version() -> None:
    canary = CanarySpec(version="3", percent=50)
    ids = [uuid.UUID(int=n, version=4) for n in range(1000)]
    first = [choose_version("2", canary, i) for i in ids]
    assert first == [choose_version("2", canary, uuid.UUID(str(i))) for i in ids]  # a retry: same id, same version
    assert {"2", "3"} == set(first)
    assert all(choose_version("2", None, i) == "2" for i in ids)
    assert all(0 <= canary_bucket(i) < 10_000 for i in ids)


def test_policies_refuse_what_cannot_be_served() -> None:
    with pytest.raises(ValueError, match="canary version '2' is the served version"):
        VersionPolicy(serve="2", canary={"version": "2", "percent": 5})
    with pytest.raises(ValueError, match="shadow version '2' is the served version"):
        VersionPolicy(serve="2", shadow="2")
    with pytest.raises(ValueError, match="less than 100"):
        VersionPolicy(serve="2", canary={"version": "3", "percent": 100})
    with pytest.raises(ValueError, match="Extra inputs"):
        VersionPolicy(serve="2", canry={"version": "3", "percent": 5})


def test_a_versioned_message_travels_under_its_versions_key() -> None:
    message = Features(id=uuid.uuid4(), model="iris", tensor=encode_tensor(np.ones((1, 4), dtype=np.float32)))
    assert message.routing_key() == "features.iris"
    message.version = "3"
    assert message.routing_key() == "features.iris.v3"
    with pytest.raises(ValueError):
        Features(id=uuid.uuid4(), model="iris", version="3.1", tensor=encode_tensor(np.ones((1, 1), dtype=np.float32)))


def checked_profile(path: Path, models_dir: Path):
    return load_checked_profile(str(path), Settings(models_dir=str(models_dir)))


def write_profile(tmp_path: Path, models: object, bind_versions: bool = True) -> Path:
    data = yaml.safe_load((PROFILES_DIR / "asynchronous.yaml").read_text())
    data["models"] = models
    data["ingress"].pop("book_model")
    if bind_versions:
        data["stages"]["preprocess"]["consumes"] = ["request.*", "request.*.*"]
        data["stages"]["predict"]["consumes"] = ["features.*", "features.*.*"]
    path = tmp_path / "versioned.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_profile_names_versions_in_its_models_mapping(tmp_path: Path) -> None:
    policy = {"serve": "2", "canary": {"version": "3", "percent": 10}}
    profile = checked_profile(write_profile(tmp_path, {"iris": policy, "digits_fast": {}}), MODELS_DIR)
    assert profile.models == ["iris", "digits_fast"]
    assert profile.versions["iris"].canary == CanarySpec(version="3", percent=10)
    # No serve: the manifest.json version serves.
    profile = checked_profile(write_profile(tmp_path, {"iris": {"shadow": "3"}}), MODELS_DIR)
    assert profile.versions["iris"].serve == "2"
    # The list form is as before: no policies.
    assert checked_profile(write_profile(tmp_path, ["iris"]), MODELS_DIR).versions == {}


def test_a_profile_with_a_wrong_version_fails_with_the_field(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"models\.iris\.canary\.version: iris has no version '7' "
                                           r"\(versions: \['2', '3'\]\)"):
        checked_profile(write_profile(tmp_path, {"iris": {"serve": "2", "canary": {"version": "7", "percent": 5}}}),
                        MODELS_DIR)
    with pytest.raises(ProfileError, match=r"models\.iris: no preprocess stage consumes request\.iris\.v2 \(bind e\.g\. 'request\.\*\.\*'\)"):
        load_profile(str(write_profile(tmp_path, {"iris": {"serve": "2", "shadow": "3"}}, bind_versions=False)))
    cached = yaml.safe_load(write_profile(tmp_path, {"iris": {"serve": "2"}}).read_text())
    cached["ingress"]["prediction_cache_ttl_s"] = 60
    (tmp_path / "cached.yaml").write_text(yaml.safe_dump(cached))
    with pytest.raises(ProfileError, match="version policies and ingress.prediction_cache_ttl_s cannot be combined"):
        load_profile(str(tmp_path / "cached.yaml"))
    with pytest.raises(ProfileError, match="models.iris.canary.percent: Input should be greater than 0"):
        load_profile(str(write_profile(tmp_path, {"iris": {"serve": "2", "canary": {"version": "3", "percent": 0}}})))


def test_the_registry_holds_every_version_and_checks_each_file(tmp_path: Path) -> None:
    registry = ModelRegistry(MODELS_DIR)
    assert sorted(registry.versions["iris"]) == ["2", "3"]
    assert sorted(registry.versions["digits_fast"]) == ["1", "2"]
    assert registry.load("iris", "3").manifest.training["estimator"].startswith("GaussianNB")
    assert registry.load("iris").manifest.version == "2"
    with pytest.raises(ModelLoadError, match=r"no version '9'.*\['2', '3'\]"):
        registry.load("iris", "9")
    # A version whose file was replaced is refused by its sha256.
    copy = tmp_path / "models"
    shutil.copytree(MODELS_DIR, copy)
    (copy / "iris@3.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ModelLoadError, match="sha256"):
        ModelRegistry(copy).load("iris", "3")
    # A version file that says it is another version is left out, with the reason.
    entry = json.loads((copy / "iris@3.json").read_text())
    (copy / "iris@4.json").write_text(json.dumps(entry))
    (copy / "iris@5.json").write_text("{not json")
    registry = ModelRegistry(copy)
    assert sorted(registry.versions["iris"]) == ["2", "3"]
    assert "describes iris@3, not iris@4" in registry.refused_files["iris@4.json"]
    assert "not a valid model manifest" in registry.refused_files["iris@5.json"]


def test_a_new_version_must_keep_the_input_and_labels() -> None:
    registry = ModelRegistry(MODELS_DIR)
    served, candidate = registry.manifest("iris", "2"), registry.manifest("iris", "3")
    assert served is not None and candidate is not None
    assert signature_problems(served, candidate) == []
    wider = candidate.model_copy(update={"input": candidate.input.model_copy(update={"shape": [None, 5]})})
    assert signature_problems(served, wider) == ["input shape [None, 5] differs from version 2's [None, 4]"]
    relabelled = candidate.model_copy(update={"labels": ["a", "b", "c"]})
    assert "labels ['a', 'b', 'c'] differ" in signature_problems(served, relabelled)[0]
    manifest_without_version = json.loads((MODELS_DIR / "iris@3.json").read_text())
    del manifest_without_version["version"]
    assert type(candidate).model_validate(manifest_without_version).version == "1"
