"""The product image (deploy/Dockerfile, built by deploy/container_lane.sh) runs `toposerve
worker` and `toposerve ingress`, which serve an asynchronous job end to end.

The containers use host networking (the CI engine has no bridge), like the session's RabbitMQ
and Redis, so they reach those on 127.0.0.1 and the ingress listens on a free loopback port.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.containers import engine_or_skip
from tests.support.processes import wait_ingress_ready
from toposerve.deploy.compose import DEFAULT_IMAGE
from toposerve.deploy.local_services import free_port

IMAGE = os.environ.get("TOPOSERVE_TEST_IMAGE", DEFAULT_IMAGE)
PROFILE = "asynchronous"
STAGES = ("preprocess", "predict", "store")


@pytest.fixture
def engine() -> Iterator[object]:
    client = engine_or_skip(IMAGE)
    try:
        yield client
    finally:
        client.close()


def _wait_ready(base_url: str, containers: list, timeout: float = 90.0) -> None:
    def still_running() -> None:
        for container in containers:
            container.reload()
            assert container.status != "exited", container.logs(tail=40).decode(errors="replace")

    wait_ingress_ready(base_url, still_running, timeout, interval=0.5)


def test_the_image_runs_the_stages_and_the_ingress_of_the_asynchronous_profile(
    engine, amqp_url: str, redis_url: str, namespace: str
) -> None:
    env = {"TOPOSERVE_AMQP_URL": amqp_url, "TOPOSERVE_REDIS_URL": redis_url, "TOPOSERVE_NAMESPACE": namespace}
    port = free_port()
    commands = [["worker", "--profile", PROFILE, "--stage", stage] for stage in STAGES]
    commands.append(["ingress", "--profile", PROFILE, "--host", "127.0.0.1", "--port", str(port)])
    containers: list = []
    try:
        for command in commands:
            containers.append(engine.containers.run(IMAGE, command, environment=env, network_mode="host",
                                                    detach=True))
        base_url = f"http://127.0.0.1:{port}"
        _wait_ready(base_url, containers)
        accepted = httpx.post(f"{base_url}/v1/models/iris/predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]},
                              timeout=10)
        assert accepted.status_code == 202, accepted.text
        job = accepted.json()["id"]
        deadline = time.monotonic() + 30
        while (answer := httpx.get(f"{base_url}/v1/jobs/{job}", params={"wait": 5}, timeout=10)).status_code == 202:
            assert time.monotonic() < deadline, answer.text
        assert answer.status_code == 200 and answer.json()["status"] == "succeeded", answer.text
        assert answer.json()["predictions"][0]["label"] == "setosa", answer.text
        # SIGTERM drains: every process exits 0 on `docker stop`.
        for container in containers:
            container.stop(timeout=30)
            assert container.wait(timeout=30)["StatusCode"] == 0, container.logs(tail=40).decode(errors="replace")
    finally:
        for container in containers:
            container.remove(force=True)
