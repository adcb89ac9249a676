"""The OpenAPI document is true: valid in every profile, and what a live ingress answers.

1. Every shipped profile's ``app.openapi()`` is a valid OpenAPI document
   (``openapi-spec-validator``), names our error shape and never FastAPI's
   ``HTTPValidationError``, and declares the request bodies the routes read by hand.
2. Against a live ingress (uvicorn on a free port, the profile's stages on real RabbitMQ
   and Redis), schemathesis calls every operation of the document the ingress serves
   at /openapi.json with generated requests, and checks each answer: no 5xx, a
   documented status, a documented content type, a body that matches the schema.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import functools
import itertools
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import hypothesis
import openapi_spec_validator
import pytest
import requests
import schemathesis
import uvicorn
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.conftest import start_stack
from tests.support.images import sample_images
from toposerve.brokers.settings import Settings
from toposerve.deploy.components import build_app, load_checked_profile, models_dir
from toposerve.deploy.local_services import free_port
from toposerve.deploy.processes import ingress_server_config
from toposerve.deploy.profile import available_profiles
from toposerve.models import ImagePreprocessing, load_manifests

# Not positive_data_acceptance: schema-valid rows with the wrong feature count are rightly a 422.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
MAX_EXAMPLES = 15
# Every shipped profile: each mode, the prediction and data caches, batches, edge, groups, stages in the ingress.
LIVE_PROFILES = available_profiles()


def spec_of(profile_name: str, settings: Settings | None = None) -> dict[str, Any]:
    if settings is None:
        return copy.deepcopy(default_spec(profile_name))
    return build_app(load_checked_profile(profile_name, settings), settings).openapi()


@functools.cache
def default_spec(profile_name: str) -> dict[str, Any]:
    """Built once per profile for the tests that only read it (building every app takes a while)."""
    settings = Settings()
    return build_app(load_checked_profile(profile_name, settings), settings).openapi()


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            yield method.upper(), path, operation


# --------------------------------------------------------------------------- the document


# 4xx/5xx answers that are a state, not an error: not ready (the Open Inference Protocol says 4xx).
STATE_ANSWERS = {("/readyz", "503"), ("/health", "503"), ("/v2/health/ready", "400"),
                 ("/v2/models/{model}/ready", "400"), ("/v2/models/{model}/versions/{version}/ready", "400")}


@pytest.mark.parametrize("profile_name", available_profiles())
def test_every_profiles_document_is_valid_and_names_our_errors(profile_name: str) -> None:
    spec = spec_of(profile_name)
    openapi_spec_validator.validate(spec)
    assert "HTTPValidationError" not in json.dumps(spec)
    schemas = spec["components"]["schemas"]
    assert schemas["ErrorBody"]["properties"]["error"] == {"$ref": "#/components/schemas/ErrorDetail"}
    bodies = {(method, path) for method, path, operation in operations(spec) if "requestBody" in operation}
    assert {("POST", "/v1/models/{model}/predict"), ("POST", "/v2/models/{model}/infer"),
            ("POST", "/v2/models/{model}/versions/{version}/infer"), ("POST", "/v1/batches"),
            ("PUT", "/v1/items/{item_id}")} <= bodies
    predict = spec["paths"]["/v1/models/{model}/predict"]["post"]
    assert "instances" in predict["requestBody"]["content"]["application/json"]["schema"]["properties"]
    infer = spec["paths"]["/v2/models/{model}/infer"]["post"]
    assert infer["requestBody"]["content"]["application/json"]["schema"]["required"] == ["inputs"]
    for method, path, operation in operations(spec):
        for status, response in operation["responses"].items():
            if not status.startswith(("4", "5")) or (path, status) in STATE_ANSWERS:
                continue
            tf_serving = path.startswith("/v1/models/{model}") and (
                ":predict" in path or path.endswith("/metadata") or path == "/v1/models/{model}/versions/{version}")
            wanted = "OipErrorBody" if path.startswith("/v2") or tf_serving else "ErrorBody"
            assert response["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{wanted}"}, \
                (method, path, status)


def test_the_artifact_routes_have_an_operation_id_each() -> None:
    spec = spec_of("edge_ai")
    item = spec["paths"]["/v1/models/{model}/artifact"]
    ids = [operation["operationId"] for method, path, operation in operations(spec)]
    assert set(item) == {"get", "head"} and len(ids) == len(set(ids))
    assert "content" not in item["head"]["responses"]["200"]
    assert "application/octet-stream" in item["get"]["responses"]["200"]["content"]


@pytest.mark.parametrize(("profile_name", "main"), [("asynchronous", "202"), ("synchronous", "200"),
                                                     ("sync_async", "200")])
def test_predict_is_documented_as_the_profile_answers(profile_name: str, main: str) -> None:
    responses = spec_of(profile_name)["paths"]["/v1/models/{model}/predict"]["post"]["responses"]
    assert main in responses
    if profile_name == "asynchronous":
        assert "200" not in responses and "504" not in responses
        assert responses["202"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/AcceptedJob"}
    if profile_name == "synchronous":
        assert "202" not in responses and "504" in responses


def test_api_keys_and_rate_limits_are_documented_on_every_path_that_is_not_open() -> None:
    spec = spec_of("synchronous", Settings(api_keys="k1", rate_limit_per_s=5))
    openapi_spec_validator.validate(spec)
    assert set(spec["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    for method, path, operation in operations(spec):
        open_path = path in ("/healthz", "/readyz", "/health", "/health/all") or path.startswith("/v2/health/")
        assert {"401", "403", "429"}.isdisjoint(operation["responses"]) == open_path, (method, path)
        assert ("security" not in operation) == open_path, (method, path)
    plain = spec_of("synchronous")
    assert "securitySchemes" not in plain["components"]
    assert all("401" not in operation["responses"] for _, _, operation in operations(plain))


def test_an_overload_fallback_is_documented_on_the_admitted_routes() -> None:
    settings = Settings()
    profile = load_checked_profile("load_shedding", settings)
    profile.ingress.overload_fallback = {"predictions": []}
    spec = build_app(profile, settings).openapi()
    openapi_spec_validator.validate(spec)
    fallback = {"$ref": "#/components/schemas/OverloadFallback"}
    predict = spec["paths"]["/v1/models/{model}/predict"]["post"]["responses"]["200"]
    assert fallback in predict["content"]["application/json"]["schema"]["anyOf"]
    assert spec["paths"]["/v1/batches"]["post"]["responses"]["200"]["content"]["application/json"]["schema"] == fallback
    # The protocol's routes answer a shed request with their own 503, never the fallback.
    assert "200" in spec["paths"]["/v2/models/{model}/infer"]["post"]["responses"]
    assert "OverloadFallback" not in json.dumps(spec["paths"]["/v2/models/{model}/infer"])
    assert "OverloadFallback" not in json.dumps(spec_of("load_shedding"))


# --------------------------------------------------------------------------- a live ingress


@contextlib.asynccontextmanager
async def live_ingress(settings: Settings, profile_name: str) -> AsyncIterator[str]:
    """The profile's stages and its ingress app (tests.integration.conftest.start_stack), served by
    uvicorn on a free port as `toposerve up` serves it; the base URL once it is ready."""
    stacks = start_stack(settings, profile_name)
    async with contextlib.aclosing(stacks):  # its runners drain even when the test fails
        stack = await anext(stacks)
        port = free_port()
        config = ingress_server_config(stack.app, settings, "127.0.0.1", port)
        config.lifespan = "off"  # start_stack's lifespan manager already runs the app's
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        try:
            while not server.started:
                assert not task.done(), "uvicorn did not start"
                await asyncio.sleep(0.05)
            base_url = f"http://127.0.0.1:{port}"
            await wait_ready(base_url)
            yield base_url
        finally:
            server.should_exit = True
            await task


async def wait_ready(base_url: str, timeout_s: float = 30.0) -> None:
    """Every stage consumes, so a request is answered rather than refused 503 no_consumer."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=base_url) as client:
        while (response := await client.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, f"the ingress is not ready: {response.text}"
            await asyncio.sleep(0.2)


ROWS = {4: [[5.1, 3.5, 1.4, 0.2]]}  # iris's flowers; other tabular models get zeros
ITEM_ID = "sample-1"
JSON_MEDIA = "application/json"


@dataclass(frozen=True)
class Model:
    name: str
    version: str
    predict: dict[str, Any]  # a predict body it answers
    infer: dict[str, Any]  # an Open Inference Protocol request it answers
    tabular: bool


@dataclass
class Served:
    """Requests the profile answers 2xx, beside the generated ones: random rows rarely have a model's
    feature count, random images are never PNG files and random ids name nothing, so without
    these the success schemas would hardly be checked."""

    models: list[Model]
    book_model: str
    image_file: bytes
    items: bool  # requests may name an item (data-cache profiles)
    path_values: dict[str, list[str]] = field(default_factory=dict)  # job_id, batch_id: made before fuzzing

    @classmethod
    def of(cls, settings: Settings, profile_name: str) -> Served:
        profile = load_checked_profile(profile_name, settings)
        manifests = load_manifests(models_dir(settings))
        image_file = sample_images()[0][0].read_bytes()
        image = base64.b64encode(image_file).decode()
        models = []
        # A model group is requested like a model, with its members' input (api.ingress.group_manifest).
        groups = {name: (manifests[group.models[0]], "+".join(f"{m}:{manifests[m].version}" for m in group.models))
                  for name, group in profile.groups.items()}
        for name, (manifest, version) in {**{m: (manifests[m], manifests[m].version) for m in profile.models},
                                          **groups}.items():
            if isinstance(manifest.preprocessing, ImagePreprocessing):
                models.append(Model(name, version, {"image": image}, {"inputs": [
                    {"name": "image", "shape": [1], "datatype": "BYTES", "data": [image]}]}, tabular=False))
            else:
                rows = ROWS.get(manifest.n_features, [[0.0] * manifest.n_features])
                models.append(Model(name, version, {"instances": rows}, {"inputs": [
                    {"name": manifest.input.name, "shape": [1, manifest.n_features], "datatype": "FP32",
                     "data": rows[0]}]}, tabular=True))
        return cls(models, profile.ingress.book_model or profile.models[0], image_file, profile.item_ids)

    @property
    def image_type(self) -> str:
        return "image/png" if self.image_file.startswith(b"\x89PNG") else "image/jpeg"

    def book_body(self) -> dict[str, Any]:
        body = next(m.predict for m in self.models if m.name == self.book_model)
        return {"data": body.get("instances", body.get("image"))}

    def csv(self) -> tuple[str, str] | None:
        """A tabular model and a CSV file of its rows, for POST /v1/batches."""
        model = next((m for m in self.models if m.tabular), None)
        if model is None:
            return None
        return model.name, "\n".join(",".join(map(str, row)) for row in model.predict["instances"]) + "\n"

    async def make_resources(self, client: httpx.AsyncClient) -> None:
        """A job, and in the profiles that take them a batch and an item, for the routes that use them."""
        model = self.models[0]
        response = await client.post(f"/v1/models/{model.name}/predict", json=model.predict)
        assert response.status_code in (200, 202), response.text
        answer = response.json()
        self.path_values["job_id"] = [answer["job"]["id"] if "job" in answer else answer["id"]]
        csv = self.csv()
        if csv is not None:
            response = await client.post("/v1/batches", params={"model": csv[0]}, content=csv[1],
                                         headers={"content-type": "text/csv"})
            if response.status_code == 202:
                self.path_values["batch_id"] = [response.json()["id"]]
        if self.items:  # so predict bodies naming it are answered
            response = await client.put(f"/v1/items/{ITEM_ID}", content=self.image_file,
                                        headers={"content-type": self.image_type})
            assert response.status_code == 201, response.text
        self.path_values["item_id"] = [ITEM_ID]


def strategies(operation: Any, served: Served) -> list[Any]:
    """Requests for ``operation``: generated whole, then with known path values, then with a body that works."""
    path, method = operation.path, operation.method.upper()
    # A job that never appears is waited for all of ?wait= (up to 30 s): ask without waiting.
    # A timeout shorter than a round trip is rightly a 504: ask for a sane one.
    query = {"/v1/jobs/{job_id}": {"wait": 0}, "/v1/models/{model}/predict": {"timeout": 10}}.get(path)
    chosen = [operation.as_strategy(query=query)]
    for parameters, model in path_parameter_sets(path, served):
        chosen.append(operation.as_strategy(path_parameters=parameters, query=query))
        for body in good_bodies(method, path, served, model):
            chosen.append(operation.as_strategy(path_parameters=parameters, **{"query": query, **body}))
    return chosen


def path_parameter_sets(path: str, served: Served) -> Iterator[tuple[dict[str, str], Model | None]]:
    names = re.findall(r"{(\w+)}", path)
    if "model" in names:
        for model in served.models:
            yield {"model": model.name, **({"version": model.version} if "version" in names else {})}, model
    elif names and all(name in served.path_values for name in names):
        for values in itertools.product(*(served.path_values[name] for name in names)):
            yield dict(zip(names, values, strict=True)), None
    elif not names:
        yield {}, None


def good_bodies(method: str, path: str, served: Served, model: Model | None) -> list[dict[str, Any]]:
    """``as_strategy`` arguments with a body ``path`` answers 2xx (for ``model``, when it names one)."""
    if model is not None:
        tf_serving = ({"instances": model.predict["instances"]} if model.tabular
                      else {"inputs": {"image": [model.predict["image"]]}})
        body = {"/v1/models/{model}/predict": model.predict, "/v2/models/{model}/infer": model.infer,
                "/v2/models/{model}/versions/{version}/infer": model.infer,
                "/v1/models/{model}:predict": tf_serving,
                "/v1/models/{model}/versions/{version}:predict": tf_serving}.get(path) if method == "POST" else None
        bodies = [] if body is None else [body]
        if served.items and path == "/v1/models/{model}/predict":
            bodies.append({"item_id": ITEM_ID})
        return [{"body": body, "media_type": JSON_MEDIA} for body in bodies]
    if method == "POST" and path in ("/predict", "/predict/label"):
        return [{"body": served.book_body(), "media_type": JSON_MEDIA}]
    if method == "POST" and path == "/v1/batches" and (csv := served.csv()) is not None:
        return [{"body": csv[1], "media_type": "text/csv", "query": {"model": csv[0]}}]
    if method == "PUT" and path == "/v1/items/{item_id}":
        return [{"body": served.image_file, "media_type": served.image_type}]
    return []


@dataclass
class Findings:
    failures: list[str] = field(default_factory=list)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)  # (operation, status) -> answers

    def summary(self) -> str:
        totals: Counter[int] = Counter()
        for (_, status), count in self.statuses.items():
            totals[status] += count
        return f"{totals.total()} requests: " + ", ".join(f"{status}: {n}" for status, n in sorted(totals.items()))


