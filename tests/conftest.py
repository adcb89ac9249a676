"""Shared fixtures: real RabbitMQ and Redis for integration tests.

Where the services come from (DESIGN.md, "Tests"), for each of AMQP and Redis:

1. ``TOPOSERVE_TEST_AMQP_URL`` / ``TOPOSERVE_TEST_REDIS_URL`` when set;
2. testcontainers containers, only where a Docker engine answers a quick ping
   (the fixtures never start one; CI does, see .ci/run; ``TOPOSERVE_TEST_NO_DOCKER=1``
   skips the probe), on host networking (tests/support/containers.py);
3. throwaway ``rabbitmq-server`` / ``redis-server`` processes on free loopback
   ports (``deploy/local_services/``), stopped at the end of the session.

``fresh_services`` (the fault tests' own servers, killed and restarted) takes path 2 or 3 the
same way. ``TOPOSERVE_TEST_REQUIRE_DOCKER=1`` (CI sets it where it runs an engine) makes path 2
mandatory: a failing container start fails the tests instead of falling back, so a container
lane never passes on local processes. The summary names the path each service took.
If none works the fixture fails (never skips) and says how to provide services.
Tests that use these fixtures are marked ``integration`` automatically.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

import pytest

from tests.support.containers import (
    ContainerService,
    rabbitmq_image,
    redis_image,
    start_rabbitmq_container,
    start_redis_container,
)
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
REQUIRE_DOCKER_ENV = "TOPOSERVE_TEST_REQUIRE_DOCKER"
RABBITMQ_IMAGE_ENV = "TOPOSERVE_TEST_RABBITMQ_IMAGE"
REDIS_IMAGE_ENV = "TOPOSERVE_TEST_REDIS_IMAGE"
# Ryuk (testcontainers' reaper) is one more image to pull, which machines without a registry
# cannot: every container here is removed by its fixture, and CI stops its engine at the end.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
SERVICE_FIXTURES = frozenset({"amqp_url", "redis_url", "fresh_services"})

HOW_TO_PROVIDE = (
    "Integration tests need a real RabbitMQ and Redis. Provide them in one of these ways:\n"
    f"  - point at running servers: {AMQP_ENV}=amqp://guest:guest@HOST:5672/ "
    f"{REDIS_ENV}=redis://HOST:6379/0\n"
    "  - run a Docker engine (testcontainers starts toposerve-local/rabbitmq and /redis from "
    "deploy/base_images.py where built, else rabbitmq:3-management and redis:7; "
    f"${RABBITMQ_IMAGE_ENV} / ${REDIS_IMAGE_ENV} override)\n"
    f"  - install the servers, which the fixtures then start themselves: {INSTALL_HINT}"
)

_SOURCES_KEY = pytest.StashKey[list[str]]()
# Lines the fault-injection summaries (tests.support.faults.summary) and the fuzz tests print.
SUMMARY_LINE_PREFIXES = ("[fault ", "[fuzz ")
FAULT_GROUP = "fault"
WORKER_SOURCES = "toposerve_sources"


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


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark integration tests, and group tests for parallel runs (pytest-xdist, ``--dist
    loadgroup`` in pyproject's addopts; each worker has its own services, as session fixtures
    run once per worker): an integration module is one group, so its module fixtures (profiles
    started once for the module) start once; every module with a fault test joins one
    ``fault`` group, so at most one test kills servers or runs steady load at a time."""
    fault_modules = {item.module.__name__ for item in items
                     if item.get_closest_marker("fault") and getattr(item, "module", None)}
    for item in items:
        integration = bool(SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())))
        if integration:
            item.add_marker(pytest.mark.integration)
        module = getattr(item, "module", None)
        if module is not None and module.__name__ in fault_modules:
            item.add_marker(pytest.mark.xdist_group(FAULT_GROUP))
        elif module is not None and (integration or item.get_closest_marker("integration")):
            item.add_marker(pytest.mark.xdist_group(module.__name__))


_UNGROUPED = pytest.StashKey[frozenset[str]]()


