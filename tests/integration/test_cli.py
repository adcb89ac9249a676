"""The commands a user types: `toposerve up` serving the README's requests, `topology`, errors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.images import b64, sample_images
from tests.support.processes import RunningProfile
from toposerve.deploy.local_services import free_port

REPO = Path(__file__).resolve().parents[2]


def toposerve(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "toposerve", *args], cwd=REPO, env=env or os.environ.copy(),
                          capture_output=True, text=True, timeout=timeout)


def test_topology_prints_exchanges_queues_bindings_and_stages() -> None:
    result = toposerve("topology", "--profile", "asynchronous", env={**os.environ, "TOPOSERVE_NAMESPACE": "demo"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in ("demo.inference (topic, durable)", "demo.dead", "demo.asynchronous.preprocess (classic) <- request.*",
                     "demo.asynchronous.predict (classic) <- features.*",
                     "demo.asynchronous.store (classic) <- prediction.*, failure.*", "max_batch_size=128"):
        assert expected in out, out


def test_unknown_profile_and_broken_profile_fail_with_the_file_and_field(tmp_path: Path) -> None:
    result = toposerve("topology", "--profile", "nope")
    assert result.returncode != 0 and "no profile 'nope'" in result.stderr and "asynchronous" in result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: broken\nmodels: [iris]\nstages:\n  p:\n    kind: predict\n    consumes: []\n")
    result = toposerve("topology", "--profile", str(broken))
    assert result.returncode != 0
    # The path as the file reads (no repeated kind): stages.<stage>.<field>.
    assert str(broken) in result.stderr and "stages.p.consumes" in result.stderr
    assert "stages.p.predict" not in result.stderr


def test_up_refuses_an_explicit_url_where_nothing_answers() -> None:
    env = {**os.environ, "TOPOSERVE_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/"}
    result = toposerve("up", "--profile", "asynchronous", "--port", str(free_port()), env=env)
    assert result.returncode != 0
    assert "nothing answers at TOPOSERVE_AMQP_URL" in result.stderr


def test_up_serves_the_readme_requests_and_stops_cleanly_on_ctrl_c(
    amqp_url: str, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    up = RunningProfile("asynchronous", {"TOPOSERVE_AMQP_URL": amqp_url, "TOPOSERVE_REDIS_URL": redis_url,
                                         "TOPOSERVE_NAMESPACE": namespace}, tmp_path / "up.log")
    try:
        up.wait_ready()
        base = up.base_url
        # The README's curl: no content type given, so curl sends a form type.
        response = httpx.post(f"{base}/v1/models/iris/predict",
                              content='{"instances": [[5.1,3.5,1.4,0.2],[6.7,3.0,5.2,2.3]]}',
                              headers={"content-type": "application/x-www-form-urlencoded"})
        assert response.status_code == 202
        job = httpx.get(f"{base}{response.headers['location']}", params={"wait": 10}).json()
        assert [p["label"] for p in job["predictions"]] == ["setosa", "virginica"]
        path, label = sample_images()[0]
        response = httpx.post(f"{base}/v1/models/digits_fast/predict", json={"image": b64(path.read_bytes())})
        job = httpx.get(f"{base}{response.headers['location']}", params={"wait": 10}).json()
        assert job["predictions"][0]["label"] == label
        assert httpx.get(f"{base}/readyz").status_code == 200
        # Every process's metrics, at the URLs `up` printed.
        printed = re.search(r"metrics: (.*)", up.log())
        assert printed, up.log()
        urls = dict(re.findall(r"(\S+) (http://\S+/metrics)", printed.group(1)))
        assert set(urls) == {"ingress", "preprocess[0]", "predict[0]", "store[0]"}, printed.group(1)
        assert "toposerve_requests_total{" in httpx.get(urls["ingress"]).text
        for stage in ("preprocess", "predict", "store"):
            text = httpx.get(urls[f"{stage}[0]"]).text
            assert re.search(rf'toposerve_stage_messages_total{{[^}}]*stage="{stage}"[^}}]*}} [1-9]', text), text[:2000]
            alive = httpx.get(urls[f"{stage}[0]"].replace("/metrics", "/healthz"))
            assert alive.status_code == 200 and alive.json()["status"] == "ok"

        assert up.stop() == 0
        output = up.log()
        assert "stopped" in output
        for stage in ("preprocess", "predict", "store"):
            assert f"stage asynchronous.{stage} replica 0 stopped" in output, output
    finally:
        up.stop()


@pytest.mark.fault
@pytest.mark.parametrize("stage", ["predict"])
def test_up_restarts_a_stage_that_dies(amqp_url: str, redis_url: str, namespace: str, tmp_path: Path,
                                       stage: str) -> None:
    up = RunningProfile("asynchronous", {"TOPOSERVE_AMQP_URL": amqp_url, "TOPOSERVE_REDIS_URL": redis_url,
                                         "TOPOSERVE_NAMESPACE": namespace}, tmp_path / "up.log")
    log_path = up.log_path
    try:
        up.wait_ready()
        victim = re.search(rf"{stage}\[0\] started \(pid (\d+)\)", up.log())
        assert victim, up.log()
        os.kill(int(victim.group(1)), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while "restarting" not in log_path.read_text():
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        base = up.base_url
        response = httpx.post(f"{base}/v1/models/iris/predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]})
        # The long poll may take its whole 20 s (the restarted stage starting on a loaded machine):
        # the client must wait longer than the server does (httpx reads for 5 s by default).
        job = httpx.get(f"{base}{response.headers['location']}", params={"wait": 20}, timeout=30).json()
        assert job["status"] == "succeeded"
    finally:
        up.stop()


def test_up_starts_throwaway_servers_when_no_urls_are_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from toposerve.brokers.settings import Settings
    from toposerve.deploy import launcher

    monkeypatch.delenv("TOPOSERVE_AMQP_URL", raising=False)
    monkeypatch.delenv("TOPOSERVE_REDIS_URL", raising=False)
    said: list[str] = []
    unset = Settings()
    settings, started = launcher.ensure_services(unset, said.append)
    try:
        assert [s.name for s in started] == ["rabbitmq", "redis"]
        assert any("starting a throwaway local rabbitmq-server" in line for line in said)
        assert any("starting a throwaway local redis-server" in line for line in said)
        assert settings.amqp_url != unset.amqp_url and settings.redis_url != unset.redis_url
        assert launcher._answers(settings.amqp_url) and launcher._answers(settings.redis_url)
    finally:
        for service in started:
            service.stop()


def test_topology_says_what_the_profile_keeps() -> None:
    sync = toposerve("topology", "--profile", "synchronous").stdout
    assert "results live" not in sync and "-> store" not in sync and "not kept" in sync
    assert "the caller's reply queue" in sync.split("flow:")[1]
    asynchronous = toposerve("topology", "--profile", "asynchronous").stdout
    assert "results live 3600s" in asynchronous and "-> store -> Redis" in asynchronous
    assert "the oldest dropped past them" in asynchronous  # the dead-letter queue's bounds
