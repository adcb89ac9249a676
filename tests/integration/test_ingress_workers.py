"""``ingress.workers: N``: N ingress processes share the port, each with its own reply queue;
a `toposerve up` of such a profile serves from all of them and survives losing one."""

from __future__ import annotations

import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from tests.integration.test_caches import profile_variant
from tests.support.processes import RunningProfile
from toposerve.api.config import IngressSpec
from toposerve.deploy.proc_cpu import with_descendants

ROWS = {"setosa": [5.1, 3.5, 1.4, 0.2], "virginica": [6.7, 3.0, 5.2, 2.3]}


def workers_of(parent: int) -> list[int]:
    found = []
    for pid in with_descendants([parent]) - {parent}:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--worker" in argv:
            found.append(pid)
    return sorted(found)


def ingress_pid(up: RunningProfile, after: int = 0) -> int:
    started = re.findall(r"ingress started \(pid (\d+)\)", up.log())
    assert len(started) > after, up.log()
    return int(started[-1])


def ask(base: str, label: str) -> tuple[int, str | None]:
    # A connection per request, so the kernel picks a worker each time.
    response = httpx.post(f"{base}/v1/models/iris/predict", json={"instances": [ROWS[label]]},
                          headers={"connection": "close"}, timeout=10)
    return response.status_code, response.json()["predictions"][0]["label"] if response.status_code == 200 else None


def wait_for_workers(parent: int, count: int, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(found := workers_of(parent)) < count:
        assert time.monotonic() < deadline, found
        time.sleep(0.1)
    return found


def test_workers_share_the_port_and_a_lost_worker_brings_the_ingress_back(
    amqp_url: str, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    path = profile_variant(tmp_path, "synchronous", "three_ingress_workers", workers=3)
    up = RunningProfile(path, {"TOPOSERVE_AMQP_URL": amqp_url, "TOPOSERVE_REDIS_URL": redis_url,
                               "TOPOSERVE_NAMESPACE": namespace}, tmp_path / "up.log")
    try:
        up.wait_ready()
        parent = ingress_pid(up)
        workers = wait_for_workers(parent, 3)
        labels = [list(ROWS)[i % 2] for i in range(240)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda label: ask(up.base_url, label), labels))
        assert answers == [(200, label) for label in labels]
        # Each worker counts what it served: ask until every one has answered for itself.
        served: dict[int, int] = {}
        for _ in range(300):
            stats = httpx.get(f"{up.base_url}/v1/stats", headers={"connection": "close"}).json()
            served[stats["pid"]] = stats["coalescing"]["jobs"]
            if len(served) == 3:
                break
        assert sorted(served) == workers
        assert sum(served.values()) == 240 and all(jobs > 0 for jobs in served.values()), served

        os.kill(workers[0], signal.SIGKILL)  # the parent takes the others down; `up` restarts the ingress
        deadline = time.monotonic() + 45
        while "restarting" not in up.log():
            assert time.monotonic() < deadline, up.log()[-3000:]
            time.sleep(0.1)
        while True:
            assert time.monotonic() < deadline, up.log()[-3000:]
            try:
                if ask(up.base_url, "setosa") == (200, "setosa"):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert len(wait_for_workers(ingress_pid(up, after=1), 3)) == 3
        assert up.stop() == 0
    finally:
        up.stop()


def test_a_single_process_profile_cannot_have_workers() -> None:
    with pytest.raises(ValidationError, match="workers must be 1"):
        IngressSpec(mode="sync", single_process=True, workers=2)
