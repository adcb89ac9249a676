"""Model versions on real RabbitMQ and Redis, on the asynchronous and the synchronous profiles.

A profile derived from the shipped one serves iris@2 with iris@3 as a canary (or shadow); its
stages are bound to the versioned keys (``request.*.*``, ``features.*.*``). Every answer's
``model_version`` is checked against the pure choice (``choose_version``) for its job id, and
its labels against ONNX Runtime run directly on the version's file.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from prometheus_client import generate_latest

from tests.integration.conftest import Stack, start_stack
from toposerve.brokers import CanarySpec, InferenceRequest, JobStatus, Settings, ShadowStore, choose_version, publishing
from toposerve.deploy.cli import main
from toposerve.deploy.profile import PROFILES_DIR
from toposerve.models import ModelRegistry

MODELS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "models"
# Flowers both versions agree on, then odd ones (off the training data) on which they disagree.
IRIS_ROWS = [[5.1, 3.5, 1.4, 0.2], [5.9, 3.0, 4.2, 1.5], [6.7, 3.0, 5.2, 2.3], [4.3, 2.0, 1.0, 2.5],
             [4.3, 2.0, 2.2, 0.1], [4.3, 2.6, 1.0, 1.3]]


def versioned_profile(tmp_path: Path, base: str, policy: dict) -> Path:
    """The shipped ``base`` profile with ``policy`` for iris, its stages bound to versioned keys."""
    data = yaml.safe_load((PROFILES_DIR / f"{base}.yaml").read_text())
    data["models"] = {"iris": policy, "digits_fast": {}}
    data["ingress"].pop("book_model", None)
    for stage in data["stages"].values():
        stage["consumes"] = [bound for key in stage["consumes"] for bound in
                             ([key, f"{key}.*"] if key.startswith(("request", "features")) else [key])]
    path = tmp_path / f"{base}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


async def versioned_stack(settings: Settings, tmp_path: Path, base: str, policy: dict):
    async for stack in start_stack(settings, str(versioned_profile(tmp_path, base, policy))):
        yield stack


async def predict(stack: Stack, rows: list[list[float]], path: str = "/v1/models/iris/predict") -> dict:
    """One request's final record (sync: the answer; async: the job, awaited)."""
    response = await stack.client.post(path, json={"instances": rows})
    assert response.status_code in (200, 202), response.text
    if response.status_code == 200:
        return response.json()
    job_id = uuid.UUID(response.json()["id"])
    for _ in range(300):
        record = await stack.results.get(job_id)
        if record is not None and record.status is not JobStatus.PENDING:
            return record.model_dump(mode="json")
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} did not end")


async def predict_many(stack: Stack, count: int, concurrency: int = 32, path: str = "/v1/models/iris/predict"
                       ) -> list[tuple[int, dict]]:
    """``count`` one-row requests (cycling IRIS_ROWS), ``concurrency`` at a time: (row index, answer) each."""
    answers: list[tuple[int, dict]] = []
    todo = iter(range(count))

    async def caller() -> None:
        for n in todo:
            row = n % len(IRIS_ROWS)
            answers.append((row, await predict(stack, [IRIS_ROWS[row]], path)))

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return answers


def onnx_labels(version: str, rows: list[list[float]]) -> list[str]:
    loaded = ModelRegistry(MODELS_DIR).load("iris", version)
    indices, _ = loaded.run(np.asarray(rows, dtype=np.float32))
    return [loaded.manifest.labels[i] for i in indices]


CANARY = {"serve": "2", "canary": {"version": "3", "percent": 10}}


