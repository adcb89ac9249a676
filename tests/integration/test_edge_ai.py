"""The edge_ai profile end to end, on real RabbitMQ and Redis: artifacts, pull/verify/update, local
inference equal to the server's, the local endpoint, telemetry store-and-forward and its idempotency."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import httpx
import pytest
import uvicorn

from tests.integration.conftest import Stack, start_stack
from tests.support.images import b64, sample_images, truncated
from toposerve.api.edge_local import create_edge_app
from toposerve.brokers.settings import Settings
from toposerve.brokers.telemetry_messages import N_LATENCY_BUCKETS, LatencyStats, Telemetry
from toposerve.brokers.telemetry_store import TelemetryStore
from toposerve.brokers.topology import exchange_name
from toposerve.deploy.local_services import free_port
from toposerve.deploy.profile import MODELS_DIR
from toposerve.models.registry import load_manifests
from toposerve.producers.edge import EdgeRuntime
from toposerve.producers.edge_agent import EdgeAgent
from toposerve.producers.edge_cache import ArtifactRejected, EdgeError, ModelCache
from toposerve.producers.edge_spool import Spool
from toposerve.producers.edge_telemetry import forward

REPO = Path(__file__).resolve().parents[2]
MODELS = ["digits_fast", "digits_accurate"]


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """A copy of the shipped models, so a test can publish a new version."""
    target = tmp_path / "server-models"
    shutil.copytree(MODELS_DIR, target, ignore=shutil.ignore_patterns("*.py"))
    return target


@pytest.fixture
async def edge_stack(settings: Settings, models_dir: Path) -> AsyncIterator[Stack]:
    async for stack in start_stack(settings.model_copy(update={"models_dir": str(models_dir)}), "edge_ai"):
        yield stack


@contextlib.asynccontextmanager
async def serving(app) -> AsyncIterator[str]:
    """The stack's app on a real port (its lifespan already runs), for the CLI in a subprocess."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def edge_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    # In a thread: the event loop keeps serving the in-process stack meanwhile.
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "toposerve", "edge", *args], cwd=REPO,
                                   env=env, capture_output=True, text=True, timeout=120)


def cli_env(settings: Settings, amqp_url: str) -> dict[str, str]:
    return {**os.environ, "TOPOSERVE_AMQP_URL": amqp_url, "TOPOSERVE_NAMESPACE": settings.namespace}


def dead_amqp_url() -> str:
    return f"amqp://guest:guest@127.0.0.1:{free_port()}/"


