"""prediction_cache and data_cache profiles, against real Redis and RabbitMQ."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.integration.conftest import Stack, start_stack
from tests.support.images import b64, sample_images
from toposerve.brokers.settings import Settings
from toposerve.deploy.profile import MODELS_DIR, PROFILES_DIR

IRIS = "/v1/models/iris/predict"
DIGITS = "/v1/models/digits_fast/predict"
ROW = {"instances": [[5.1, 3.5, 1.4, 0.2]]}


def profile_variant(tmp_path: Path, base: str, name: str, **ingress: object) -> str:
    """A copy of a shipped profile with some ingress fields changed (a path for --profile)."""
    data = yaml.safe_load((PROFILES_DIR / f"{base}.yaml").read_text())
    data["ingress"].update(ingress)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


async def cache_filled(stack: Stack, count: int = 1, timeout: float = 10) -> list[str]:
    client = stack.results.client
    for _ in range(int(timeout / 0.02)):
        keys = [k.decode() async for k in client.scan_iter(match=f"{stack.settings.namespace}:pred:*")
                if not k.decode().endswith((":lock", ":followers"))]
        if len(keys) >= count:
            return keys
        await asyncio.sleep(0.02)
    raise AssertionError("the cache was not filled")


def break_redis(client) -> None:
    """Point a client at a port where nothing listens (its pooled connections are dropped)."""
    client.connection_pool.connection_kwargs["port"] = 1
    for connection in list(client.connection_pool._available_connections):
        connection.port = 1


@pytest.fixture
async def cache_stack(settings: Settings) -> AsyncIterator[Stack]:
    async for stack in start_stack(settings, "prediction_cache"):
        yield stack


@pytest.fixture
async def data_stack(settings: Settings) -> AsyncIterator[Stack]:
    async for stack in start_stack(settings, "data_cache"):
        yield stack


# -- prediction cache -------------------------------------------------------------------

async def test_a_miss_goes_through_the_pipeline_and_a_hit_skips_the_queue(cache_stack: Stack) -> None:
    first = await cache_stack.client.post(IRIS, json=ROW)
    assert first.status_code == 200 and first.headers["x-cache"] == "miss"
    assert first.json()["cached"] is False
    keys = await cache_filled(cache_stack)
    version = json.loads((MODELS_DIR / "manifest.json").read_text())["models"]["iris"]["version"]
    assert keys[0].startswith(f"{cache_stack.settings.namespace}:pred:iris:{version}:")
    assert 0 < await cache_stack.results.client.ttl(keys[0]) <= 600
    predicted = cache_stack.runners["predict"].stats.handled

    second = await cache_stack.client.post(IRIS, json=ROW)
    assert second.status_code == 200 and second.headers["x-cache"] == "hit"
    assert second.json()["cached"] is True
    assert second.json()["predictions"] == first.json()["predictions"]
    assert cache_stack.runners["predict"].stats.handled == predicted  # the queue was not touched
    stats = (await cache_stack.client.get("/v1/stats")).json()["prediction_cache"]
    assert stats["hits"] == 1 and stats["misses"] == 1


async def test_the_key_is_the_decoded_image_not_its_file(cache_stack: Stack) -> None:
    path, label = next((p, lbl) for p, lbl in sample_images() if p.suffix == ".png")
    first = await cache_stack.client.post(DIGITS, json={"image": b64(path.read_bytes())})
    assert first.headers["x-cache"] == "miss"
    await cache_filled(cache_stack)
    # The same pixels in another file format and colour mode: the same canonical tensor.
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, format="PNG", compress_level=1)
    assert buffer.getvalue() != path.read_bytes()
    second = await cache_stack.client.post(DIGITS, json={"image": b64(buffer.getvalue())})
    assert second.headers["x-cache"] == "hit" and second.json()["predictions"][0]["label"] == label


async def test_identical_concurrent_misses_are_computed_once(cache_stack: Stack) -> None:
    predict = cache_stack.runners["predict"].stage
    original = predict.batcher.run_batch
    predict.batcher.inline_max_rows = 0

    def slow(model, features):  # keep the leader's work in flight while the others arrive
        import time
        time.sleep(0.3)
        return original(model, features)

    predict.batcher.run_batch = slow
    responses = await asyncio.gather(*(cache_stack.client.post(IRIS, json=ROW) for _ in range(20)))
    assert {r.status_code for r in responses} == {200}
    how = sorted(r.headers["x-cache"] for r in responses)
    assert how.count("miss") == 1 and how.count("coalesced") == 19, how
    assert cache_stack.runners["predict"].stats.handled == 1
    assert len({json.dumps(r.json()["predictions"]) for r in responses}) == 1
    # The cache holds one well-formed entry, and no lock or follower set is left.
    keys = [k.decode() async for k in cache_stack.results.client.scan_iter(
        match=f"{cache_stack.settings.namespace}:pred:*")]
    assert len(keys) == 1
    rows = json.loads(await cache_stack.results.client.get(keys[0]))
    assert rows[0]["label"] == "setosa"


async def test_entries_expire_with_the_profile_ttl(settings: Settings, tmp_path: Path) -> None:
    profile = profile_variant(tmp_path, "prediction_cache", "short_cache", prediction_cache_ttl_s=1)
    async for stack in start_stack(settings, profile):
        assert (await stack.client.post(IRIS, json=ROW)).headers["x-cache"] == "miss"
        await cache_filled(stack)
        assert (await stack.client.post(IRIS, json=ROW)).headers["x-cache"] == "hit"
        await asyncio.sleep(1.5)
        assert (await stack.client.post(IRIS, json=ROW)).headers["x-cache"] == "miss"


async def test_a_new_model_version_never_serves_the_old_versions_answer(settings: Settings, tmp_path: Path) -> None:
    async for stack in start_stack(settings, "prediction_cache"):
        assert (await stack.client.post(IRIS, json=ROW)).headers["x-cache"] == "miss"
        await cache_filled(stack)
        assert (await stack.client.post(IRIS, json=ROW)).headers["x-cache"] == "hit"
    # The same model retrained as a new version (same file here; only the version matters).
    models = tmp_path / "models"
    shutil.copytree(MODELS_DIR, models, ignore=shutil.ignore_patterns("*.py"))
    manifest = json.loads((models / "manifest.json").read_text())
    manifest["models"]["iris"]["version"] = new_version = manifest["models"]["iris"]["version"] + "-retrained"
    (models / "manifest.json").write_text(json.dumps(manifest))
    async for stack in start_stack(settings.model_copy(update={"models_dir": str(models)}), "prediction_cache"):
        response = await stack.client.post(IRIS, json=ROW)
        assert response.headers["x-cache"] == "miss" and response.json()["model_version"] == new_version


async def test_async_profile_hit_is_a_succeeded_job_at_once_and_misses_coalesce(
    settings: Settings, tmp_path: Path
) -> None:
    profile = profile_variant(tmp_path, "prediction_cache", "async_cache", mode="async")
    async for stack in start_stack(settings, profile):
        predict = stack.runners["predict"]
        await predict.drain_and_close()  # misses wait in the queue: they must coalesce
        misses = await asyncio.gather(*(stack.client.post(IRIS, json=ROW) for _ in range(5)))
        assert sorted(r.headers["x-cache"] for r in misses) == ["coalesced"] * 4 + ["miss"]
        from toposerve.deploy.components import build_stage_runner
        restarted = build_stage_runner(stack.profile, "predict", settings)
        await restarted.start()
        try:
            for response in misses:
                job = (await stack.client.get(response.headers["location"], params={"wait": 10})).json()
                assert job["status"] == "succeeded" and job["predictions"][0]["label"] == "setosa"
            assert restarted.stats.handled == 1
            hit = await stack.client.post(IRIS, json=ROW)
            assert hit.status_code == 202 and hit.headers["x-cache"] == "hit"
            assert hit.json()["status"] == "succeeded" and hit.json()["cached"] is True
            job = (await stack.client.get(hit.headers["location"])).json()
            assert job["status"] == "succeeded" and job["cached"] is True
        finally:
            await restarted.drain_and_close()


async def test_with_the_cache_unreachable_requests_are_still_served(cache_stack: Stack) -> None:
    cache = cache_stack.ingress.prediction_cache
    from toposerve.brokers.connections import connect_redis
    cache.client = connect_redis("redis://127.0.0.1:1/0")
    cache._fill = cache.client.register_script("return 0")
    response = await cache_stack.client.post(IRIS, json=ROW)
    assert response.status_code == 200 and response.json()["predictions"][0]["label"] == "setosa"
    assert (await cache_stack.client.get("/v1/stats")).json()["prediction_cache"]["errors"] >= 1


# -- data cache -----------------------------------------------------------------------

async def test_items_are_loaded_once_then_served_from_the_feature_cache(data_stack: Stack) -> None:
    for path, label in sample_images():
        first = await data_stack.client.post(DIGITS, json={"item_id": path.stem})
        assert first.status_code == 200, first.text
        assert first.json()["predictions"][0]["label"] == label
        assert {"item_load_ms", "item_decode_ms"} <= set(first.json()["timings"])
        second = await data_stack.client.post(DIGITS, json={"item_id": path.stem})
        timings = second.json()["timings"]
        assert "item_cache_hit_ms" in timings and "item_load_ms" not in timings
        assert second.json()["predictions"] == first.json()["predictions"]
    keys = [k async for k in data_stack.results.client.scan_iter(match=f"{data_stack.settings.namespace}:features:*")]
    assert len(keys) == len(sample_images())
    for key in keys:
        assert 0 < await data_stack.results.client.ttl(key) <= 900


async def test_items_can_come_from_redis(data_stack: Stack) -> None:
    path, label = sample_images()[2]
    await data_stack.results.client.set(f"{data_stack.settings.namespace}:items:uploaded-7", path.read_bytes(), ex=60)
    response = await data_stack.client.post(DIGITS, json={"item_id": "uploaded-7"})
    assert response.status_code == 200 and response.json()["predictions"][0]["label"] == label


@pytest.mark.parametrize("item_id", [
    "../digit_0_8x8", "../../etc/passwd", "/etc/passwd", "a/b", "a\\b", "..", ".hidden", "x\x00y", "~root",
    "with space", "é", "", "a" * 129, "digit_0_8x8.png/..", "%2e%2e%2fetc", "a;rm -rf",
])
async def test_bad_item_ids_are_refused_with_400(data_stack: Stack, item_id: str) -> None:
    response = await data_stack.client.post(DIGITS, json={"item_id": item_id})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_item_id"
    assert data_stack.runners["preprocess"].stats.handled == 0  # nothing reached a stage


async def test_an_unknown_item_is_404(data_stack: Stack) -> None:
    response = await data_stack.client.post(DIGITS, json={"item_id": "no_such_item"})
    assert response.status_code == 404
    body = response.json()["error"]
    assert body["code"] == "unknown_item" and "no_such_item" in body["message"]
    assert "/work" not in body["message"] and "/tmp" not in body["message"]  # no server paths


async def test_with_redis_unreachable_items_are_still_served_from_their_source(data_stack: Stack) -> None:
    stage = data_stack.runners["preprocess"].stage
    break_redis(stage.feature_cache.client)
    path, label = sample_images()[0]
    response = await data_stack.client.post(DIGITS, json={"item_id": path.stem})
    assert response.status_code == 200 and response.json()["predictions"][0]["label"] == label
    assert "item_load_ms" in response.json()["timings"]


async def test_book_route_takes_the_item_id_as_data(data_stack: Stack) -> None:
    path, label = sample_images()[1]
    response = await data_stack.client.post("/predict/label", json={"data": path.stem})
    assert response.status_code == 200 and response.json()["prediction"] == label


async def _lock_keys(stack: Stack) -> list[str]:
    return [k.decode() async for k in stack.results.client.scan_iter(match=f"{stack.settings.namespace}:pred:*:lock")]


async def test_a_refused_leader_releases_its_lock_at_once(cache_stack: Stack) -> None:
    """No predict consumer: the leader is refused (503) and the next identical call is refused at
    once too, instead of being "coalesced" onto a lock that waits out the first caller's deadline."""
    predict = cache_stack.runners["predict"]
    await predict.drain_and_close()
    await cache_stack.ingress.monitor.refresh()
    row = {"instances": [[6.1, 2.8, 4.7, 1.2]]}
    for _ in range(3):
        started = asyncio.get_running_loop().time()
        response = await cache_stack.client.post(IRIS, json=row, headers={"X-Request-Timeout": "20"})
        assert response.status_code == 503 and response.json()["error"]["code"] == "no_consumer", response.text
        assert response.headers["x-cache"] == "miss" and response.headers["retry-after"] == "1"
        assert asyncio.get_running_loop().time() - started < 2
        assert await _lock_keys(cache_stack) == []


