"""deploy/launcher.py ensure_services: a URL that is set must answer; an unset one gets a throwaway server.

No real server is ever started here: the start functions are replaced, and the
"default" URLs are pointed at free loopback ports so a RabbitMQ/Redis that may be
running on 5672/6379 on this machine plays no part.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from toposerve.brokers.settings import Settings
from toposerve.deploy import launcher
from toposerve.deploy.launcher import LaunchError, ensure_services
from toposerve.deploy.local_services import INSTALL_HINT, ServiceUnavailable, free_port, rabbitmq_server


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch) -> None:
    for var in ("TOPOSERVE_AMQP_URL", "TOPOSERVE_REDIS_URL", "TOPOSERVE_NAMESPACE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def listener() -> Iterator[int]:
    """A loopback port where something accepts TCP connections."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


@pytest.fixture
def never_start(monkeypatch) -> None:
    def fail(*args, **kwargs):
        pytest.fail("ensure_services tried to start a local server")

    monkeypatch.setattr(launcher, "start_rabbitmq", fail)
    monkeypatch.setattr(launcher, "start_redis", fail)


@dataclass
class FakeService:
    name: str
    url: str
    workdir: Path = Path("/tmp/fake")
    stopped: int = 0

    def stop(self) -> None:
        self.stopped += 1


@dataclass
class Said:
    lines: list[str] = field(default_factory=list)

    def __call__(self, line: str) -> None:
        self.lines.append(line)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def test_the_real_defaults_are_the_documented_ones() -> None:
    assert launcher.DEFAULT_AMQP_URL == "amqp://guest:guest@127.0.0.1:5672/"
    assert launcher.DEFAULT_REDIS_URL == "redis://127.0.0.1:6379/0"


def test_silent_non_default_amqp_url_is_named_and_nothing_is_started(never_start, listener) -> None:
    port = free_port()
    settings = Settings(amqp_url=f"amqp://app:s3cret@127.0.0.1:{port}/", redis_url=f"redis://127.0.0.1:{listener}/0")
    say = Said()
    with pytest.raises(LaunchError) as info:
        ensure_services(settings, say)
    message = str(info.value)
    assert "TOPOSERVE_AMQP_URL" in message
    assert f"127.0.0.1:{port}" in message
    assert "s3cret" not in message and "***" in message  # the password is redacted
    assert "starting" not in say.text


def test_silent_non_default_redis_url_is_named_and_nothing_is_started(never_start, listener) -> None:
    port = free_port()
    settings = Settings(amqp_url=f"amqp://guest:guest@127.0.0.1:{listener}/", redis_url=f"redis://127.0.0.1:{port}/0")
    with pytest.raises(LaunchError) as info:
        ensure_services(settings, Said())
    assert "TOPOSERVE_REDIS_URL" in str(info.value)
    assert f"127.0.0.1:{port}" in str(info.value)


def test_services_that_answer_are_used_as_they_are(never_start, listener) -> None:
    settings = Settings(amqp_url=f"amqp://guest:guest@127.0.0.1:{listener}/",
                        redis_url=f"redis://127.0.0.1:{listener}/0", namespace="t-abc")
    say = Said()
    resolved, started = ensure_services(settings, say)
    assert started == []
    assert resolved.amqp_url == settings.amqp_url and resolved.redis_url == settings.redis_url
    assert resolved.namespace == "t-abc"
    assert say.lines == []


@pytest.mark.parametrize("which", ["rabbitmq", "redis"])
def test_missing_server_for_an_unset_url_propagates_the_install_hint(monkeypatch, listener, which: str) -> None:
    settings = Settings()
    if which == "redis":  # AMQP is set and answers; only Redis is missing
        settings = Settings(amqp_url=f"amqp://guest:guest@127.0.0.1:{listener}/")

    def missing(*args, **kwargs):
        raise ServiceUnavailable(f"{which}-server not found. Install it with: {INSTALL_HINT}")

    monkeypatch.setattr(launcher, "start_rabbitmq", missing if which == "rabbitmq" else _not_called)
    monkeypatch.setattr(launcher, "start_redis", missing)
    say = Said()
    with pytest.raises(ServiceUnavailable) as info:
        ensure_services(settings, say)
    assert INSTALL_HINT in str(info.value)
    assert f"starting a throwaway local {which}-server" in say.text


def _not_called(*args, **kwargs):
    pytest.fail("start_rabbitmq called although AMQP answers")


