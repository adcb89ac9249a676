"""The bus is a trust boundary: each role has its own account, and only stages can write results.

Each test runs on servers set up as ``toposerve up`` sets them up (``fresh_services``):
an account per role, no guest, no default Redis user. The attacker holds the ``client``
account, the one direct publishers get, or another account that is not a stage's.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
import redis.asyncio as redis
from aiormq.exceptions import ChannelAccessRefused, ChannelPreconditionFailed
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from tests.conftest import FreshServices
from tests.integration.conftest import Stack, start_stack
from tests.integration.test_direct_amqp import dead_letters, job_when_done
from toposerve.brokers.messages import Prediction, RowPrediction
from toposerve.brokers.settings import Settings
from toposerve.brokers.topology import exchange_name
from toposerve.deploy.accounts import AccountsFile
from toposerve.deploy.components import build_stage_runner

ALICE = "alice-key-0123456789"
ROW = [5.1, 3.5, 1.4, 0.2]


def login(fresh_services: FreshServices, role: str) -> str:
    return AccountsFile.load(fresh_services.accounts_file).roles[role].amqp_url


@pytest.fixture
async def secured_stack(fault_settings: Settings) -> AsyncIterator[Stack]:
    async for stack in start_stack(fault_settings.model_copy(update={"api_keys": ALICE}), "asynchronous"):
        yield stack


def forged(job_id: str) -> bytes:
    return Prediction(id=uuid.UUID(job_id), model="iris", model_version="1",
                      rows=[RowPrediction(label="FORGED", class_index=0, probabilities=[1.0, 0.0, 0.0])]
                      ).model_dump_json().encode()


async def refused(coroutine) -> str:
    """Run ``coroutine``; the broker's refusal (which closes the channel), as text."""
    try:
        await coroutine
    except (ChannelAccessRefused, ChannelPreconditionFailed) as exc:
        return str(exc)
    raise AssertionError("the broker allowed it")


async def test_the_client_account_sees_no_ones_requests_and_can_publish_no_result(
        secured_stack: Stack, fresh_services: FreshServices) -> None:
    ns = secured_stack.settings.namespace
    connection = await aio_pika.connect(login(fresh_services, "client"))
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        exchange = await channel.get_exchange(exchange_name(ns), ensure=False)
        reason = await refused(queue.bind(exchange, "request.#"))
        assert "ACCESS_REFUSED" in reason
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(exchange_name(ns), ensure=False)
        reason = await refused(exchange.publish(aio_pika.Message(forged(str(uuid.uuid4()))), "prediction.iris"))
        assert "ACCESS_REFUSED" in reason and "prediction.iris" in reason
        # ... while publishing a request, its one right, works: the job is served.
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(exchange_name(ns), ensure=False)
        job_id = uuid.uuid4()
        body = json.dumps({"id": str(job_id), "model": "iris", "instances": [ROW]}).encode()
        await exchange.publish(aio_pika.Message(body), "request.iris")
    job = await job_when_done(secured_stack, job_id, headers={"Authorization": f"Bearer {ALICE}"})
    assert job["status"] == "succeeded" and job["predictions"][0]["label"] == "setosa"


async def test_forged_results_from_an_account_that_is_no_stage_are_dead_lettered_and_every_job_is_right(
        secured_stack: Stack, fresh_services: FreshServices, fault_settings: Settings) -> None:
    """The attack: forge a Prediction for each of key A's 50 jobs before the real one comes. The
    operator's account may publish any key (to replay dead letters), but it is no stage: the store
    dead-letters every forgery, and all 50 jobs end with their real answers."""
    predict = secured_stack.runners["predict"]
    await predict.drain_and_close()  # hold the real answers back: the forgeries arrive first
    headers = {"Authorization": f"Bearer {ALICE}"}
    ids = []
    for _ in range(50):
        response = await secured_stack.client.post("/v1/models/iris/predict", json={"instances": [ROW]},
                                                   headers=headers)
        ids.append(response.json()["id"])
    connection = await aio_pika.connect(login(fresh_services, "operator"))
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(exchange_name(fault_settings.namespace), ensure=False)
        for job_id in ids:
            await exchange.publish(aio_pika.Message(forged(job_id)), "prediction.iris")
        # Claiming to be a stage is refused by the broker itself: user_id must be one's own.
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(exchange_name(fault_settings.namespace), ensure=False)
        spoofed = aio_pika.Message(forged(ids[0]), user_id=f"{fault_settings.namespace}.predict")
        assert "user_id" in await refused(exchange.publish(spoofed, "prediction.iris"))
    dead = await dead_letters(secured_stack, expected=50, timeout=20)
    assert len(dead) == 50
    assert all("accepted only from stage accounts" in d.headers["x-toposerve-reason"] for d in dead)
    assert secured_stack.runners["store"].metrics.untrusted._value.get() == 50
    restarted = build_stage_runner(secured_stack.profile, "predict", fault_settings)
    await restarted.start()
    try:
        jobs = await asyncio.gather(*(secured_stack.client.get(f"/v1/jobs/{job_id}", params={"wait": 20},
                                                               headers=headers) for job_id in ids))
    finally:
        await restarted.drain_and_close()
    labels = [job.json()["predictions"][0]["label"] for job in jobs]
    assert labels == ["setosa"] * 50