async def test_a_follower_past_its_deadline_gets_a_504_naming_its_own_timeout(cache_stack: Stack) -> None:
    predict = cache_stack.runners["predict"].stage
    original = predict.batcher.run_batch
    predict.batcher.inline_max_rows = 0

    def slow(model, features):
        import time
        time.sleep(1.5)
        return original(model, features)

    predict.batcher.run_batch = slow
    row = {"instances": [[6.3, 2.5, 5.0, 1.9]]}
    leader = asyncio.create_task(cache_stack.client.post(IRIS, json=row, params={"timeout": "10"}))
    await asyncio.sleep(0.3)
    follower = await cache_stack.client.post(IRIS, json=row, params={"timeout": "0.5"})
    assert follower.status_code == 504 and follower.headers["x-cache"] == "coalesced"
    assert "deadline of 0.5 s" in follower.json()["error"]["message"]
    assert (await leader).status_code == 200


async def test_bursts_of_identical_requests_are_computed_exactly_once_each(cache_stack: Stack) -> None:
    """Ten bursts of twenty identical requests released together, a new input each burst."""
    handled = cache_stack.runners["predict"].stats.handled
    for burst in range(10):
        row = {"instances": [[4.0 + burst / 10, 3.0, 1.5, 0.3]]}
        responses = await asyncio.gather(*(cache_stack.client.post(IRIS, json=row) for _ in range(20)))
        assert {r.status_code for r in responses} == {200}
        how = [r.headers["x-cache"] for r in responses]
        assert how.count("miss") == 1, how
        assert len({json.dumps(r.json()["predictions"]) for r in responses}) == 1
    assert cache_stack.runners["predict"].stats.handled - handled == 10


