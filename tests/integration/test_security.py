"""Security of the ingress on real services: API keys, job ownership, rate limit, no credentials leaked."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from pathlib import Path

import aio_pika
import pytest
from redis.asyncio.connection import SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.integration.conftest import Stack, start_stack
from toposerve.api.auth import ApiKeys, RateLimiter, key_file_line
from toposerve.brokers.batches import BatchStore
from toposerve.brokers.connections import PublishRefused, connect_redis
from toposerve.brokers.settings import Settings
from toposerve.deploy.components import build_stage_runner

ALICE = "alice-key-0123456789"  # TOPOSERVE_API_KEYS (plain, development)
BOB = "bob-key-9876543210"  # TOPOSERVE_API_KEYS_FILE (hashed)
IRIS = {"instances": [[5.1, 3.5, 1.4, 0.2]]}
OPEN_PATHS = ["/healthz", "/readyz", "/health", "/v2/health/live", "/v2/health/ready", "/metrics"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def secured(settings: Settings, tmp_path: Path) -> Settings:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"# id:sha256\n{key_file_line('bob', BOB)}\n")
    return settings.model_copy(update={"api_keys": ALICE, "api_keys_file": str(keys_file)})


@pytest.fixture
async def secured_stack(secured: Settings):
    async for stack in start_stack(secured, "asynchronous"):
        yield stack


async def test_predict_needs_a_valid_key(secured_stack: Stack) -> None:
    client = secured_stack.client
    response = await client.post("/v1/models/iris/predict", json=IRIS)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["error"]["code"] == "unauthenticated"

    for headers in (bearer("not-a-key"), {"X-API-Key": ALICE + "x"}, {"Authorization": f"Basic {ALICE}"}):
        response = await client.post("/v1/models/iris/predict", json=IRIS, headers=headers)
        assert response.status_code in (401, 403), (headers, response.text)
    response = await client.post("/v1/models/iris/predict", json=IRIS, headers=bearer("not-a-key"))
    assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden"
    assert ALICE not in response.text and BOB not in response.text

    assert (await client.post("/v1/models/iris/predict", json=IRIS, headers=bearer(ALICE))).status_code == 202
    assert (await client.post("/v1/models/iris/predict", json=IRIS, headers={"X-API-Key": BOB})).status_code == 202
    # Every other route is guarded too (book-compatible, models, Open Inference Protocol).
    for method, path in (("POST", "/predict"), ("GET", "/v1/models"), ("POST", "/v2/models/iris/infer"),
                         ("GET", f"/v1/jobs/{uuid.uuid4()}"), ("GET", "/openapi.json")):
        assert (await client.request(method, path)).status_code == 401, path


async def test_health_endpoints_stay_open(secured_stack: Stack) -> None:
    for path in OPEN_PATHS:
        response = await secured_stack.client.get(path)
        assert response.status_code not in (401, 403), (path, response.text)


async def test_no_keys_means_no_authentication(async_stack: Stack) -> None:
    assert (await async_stack.client.post("/v1/models/iris/predict", json=IRIS)).status_code == 202


async def test_jobs_of_one_key_are_unknown_to_another(secured_stack: Stack) -> None:
    client = secured_stack.client
    response = await client.post("/v1/models/iris/predict", json=IRIS, headers=bearer(ALICE))
    job_id = response.json()["id"]
    done = await client.get(f"/v1/jobs/{job_id}?wait=10", headers=bearer(ALICE))
    assert done.status_code == 200 and done.json()["status"] == "succeeded", done.text
    assert "owner" not in done.json() and "env-1" not in done.text
    # After the terminal rewrite the owner still holds: bob sees a 404 like an unknown id.
    for path in (f"/v1/jobs/{job_id}", f"/job/{job_id}"):
        other = await client.get(path, headers={"X-API-Key": BOB})
        assert other.status_code == 404, (path, other.text)
        unknown = await client.get(path.replace(job_id, str(uuid.uuid4())), headers={"X-API-Key": BOB})
        assert other.json()["error"]["code"] == unknown.json()["error"]["code"] == "unknown_job"
    assert (await client.get(f"/job/{job_id}", headers=bearer(ALICE))).status_code == 200
    record = await secured_stack.results.get(uuid.UUID(job_id))
    assert record is not None and record.owner == "env-1"
    assert await secured_stack.results.client.ttl(secured_stack.results.owner_key(uuid.UUID(job_id))) > 0


async def test_batches_of_one_key_are_unknown_to_another(secured: Settings) -> None:
    async for stack in start_stack(secured, "batch"):
        body = "5.1,3.5,1.4,0.2\n6.7,3.0,5.2,2.3\n"
        response = await stack.client.post("/v1/batches?model=iris", content=body,
                                           headers={"content-type": "text/csv", **bearer(ALICE)})
        assert response.status_code == 202, response.text
        location = response.json()["location"]
        assert (await stack.client.get(location, headers=bearer(ALICE))).status_code == 200
        for path in (location, f"{location}/results"):
            other = await stack.client.get(path, headers={"X-API-Key": BOB})
            assert other.status_code == 404 and other.json()["error"]["code"] == "unknown_batch", path
        # The owner is a field of the batch's manifest hash, whose TTL every chunk write
        # renews: it cannot expire before the batch does (and leave it readable to all).
        store = BatchStore(stack.results.client, secured.namespace, stack.profile.ingress.result_ttl_s)
        manifest = await store.manifest(response.json()["id"])
        assert manifest is not None and manifest.owner is not None
        # The status names its owner by key id (GET /v1/batches lists it too), never by the key itself.
        shown = (await stack.client.get(location, headers=bearer(ALICE))).json()
        assert shown["owner"] == manifest.owner and ALICE not in json.dumps(shown)
        await stack.results.client.hdel(store.key(manifest.id), "owner")  # what an owner-less batch is
        assert (await stack.client.get(location, headers={"X-API-Key": BOB})).status_code == 200


async def test_rate_limit_per_key_answers_429_with_retry_after(secured: Settings) -> None:
    limited = secured.model_copy(update={"rate_limit_per_s": 0.1, "rate_limit_burst": 3})
    async for stack in start_stack(limited, "asynchronous"):
        statuses = [(await stack.client.post("/v1/models/iris/predict", json=IRIS, headers=bearer(ALICE)))
                    for _ in range(4)]
        assert [r.status_code for r in statuses] == [202, 202, 202, 429]
        refused = statuses[-1]
        assert refused.json()["error"]["code"] == "rate_limited"
        assert int(refused.headers["retry-after"]) >= 1
        # Another key has its own bucket; health checks are never limited.
        assert (await stack.client.post("/v1/models/iris/predict", json=IRIS,
                                        headers={"X-API-Key": BOB})).status_code == 202
        for _ in range(5):
            assert (await stack.client.get("/healthz")).status_code == 200


async def test_rate_limit_without_keys_counts_per_client_address(settings: Settings) -> None:
    limited = settings.model_copy(update={"rate_limit_per_s": 0.1, "rate_limit_burst": 2})
    async for stack in start_stack(limited, "asynchronous"):
        codes = [(await stack.client.get("/v1/models")).status_code for _ in range(3)]
        assert codes == [200, 200, 429]


def test_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=2, clock=lambda: now[0])
    assert [limiter.take("k") for _ in range(2)] == [0.0, 0.0]
    assert limiter.take("k") == pytest.approx(0.5)
    now[0] += 0.5
    assert limiter.take("k") == 0.0
    assert limiter.take("other") == 0.0


def test_keys_file_errors_never_show_a_key(tmp_path: Path) -> None:
    bad = tmp_path / "keys.txt"
    bad.write_text(f"bob {BOB}\n")
    with pytest.raises(ValueError) as caught:
        ApiKeys.from_settings(Settings(api_keys_file=str(bad)))
    assert BOB not in str(caught.value) and "line 1" in str(caught.value)
    keys = ApiKeys.from_settings(Settings(api_keys=f" {ALICE} , {BOB} "))
    assert (keys.identify(ALICE), keys.identify(BOB), keys.identify("nope")) == ("env-1", "env-2", None)
    assert ALICE not in repr(Settings(api_keys=ALICE))


def test_rediss_urls_connect_with_tls_and_their_ca() -> None:
    client = connect_redis("rediss://:pw@redis.example:6380/0?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=required")
    pool = client.connection_pool
    assert pool.connection_class is SSLConnection
    assert pool.connection_kwargs["ssl_ca_certs"] == "/etc/ca.pem"


def _with_password(url: str, password: str) -> str:
    scheme, rest = url.split("://", 1)
    host = rest.rsplit("@", 1)[-1]
    return f"{scheme}://guest:{password}@{host}"


async def test_no_password_in_error_bodies_or_logs(async_stack: Stack, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Errors that quote a connection URL (as broker and Redis client errors can) are redacted."""
    password = "s3cret-" + uuid.uuid4().hex[:8]
    amqp_url = _with_password(async_stack.settings.amqp_url, password)
    redis_url = _with_password(async_stack.settings.redis_url, password)
    ingress = async_stack.ingress
    caplog.set_level(logging.DEBUG)

    async def refuse(*_args, **_kwargs):
        raise PublishRefused(f"connection to {amqp_url} was lost")

    async def unreachable(*_args, **_kwargs):
        raise RedisConnectionError(f"Error connecting to {redis_url}")

    monkeypatch.setattr(ingress.publisher, "publish", refuse)
    monkeypatch.setattr(ingress.results.client, "ping", unreachable)
    bodies = []
    response = await async_stack.client.post("/v1/models/iris/predict", json=IRIS)
    assert response.status_code == 503 and "guest:***@" in response.text, response.text
    bodies.append(response.text)
    bodies.append((await async_stack.client.post("/predict", json={"data": IRIS["instances"]})).text)
    ready = await async_stack.client.get("/readyz")
    assert ready.status_code == 503 and "***" in ready.text
    bodies.append(ready.text)
    bodies.append((await async_stack.client.get("/health")).text)
    for body in bodies:
        assert password not in body
    assert not [r for r in caplog.records if password in r.getMessage()]


