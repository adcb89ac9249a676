"""RabbitMQ and Redis in containers (testcontainers), on host networking, for the fixtures.

Why host networking: the project's machines run dockerd without a bridge (no iptables), so
there is no port mapping; and testcontainers' own address guess on a machine that is itself a
container (``/.dockerenv``) is a bridge gateway nothing listens on. So each server gets free
loopback ports picked here and listens on 127.0.0.1 only, exactly like the throwaway local
processes (deploy/local_services), and the tests connect to 127.0.0.1.

Images: ``toposerve-local/*:latest`` (deploy/base_images.py, built from Debian packages) when
the engine has them, else the official ``rabbitmq:3-management`` and ``redis:7``; either can be
overridden with $TOPOSERVE_TEST_RABBITMQ_IMAGE / $TOPOSERVE_TEST_REDIS_IMAGE. Both kinds take
their ports and names from the environment and the command line, so one recipe serves both.

``kill()`` / ``restart()`` go through the container API (SIGKILL; start the same container
again, same ports, same data in its filesystem), for the fault-injection tests.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from toposerve.deploy.accounts import ADMIN_USER, redis_acl_file, with_administrator
from toposerve.deploy.base_images import latest
from toposerve.deploy.local_services import ServiceUnavailable, free_port, port_answers
from toposerve.deploy.local_services.rabbitmq_server import MAX_MESSAGE_SIZE

LOOPBACK = "127.0.0.1"
OFFICIAL_RABBITMQ_IMAGE = "rabbitmq:3-management"
OFFICIAL_REDIS_IMAGE = "redis:7"
# Inside the container: files copied in before start (the broker's user must read them, so
# they are copied, not bind-mounted from a private host dir).
CONFIG_DIR = "/run/toposerve"
_LOG_TAIL_LINES = 40
_STOP_TIMEOUT_S = 30


def free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _image_present(client: Any, image: str) -> bool:
    try:
        client.images.get(image)
    except Exception:  # noqa: BLE001 - docker.errors.ImageNotFound or an API error: not usable here
        return False
    return True


def choose_image(client: Any, override: str | None, local: str, official: str) -> str:
    """The override, else the locally built image when the engine has it, else the official one."""
    if override:
        return override
    return local if _image_present(client, local) else official


def amqp_handshake(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when an AMQP 0-9-1 server answers the protocol header with a method frame."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            return sock.recv(1) == b"\x01"
    except OSError:
        return False


def redis_ping(host: str, port: int, admin: tuple[str, str] | None = None, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if admin is not None:
                sock.sendall(f"AUTH {admin[0]} {admin[1]}\r\n".encode())
                if not sock.recv(64).startswith(b"+OK"):
                    return False
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass(eq=False)
class ContainerService:
    """A server in a container on host networking: ``url``, ``kill()``, ``restart()``, ``stop()``."""

    name: str
    url: str
    host: str
    port: int
    image: str
    container: Any  # testcontainers DockerContainer
    ready: Callable[[], bool]
    start_timeout: float = 90.0
    _extra_ports: tuple[int, ...] = ()
    _stopped: bool = field(default=False, init=False)

    @property
    def workdir(self) -> str:
        return f"container {self.container_id[:12]} ({self.image})"

    @property
    def pid(self) -> int | None:
        wrapped = self.container.get_wrapped_container()
        wrapped.reload()
        pid = int(wrapped.attrs.get("State", {}).get("Pid") or 0)
        return pid or None

    @property
    def container_id(self) -> str:
        return str(self.container.get_container_id())

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not self.ready():
            wrapped = self.container.get_wrapped_container()
            wrapped.reload()
            if wrapped.status in ("exited", "dead"):
                raise ServiceUnavailable(f"{self.name} container exited during startup\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"{self.name} did not answer on {self.host}:{self.port} within "
                                         f"{self.start_timeout:.0f} s\n{self.log_tail()}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the container (a crash); its filesystem, hence the data, stays for ``restart()``."""
        wrapped = self.container.get_wrapped_container()
        wrapped.kill()
        wrapped.wait(timeout=_STOP_TIMEOUT_S)
        self._wait_ports_closed()

    def restart(self) -> None:
        """Start the same container again (clean stop first if it runs); returns once it answers."""
        wrapped = self.container.get_wrapped_container()
        wrapped.reload()
        if wrapped.status == "running":
            wrapped.stop(timeout=_STOP_TIMEOUT_S)
        self._wait_ports_closed()
        wrapped.start()
        self.wait_ready()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            self.container.get_wrapped_container().stop(timeout=_STOP_TIMEOUT_S)
        except Exception:  # noqa: BLE001, S110 - removed below either way
            pass
        self.container.stop()

    def removed(self) -> bool:
        """True once the engine no longer has the container (``stop()`` removes it)."""
        import docker

        client = docker.from_env(timeout=30)
        try:
            client.containers.get(self.container_id)
        except docker.errors.NotFound:
            return True
        finally:
            client.close()
        return False

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            return self.container.get_wrapped_container().logs(tail=lines).decode(errors="replace")
        except Exception as exc:  # noqa: BLE001 - a log tail is best effort, in an error message
            return f"(no logs: {exc})"

    def exec(self, *command: str, user: str = "") -> subprocess.CompletedProcess[str]:
        """Run ``command`` inside the container (as ``user``, default the image's; its environment)."""
        code, (out, err) = self.container.get_wrapped_container().exec_run(list(command), demux=True, user=user)
        return subprocess.CompletedProcess(list(command), int(code), (out or b"").decode(errors="replace"),
                                           (err or b"").decode(errors="replace"))

    def _wait_ports_closed(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while any(port_answers(self.host, p, timeout=0.2) for p in (self.port, *self._extra_ports)):
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)

    def __enter__(self) -> ContainerService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(eq=False)
