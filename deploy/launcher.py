"""``toposerve up``: run a whole profile on this machine, one supervised process per part.

Uses the RabbitMQ and Redis its URLs name, or, where a URL is not set, starts a
throwaway local one with an account per role (brokers/accounts.py) and no guest or
default user; starts the ingress and every stage replica as child processes, each
logged in as its own role, restarts a child that dies, and on Ctrl-C / SIGTERM stops
the ingress first, then lets every stage drain, then stops what it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

from toposerve.brokers import Account, Settings
from toposerve.deploy.accounts import (
    AccountsFile,
    ingress_role,
    logins,
    new_passwords,
    profile_accounts,
    rabbitmq_definitions,
    redis_acl,
    stage_role,
)
from toposerve.deploy.local_services import (
    LocalService,
    ServiceUnavailable,
    free_port,
    port_answers,
    start_rabbitmq,
    start_rabbitmq_cluster,
    start_redis,
)
from toposerve.deploy.profile import Profile

Say = Callable[[str], None]
DEFAULT_AMQP_URL = Settings.model_fields["amqp_url"].default
DEFAULT_REDIS_URL = Settings.model_fields["redis_url"].default


class LaunchError(RuntimeError):
    pass


# What the clients (aiormq, redis-py) connect to when a URL names no port.
DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671, "redis": 6379, "rediss": 6379}


def _answers(url: str) -> bool:
    """Something answers at ``url`` (at any node of a comma-separated list: a cluster with one
    node down still serves)."""
    if "," in url:
        return any(_answers(node.strip()) for node in url.split(","))
    parsed = urlparse(url)
    return port_answers(parsed.hostname or "127.0.0.1", parsed.port or DEFAULT_PORTS.get(parsed.scheme, 5672))


def ensure_services(settings: Settings, say: Say, definitions: dict | None = None,
                    acl: list[str] | None = None, cluster: int = 1) -> tuple[Settings, list[LocalService]]:
    """The settings to run with, and the throwaway servers started for them (to stop later).

    A server whose URL is not set (``TOPOSERVE_AMQP_URL``, ``TOPOSERVE_REDIS_URL``) is a
    throwaway one started here, with the accounts in ``definitions`` / ``acl`` and no guest
    or default user; a URL that is set must answer, and is used as it is. ``cluster`` > 1: the
    throwaway RabbitMQ is a cluster of that many nodes (deploy/local_services/rabbitmq_cluster.py).
    """
    if cluster > 1 and "amqp_url" in settings.model_fields_set:
        raise LaunchError(f"--cluster {cluster} starts a throwaway cluster; TOPOSERVE_AMQP_URL is set "
                          f"({_redact(settings.amqp_url)}): unset it, or drop --cluster to use that broker")

    def throwaway_rabbitmq() -> LocalService:
        if cluster > 1:
            return start_rabbitmq_cluster(cluster, definitions=definitions)  # type: ignore[return-value]
        return start_rabbitmq(definitions=definitions)

    started: list[LocalService] = []
    urls: dict[str, str] = {}
    # The Redis it starts keeps an append-only file (fsync every second), so a restart of
    # it loses at most a second of results instead of every one (README, "Configuration").
    wanted = (("amqp_url", "RabbitMQ" if cluster <= 1 else f"a {cluster}-node RabbitMQ cluster", "rabbitmq-server",
               throwaway_rabbitmq),
              ("redis_url", "Redis", "redis-server", lambda: persistent_redis(acl)))
    try:
        for field, what, binary, start in wanted:
            url = getattr(settings, field)
            if field in settings.model_fields_set:
                if not _answers(url):
                    raise LaunchError(f"nothing answers at TOPOSERVE_{field.upper()}={_redact(url)}; start {what} "
                                      "there, or unset the variable to let toposerve start a throwaway one")
                continue
            say(f"TOPOSERVE_{field.upper()} is not set: starting a throwaway local {binary} ...")
            service = start()
            started.append(service)
            urls[field] = service.url
            say(f"  {what} is up at {_redact(service.url)} (data in {service.workdir}, removed on exit)")
    except (ServiceUnavailable, LaunchError):
        for service in reversed(started):
            service.stop()
        raise
    return settings.model_copy(update=urls), started


def persistent_redis(acl: list[str] | None = None) -> LocalService:
    return start_redis(appendonly=True, appendfsync="everysec", acl=acl)


def _redact(url: str) -> str:
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


@dataclass
class Child:
    name: str
    argv: list[str]
    role: str = "ingress"  # the account it logs in as (brokers/accounts.py)
    stage: str | None = None  # the stage it runs (None: the ingress)
    metrics_url: str | None = None  # where its Prometheus metrics are served
    process: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    backoff_s: float = field(default=1.0)


class Supervisor:
    """Keeps a set of child processes running until told to stop."""

    def __init__(self, children: list[Child], env: dict[str, str], say: Say,
                 role_env: Callable[[str], dict[str, str]] = lambda role: {}, settings: Settings | None = None) -> None:
        self.children = children
        self.settings = settings  # the services its children use (the administrator's login)
        self.env = env
        self.role_env = role_env  # a child's own login (its role's URLs), on top of ``env``
        self.say = say
        self.stopping = False

    def start_all(self) -> None:
        for child in self.children:
            self.start(child)

    def start(self, child: Child) -> None:
        # A session of its own: Ctrl-C reaches only the launcher, which then stops
        # children in order instead of all of them at once.
        child.process = subprocess.Popen(child.argv, env={**self.env, **self.role_env(child.role)},
                                         start_new_session=True)
        self.say(f"{child.name} started (pid {child.process.pid})")

    def poll(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.process is None:
                if now >= child.next_start:
                    self.start(child)
                continue
            code = child.process.poll()
            if code is None:
                if child.restarts and now - child.next_start > 60:
                    child.backoff_s = 1.0  # it stayed up a minute: forget old crashes
                continue
            child.restarts += 1
            child.process = None
            child.next_start = now + child.backoff_s
            self.say(f"{child.name} exited with code {code}; restarting in {child.backoff_s:.0f}s "
                     f"(restart #{child.restarts})")
            child.backoff_s = min(child.backoff_s * 2, 30.0)

    def stop(self, names_in_order: list[list[str]], timeout_s: float) -> None:
        self.stopping = True
        for group in names_in_order:
            terminate([c for c in self.children if c.name in group], timeout_s)


def terminate(children: list[Child], timeout_s: float) -> None:
    """SIGTERM (a stage drains what it holds, then exits); killed past ``timeout_s``."""
    running = [c.process for c in children if c.process is not None and c.process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in running:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


TOPOSERVE = [sys.executable, "-m", "toposerve"]
STANDBY = "--standby"  # a stage of a swap's new profile: its queue declared unbound (deploy/swap.py)


def child_processes(profile: Profile, profile_arg: str, host: str, port: int,
                    metrics_port: Callable[[], int] = free_port) -> list[Child]:
    """The ingress and every stage replica; each stage serves its metrics on a port of
    its own from ``metrics_port()`` (loopback), the ingress at its ``/metrics``."""
    ingress = Child("ingress", [*TOPOSERVE, "ingress", "--profile", profile_arg, "--host", host, "--port", str(port)],
                    role=ingress_role(profile), metrics_url=f"http://{host}:{port}/metrics")
    if profile.ingress.single_process:
        return [ingress]  # the ingress runs every stage itself (and serves their metrics)
    return [ingress, *stage_children(profile, profile_arg, metrics_port)]


def stage_children(profile: Profile, profile_arg: str, metrics_port: Callable[[], int] = free_port,
                   standby: bool = False) -> list[Child]:
    """Every stage replica of the profile; ``standby``: their queues declared unbound (a swap's new profile)."""
    children = []
    for stage, spec in profile.stages.items():
        for replica in range(spec.replicas):
            mport = metrics_port()
            argv = [*TOPOSERVE, "worker", "--profile", profile_arg, "--stage", stage, "--replica", str(replica),
                    "--metrics-port", str(mport), *([STANDBY] if standby else [])]
            children.append(Child(f"{stage}[{replica}]", argv, role=stage_role(profile, stage), stage=stage,
                                  metrics_url=f"http://127.0.0.1:{mport}/metrics"))
    return children


def wait_ready(url: str, timeout_s: float, supervisor: Supervisor) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not supervisor.stopping:
        supervisor.poll()
        try:
            response = httpx.get(f"{url}/readyz", timeout=1.0)
            body = response.json()
            consumers = body.get("stage_consumers", {})
            if response.status_code == 200 and consumers and all(n > 0 for n in consumers.values()):
                return True
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    return False


@contextmanager
def running_profile(
    profile: Profile, profile_arg: str, settings: Settings, host: str, port: int, say: Say,
    accounts_file: Path | None = None, provision: bool = False, management_url: str | None = None,
    replace: bool = False, cluster: int = 1,
) -> Iterator[tuple[str, Supervisor]]:
    """Start services (if needed) and every process of the profile; stop them all on exit.

    The namespace must have no other live profile (deploy/lifecycle.py); ``replace`` unbinds it.
    """
    if port_answers(host, port):
        raise LaunchError(f"port {port} on {host} is in use; pick another with --port")
    from toposerve.deploy.lifecycle import shipped_profiles

    # Every shipped profile's roles and queues too: a live swap (`toposerve swap --to NAME`)
    # starts another profile's stages in this namespace, logged in as their own roles.
    accounts = profile_accounts(settings.namespace, *{**shipped_profiles(), profile.name: profile}.values())
    path = accounts_file or AccountsFile.path_for(settings.namespace)
    passwords = new_passwords(accounts, keep=AccountsFile.load(path) if provision and path.is_file() else None)
    settings, started = ensure_services(settings, say, definitions=rabbitmq_definitions(accounts, passwords),
                                        acl=redis_acl(accounts, passwords), cluster=cluster)
    provisioned = set()
    try:
        if provision:
            provisioned = provision_given(settings, started, accounts, passwords, management_url, say)
        claim_live(settings, profile, replace, say, source=profile_arg)
    except BaseException:
        for service in reversed(started):
            service.stop()
        raise
    logins = role_logins(settings, {s.name for s in started} | provisioned, accounts, passwords)
    if logins is not None:
        path = logins.save(path)
        say(f"  an account per role; their URLs are in {path} (readable by you only). Direct publishers: "
            f"`toposerve accounts url client --namespace {settings.namespace}`")
    else:
        say("  every role uses the account of TOPOSERVE_AMQP_URL: anyone with it can publish results. "
            "Add --provision to make an account per role there, or unset the URLs to let toposerve start "
            "servers with them")
    env = {**os.environ, "TOPOSERVE_AMQP_URL": settings.amqp_url, "TOPOSERVE_REDIS_URL": settings.redis_url,
           "TOPOSERVE_NAMESPACE": settings.namespace}
    children = child_processes(profile, profile_arg, host, port)
    supervisor = Supervisor(children, env, say, role_env=lambda role: logins.env(role) if logins else {},
                            settings=settings)
    base_url = f"http://{host}:{port}"
    try:
        say(f"starting profile {profile.name!r}: {', '.join(c.name for c in children)}")
        supervisor.start_all()
        try:
            if not wait_ready(base_url, 60, supervisor):
                raise LaunchError(f"profile {profile.name!r} was not ready after 60 s ({base_url}/readyz tells why)")
            yield base_url, supervisor
        finally:
            # Runs on Ctrl-C too; a second Ctrl-C interrupts it and the outer finally kills.
            say("stopping: ingress first, then stages drain their in-flight work (Ctrl-C again forces) ...")
            stages = [c.name for c in supervisor.children if c.name != "ingress"]  # a swap changes them
            supervisor.stop([["ingress"], stages], timeout_s=settings.drain_timeout_s + 5)
    finally:
        for child in supervisor.children:
            if child.process is not None and child.process.poll() is None:
                child.process.kill()
                child.process.wait()
        for service in reversed(started):
            say(f"stopping the throwaway {service.name} ...")
            service.stop()


def claim_live(settings: Settings, profile: Profile, replace: bool, say: Say, source: str | None = None) -> None:
    """Record the profile as the namespace's live one before any of its processes binds a queue."""
    from toposerve.deploy.lifecycle import LifecycleError, claim_namespace

    try:
        claim_namespace(settings, profile, replace=replace, say=say, source=source)
    except LifecycleError as exc:
        raise LaunchError(str(exc)) from exc


def provision_given(settings: Settings, started: list[LocalService], accounts: list[Account],
                    passwords: dict[str, str], management_url: str | None, say: Say) -> set[str]:
    """Create the accounts on the servers whose URLs were given (``--provision``); which ones."""
    import asyncio

    from toposerve.deploy.provision import ProvisionError, management_url_for, provision_rabbitmq, provision_redis

    ours = {service.name for service in started}
    done = set()
    try:
        if "rabbitmq" not in ours:
            api = management_url or management_url_for(settings.amqp_url)
            asyncio.run(provision_rabbitmq(api, settings.amqp_url, rabbitmq_definitions(accounts, passwords)))
            say(f"  accounts made on the broker through its management API ({api})")
            done.add("rabbitmq")
        if "redis" not in ours:
            asyncio.run(provision_redis(settings.redis_url, accounts, passwords))
            say("  Redis ACL users made for every role")
            done.add("redis")
    except ProvisionError as exc:
        raise LaunchError(str(exc)) from exc
    return done


def role_logins(settings: Settings, ours: set[str], accounts: list[Account],
                passwords: dict[str, str]) -> AccountsFile | None:
    """Each role's URLs on the servers that have the accounts (``ours``: started here, or
    provisioned); a server without them is used as given by every role. None: neither has."""
    if not ours:
        return None
    made = logins(accounts, passwords, settings.amqp_url, settings.redis_url, settings.namespace)
    for login in made.roles.values():
        if "rabbitmq" not in ours:
            login.amqp_url = settings.amqp_url
        if "redis" not in ours:
            login.redis_url = settings.redis_url
    return made


def run_profile(profile: Profile, profile_arg: str, settings: Settings, host: str, port: int, say: Say,
                provision: bool = False, management_url: str | None = None, accounts_file: Path | None = None,
                replace: bool = False, cluster: int = 1) -> int:
    """``toposerve up``: run until Ctrl-C or SIGTERM."""
    stop_requested = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True
        raise KeyboardInterrupt  # leaves a wait in progress (startup included); cleanup runs in finally

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with running_profile(profile, profile_arg, settings, host, port, say, accounts_file=accounts_file,
                             provision=provision, management_url=management_url,
                             replace=replace, cluster=cluster) as (base_url, supervisor):
            say(f"ready: {base_url}  (profile {profile.name}, namespace {settings.namespace}); Ctrl-C stops")
            say(f"  operator's page: {base_url}/ui  (live topology, jobs, dead letters, try it)")
            say("  metrics: " + ", ".join(f"{c.name} {c.metrics_url}" for c in supervisor.children if c.metrics_url))
            say(f"  try: curl -X POST {base_url}/v1/models/{profile.models[0]}/predict "
                "-d '{\"instances\": [[5.1,3.5,1.4,0.2]]}'")
            from toposerve.deploy.supervised_swap import SwapDesk

            # `toposerve swap --to NAME` is carried out here: this process owns the stages.
            desk = None if profile.ingress.single_process else SwapDesk(supervisor.settings or settings, profile,
                                                                       supervisor, say)
            try:
                while not stop_requested:
                    supervisor.poll()
                    if desk is not None:
                        desk.poll()
                    time.sleep(0.2)
            finally:
                if desk is not None:
                    desk.close()
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    say("stopped")
    return 0