async def telemetry_of(stack: Stack, model: str, predictions: int, errors: int = 0, timeout: float = 15.0) -> dict:
    """The model's telemetry once it counts ``predictions`` and ``errors`` (the stage consumes asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        response = await stack.client.get(f"/v1/models/{model}/telemetry")
        assert response.status_code == 200, response.text
        body = response.json()
        if (body["predictions"] >= predictions and body["errors"] >= errors) or time.monotonic() > deadline:
            return body
        await asyncio.sleep(0.05)


def make_report(model: str = "digits_fast", labels: dict[str, int] | None = None, client: str = "edge-test") -> Telemetry:
    labels = {"3": 2, "7": 1} if labels is None else labels
    count = sum(labels.values())
    buckets = [0] * N_LATENCY_BUCKETS
    buckets[1] = count
    now = datetime.now(UTC)
    return Telemetry(id=uuid.uuid4(), model=model, client_id=client, model_version="1", window_start=now,
                     window_end=now, predictions=count, labels=labels,
                     latency_ms=LatencyStats(count=count, sum_ms=2.0 * count, max_ms=2.0 if count else 0,
                                             buckets=buckets))


# --------------------------------------------------------------------------- server side


async def test_artifact_carries_version_sha256_and_a_strong_etag_and_answers_304(edge_stack: Stack,
                                                                                  models_dir: Path) -> None:
    manifest = load_manifests(models_dir)["digits_fast"]
    response = await edge_stack.client.get("/v1/models/digits_fast/artifact")
    assert response.status_code == 200, response.text
    assert hashlib.sha256(response.content).hexdigest() == manifest.sha256
    assert response.headers["x-model-sha256"] == manifest.sha256
    assert response.headers["x-model-version"] == manifest.version
    assert response.headers["etag"] == f'"{manifest.sha256}"'
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["repr-digest"].startswith("sha-256=:")

    for tag in (f'"{manifest.sha256}"', f'W/"{manifest.sha256}"', f'"stale", "{manifest.sha256}"', "*"):
        cached = await edge_stack.client.get("/v1/models/digits_fast/artifact", headers={"If-None-Match": tag})
        assert cached.status_code == 304, tag
        assert cached.content == b"" and cached.headers["etag"] == f'"{manifest.sha256}"'
    stale = await edge_stack.client.get("/v1/models/digits_fast/artifact", headers={"If-None-Match": '"stale"'})
    assert stale.status_code == 200

    head = await edge_stack.client.head("/v1/models/digits_fast/artifact")
    assert head.status_code == 200 and head.headers["x-model-sha256"] == manifest.sha256

    described = (await edge_stack.client.get("/v1/models/digits_fast")).json()
    assert described["version"] == manifest.version and described["sha256"] == manifest.sha256
    served_manifest = (await edge_stack.client.get("/v1/models/digits_fast/manifest")).json()
    assert served_manifest["sha256"] == manifest.sha256 and served_manifest["outputs"] == manifest.outputs

    unknown = await edge_stack.client.get("/v1/models/nope/artifact")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_model"


async def test_a_server_file_that_does_not_match_its_manifest_is_never_served(edge_stack: Stack,
                                                                              models_dir: Path) -> None:
    path = models_dir / "digits_fast.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    response = await edge_stack.client.get("/v1/models/digits_fast/artifact")
    assert response.status_code == 500 and response.json()["error"]["code"] == "artifact_mismatch"


async def test_other_profiles_do_not_distribute_models(sync_stack: Stack) -> None:
    response = await sync_stack.client.get("/v1/models/digits_fast/artifact")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "edge_disabled" and "edge_ai" in response.json()["error"]["message"]


# --------------------------------------------------------------------------- pull / verify / update


class Tampering(httpx.AsyncBaseTransport):
    """Flips one byte of every artifact on the way: a corrupted download with honest headers."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.url.path.endswith("/artifact") and response.status_code == 200:
            body = await response.aread()
            return httpx.Response(200, headers=response.headers, content=bytes([body[0] ^ 0xFF]) + body[1:])
        return response


async def test_pull_verifies_updates_keeps_the_previous_version_and_rejects_a_corrupted_download(
    edge_stack: Stack, models_dir: Path, tmp_path: Path
) -> None:
    cache_root = tmp_path / "edge"
    cache = ModelCache(cache_root, "digits_fast")
    first = await cache.pull(edge_stack.client, "http://ingress")
    assert first.status == "updated" and first.version == "1"
    assert (await cache.pull(edge_stack.client, "http://ingress")).status == "unchanged"  # a 304
    v1 = cache.current()
    assert v1 is not None and (cache.version_dir(v1.sha256) / "digits_fast.onnx").is_file()

    # A corrupted download is rejected; version 1 stays current and nothing is left behind.
    tampered = httpx.AsyncClient(transport=Tampering(httpx.ASGITransport(app=edge_stack.app)), base_url="http://ingress")
    async with tampered:
        with pytest.raises(ArtifactRejected, match="sha256 .* kept version 1"):
            await cache.pull(tampered, "http://ingress", force=True)
    assert cache.current() == v1
    assert sorted(p.name for p in cache.dir.iterdir()) == [".lock", "current.json", "versions"]
    assert [p.name for p in (cache.dir / "versions").iterdir()] == [v1.sha256]

    # The server publishes version 2 (here: the accurate model's graph under the fast model's name).
    accurate = load_manifests(models_dir)["digits_accurate"]
    shutil.copy(models_dir / accurate.file, models_dir / "digits_fast_v2.onnx")
    v2_manifest = accurate.model_copy(update={"name": "digits_fast", "version": "2", "file": "digits_fast_v2.onnx"})
    edge_stack.ingress.manifests["digits_fast"] = v2_manifest

    runtime = EdgeRuntime(cache_root, "edge-test")
    runtime.load("digits_fast")
    agent = EdgeAgent(runtime, ["digits_fast"], "http://ingress", edge_stack.client, dead_amqp_url(), "unused")
    [update] = await agent.refresh_once()
    assert update.status == "updated" and update.version == "2" and update.previous_version == "1"
    current = cache.current()
    assert current is not None and current.version == "2" and current.previous_version == "1"
    assert {p.name for p in (cache.dir / "versions").iterdir()} == {v1.sha256, v2_manifest.sha256}
    # The running client now serves version 2, which answers like the accurate model.
    path, _ = sample_images()[0]
    local = runtime.predict("digits_fast", image_bytes=path.read_bytes())
    assert local.model_version == "2"
    reference = EdgeRuntime(cache_root, "edge-ref")
    await ModelCache(cache_root, "digits_accurate").pull(edge_stack.client, "http://ingress")
    reference.load("digits_accurate")
    assert local.rows == reference.predict("digits_accurate", image_bytes=path.read_bytes()).rows
    assert (await agent.refresh_once())[0].status == "unchanged"

    # A cached file damaged on disk is refused at load, and a forced pull repairs it.
    installed = cache.version_dir(v2_manifest.sha256) / "digits_fast.onnx"
    installed.write_bytes(installed.read_bytes()[:100])
    with pytest.raises(EdgeError, match="cannot be loaded .* --force"):
        EdgeRuntime(cache_root, "edge-test").load("digits_fast")
    assert (await cache.pull(edge_stack.client, "http://ingress", force=True)).version == "2"
    assert EdgeRuntime(cache_root, "edge-test").load("digits_fast").pointer.version == "2"