class RabbitMQContainer(ContainerService):
    node: str = ""

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n NODE ARGS`` inside the container, like RabbitMQService.ctl."""
        # As the node's user (official and local images alike): its cookie, no su wrapper.
        return self.exec("rabbitmqctl", "-n", self.node, *args, user="rabbitmq")


ServiceT = TypeVar("ServiceT", bound=ContainerService)


def _start(service: ServiceT) -> ServiceT:
    try:
        service.container.start()
        service.wait_ready()
    except BaseException:
        service.stop()
        raise
    return service


def _rabbitmq_config(admin: tuple[str, str] | None) -> str:
    lines = [
        "# throwaway node for toposerve's tests (tests/support/containers.py)",
        "disk_free_limit.absolute = 1MB",  # never block publishers because the disk is fullish
        f"max_message_size = {MAX_MESSAGE_SIZE}",
    ]
    if admin is not None:
        lines += [f"default_user = {admin[0]}", f"default_pass = {admin[1]}", "default_user_tags.administrator = true",
                  "default_permissions.configure = .*", "default_permissions.read = .*",
                  "default_permissions.write = .*", f"load_definitions = {CONFIG_DIR}/definitions.json"]
    return "\n".join(lines) + "\n"


def rabbitmq_host_network_env(node: str, amqp: int, dist: int, epmd: int, management: int,
                               prometheus: int) -> dict[str, str]:
    """A RabbitMQ node's environment on host networking: its own name and ports, loopback only."""
    erl_args = (
        "-kernel inet_dist_use_interface {127,0,0,1}"
        # The official management image's listeners, else 15672/15692 on the host for everyone.
        f' -rabbitmq_management tcp_config [{{port,{management}}},{{ip,"{LOOPBACK}"}}]'
        f' -rabbitmq_prometheus tcp_config [{{port,{prometheus}}},{{ip,"{LOOPBACK}"}}]'
    )
    return {
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_NODE_IP_ADDRESS": LOOPBACK,
        "RABBITMQ_NODE_PORT": str(amqp),
        "RABBITMQ_DIST_PORT": str(dist),
        "ERL_EPMD_PORT": str(epmd),  # an epmd of its own: never the host's on 4369
        "ERL_EPMD_ADDRESS": LOOPBACK,
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": erl_args,
        "RABBITMQ_CTL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
    }