@pytest.mark.parametrize("base", ["synchronous", "asynchronous"])
async def test_canary_share_follows_the_job_id_and_answers_are_the_versions_own(
        settings: Settings, tmp_path: Path, base: str) -> None:
    count = 2000 if base == "synchronous" else 400  # the async run polls each job: the smaller real run
    async for stack in versioned_stack(settings, tmp_path, base, CANARY):
        answered = await predict_many(stack, count)
        answers = [answer for _, answer in answered]
        canary = CanarySpec(version="3", percent=10)
        assert all(a["status"] == "succeeded" for a in answers), [a for a in answers if a["status"] != "succeeded"][:3]
        # Each job went where the pure choice sends its id (so a retried id lands there again) ...
        wrong = [a for a in answers if a["model_version"] != choose_version("2", canary, uuid.UUID(a["id"]))]
        assert wrong == []
        # ... the share is the percent ...
        share = 100 * sum(a["model_version"] == "3" for a in answers) / len(answers)
        assert abs(share - 10) <= (3 if count >= 2000 else 5), share
        # ... and each version answered with its own model (ONNX Runtime on its file, directly).
        expected = {version: onnx_labels(version, IRIS_ROWS) for version in ("2", "3")}
        assert expected["2"] != expected["3"]  # the rows tell the versions apart
        mislabelled = [(row, a) for row, a in answered if a["predictions"][0]["label"] != expected[a["model_version"]][row]]
        assert mislabelled == []
        # Per-version figures, side by side in the predict stage's metrics.
        exported = generate_latest(stack.runners["predict"].metrics.registry).decode()
        for version in ("2", "3"):
            assert f'toposerve_model_version_jobs_total{{model="iris",outcome="answered",stage="predict",' \
                   f'version="{version}"}}' in exported
            assert f'toposerve_model_version_seconds_count{{model="iris",stage="predict",version="{version}"}}' \
                   in exported


@pytest.mark.parametrize("base", ["synchronous", "asynchronous"])
async def test_a_version_named_in_the_url_answers(settings: Settings, tmp_path: Path, base: str) -> None:
    async for stack in versioned_stack(settings, tmp_path, base, CANARY):
        for version in ("2", "3"):
            answer = await predict(stack, IRIS_ROWS, f"/v1/models/iris/versions/{version}/predict")
            assert answer["model_version"] == version
            assert [row["label"] for row in answer["predictions"]] == onnx_labels(version, IRIS_ROWS)
        response = await stack.client.post("/v1/models/iris/versions/9/predict", json={"instances": IRIS_ROWS})
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "unknown_version"
        assert "'9'" in response.json()["error"]["message"] and "['2', '3']" in response.json()["error"]["message"]
        for wrong in ("3.1", "v3", "%20"):
            response = await stack.client.post(f"/v1/models/iris/versions/{wrong}/predict", json={"instances": IRIS_ROWS})
            assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_version", wrong
        # A model without a policy has its manifest's version only.
        response = await stack.client.post("/v1/models/digits_fast/versions/2/predict", json={"instances": [[0] * 64]})
        assert response.status_code == 404, response.text
        # The Open Inference Protocol's versioned infer.
        body = {"inputs": [{"name": "float_input", "shape": [len(IRIS_ROWS), 4], "datatype": "FP32",
                            "data": [x for row in IRIS_ROWS for x in row]}]}
        oip = await stack.client.post("/v2/models/iris/versions/3/infer", json=body)
        assert oip.status_code == 200, oip.text
        assert oip.json()["model_version"] == "3"
        assert (await stack.client.post("/v2/models/iris/versions/9/infer", json=body)).status_code == 404


@pytest.mark.parametrize("base", ["synchronous", "asynchronous"])
async def test_the_shadow_sees_every_job_and_its_agreement_is_the_direct_computation(
        settings: Settings, tmp_path: Path, base: str) -> None:
    count = 120
    async for stack in versioned_stack(settings, tmp_path, base, {"serve": "2", "shadow": "3"}):
        assert "shadow" in stack.runners  # the profile added the stage: a second binding on features.iris(.*)
        answered = await predict_many(stack, count, concurrency=16)
        expected = {version: onnx_labels(version, IRIS_ROWS) for version in ("2", "3")}
        # Callers only ever get the serving version.
        assert {a["model_version"] for _, a in answered} == {"2"}
        assert all(a["predictions"][0]["label"] == expected["2"][row] for row, a in answered)
        store = ShadowStore(stack.results.client, settings.namespace, 3600)
        for _ in range(250):
            tally = await store.tally("iris")
            if tally.jobs >= count:
                break
            await asyncio.sleep(0.02)
        agrees = [expected["2"][row] == expected["3"][row] for row, _ in answered]
        assert (tally.jobs, tally.agreed, tally.rows, tally.rows_agreed) == (count, sum(agrees), count, sum(agrees))
        for (row, answer), agreed in list(zip(answered, agrees, strict=True))[:20]:
            kept = await store.comparison("iris", uuid.UUID(answer["id"]))
            assert kept is not None and kept.agreed == agreed
            assert kept.serve_labels == [expected["2"][row]] and kept.shadow_labels == [expected["3"][row]]
        report = (await stack.client.get("/v1/models/iris/shadow")).json()
        assert report["agreement_rate"] == pytest.approx(sum(agrees) / count, abs=1e-6)
        assert report["serve_version"] == "2" and report["shadow_version"] == "3"
        assert report["latency"]["serve_ms"] > 0 and report["latency"]["shadow_ms"] > 0
        assert len(report["disagreements"]) == min(20, count - sum(agrees))
        disagreeing = [r for r, e2, e3 in zip(IRIS_ROWS, expected["2"], expected["3"], strict=True) if e2 != e3]
        assert all(np.allclose(d["inputs"][0], rows_like(disagreeing, d["inputs"][0])) for d in report["disagreements"])
        assert (await stack.client.get("/v1/models/digits_fast/shadow")).status_code == 404


