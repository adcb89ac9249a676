"""Shared fixtures: real RabbitMQ and Redis for integration tests.

Where the services come from (DESIGN.md, "Tests"), for each of AMQP and Redis:

1. ``TOPOSERVE_TEST_AMQP_URL`` / ``TOPOSERVE_TEST_REDIS_URL`` when set;
2. testcontainers containers, only where a Docker engine answers a quick ping
   (dockerd is never started; ``TOPOSERVE_TEST_NO_DOCKER=1`` skips the probe);
3. throwaway ``rabbitmq-server`` / ``redis-server`` processes on free loopback
   ports (``deploy/local_services/``), stopped at the end of the session.

If none works the fixture fails (never skips) and says how to provide services.
Tests that use these fixtures are marked ``integration`` automatically.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest

from toposerve.deploy.local_services import (
    INSTALL_HINT,
    LocalService,
    ServiceUnavailable,
    port_answers,
    start_rabbitmq,
    start_redis,
)

AMQP_ENV = "TOPOSERVE_TEST_AMQP_URL"
REDIS_ENV = "TOPOSERVE_TEST_REDIS_URL"
NO_DOCKER_ENV = "TOPOSERVE_TEST_NO_DOCKER"
RABBITMQ_IMAGE = os.environ.get("TOPOSERVE_TEST_RABBITMQ_IMAGE", "rabbitmq:3.13-alpine")
REDIS_IMAGE = os.environ.get("TOPOSERVE_TEST_REDIS_IMAGE", "redis:7-alpine")
SERVICE_FIXTURES = frozenset({"amqp_url", "redis_url", "fresh_services"})

HOW_TO_PROVIDE = (
    "Integration tests need a real RabbitMQ and Redis. Provide them in one of these ways:\n"
    f"  - point at running servers: {AMQP_ENV}=amqp://guest:guest@HOST:5672/ "
    f"{REDIS_ENV}=redis://HOST:6379/0\n"
    "  - run a Docker engine that can pull images (testcontainers starts "
    f"{RABBITMQ_IMAGE} and {REDIS_IMAGE})\n"
    f"  - install the servers, which the fixtures then start themselves: {INSTALL_HINT}"
)

_SOURCES_KEY = pytest.StashKey[list[str]]()
# Lines the fault-injection summaries (tests.support.faults.summary) and the fuzz tests print.
SUMMARY_LINE_PREFIXES = ("[fault ", "[fuzz ")


# --------------------------------------------------------------------------- reporting


def _announce(config: pytest.Config, line: str) -> None:
    """Say where the services come from: now on the terminal, and again in the summary."""
    config.stash.setdefault(_SOURCES_KEY, []).append(line)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(f"[toposerve services] {line}", cyan=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Where the services came from, and every fault-injection scenario's summary line
    (found in the captured output of each test, so they show without ``-s`` too)."""
    sources = terminalreporter.config.stash.get(_SOURCES_KEY, [])
    if sources:
        terminalreporter.section("toposerve test services")
        for line in sources:
            terminalreporter.write_line(line)
    # Every phase's report carries the output captured so far (a module fixture's teardown
    # prints the fuzz counts): collect from all of them, once each, in order.
    reports = [r for group in terminalreporter.stats.values() for r in group if isinstance(r, pytest.TestReport)]
    outcome = {r.nodeid: r.outcome for r in reports if r.when == "call"}
    lines: dict[str, None] = {}
    for report in reports:
        for line in report.capstdout.splitlines():
            if line.startswith(SUMMARY_LINE_PREFIXES):
                lines.setdefault(f"{line} ({outcome.get(report.nodeid, report.outcome)})")
    if lines:
        terminalreporter.section("toposerve fault injection and fuzzing")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def _redact(url: str) -> str:
    parsed = urlparse(url)
    return url.replace(f":{parsed.password}@", ":***@") if parsed.password else url


# --------------------------------------------------------------------------- probes