def start_rabbitmq_container(image: str, definitions: dict | None = None) -> RabbitMQContainer:
    """A RabbitMQ node in a container, on free loopback ports (AMQP, distribution, epmd,
    management). With ``definitions`` no guest account: an admin with a random password."""
    from testcontainers.core.container import DockerContainer

    amqp, dist, epmd, management, prometheus = free_ports(5)
    node = f"toposerve-{secrets.token_hex(4)}@localhost"
    admin = (ADMIN_USER, secrets.token_urlsafe(18)) if definitions is not None else None
    container = (
        DockerContainer(image)
        .with_kwargs(network_mode="host")
        .with_envs(**rabbitmq_host_network_env(node, amqp, dist, epmd, management, prometheus),
                   RABBITMQ_CONFIG_FILE=f"{CONFIG_DIR}/rabbitmq.conf")
        .with_copy_into_container(_rabbitmq_config(admin).encode(), f"{CONFIG_DIR}/rabbitmq.conf", 0o644)
    )
    if admin is not None and definitions is not None:
        document = json.dumps(with_administrator(definitions, *admin)).encode()
        container = container.with_copy_into_container(document, f"{CONFIG_DIR}/definitions.json", 0o644)
    login = f"{admin[0]}:{admin[1]}" if admin else "guest:guest"
    service = RabbitMQContainer(
        name="rabbitmq", url=f"amqp://{login}@{LOOPBACK}:{amqp}/", host=LOOPBACK, port=amqp, image=image,
        container=container, ready=lambda: False, _extra_ports=(dist, epmd), node=node,
    )

    def booted() -> bool:
        # The AMQP listener opens at the end of boot; await_startup confirms the app is up.
        if not amqp_handshake(LOOPBACK, amqp):
            return False
        return service.ctl("await_startup", "--timeout", "30").returncode == 0

    service.ready = booted
    return _start(service)


def start_redis_container(image: str, appendonly: bool = False, acl: list[str] | None = None) -> ContainerService:
    """A redis-server in a container on a free loopback port (data in the container's work dir).
    With ``acl`` no default user anyone can use: an admin with a random password, whom ``url`` names."""
    from testcontainers.core.container import DockerContainer

    (port,) = free_ports(1)
    admin = (ADMIN_USER, secrets.token_urlsafe(18)) if acl is not None else None
    command = ["redis-server", "--bind", LOOPBACK, "--port", str(port), "--save", "",
               "--appendonly", "yes" if appendonly else "no", "--appendfsync", "always"]
    container = DockerContainer(image).with_kwargs(network_mode="host")
    if acl is not None and admin is not None:
        container = container.with_copy_into_container(redis_acl_file(acl, *admin).encode(), f"{CONFIG_DIR}/users.acl",
                                                       0o644)
        command += ["--aclfile", f"{CONFIG_DIR}/users.acl"]
    container = container.with_command(command)
    login = f"{admin[0]}:{admin[1]}@" if admin else ""
    service = ContainerService(
        name="redis", url=f"redis://{login}{LOOPBACK}:{port}/0", host=LOOPBACK, port=port, image=image,
        container=container, ready=lambda: redis_ping(LOOPBACK, port, admin),
    )
    return _start(service)


def rabbitmq_image(client: Any, override: str | None) -> str:
    return choose_image(client, override, latest("rabbitmq"), OFFICIAL_RABBITMQ_IMAGE)


def redis_image(client: Any, override: str | None) -> str:
    return choose_image(client, override, latest("redis"), OFFICIAL_REDIS_IMAGE)


def engine_or_skip(image: str | None = None) -> Any:
    """A docker client for tests that run containers of their own (the product image, compose);
    skips where no engine answers (or ``image`` is missing) - but fails under
    $TOPOSERVE_TEST_REQUIRE_DOCKER, so a container lane cannot pass without them."""
    import os

    import docker
    import pytest

    required = os.environ.get("TOPOSERVE_TEST_REQUIRE_DOCKER", "").lower() in ("1", "true", "yes")
    give_up = pytest.fail if required else pytest.skip
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "no engine"
        give_up(f"no Docker engine answers ({type(exc).__name__}); deploy/container_lane.sh starts one")
    if image is not None and not _image_present(client, image):
        client.close()
        give_up(f"image {image} is not built here (deploy/container_lane.sh start builds it)")
    return client