async def test_an_async_leader_refused_by_a_full_queue_frees_the_lock(settings: Settings, tmp_path: Path) -> None:
    from tests.integration.test_load_shedding import variant

    profile = variant(tmp_path, "prediction_cache", "async_cache_bounded", ingress={"mode": "async"},
                      stages={"predict": {"max_queue_length": 1}})
    async for stack in start_stack(settings, profile):
        await stack.runners["predict"].drain_and_close()  # nothing drains the one-message queue
        first = await stack.client.post(IRIS, json={"instances": [[5.0, 3.4, 1.5, 0.2]]})
        assert first.status_code == 202  # fills the queue
        row = {"instances": [[6.9, 3.1, 5.4, 2.1]]}
        for _ in range(2):
            refused = await stack.client.post(IRIS, json=row)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded", refused.text
            assert len(await _lock_keys(stack)) == 1  # only the first, queued job's lock


async def test_a_miss_just_before_the_fill_does_not_compute_the_answer_again(cache_stack: Stack) -> None:
    """The race behind duplicate work: a caller misses just before the leader's fill, then takes
    the lock the fill has just freed. It must look again, find the answer, and not recompute it."""
    predict = cache_stack.runners["predict"].stage
    original_run = predict.batcher.run_batch
    predict.batcher.inline_max_rows = 0

    def slow(model, features):
        import time
        time.sleep(0.4)
        return original_run(model, features)

    predict.batcher.run_batch = slow
    cache = cache_stack.ingress.prediction_cache
    real_get = cache.get
    late = {"armed": False}

    async def get(key: str):
        rows = await real_get(key)
        if late["armed"] and rows is None:
            late["armed"] = False
            # This caller has missed; let the leader fill the cache and free its lock first.
            for _ in range(200):
                if await real_get(key) is not None and not await cache_stack.results.client.exists(f"{key}:lock"):
                    break
                await asyncio.sleep(0.02)
        return rows

    cache.get = get
    row = {"instances": [[5.7, 2.9, 4.2, 1.3]]}
    handled = cache_stack.runners["predict"].stats.handled
    leader = asyncio.create_task(cache_stack.client.post(IRIS, json=row))
    await asyncio.sleep(0.1)
    late["armed"] = True
    second = await cache_stack.client.post(IRIS, json=row)
    assert (await leader).headers["x-cache"] == "miss"
    assert second.status_code == 200 and second.headers["x-cache"] == "hit"
    assert cache_stack.runners["predict"].stats.handled - handled == 1