def _amqp_handshake(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when an AMQP 0-9-1 server answers the protocol header with a method frame.
    (A mapped Docker port accepts TCP before the broker inside listens.)"""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            return sock.recv(1) == b"\x01"
    except OSError:
        return False


def _redis_ping(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _wait_for(probe: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return True
        time.sleep(0.25)
    return False


@dataclass(frozen=True)
class DockerProbe:
    available: bool
    reason: str


@pytest.fixture(scope="session")
def _docker_probe() -> DockerProbe:
    """Does a Docker engine answer right now? Never starts one."""
    if os.environ.get(NO_DOCKER_ENV, "").lower() in ("1", "true", "yes"):
        return DockerProbe(False, f"{NO_DOCKER_ENV} is set")
    try:
        import docker  # installed with testcontainers
    except ImportError:
        return DockerProbe(False, "the docker SDK (testcontainers) is not installed")
    try:
        client = docker.from_env(timeout=3)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 - any failure means "no engine"
        return DockerProbe(False, f"no Docker engine answers ({type(exc).__name__})")
    return DockerProbe(True, "Docker engine answers")


# --------------------------------------------------------------------------- providers


def _from_env(var: str, default_port: int, config: pytest.Config, what: str) -> str | None:
    url = os.environ.get(var)
    if not url:
        return None
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or default_port
    if not port_answers(host, port, timeout=3.0):
        pytest.fail(f"{var}={_redact(url)} is set but nothing answers at {host}:{port}.\n{HOW_TO_PROVIDE}")
    _announce(config, f"{what}: from ${var} -> {_redact(url)}")
    return url


def _from_docker(
    stack: ExitStack,
    image: str,
    port: int,
    ready: Callable[[str, int], bool],
    url_of: Callable[[str, int], str],
) -> str:
    from testcontainers.core.container import DockerContainer

    container = DockerContainer(image).with_exposed_ports(port)
    container.start()
    stack.callback(container.stop)
    host, mapped = container.get_container_host_ip(), int(container.get_exposed_port(port))
    if not _wait_for(lambda: ready(host, mapped), 90.0):
        raise RuntimeError(f"container {image} did not become ready on {host}:{mapped} within 90 s")
    return url_of(host, mapped)


def _provide(
    request: pytest.FixtureRequest,
    stack: ExitStack,
    *,
    what: str,
    env_var: str,
    default_port: int,
    image: str,
    ready: Callable[[str, int], bool],
    url_of: Callable[[str, int], str],
    start_local: Callable[[], LocalService],
) -> str:
    config = request.config
    url = _from_env(env_var, default_port, config, what)
    if url is not None:
        return url
    failures: list[str] = [f"${env_var} is not set"]
    probe: DockerProbe = request.getfixturevalue("_docker_probe")
    if probe.available:
        started = time.monotonic()
        try:
            url = _from_docker(stack, image, default_port, ready, url_of)
        except Exception as exc:  # noqa: BLE001 - fall back to local processes
            failures.append(f"testcontainers {image}: {type(exc).__name__}: {exc}")
        else:
            _announce(config, f"{what}: testcontainers {image} ({time.monotonic() - started:.1f} s) -> {url}")
            return url
    else:
        failures.append(f"testcontainers: {probe.reason}")
    started = time.monotonic()
    try:
        service = start_local()
    except ServiceUnavailable as exc:
        failures.append(f"local server: {exc}")
    else:
        stack.callback(service.stop)
        _announce(
            config,
            f"{what}: throwaway local {service.name} in {service.workdir} "
            f"(pid {service.pid}, started in {time.monotonic() - started:.1f} s) -> {service.url}",
        )
        return service.url
    pytest.fail(f"No {what} for the integration tests:\n  - " + "\n  - ".join(failures) + f"\n{HOW_TO_PROVIDE}")


@pytest.fixture(scope="session")
def amqp_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """AMQP URL of a RabbitMQ shared by the whole session (use your own namespace)."""
    with ExitStack() as stack:
        yield _provide(
            request,
            stack,
            what="RabbitMQ",
            env_var=AMQP_ENV,
            default_port=5672,
            image=RABBITMQ_IMAGE,
            ready=_amqp_handshake,
            url_of=lambda host, port: f"amqp://guest:guest@{host}:{port}/",
            start_local=start_rabbitmq,
        )


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """Redis URL shared by the whole session (use your own namespace in keys)."""
    with ExitStack() as stack:
        yield _provide(
            request,
            stack,
            what="Redis",
            env_var=REDIS_ENV,
            default_port=6379,
            image=REDIS_IMAGE,
            ready=_redis_ping,
            url_of=lambda host, port: f"redis://{host}:{port}/0",
            start_local=start_redis,
        )


@pytest.fixture
def namespace() -> str:
    """A namespace of its own for one test, e.g. ``t-1f2e3d4c``."""
    return f"t-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class FreshServices:
    """A RabbitMQ and a Redis (append-only) that belong to one test, to kill and restart.

    They run as ``toposerve up`` runs them: an account per role for the test's namespace
    (every shipped profile's stages), no guest and no default Redis user. ``amqp_url`` and
    ``redis_url`` are the admin's (for the test itself); ``accounts_file`` holds each role's
    login, which stages and ingresses built with it use (``Settings.accounts_file``).
    """

    rabbitmq: LocalService
    redis: LocalService
    accounts_file: Path

    @property
    def amqp_url(self) -> str:
        return self.rabbitmq.url

    @property
    def redis_url(self) -> str:
        return self.redis.url


@pytest.fixture
def fresh_services(namespace: str, tmp_path: Path) -> Iterator[FreshServices]:
    """Private throwaway servers for fault-injection tests (about 5 s to start)."""
    from toposerve.deploy.accounts import logins, new_passwords, profile_accounts, rabbitmq_definitions, redis_acl
    from toposerve.deploy.profile import available_profiles, load_profile

    accounts = profile_accounts(namespace, *(load_profile(name) for name in available_profiles()))
    passwords = new_passwords(accounts)
    with ExitStack() as stack:
        error: ServiceUnavailable | None = None
        try:
            rabbitmq = stack.enter_context(start_rabbitmq(definitions=rabbitmq_definitions(accounts, passwords)))
            redis = stack.enter_context(start_redis(appendonly=True, acl=redis_acl(accounts, passwords)))
        except ServiceUnavailable as exc:
            error = exc
        if error is not None:
            pytest.fail(
                "fresh_services needs local rabbitmq-server and redis-server processes, which it "
                f"kills and restarts on the same ports:\n{error}"
            )
        accounts_file = logins(accounts, passwords, rabbitmq.url, redis.url, namespace).save(tmp_path / "accounts.json")
        yield FreshServices(rabbitmq=rabbitmq, redis=redis, accounts_file=accounts_file)