async def test_pull_errors_are_clear(edge_stack: Stack, tmp_path: Path) -> None:
    with pytest.raises(EdgeError, match="refused model 'nope' .*unknown_model"):
        await ModelCache(tmp_path, "nope").pull(edge_stack.client, "http://ingress")
    with pytest.raises(EdgeError, match="not a model name"):
        ModelCache(tmp_path, "../../etc")
    async with httpx.AsyncClient(timeout=2) as http:
        with pytest.raises(EdgeError, match="cannot reach"):
            await ModelCache(tmp_path, "digits_fast").pull(http, f"http://127.0.0.1:{free_port()}")
    with pytest.raises(EdgeError, match="no cached model 'digits_fast'.*toposerve edge pull"):
        EdgeRuntime(tmp_path, "edge-test").load("digits_fast")


# --------------------------------------------------------------------------- local inference


async def test_local_inference_equals_the_servers_for_every_sample(edge_stack: Stack, tmp_path: Path) -> None:
    runtime = EdgeRuntime(tmp_path, "edge-test")
    for model in MODELS:
        await ModelCache(tmp_path, model).pull(edge_stack.client, "http://ingress")
        runtime.load(model)
    local_app = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_edge_app(runtime)), base_url="http://edge")
    async with local_app:
        for model in MODELS:
            for path, label in sample_images():
                body = {"image": b64(path.read_bytes())}
                server = await edge_stack.client.post(f"/v1/models/{model}/predict", json=body)
                assert server.status_code == 200, server.text
                offline = runtime.predict(model, image_bytes=path.read_bytes())
                assert [r.model_dump() for r in offline.rows] == server.json()["predictions"], (model, path)
                # The local endpoint: same request, same answer shape and content.
                local = await local_app.post(f"/v1/models/{model}/predict", json=body)
                assert local.status_code == 200, local.text
                assert set(local.json()) == set(server.json())
                assert local.json()["predictions"] == server.json()["predictions"]
                assert local.json()["status"] == "succeeded"
                assert local.json()["model_version"] == server.json()["model_version"] == runtime.manifest(model).version
                if model == "digits_accurate":
                    assert offline.rows[0].label == label

            # Bad input is the same 4xx on both.
            for body, status, code in (({"image": b64(truncated(sample_images()[0][0].read_bytes()))}, 422,
                                        "invalid_input"),
                                       ({"image": b64(b"not an image")}, 422, "invalid_input"),
                                       ({"instances": [[1.0] * 64]}, 422, "invalid_input"),
                                       ({"image": "x", "instances": [[1.0]]}, 422, "invalid_request")):
                server = await edge_stack.client.post(f"/v1/models/{model}/predict", json=body)
                local = await local_app.post(f"/v1/models/{model}/predict", json=body)
                assert (server.status_code, local.status_code) == (status, status), (body, server.text, local.text)
                assert server.json()["error"]["code"] == local.json()["error"]["code"] == code
        unknown = await local_app.post("/v1/models/iris/predict", json={"instances": [[1, 2, 3, 4]]})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_model"
        described = await local_app.get("/v1/models/digits_fast")
        assert described.json()["version"] == "1"
    # Errors count in telemetry too.
    reports = {r.model: r for r in runtime.take_reports()}
    assert reports["digits_fast"].errors >= 3
    # 2x per sample: runtime.predict and the local endpoint.
    assert reports["digits_fast"].predictions == 2 * len(sample_images())