def test_real_start_functions_without_binaries_give_the_install_hint(monkeypatch) -> None:
    # The real start_rabbitmq, with no binary to be found: it must refuse before starting anything.
    monkeypatch.setattr(rabbitmq_server, "find_binary", lambda name: None)
    with pytest.raises(ServiceUnavailable) as info:
        ensure_services(Settings(), Said())
    assert INSTALL_HINT in str(info.value) and "rabbitmq-server" in str(info.value)


def test_servers_started_before_a_failure_are_stopped(monkeypatch) -> None:
    rabbit = FakeService("rabbitmq", "amqp://guest:guest@127.0.0.1:1/")
    monkeypatch.setattr(launcher, "start_rabbitmq", lambda **options: rabbit)

    def no_redis(**options):
        raise ServiceUnavailable(f"redis-server not found. Install it with: {INSTALL_HINT}")

    monkeypatch.setattr(launcher, "start_redis", no_redis)
    with pytest.raises(ServiceUnavailable):
        ensure_services(Settings(), Said())
    assert rabbit.stopped == 1


def test_throwaway_servers_replace_unset_urls(monkeypatch) -> None:
    rabbit = FakeService("rabbitmq", "amqp://guest:guest@127.0.0.1:40001/")
    redis_service = FakeService("redis", "redis://127.0.0.1:40002/0")
    monkeypatch.setattr(launcher, "start_rabbitmq", lambda **options: rabbit)
    redis_options: list[dict] = []
    monkeypatch.setattr(launcher, "start_redis", lambda **options: redis_options.append(options) or redis_service)
    say = Said()
    resolved, started = ensure_services(Settings(), say)
    assert started == [rabbit, redis_service]
    # The Redis it starts keeps results across its own restart (an append-only file).
    assert redis_options == [{"appendonly": True, "appendfsync": "everysec", "acl": None}]
    assert resolved.amqp_url == rabbit.url and resolved.redis_url == redis_service.url
    assert rabbit.stopped == redis_service.stopped == 0  # the caller stops them later
    # Where they are, with the password masked.
    assert "127.0.0.1:40001" in say.text and "guest:guest" not in say.text and redis_service.url in say.text


@pytest.mark.parametrize(("url", "port"), [("amqp://h/", 5672), ("amqps://h/vhost", 5671), ("amqps://h:5999/", 5999),
                                           ("redis://h/0", 6379), ("rediss://h/0", 6379)])
def test_a_url_without_a_port_is_probed_where_its_client_would_connect(monkeypatch, url: str, port: int) -> None:
    probed: list[tuple[str, int]] = []
    monkeypatch.setattr(launcher, "port_answers", lambda host, p: probed.append((host, p)) or True)
    assert launcher._answers(url)
    assert probed == [("h", port)]


def test_every_stage_replica_gets_its_own_metrics_port() -> None:
    from toposerve.deploy.components import load_checked_profile

    ports = iter(range(9500, 9600))
    profile = load_checked_profile("prep_pred", Settings())
    children = launcher.child_processes(profile, "prep_pred", "127.0.0.1", 8000, metrics_port=lambda: next(ports))
    assert [c.name for c in children] == ["ingress", "preprocess[0]", "preprocess[1]", "predict[0]"]
    assert [c.metrics_url for c in children] == ["http://127.0.0.1:8000/metrics", "http://127.0.0.1:9500/metrics",
                                                 "http://127.0.0.1:9501/metrics", "http://127.0.0.1:9502/metrics"]
    assert children[2].argv[-2:] == ["--metrics-port", "9501"]
    single = load_checked_profile("web_single", Settings())
    only = launcher.child_processes(single, "web_single", "127.0.0.1", 8000, metrics_port=lambda: next(ports))
    assert [(c.name, c.metrics_url) for c in only] == [("ingress", "http://127.0.0.1:8000/metrics")]


def test_server_processes_settle_their_heap_after_start_up() -> None:
    """Frozen start-up objects and a larger young generation (deploy/processes.settle_heap), in
    a process of its own: the test process must not freeze its own garbage for good."""
    import subprocess
    import sys

    check = ("import gc\nfrom toposerve.deploy.processes import GC_YOUNG_THRESHOLD, settle_heap\n"
             "before = gc.get_threshold()\nsettle_heap()\n"
             "assert gc.get_freeze_count() > 10_000, gc.get_freeze_count()\n"
             "assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:]), gc.get_threshold()\n")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