def fuzz(base_url: str, served: Served) -> Findings:
    """Every operation of the served document, ``MAX_EXAMPLES`` requests each, every answer checked.

    Synchronous (schemathesis calls with requests): run it in a thread, as the server runs on the test's loop.
    """
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    findings = Findings()
    with requests.Session() as session:
        for result in schema.get_all_operations():
            fuzz_operation(result.ok(), base_url, served, session, findings)
    return findings


def fuzz_operation(operation: Any, base_url: str, served: Served, session: requests.Session,
                   findings: Findings) -> None:
    label = f"{operation.method.upper()} {operation.path}"

    # derandomize: the same requests on every run (CI included); no shrinking against a live server.
    @hypothesis.settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
                         phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @hypothesis.given(case=st.one_of(strategies(operation, served)))
    def call(case: schemathesis.Case) -> None:
        response = case.call(base_url=base_url, session=session, timeout=30)
        findings.statuses[(label, response.status_code)] += 1
        case.validate_response(response, checks=CHECKS)

    try:
        call()
    except Exception as exc:  # noqa: BLE001 - collected, so one run names every operation that fails
        findings.failures.append(f"{label}: {exc}")


@pytest.mark.parametrize("profile_name", LIVE_PROFILES)
async def test_a_live_ingress_answers_as_its_document_says(settings: Settings, profile_name: str) -> None:
    served = Served.of(settings, profile_name)
    async with live_ingress(settings, profile_name) as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            await served.make_resources(client)
        findings = await asyncio.to_thread(fuzz, base_url, served)
    print(f"[openapi {profile_name}] {findings.summary()}")
    assert not findings.failures, "\n\n".join(findings.failures)
    # Not vacuous: the predict route answered with its success schema, checked above.
    predicted = {status for label, status in findings.statuses if label == "POST /v1/models/{model}/predict"}
    assert predicted & {200, 202}, predicted