async def test_wrong_amqp_password_is_not_logged(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    password = "wrong-" + uuid.uuid4().hex[:8]
    caplog.set_level(logging.DEBUG)
    with pytest.raises(Exception) as caught:
        await aio_pika.connect(_with_password(settings.amqp_url, password), timeout=5)
    assert password not in str(caught.value)
    assert not [r for r in caplog.records if password in r.getMessage()]
    assert password not in repr(settings.model_copy(update={"amqp_url": _with_password(settings.amqp_url,
                                                                                        password)}))


async def test_tf_serving_route_limits_images_per_request(sync_stack: Stack) -> None:
    model = "digits_fast"  # an image model: its input is base64 images
    too_many = ["aGVsbG8="] * (sync_stack.settings.max_rows + 1)
    response = await sync_stack.client.post(f"/v1/models/{model}:predict", json={"inputs": {"image": too_many}})
    # TF Serving's error shape, {"error": "<message>"}
    assert response.status_code == 413 and "limit" in response.json()["error"], response.text


async def test_answers_of_sync_calls_belong_to_their_key_too(secured_stack: Stack) -> None:
    """An Open Inference Protocol infer in an async profile is answered at once, and the store keeps
    the answer under its id: that record is the caller's, not readable with another key."""
    import asyncio

    from tests.integration.test_open_inference_protocol import model_input

    client = secured_stack.client
    name = (await model_input(secured_stack, "iris", headers=bearer(ALICE)))["name"]
    body = {"inputs": [{"name": name, "shape": [1, 4], "datatype": "FP32", "data": IRIS["instances"][0]}]}
    answer = await client.post("/v2/models/iris/infer", json=body, headers=bearer(ALICE))
    assert answer.status_code == 200, answer.text
    job_id = answer.json()["id"]
    for _ in range(100):  # the store writes the record shortly after the answer
        mine = await client.get(f"/v1/jobs/{job_id}", headers=bearer(ALICE))
        if mine.status_code == 200:
            break
        await asyncio.sleep(0.05)
    assert mine.status_code == 200 and mine.json()["status"] == "succeeded"
    theirs = await client.get(f"/v1/jobs/{job_id}", headers=bearer(BOB))
    assert theirs.status_code == 404 and theirs.json()["error"]["code"] == "unknown_job"


async def test_wrong_keys_are_throttled_per_address_before_any_key_is_checked(secured: Settings) -> None:
    """1,000 guesses used to cost 0.58 s: past a small burst the address is refused at once, a valid
    key included (so a lucky guess is not confirmed), until it is back under the rate."""
    import asyncio
    import time

    settings = secured.model_copy(update={"auth_failures_burst": 5, "auth_failures_per_s": 2.0})
    async for stack in start_stack(settings, "asynchronous"):
        statuses = [(await stack.client.get("/v1/models", headers=bearer(f"guess-{n}"))).status_code
                    for n in range(50)]
        assert statuses[:5] == [403] * 5 and set(statuses[5:]) == {429}
        locked = await stack.client.get("/v1/models", headers=bearer(ALICE))
        assert locked.status_code == 429 and int(locked.headers["retry-after"]) >= 1
        assert "invalid API keys" in locked.json()["error"]["message"]
        started = time.monotonic()
        while (await stack.client.get("/v1/models", headers=bearer(ALICE))).status_code == 429:
            assert time.monotonic() - started < 5
            await asyncio.sleep(0.1)
        assert (await stack.client.get("/v1/models", headers=bearer(ALICE))).status_code == 200
        # Health stays open throughout.
        assert (await stack.client.get("/healthz")).status_code == 200


async def test_reading_another_keys_job_reveals_nothing_more_than_an_unknown_id(secured_stack: Stack) -> None:
    client = secured_stack.client
    created = await client.post("/v1/models/iris/predict", json=IRIS, headers=bearer(ALICE))
    job = created.json()["id"]
    theirs = await client.get(f"/v1/jobs/{job}", headers=bearer(BOB))
    unknown = await client.get(f"/v1/jobs/{uuid.uuid4()}", headers=bearer(BOB))
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json()["error"]["code"] == unknown.json()["error"]["code"] == "unknown_job"
    # The owner is checked in Redis, before the record is fetched: nothing of it is read.
    assert await secured_stack.results.get_for(uuid.UUID(job), "bob") is None
    assert (await secured_stack.results.get_for(uuid.UUID(job), "env-1")).id == uuid.UUID(job)


async def test_a_key_waiting_on_another_keys_job_is_not_answered_by_its_announcement(secured: Settings) -> None:
    """The store's job-done announcement carries the record: a long poll by another key must
    still end as for an unknown id (404), while the owner's own long poll is answered."""
    async for stack in start_stack(secured, "asynchronous", stages=["preprocess", "store"]):
        client = stack.client
        job_id = (await client.post("/v1/models/iris/predict", json=IRIS, headers=bearer(ALICE))).json()["id"]
        bobs = asyncio.create_task(client.get(f"/v1/jobs/{job_id}?wait=3", headers={"X-API-Key": BOB}))
        alices = asyncio.create_task(client.get(f"/v1/jobs/{job_id}?wait=10", headers=bearer(ALICE)))
        await asyncio.sleep(0.3)  # both wait on the pending job
        predict = build_stage_runner(stack.profile, "predict", secured)
        await predict.start()
        try:
            alice_answer = await asyncio.wait_for(alices, 10)
            bob_answer = await asyncio.wait_for(bobs, 10)
        finally:
            await predict.drain_and_close()
        assert alice_answer.status_code == 200 and alice_answer.json()["status"] == "succeeded"
        assert bob_answer.status_code == 404 and bob_answer.json()["error"]["code"] == "unknown_job"