async def test_writing_an_item_drops_its_cached_tensor(data_stack: Stack) -> None:
    """An item overwritten through PUT /v1/items/{id} is answered from its new pixels at once,
    not from the tensor cached for 15 minutes."""
    (zero, zero_label), (other, other_label) = [
        next((p, lbl) for p, lbl in sample_images() if lbl == want) for want in ("0", "3")]
    put = await data_stack.client.put("/v1/items/shelf-1", content=zero.read_bytes(),
                                      headers={"content-type": "application/octet-stream"})
    assert put.status_code == 201, put.text
    assert put.json()["bytes"] == len(zero.read_bytes()) and put.headers["location"] == "/v1/items/shelf-1"
    first = await data_stack.client.post(DIGITS, json={"item_id": "shelf-1"})
    cached = await data_stack.client.post(DIGITS, json={"item_id": "shelf-1"})
    assert first.json()["predictions"][0]["label"] == zero_label and "item_cache_hit_ms" in cached.json()["timings"]
    await data_stack.client.put("/v1/items/shelf-1", content=other.read_bytes())
    after = await data_stack.client.post(DIGITS, json={"item_id": "shelf-1"})
    assert after.json()["predictions"][0]["label"] == other_label
    assert "item_load_ms" in after.json()["timings"]
    key = f"{data_stack.settings.namespace}:items:shelf-1"
    assert 0 < await data_stack.results.client.ttl(key) <= 30 * 24 * 3600


