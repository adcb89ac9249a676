"""Bad input at scale: random bodies over HTTP and random messages on the queues.

Against a real `toposerve up` (synchronous profile: every answer is known before the
request returns) on real RabbitMQ and Redis. The property: a 4xx or a 200, never a
5xx; no stage crashes; no message is stuck in redelivery; the service still answers
correctly afterwards. Case counts are printed (`pytest -s`) and asserted.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.processes import RunningProfile
from toposerve.brokers.topology import exchange_name, stage_queue_name

REPO = Path(__file__).resolve().parents[2]
ROW = [5.1, 3.5, 1.4, 0.2]

json_leaves = (st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
json_values = st.recursive(json_leaves, lambda children: st.lists(children, max_size=6)
                           | st.dictionaries(st.text(max_size=10), children, max_size=6), max_leaves=40)
# Bodies shaped like a predict request, with wrong parts inside.
near_miss = st.fixed_dictionaries({}, optional={
    "instances": st.lists(st.lists(json_leaves, max_size=6), max_size=4) | json_values,
    "image": st.text(max_size=50) | json_values,
    "item_id": st.text(max_size=20) | json_values,
    "extra": json_values,
})


class Service:
    def __init__(self, base_url: str, amqp_url: str, namespace: str, log: Path) -> None:
        self.base_url = base_url
        self.amqp_url = amqp_url
        self.namespace = namespace
        self.log = log
        self.client = httpx.Client(base_url=base_url, timeout=30)
        self.cases = 0

    def post(self, path: str, **kwargs) -> httpx.Response:
        self.cases += 1
        return self.client.post(path, **kwargs)


@pytest.fixture(scope="module")
def service(amqp_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    namespace = f"t-fuzz-{uuid.uuid4().hex[:6]}"
    log = tmp_path_factory.mktemp("fuzz") / "up.log"
    up = RunningProfile("synchronous", {"TOPOSERVE_AMQP_URL": amqp_url, "TOPOSERVE_REDIS_URL": redis_url,
                                        "TOPOSERVE_NAMESPACE": namespace, "TOPOSERVE_MAX_BODY_BYTES": "65536"}, log)
    try:
        up.wait_ready()
        service = Service(up.base_url, amqp_url, namespace, log)
        yield service
        print(f"\n[fuzz synchronous] {service.cases} cases (HTTP bodies, and messages published to the queues)")
        assert service.cases >= 900
        # No stage died and none was restarted while being fuzzed.
        assert "restarting" not in log.read_text(), log.read_text()
    finally:
        up.stop()


FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_clean(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["code"] and error["message"]


@FUZZ
@given(body=json_values | near_miss)
def test_random_json_bodies_get_a_4xx_or_an_answer(service: Service, body: object) -> None:
    payload = json.dumps(body, allow_nan=True)
    for model in ("iris", "digits_fast"):
        assert_clean(service.post(f"/v1/models/{model}/predict", content=payload,
                                  headers={"content-type": "application/json"}))


@FUZZ
@given(raw=st.binary(max_size=300))
def test_binary_garbage_and_invalid_utf8_get_a_4xx(service: Service, raw: bytes) -> None:
    response = service.post("/v1/models/iris/predict", content=raw, headers={"content-type": "application/json"})
    assert_clean(response)


@FUZZ
@given(depth=st.integers(min_value=1, max_value=5000), number=st.sampled_from(
    ["1e999", "-1e999", "1" * 400, "NaN", "Infinity", "-0", "4.9e-324", "1.7976931348623157e308"]))
def test_deep_nesting_and_huge_numbers(service: Service, depth: int, number: str) -> None:
    nested = "[" * depth + "1" + "]" * depth
    assert_clean(service.post("/v1/models/iris/predict", content=f'{{"instances": {nested}}}'))
    row = f'{{"instances": [[{number}, 3.5, 1.4, 0.2]]}}'
    assert_clean(service.post("/v1/models/iris/predict", content=row))


def test_oversized_bodies_are_413(service: Service) -> None:
    big = b'{"instances": [' + b"[1,2,3,4]," * 20_000 + b"[1,2,3,4]]}"
    response = service.post("/v1/models/iris/predict", content=big)
    assert response.status_code == 413


@pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
def test_random_messages_on_the_queues_never_crash_a_stage_nor_loop(service: Service) -> None:
    asyncio.run(_publish_garbage(service))
    # Still serving, correctly.
    response = service.post("/v1/models/iris/predict", json={"instances": [ROW]})
    assert response.status_code == 200 and response.json()["predictions"][0]["label"] == "setosa"


async def _publish_garbage(service: Service) -> None:
    bodies = st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v, allow_nan=True).encode()),
        near_miss.map(lambda v: json.dumps({"id": str(uuid.uuid4()), "model": "iris", **v}, allow_nan=True).encode()),
        st.fixed_dictionaries({"id": st.text(max_size=40), "model": st.text(max_size=20)}).map(
            lambda v: json.dumps(v).encode()),
    )
    examples = [bodies.example() for _ in range(300)]
    keys = ["request.iris", "features.iris", "request.digits_fast", "features.digits_fast"]
    connection = await aio_pika.connect(service.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(exchange_name(service.namespace))
        for index, body in enumerate(examples):
            await exchange.publish(aio_pika.Message(body), keys[index % len(keys)])
        # Every message is consumed and settled: both stage queues drain to empty.
        deadline = time.monotonic() + 60
        for stage in ("preprocess", "predict"):
            name = stage_queue_name(service.namespace, "synchronous", stage)
            while True:
                queue = await channel.declare_queue(name, passive=True)
                if queue.declaration_result.message_count == 0:
                    break
                assert time.monotonic() < deadline, f"{name} did not drain"
                await asyncio.sleep(0.1)
    service.cases += len(examples)
    # Garbage is bad input, handled as such: no stage hit an unexpected error on it, and
    # none was requeued (a ready count of 0 alone would miss a message bouncing between
    # the queue and a consumer, e.g. an outcome that no queue of the profile takes).
    assert "Traceback" not in service.log.read_text(), service.log.read_text()[-3000:]
    assert "requeueing" not in service.log.read_text(), service.log.read_text()[-3000:]