# --------------------------------------------------------------------------- telemetry


async def test_telemetry_is_aggregated_once_per_report_even_when_redelivered(edge_stack: Stack) -> None:
    connection = await aio_pika.connect(edge_stack.settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(exchange_name(edge_stack.settings.namespace))
        one, two = make_report(), make_report(labels={"7": 4}, client="edge-other")
        for report in (one, one, two, one):  # a resend and redeliveries of the first
            await exchange.publish(aio_pika.Message(report.model_dump_json().encode(),
                                                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                                   routing_key=f"telemetry.{report.model}")
        body = await telemetry_of(edge_stack, "digits_fast", 7)
        await asyncio.sleep(0.3)  # let any duplicate land, if one were counted
        body = (await edge_stack.client.get("/v1/models/digits_fast/telemetry")).json()
        assert body["reports"] == 2 and body["predictions"] == 7
        assert body["labels"] == {"3": 2, "7": 5} and body["versions"] == {"1": 7}
        assert set(body["clients"]) == {"edge-test", "edge-other"}
        assert body["latency_ms"]["count"] == 7 and body["latency_ms"]["max_ms"] == 2.0
        assert 0 < body["expires_in_s"] <= 7 * 24 * 3600

        # A report that does not fit the model is refused: a failed job under its id, never counted.
        bad = make_report(labels={"cat": 1})
        await exchange.publish(aio_pika.Message(bad.model_dump_json().encode()), routing_key="telemetry.digits_fast")
        deadline = time.monotonic() + 10
        while (response := await edge_stack.client.get(f"/v1/jobs/{bad.id}")).status_code == 404:
            assert time.monotonic() < deadline, "the refused report was not recorded"
            await asyncio.sleep(0.05)
        record = response.json()
        assert record["status"] == "failed" and record["error"]["code"] == "invalid_input"
        assert "'cat'" in record["error"]["message"]
    assert (await edge_stack.client.get("/v1/models/digits_fast/telemetry")).json()["predictions"] == 7

    # Direct: the marker and the aggregate have a TTL; a second record of one id changes nothing.
    store = TelemetryStore(edge_stack.results.client, edge_stack.settings.namespace, ttl_s=120)
    fresh = make_report(model="digits_accurate")
    assert await store.record(fresh) is True and await store.record(fresh) is False
    assert 0 < await store.client.ttl(store.marker_key(fresh.id)) <= 120
    assert 0 < await store.client.ttl(store.key("digits_accurate")) <= 120
    assert (await store.summary("digits_accurate")).predictions == 3


async def test_a_crash_after_sending_before_truncating_resends_harmlessly(edge_stack: Stack, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path, "digits_fast")
    spool.append(make_report())
    settings = edge_stack.settings
    # The client "crashes" after the broker confirmed, before the spool was truncated.
    monkeypatch.setattr(Spool, "remove", lambda self, ids: 0)
    crashed = await forward(spool, settings.amqp_url, settings.namespace)
    assert crashed.pending == 1 and crashed.error is None
    monkeypatch.undo()
    resent = await forward(spool, settings.amqp_url, settings.namespace)
    assert (resent.sent, resent.pending) == (1, 0)
    body = await telemetry_of(edge_stack, "digits_fast", 3)
    await asyncio.sleep(0.3)
    body = (await edge_stack.client.get("/v1/models/digits_fast/telemetry")).json()
    assert body["reports"] == 1 and body["predictions"] == 3


async def test_cli_pull_predict_offline_spool_across_restarts_then_drain(edge_stack: Stack, tmp_path: Path) -> None:
    cache = str(tmp_path / "edge")
    images = [str(path) for path, _ in sample_images()]
    offline = cli_env(edge_stack.settings, dead_amqp_url())
    async with serving(edge_stack.app) as url:
        pulled = await edge_cli("pull", "--server", url, "--model", "digits_fast", "--cache-dir", cache, env=offline)
        assert pulled.returncode == 0, pulled.stderr
        assert "digits_fast: updated to version 1" in pulled.stdout
        again = await edge_cli("pull", "--server", url, "--model", "digits_fast", "--cache-dir", cache, env=offline)
        assert again.returncode == 0 and "version 1 is current" in again.stdout

    # No server and no broker from here on: predictions still work, telemetry is spooled.
    expected: dict[str, int] = {}
    for run in range(2):  # two runs: the second is a client restart
        result = await edge_cli("predict", "--model", "digits_fast", "--cache-dir", cache, *images, env=offline)
        assert result.returncode == 0, result.stderr
        lines = [line.split("\t") for line in result.stdout.splitlines()]
        assert [path for path, _ in lines] == images
        for _, label in lines:
            expected[label] = expected.get(label, 0) + 1
        assert f"{run + 1} reports kept in the spool" in result.stderr
    assert Spool(Path(cache) / "spool", "digits_fast").stats().pending == 2

    # Clear errors, non-zero exits.
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    result = await edge_cli("predict", "--model", "digits_fast", "--cache-dir", cache, "--no-telemetry", str(bad),
                            images[0], env=offline)
    assert result.returncode == 1
    assert f"{bad}: 'image' is not a PNG or JPEG image" in result.stderr and images[0] in result.stdout
    result = await edge_cli("predict", "--model", "digits_nope", "--cache-dir", cache, images[0], env=offline)
    assert result.returncode == 1 and "no cached model 'digits_nope'" in result.stderr
    result = await edge_cli("predict", "--model", "digits_fast", "--cache-dir", cache, "--no-telemetry",
                            str(tmp_path / "missing.png"), env=offline)
    assert result.returncode == 1 and "cannot read the file" in result.stderr

    # The broker is back: the spool drains, and the server counts every prediction once.
    online = cli_env(edge_stack.settings, edge_stack.settings.amqp_url)
    drained = await edge_cli("flush", "--cache-dir", cache, env=online)
    assert drained.returncode == 0, drained.stderr
    assert "digits_fast: 2 sent, 0 pending" in drained.stdout
    assert Spool(Path(cache) / "spool", "digits_fast").stats().pending == 0
    body = await telemetry_of(edge_stack, "digits_fast", 2 * len(images))
    assert body["reports"] == 2 and body["predictions"] == 2 * len(images)
    assert body["labels"] == expected
    assert len(body["clients"]) == 1 and body["errors"] == 0

    # Online, a prediction's report is sent at once.
    result = await edge_cli("predict", "--model", "digits_fast", "--cache-dir", cache, images[0], env=online)
    assert result.returncode == 0 and "spool" not in result.stderr
    assert (await telemetry_of(edge_stack, "digits_fast", 2 * len(images) + 1))["reports"] == 3


async def test_edge_run_serves_locally_and_reports(edge_stack: Stack, tmp_path: Path) -> None:
    """`toposerve edge run` as a user starts it: pulls, serves the predict API, reports on its interval."""
    cache = str(tmp_path / "edge")
    port = free_port()
    env = cli_env(edge_stack.settings, edge_stack.settings.amqp_url)
    async with serving(edge_stack.app) as url:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "toposerve", "edge", "run", "--server", url, "--model", "digits_fast",
            "--cache-dir", cache, "--port", str(port), "--poll-interval", "0.5", "--report-interval", "0.5",
            cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as local:
                deadline = time.monotonic() + 60
                while True:
                    with contextlib.suppress(httpx.TransportError):
                        if (await local.get("/readyz")).status_code == 200:
                            break
                    assert process.returncode is None and time.monotonic() < deadline, "edge run did not start"
                    await asyncio.sleep(0.1)
                path, _ = sample_images()[0]
                body = {"image": b64(path.read_bytes())}
                answer = await local.post("/v1/models/digits_fast/predict", json=body)
                server = await edge_stack.client.post("/v1/models/digits_fast/predict", json=body)
                assert answer.status_code == 200 and answer.json()["predictions"] == server.json()["predictions"]
                bad = await local.post("/v1/models/digits_fast/predict", json={"image": b64(b"junk")})
                assert bad.status_code == 422
            telemetry = await telemetry_of(edge_stack, "digits_fast", 1)
            assert telemetry["predictions"] == 1
        finally:
            process.terminate()
            _, stderr = await asyncio.wait_for(process.communicate(), 30)
    # uvicorn drains, runs the lifespan exit (a last report), then re-raises SIGTERM as the ingress does.
    assert process.returncode in (0, -signal.SIGTERM), stderr.decode()
    assert "Traceback" not in stderr.decode(), stderr.decode()
    assert Spool(Path(cache) / "spool", "digits_fast").stats().pending == 0
    final = await telemetry_of(edge_stack, "digits_fast", 1, errors=1)
    assert (final["predictions"], final["errors"]) == (1, 1)