@pytest.mark.parametrize(("item_id", "body", "status", "code"), [
    ("with space", b"\x89PNG", 400, "invalid_item_id"),
    (".hidden", b"\x89PNG", 400, "invalid_item_id"),
    ("ok-1", b"not an image at all", 422, "invalid_input"),
    ("ok-2", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, 422, "invalid_input"),
])
async def test_a_bad_item_write_is_refused_and_stores_nothing(data_stack: Stack, item_id: str, body: bytes,
                                                              status: int, code: str) -> None:
    response = await data_stack.client.put(f"/v1/items/{item_id}", content=body)
    assert response.status_code == status and response.json()["error"]["code"] == code, response.text
    keys = [k async for k in data_stack.results.client.scan_iter(match=f"{data_stack.settings.namespace}:items:*")]
    assert keys == []


async def test_items_cannot_be_written_in_a_profile_that_reads_none(cache_stack: Stack) -> None:
    response = await cache_stack.client.put("/v1/items/a", content=b"\x89PNG")
    assert response.status_code == 404 and response.json()["error"]["code"] == "items_not_served"


async def test_cache_flush_empties_both_caches_and_items_put_invalidates(data_stack: Stack) -> None:
    import os
    import subprocess
    import sys

    settings = data_stack.settings
    path, label = sample_images()[0]
    await data_stack.client.post(DIGITS, json={"item_id": path.stem})
    prefix = f"{settings.namespace}:features:"
    assert [k async for k in data_stack.results.client.scan_iter(match=prefix + "*")]
    env = {**os.environ, "TOPOSERVE_REDIS_URL": settings.redis_url, "TOPOSERVE_NAMESPACE": settings.namespace}

    def toposerve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "toposerve", *args], env=env, capture_output=True, text=True,
                              timeout=60)

    flushed = await asyncio.to_thread(toposerve, "cache", "flush")
    assert flushed.returncode == 0 and "1 cached features deleted" in flushed.stderr, flushed.stderr
    assert [k async for k in data_stack.results.client.scan_iter(match=prefix + "*")] == []
    put = await asyncio.to_thread(toposerve, "items", "put", "cli-item", str(path))
    assert put.returncode == 0, put.stderr
    answer = await data_stack.client.post(DIGITS, json={"item_id": "cli-item"})
    assert answer.json()["predictions"][0]["label"] == label
    refused = await asyncio.to_thread(toposerve, "items", "put", "../up", str(path))
    assert refused.returncode != 0 and "not valid" in refused.stderr
