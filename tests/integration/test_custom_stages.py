"""A user's own stage (``kind: custom``) started by ``toposerve up``: the shipped example, and a
module of the user's own outside toposerve, with every guarantee of a built-in stage."""

from __future__ import annotations

import textwrap
from pathlib import Path

import httpx
import pytest

from tests.support.processes import RunningProfile
from toposerve.deploy.examples.iris_labels import DISPLAY_NAMES

SETOSA, VIRGINICA = [5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]


def env(amqp_url: str, redis_url: str, namespace: str, **extra: str) -> dict[str, str]:
    return {"TOPOSERVE_AMQP_URL": amqp_url, "TOPOSERVE_REDIS_URL": redis_url, "TOPOSERVE_NAMESPACE": namespace,
            **extra}


def test_up_runs_the_shipped_post_processing_stage(amqp_url: str, redis_url: str, namespace: str,
                                                    tmp_path: Path) -> None:
    up = RunningProfile("post_processing", env(amqp_url, redis_url, namespace), tmp_path / "up.log")
    try:
        up.wait_ready()
        base = up.base_url
        response = httpx.post(f"{base}/v1/models/iris/predict", json={"instances": [SETOSA, VIRGINICA]})
        assert response.status_code == 202, response.text
        job = httpx.get(f"{base}{response.headers['location']}", params={"wait": 15}, timeout=20).json()
        assert job["status"] == "succeeded", job
        # The answer is the custom stage's, not predict's: the business's names.
        assert [p["label"] for p in job["predictions"]] == [DISPLAY_NAMES["setosa"], DISPLAY_NAMES["virginica"]]

        # A sync answer (the Open Inference Protocol's infer) comes from the custom stage too.
        name = httpx.get(f"{base}/v2/models/iris").json()["inputs"][0]["name"]
        infer = httpx.post(f"{base}/v2/models/iris/infer", timeout=20, json={
            "inputs": [{"name": name, "shape": [1, 4], "datatype": "FP32", "data": SETOSA}]})
        assert infer.status_code == 200, infer.text
        labels = next(o for o in infer.json()["outputs"] if o["name"] == "label")["data"]
        assert labels == [DISPLAY_NAMES["setosa"]]
        assert httpx.get(f"{base}/readyz").status_code == 200
    finally:
        assert up.stop() == 0, up.log()


USER_MODULE = '''
from toposerve.brokers import Prediction
from toposerve.models import InputError

CALLS = {"bug": 0}


def handle(message: Prediction) -> list[Prediction]:
    """A plain def (it runs in a worker thread): a business rule, and a bug, on purpose."""
    label = message.rows[0].label
    if label == "virginica":
        raise InputError("virginica is out of season: no orders taken")
    if label == "versicolor":
        raise RuntimeError("a bug in the user's code")
    return [message.model_copy(update={"rows": [r.model_copy(update={"label": r.label.upper()})
                                                for r in message.rows]})]
'''

USER_PROFILE = '''
name: my_rules
models: [iris]
ingress: {mode: async, result_ttl_s: 600}
stages:
  preprocess: {kind: preprocess, consumes: ["request.*"]}
  predict: {kind: predict, consumes: ["features.*"], publishes: "checked.{model}"}
  rules: {kind: custom, handler: "my_rules_module:handle", consumes: ["checked.*"]}
  store: {kind: store, consumes: ["prediction.*", "failure.*"]}
'''


@pytest.fixture
def user_profile(tmp_path: Path) -> Path:
    (tmp_path / "my_rules_module.py").write_text(textwrap.dedent(USER_MODULE))
    profile = tmp_path / "my_rules.yaml"
    profile.write_text(textwrap.dedent(USER_PROFILE))
    return profile


def test_a_users_own_module_gets_failures_retries_and_dead_letters(
        amqp_url: str, redis_url: str, namespace: str, tmp_path: Path, user_profile: Path) -> None:
    up = RunningProfile(str(user_profile), env(amqp_url, redis_url, namespace, PYTHONPATH=str(tmp_path),
                                               TOPOSERVE_MAX_ATTEMPTS="2"), tmp_path / "up.log")
    try:
        up.wait_ready()
        base = up.base_url

        def job_for(row: list[float]) -> dict:
            response = httpx.post(f"{base}/v1/models/iris/predict", json={"instances": [row]})
            assert response.status_code == 202, response.text
            return httpx.get(f"{base}{response.headers['location']}", params={"wait": 20}, timeout=25).json()

        assert job_for(SETOSA)["predictions"][0]["label"] == "SETOSA"
        refused = job_for(VIRGINICA)  # InputError: the job fails with the user's words, no retry
        assert refused["status"] == "failed", refused
        assert refused["error"]["stage"] == "rules" and "out of season" in refused["error"]["message"]
        buggy = job_for([6.0, 2.9, 4.5, 1.5])  # versicolor: an exception, retried, then failed
        assert buggy["status"] == "failed" and buggy["error"]["code"] == "internal", buggy
        assert "failed 2 times" in buggy["error"]["message"] and "a bug in the user's code" in buggy["error"]["message"]
    finally:
        assert up.stop() == 0, up.log()