async def test_a_stage_account_publishes_only_the_keys_of_its_kind(
        secured_stack: Stack, fresh_services: FreshServices) -> None:
    ns = secured_stack.settings.namespace
    connection = await aio_pika.connect(login(fresh_services, "preprocess"))
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(exchange_name(ns), ensure=False)
        reason = await refused(exchange.publish(aio_pika.Message(forged(str(uuid.uuid4()))), "prediction.iris"))
        assert "ACCESS_REFUSED" in reason
        # Nor may it consume another stage's queue.
        channel = await connection.channel()
        store_queue = await channel.declare_queue(f"{ns}.asynchronous.store", passive=True)
        assert "ACCESS_REFUSED" in await refused(store_queue.get(fail=False))


async def test_the_monitor_account_reads_queue_depths_and_nothing_else(
        secured_stack: Stack, fresh_services: FreshServices) -> None:
    """What KEDA's rabbitmq scaler (AMQP mode) logs in as: a passive declare answers the depth."""
    ns = secured_stack.settings.namespace
    connection = await aio_pika.connect(login(fresh_services, "monitor"))
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"{ns}.asynchronous.predict", passive=True)
        assert queue.declaration_result.message_count >= 0
        assert "ACCESS_REFUSED" in await refused(queue.get(fail=False))
        channel = await connection.channel()
        assert "ACCESS_REFUSED" in await refused(channel.declare_queue(f"{ns}.asynchronous.mine"))
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(exchange_name(ns), ensure=False)
        reason = await refused(exchange.publish(aio_pika.Message(b"{}"), "request.iris"))
        assert "ACCESS_REFUSED" in reason


async def test_a_reply_forged_into_an_ingress_reply_queue_is_refused_by_the_broker(
        fault_settings: Settings, fresh_services: FreshServices) -> None:
    async for stack in start_stack(fault_settings, "synchronous"):
        reply_queue = stack.ingress.replies.queue_name
        connection = await aio_pika.connect(login(fresh_services, "client"))
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            reason = await refused(channel.default_exchange.publish(
                aio_pika.Message(forged(str(uuid.uuid4())), correlation_id="x"), reply_queue))
            assert "ACCESS_REFUSED" in reason and "amq.default" in reason
        response = await stack.client.post("/v1/models/iris/predict", json={"instances": [ROW]})
        assert response.status_code == 200 and response.json()["predictions"][0]["label"] == "setosa"


async def test_redis_has_no_default_user_and_each_role_reaches_only_its_keys(
        secured_stack: Stack, fresh_services: FreshServices) -> None:
    ns = secured_stack.settings.namespace
    port = fresh_services.redis.port
    anonymous = redis.Redis(host="127.0.0.1", port=port)
    with pytest.raises((AuthenticationError, ResponseError)):
        await anonymous.get(f"{ns}:job:x")
    await anonymous.aclose()
    logins = AccountsFile.load(fresh_services.accounts_file).roles
    predict = redis.Redis.from_url(logins["predict"].redis_url)
    with pytest.raises(NoPermissionError):
        await predict.get(f"{ns}:job:{uuid.uuid4()}")  # the store's keys, not the predict stage's
    with pytest.raises(NoPermissionError):
        await predict.flushall()
    batch = uuid.uuid4()
    assert await predict.exists(f"{ns}:batch:{batch}:cancelled") == 0  # a batch's cancel flag: read, once a chunk
    with pytest.raises(NoPermissionError):
        await predict.set(f"{ns}:batch:{batch}:cancelled", "1")  # but never written
    with pytest.raises(NoPermissionError):
        await predict.hgetall(f"{ns}:batch:{batch}")  # nor any other batch key
    await predict.aclose()
    store = redis.Redis.from_url(logins["store"].redis_url)
    assert await store.get(f"{ns}:job:{uuid.uuid4()}") is None  # its own keys: allowed
    with pytest.raises(NoPermissionError):
        await store.get("another-namespace:job:1")
    await store.aclose()


def test_up_provision_makes_the_accounts_on_a_given_broker_and_redis(tmp_path) -> None:
    """`toposerve up --provision` against servers it did not start: the accounts go in through the
    management API and ACL SETUSER, every process logs in as its role, the client can only publish."""
    import httpx

    from tests.support.processes import RunningProfile
    from toposerve.deploy.local_services import start_rabbitmq, start_redis

    accounts_path = tmp_path / "accounts.json"
    with start_rabbitmq(management=True) as mq, start_redis(acl=[]) as rd:
        env = {"TOPOSERVE_AMQP_URL": mq.url, "TOPOSERVE_REDIS_URL": rd.url, "TOPOSERVE_NAMESPACE": "prov"}
        up = RunningProfile("asynchronous", env, tmp_path / "up.log",
                            extra=["--provision", "--management-url", mq.management_url,
                                   "--accounts-file", str(accounts_path)])
        try:
            up.wait_ready(timeout=90)
            assert "accounts made on the broker through its management API" in up.log()
            response = httpx.post(f"{up.base_url}/v1/models/iris/predict", json={"instances": [ROW]})
            job = httpx.get(f"{up.base_url}{response.headers['location']}", params={"wait": 10}).json()
            assert job["status"] == "succeeded"
            users = mq.ctl("list_users").stdout
            assert "prov.ingress" in users and "prov.store" in users and "prov.client" in users
            logins = AccountsFile.load(accounts_path)
            assert logins.roles["store"].amqp_url.startswith("amqp://prov.store:")
            assert (accounts_path.stat().st_mode & 0o777) == 0o600

            async def client_cannot_bind() -> str:
                connection = await aio_pika.connect(logins.roles["client"].amqp_url)
                async with connection:
                    channel = await connection.channel()
                    queue = await channel.declare_queue(exclusive=True)
                    exchange = await channel.get_exchange("prov.inference", ensure=False)
                    return await refused(queue.bind(exchange, "prediction.#"))

            assert "ACCESS_REFUSED" in asyncio.run(client_cannot_bind())
        finally:
            up.stop()