def rows_like(rows: list[list[float]], row: list[float]) -> list[float]:
    """The row of ``rows`` closest to ``row`` (the stored input is float32)."""
    return min(rows, key=lambda candidate: float(np.abs(np.subtract(candidate, row)).sum()))


def models_cli(settings: Settings, *args: str):
    """``toposerve models ...`` as an operator runs it, against the test's services and namespace."""
    env = {"TOPOSERVE_AMQP_URL": settings.amqp_url, "TOPOSERVE_REDIS_URL": settings.redis_url,
           "TOPOSERVE_NAMESPACE": settings.namespace, "TOPOSERVE_MODELS_DIR": settings.models_dir or str(MODELS_DIR)}
    return CliRunner().invoke(main, ["models", *args], env=env)


class SteadyLoad:
    """``callers`` callers, each sending one iris request after another (async: waiting for its job) until stopped;
    what each one got, in order."""

    def __init__(self, stack: Stack, callers: int = 4) -> None:
        self.stack = stack
        self.sent = 0
        self.errors: list[str] = []
        self.answers: list[list[tuple[int, dict]]] = [[] for _ in range(callers)]
        self.stop = asyncio.Event()

    async def _caller(self, index: int) -> None:
        row = index
        while not self.stop.is_set():
            row = (row + 1) % len(IRIS_ROWS)
            self.sent += 1
            try:
                self.answers[index].append((row, await predict(self.stack, [IRIS_ROWS[row]])))
            except (AssertionError, httpx.HTTPError) as exc:
                self.errors.append(repr(exc))

    async def each_made(self, more: int) -> None:
        """Wait until every caller got ``more`` answers more than now."""
        targets = [len(a) + more for a in self.answers]
        while any(len(a) < t for a, t in zip(self.answers, targets, strict=True)):
            await asyncio.sleep(0.01)

    def run(self) -> asyncio.Future:
        return asyncio.gather(*(self._caller(i) for i in range(len(self.answers))))


def runs_of(versions: list[str]) -> list[str]:
    """Consecutive repeats folded: ['2', '2', '3', '2'] -> ['2', '3', '2']."""
    return [v for i, v in enumerate(versions) if i == 0 or versions[i - 1] != v]


@pytest.mark.parametrize("base", ["synchronous", "asynchronous"])
async def test_promote_then_rollback_under_steady_load_switches_once_each_and_loses_nothing(
        settings: Settings, tmp_path: Path, base: str) -> None:
    async for stack in versioned_stack(settings, tmp_path, base, {"serve": "2"}):
        load = SteadyLoad(stack)
        running = load.run()
        await load.each_made(5)
        promoted = await asyncio.to_thread(models_cli, settings, "promote", "--profile", str(tmp_path / f"{base}.yaml"),
                                           "iris", "3")
        assert promoted.exit_code == 0, promoted.output
        assert "iris@3 serves now (was 2" in promoted.output
        await load.each_made(8)
        assert (await stack.client.get("/v1/models/iris/versions")).json()["serving"] == "3"
        rolled = await asyncio.to_thread(models_cli, settings, "rollback", "--profile", str(tmp_path / f"{base}.yaml"),
                                         "iris")
        assert rolled.exit_code == 0, rolled.output
        assert "iris@2 serves again (was 3)" in rolled.output
        await load.each_made(8)
        load.stop.set()
        await running
        answers = [answer for caller in load.answers for answer in caller]
        # Exact counts: every request sent was answered, and succeeded.
        assert load.errors == []
        assert len(answers) == load.sent
        assert all(a["status"] == "succeeded" for _, a in answers)
        # Each caller's answers (in the order it sent them) came from 2, then 3, then 2: one switch each way.
        for caller in load.answers:
            assert runs_of([a["model_version"] for _, a in caller]) == ["2", "3", "2"]
        expected = {version: onnx_labels(version, IRIS_ROWS) for version in ("2", "3")}
        assert all(a["predictions"][0]["label"] == expected[a["model_version"]][row] for row, a in answers)