def pytest_collection_finish(session: pytest.Session) -> None:
    """In a pytest-xdist worker with --dist loadgroup: the groups must have taken (pytest-xdist
    names a grouped test ``id@group``), else the fault tests would run side by side and module
    fixtures start twice without anyone noticing; each test whose group did not take fails."""
    if hasattr(session.config, "workerinput") and session.config.getvalue("loadgroup"):
        session.config.stash[_UNGROUPED] = frozenset(
            item.nodeid for item in session.items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.nodeid in item.config.stash.get(_UNGROUPED, frozenset()):
        pytest.fail("pytest-xdist ignored this test's xdist_group (its id has no @group), so the groups of "
                    "tests/conftest.py do not hold; see the pytest pin in pyproject.toml", pytrace=False)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """In a pytest-xdist worker: hand the services it announced to the controller's summary."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput[WORKER_SOURCES] = session.config.stash.get(_SOURCES_KEY, [])


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook, called in the controller only
def pytest_testnodedown(node, error) -> None:  # noqa: ANN001 - xdist's WorkerController
    """In the controller: the services each worker used, named by worker, for the summary."""
    for line in getattr(node, "workeroutput", {}).get(WORKER_SOURCES, []):
        node.config.stash.setdefault(_SOURCES_KEY, []).append(f"{node.gateway.id}: {line}")


def _redact(url: str) -> str:
    parsed = urlparse(url)
    return url.replace(f":{parsed.password}@", ":***@") if parsed.password else url


# --------------------------------------------------------------------------- probes


def _truthy(var: str) -> bool:
    return os.environ.get(var, "").lower() in ("1", "true", "yes")


def _docker_required() -> bool:
    return _truthy(REQUIRE_DOCKER_ENV)


@dataclass(frozen=True)
class DockerProbe:
    available: bool
    reason: str


@pytest.fixture(scope="session")
def _docker_probe() -> DockerProbe:
    """Does a Docker engine answer right now? Never starts one."""
    probe = _probe_docker()
    if not probe.available and _docker_required():
        pytest.fail(f"{REQUIRE_DOCKER_ENV} is set but testcontainers cannot be used: {probe.reason}")
    return probe


def _probe_docker() -> DockerProbe:
    if _truthy(NO_DOCKER_ENV):
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
    return DockerProbe(True, f"Docker engine answers at {os.environ.get('DOCKER_HOST', 'the default socket')}")


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


def _docker_client():  # noqa: ANN202 - docker.DockerClient, imported lazily
    import docker

    return docker.from_env(timeout=30)


def _container_image(kind: str) -> str:
    client = _docker_client()
    try:
        if kind == "rabbitmq":
            return rabbitmq_image(client, os.environ.get(RABBITMQ_IMAGE_ENV))
        return redis_image(client, os.environ.get(REDIS_IMAGE_ENV))
    finally:
        client.close()


def _describe_container(service: ContainerService, seconds: float) -> str:
    return f"testcontainers {service.image} (host network, started in {seconds:.1f} s) -> {_redact(service.url)}"


def _provide(
    request: pytest.FixtureRequest,
    stack: ExitStack,
    *,
    what: str,
    env_var: str,
    default_port: int,
    start_container: Callable[[], ContainerService],
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
            container = start_container()
        except Exception as exc:  # noqa: BLE001 - fall back to local processes, unless required
            if _docker_required():
                pytest.fail(f"{REQUIRE_DOCKER_ENV} is set and the {what} container failed: "
                            f"{type(exc).__name__}: {exc}")
            failures.append(f"testcontainers: {type(exc).__name__}: {exc}")
        else:
            stack.callback(container.stop)
            _announce(config, f"{what}: {_describe_container(container, time.monotonic() - started)}")
            return container.url
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
            f"(pid {service.pid}, started in {time.monotonic() - started:.1f} s) -> {service.url}"
            f" [testcontainers not used: {failures[-1].removeprefix('testcontainers: ')}]",
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
            start_container=lambda: start_rabbitmq_container(_container_image("rabbitmq")),
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
            start_container=lambda: start_redis_container(_container_image("redis")),
            start_local=start_redis,
        )


@pytest.fixture
def namespace() -> str:
    """A namespace of its own for one test, e.g. ``t-1f2e3d4c``."""
    return f"t-{secrets.token_hex(4)}"


class KillableService(Protocol):
    """What the fault tests use of a server: a local process (LocalService) or a container."""

    name: str
    url: str
    port: int

    def kill(self) -> None: ...

    def restart(self) -> None: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class FreshServices:
    """A RabbitMQ and a Redis (append-only) that belong to one test, to kill and restart.

    They run as ``toposerve up`` runs them: an account per role for the test's namespace
    (every shipped profile's stages), no guest and no default Redis user. ``amqp_url`` and
    ``redis_url`` are the admin's (for the test itself); ``accounts_file`` holds each role's
    login, which stages and ingresses built with it use (``Settings.accounts_file``).
    Containers where the session's services come from testcontainers, else local processes.
    """

    rabbitmq: KillableService
    redis: KillableService
    accounts_file: Path

    @property
    def amqp_url(self) -> str:
        return self.rabbitmq.url

    @property
    def redis_url(self) -> str:
        return self.redis.url


_FRESH_ANNOUNCED = pytest.StashKey[bool]()


def _fresh_in_containers(stack: ExitStack, definitions: dict, acl: list[str]) -> tuple[KillableService,
                                                                                       KillableService]:
    rabbitmq = stack.enter_context(start_rabbitmq_container(_container_image("rabbitmq"), definitions=definitions))
    redis = stack.enter_context(start_redis_container(_container_image("redis"), appendonly=True, acl=acl))
    return rabbitmq, redis


def _fresh_locally(stack: ExitStack, definitions: dict, acl: list[str]) -> tuple[KillableService, KillableService]:
    try:
        rabbitmq = stack.enter_context(start_rabbitmq(definitions=definitions))
        redis = stack.enter_context(start_redis(appendonly=True, acl=acl))
    except ServiceUnavailable as exc:
        pytest.fail(
            "fresh_services needs local rabbitmq-server and redis-server processes, which it "
            f"kills and restarts on the same ports:\n{exc}"
        )
    return rabbitmq, redis


@pytest.fixture
def fresh_services(request: pytest.FixtureRequest, namespace: str, tmp_path: Path) -> Iterator[FreshServices]:
    """Private throwaway servers for fault-injection tests (about 5 s to start)."""
    from toposerve.deploy.accounts import logins, new_passwords, profile_accounts, rabbitmq_definitions, redis_acl
    from toposerve.deploy.profile import available_profiles, load_profile

    accounts = profile_accounts(namespace, *(load_profile(name) for name in available_profiles()))
    passwords = new_passwords(accounts)
    definitions, acl = rabbitmq_definitions(accounts, passwords), redis_acl(accounts, passwords)
    probe: DockerProbe = request.getfixturevalue("_docker_probe")
    with ExitStack() as stack:
        path = "throwaway local processes"
        if probe.available:
            try:
                rabbitmq, redis = _fresh_in_containers(stack, definitions, acl)
                path = f"testcontainers {rabbitmq.image} + {redis.image}"  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001 - fall back to local processes, unless required
                if _docker_required():
                    pytest.fail(f"{REQUIRE_DOCKER_ENV} is set and a fresh_services container failed: "
                                f"{type(exc).__name__}: {exc}")
                stack.close()
                path = f"throwaway local processes [testcontainers failed: {type(exc).__name__}: {exc}]"
                rabbitmq, redis = _fresh_locally(stack, definitions, acl)
        else:
            path = f"throwaway local processes [testcontainers not used: {probe.reason}]"
            rabbitmq, redis = _fresh_locally(stack, definitions, acl)
        if not request.config.stash.get(_FRESH_ANNOUNCED, False):
            request.config.stash[_FRESH_ANNOUNCED] = True
            _announce(request.config, f"fresh_services (fault tests' own RabbitMQ + Redis): {path}")
        accounts_file = logins(accounts, passwords, rabbitmq.url, redis.url, namespace).save(tmp_path / "accounts.json")
        yield FreshServices(rabbitmq=rabbitmq, redis=redis, accounts_file=accounts_file)