def broken_versions(models_dir: Path) -> None:
    """Next to iris@2 and iris@3: iris@4 with another input signature, iris@5 whose file does not load,
    iris@6 whose file is not the one its manifest hashes."""
    entry = json.loads((models_dir / "iris@3.json").read_text())
    wider = {**entry, "version": "4", "input": {**entry["input"], "shape": [None, 5],
                                               "features": [*entry["input"]["features"], "stem_length_cm"]}}
    (models_dir / "iris@4.json").write_text(json.dumps(wider))
    garbage = b"this is not an ONNX model"
    (models_dir / "iris@5.onnx").write_bytes(garbage)
    (models_dir / "iris@5.json").write_text(json.dumps({**entry, "version": "5", "file": "iris@5.onnx",
                                                        "sha256": hashlib.sha256(garbage).hexdigest()}))
    shutil.copy(models_dir / "iris@3.onnx", models_dir / "iris@6.onnx")
    (models_dir / "iris@6.onnx").write_bytes((models_dir / "iris@6.onnx").read_bytes() + b"\0")
    (models_dir / "iris@6.json").write_text(json.dumps({**entry, "version": "6", "file": "iris@6.onnx"}))


@pytest.mark.parametrize("base", ["synchronous", "asynchronous"])
async def test_reload_loads_a_dropped_in_version_refuses_corrupt_or_incompatible_ones_and_nothing_fails(
        settings: Settings, tmp_path: Path, base: str) -> None:
    models_dir = tmp_path / "models"
    shutil.copytree(MODELS_DIR, models_dir)
    held_back = tmp_path / "held_back"
    held_back.mkdir()
    for name in ("iris@3.json", "iris@3.onnx"):
        shutil.move(models_dir / name, held_back / name)
    settings = settings.model_copy(update={"models_dir": str(models_dir), "version_watch_s": 0.2})
    async for stack in versioned_stack(settings, tmp_path, base, {"serve": "2"}):
        profile = str(tmp_path / f"{base}.yaml")
        load = SteadyLoad(stack, callers=2)
        running = load.run()
        await load.each_made(3)
        # Not in the directory yet: refused, and 2 keeps serving.
        result = await asyncio.to_thread(models_cli, settings, "promote", "--profile", profile, "iris", "3")
        assert result.exit_code == 1 and "iris has no version '3'" in result.output, result.output
        # Dropped in while the profile runs: iris@3, and three broken versions.
        for path in held_back.iterdir():
            shutil.copy(path, models_dir / path.name)
        (models_dir / "iris@3.json").touch()
        broken_versions(models_dir)
        result = await asyncio.to_thread(models_cli, settings, "reload", "--profile", profile)
        said = " ".join(result.output.split())
        assert result.exit_code == 1, result.output
        assert "iris@3: loaded by 1 predict stage process(es)" in said
        assert "iris@4: iris@4 cannot replace iris@2: input shape [None, 5] differs from version 2's [None, 4]" in said
        assert "iris@5: iris@5 is refused: model file" in said and "does not load in ONNX Runtime" in said
        assert "iris@6: iris@6 is refused: model file" in said and "sha256" in said
        assert "refused: iris@4, iris@5, iris@6; the versions serving are unchanged" in said
        for version, reason in {"4": "input shape [None, 5] differs", "5": "does not load in ONNX Runtime",
                                "6": "sha256", "9": "iris has no version '9'"}.items():
            result = await asyncio.to_thread(models_cli, settings, "promote", "--profile", profile, "iris", version)
            assert result.exit_code == 1 and reason in " ".join(result.output.split()), (version, result.output)
        await load.each_made(3)
        assert {a["model_version"] for caller in load.answers for _, a in caller} == {"2"}
        # Named in the URL, the dropped-in version answers without an ingress restart; one whose
        # signature differs is unknown to the ingress, as to the stages.
        assert (await predict(stack, IRIS_ROWS[:1], "/v1/models/iris/versions/3/predict"))["model_version"] == "3"
        refused = await stack.client.post("/v1/models/iris/versions/4/predict", json={"instances": IRIS_ROWS[:1]})
        assert refused.status_code == 404 and "no version '4'" in refused.text, refused.text
        # The sound one serves once promoted.
        result = await asyncio.to_thread(models_cli, settings, "promote", "--profile", profile, "iris", "3")
        assert result.exit_code == 0, result.output
        await load.each_made(5)
        load.stop.set()
        await running
        answers = [answer for caller in load.answers for answer in caller]
        assert load.errors == [] and len(answers) == load.sent
        assert all(a["status"] == "succeeded" for _, a in answers)
        for caller in load.answers:
            assert runs_of([a["model_version"] for _, a in caller]) == ["2", "3"]


async def test_a_job_published_straight_to_the_exchange_twice_lands_on_the_same_version(
        settings: Settings, tmp_path: Path) -> None:
    """A direct AMQP publisher names no version: the predict stage chooses as the ingress does, by job id."""
    policy = {"serve": "2", "canary": {"version": "3", "percent": 50}}
    async for stack in versioned_stack(settings, tmp_path, "asynchronous", policy):
        ids = [uuid.uuid4() for _ in range(30)]
        seen: dict[uuid.UUID, list[str]] = {i: [] for i in ids}
        async with publishing(settings, "test-versions", stack.profile.queue_specs(settings.namespace)) as publisher:
            for _ in range(2):  # the second round: a publisher retrying every job, same ids
                for job_id in ids:
                    await publisher.publish(InferenceRequest(id=job_id, model="iris", instances=[IRIS_ROWS[3]]),
                                            "request.iris")
                for job_id in ids:
                    for _ in range(300):
                        record = await stack.results.get(job_id)
                        if record is not None and record.status is JobStatus.SUCCEEDED:
                            seen[job_id].append(record.model_version or "")
                            break
                        await asyncio.sleep(0.02)
                    await stack.results.delete(job_id)  # so the retry's answer is the one read next
            # A version no stage has: the job fails, saying which versions there are.
            unknown = InferenceRequest(id=uuid.uuid4(), model="iris", version="9", instances=[IRIS_ROWS[0]])
            await publisher.publish(unknown, unknown.routing_key())
        for _ in range(300):
            record = await stack.results.get(unknown.id)
            if record is not None and record.status is not JobStatus.PENDING:
                break
            await asyncio.sleep(0.02)
        assert record is not None and record.status is JobStatus.FAILED and record.error is not None
        assert record.error.code == "unknown_model"
        assert "has no version '9'" in record.error.message and "['2', '3']" in record.error.message
        # Failures are counted per version too, beside the answers.
        exported = generate_latest(stack.runners["predict"].metrics.registry).decode()
        assert 'toposerve_model_version_jobs_total{model="iris",outcome="failed",stage="predict",version="9"} 1.0' \
            in exported
        canary = CanarySpec(version="3", percent=50)
        assert seen == {i: [choose_version("2", canary, i)] * 2 for i in ids}
        assert {v for versions in seen.values() for v in versions} == {"2", "3"}


async def test_an_ingress_that_serves_by_a_promotion_keeps_it_from_expiring(settings: Settings) -> None:
    """A promotion has a TTL like every key; an ingress reading it renews it, so a profile that
    runs longer than the TTL does not silently fall back to the profile's ``serve``."""
    from toposerve.api.versions import IngressVersions
    from toposerve.brokers import ServingVersions
    from toposerve.brokers.connections import connect_redis
    from toposerve.brokers.serving_versions import SERVING_TTL_S

    client = connect_redis(settings.redis_url)
    try:
        serving = ServingVersions(client, settings.namespace)
        await serving.promote("iris", "3", "2")
        await client.expire(serving.key("iris"), 30)  # as if the promotion were 90 days old
        hourly = IngressVersions({}, {}, serving)
        assert await hourly.serving_version("iris") == "3"
        assert await client.ttl(serving.key("iris")) > SERVING_TTL_S - 60  # renewed at its first read
        await client.expire(serving.key("iris"), 30)
        assert await hourly.serving_version("iris") == "3"
        assert await client.ttl(serving.key("iris")) <= 30  # not again within the hour
        await serving.forget("iris")
    finally:
        await client.aclose()
