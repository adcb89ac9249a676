"""The Docker Compose file, rendered from the profiles (``toposerve render compose``), and the
credentials it reads (``toposerve render compose-secrets``).

deploy/compose.yaml is this module's output, committed; a unit test fails when it is stale. It
holds no credential: every toposerve service reads its role's URLs from an env file, and
RabbitMQ and Redis boot with their accounts from files, all in deploy/secrets/ (git- and
docker-ignored), which ``compose_secret_files`` renders with fresh passwords.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from toposerve.brokers import Account
from toposerve.deploy.accounts import (
    ADMIN_USER,
    AdminPasswords,
    ingress_role,
    logins,
    rabbitmq_definitions,
    redis_acl,
    redis_acl_file,
    stage_role,
    with_administrator,
    write_private,
)
from toposerve.deploy.k8s import GRACE_PERIOD_S, HTTP_PORT, METRICS_PORT, dump_yaml, stage_workers
from toposerve.deploy.monitoring import compose_services
from toposerve.deploy.profile import Profile

COMPOSE_FILE = Path(__file__).parent / "compose.yaml"
API_KEYS_SECRET = "toposerve_api_keys"
DEFAULT_IMAGE = f"toposerve:{version('toposerve')}"
# Where compose.yaml finds the generated files: deploy/secrets (relative to compose.yaml) unless
# the shell or deploy/.env set TOPOSERVE_SECRETS_DIR (best an absolute path).
SECRETS_DIR = "${TOPOSERVE_SECRETS_DIR:-./secrets}"
DEFAULT_SECRETS_DIR = Path("deploy/secrets")  # what `render compose-secrets` writes, from the repository root
DEFINITIONS_FILE = "rabbitmq-definitions.json"
REDIS_ACL_FILE = "redis-users.acl"
RABBITMQ_ADMIN_FILE = "rabbitmq-admin.password"
REDIS_ADMIN_FILE = "redis-admin.password"
HOST_ACCOUNTS_FILE = "accounts.json"  # every role's URLs from this machine (the published loopback ports)
# The brokers as the services reach them in the compose network, and as this machine does.
NETWORK_AMQP_URL, NETWORK_REDIS_URL = "amqp://rabbitmq:5672/", "redis://redis:6379/0"
HOST_AMQP_URL, HOST_REDIS_URL = "amqp://127.0.0.1:5672/", "redis://127.0.0.1:6379/0"

# Compose file secrets are bind mounts of the host files, whose owner (this user) and mode
# (0600) they keep (uid/gid/mode are not applied to file secrets), so the brokers' own users
# (uid 999 in the images) could not read them. Each broker starts as root, copies its file to
# a place its user owns, and hands over to the image's own entrypoint, which drops to that user.
_IN_CONTAINER_DEFINITIONS = "/etc/rabbitmq/definitions.json"
_RABBITMQ_BOOT = (
    f"install -m 0400 -o rabbitmq -g rabbitmq /run/secrets/rabbitmq_definitions {_IN_CONTAINER_DEFINITIONS}"
    # Definitions imported at boot: the node makes neither guest nor its default vhost.
    f" && echo 'load_definitions = {_IN_CONTAINER_DEFINITIONS}' > /etc/rabbitmq/conf.d/90-toposerve.conf"
    ' && exec docker-entrypoint.sh "$$@"'  # $$: a literal $ for the shell, not compose interpolation
)
_IN_CONTAINER_ACL = "/etc/redis/users.acl"
_REDIS_BOOT = (f"install -D -m 0600 -o redis -g redis /run/secrets/redis_users {_IN_CONTAINER_ACL}"
               ' && exec docker-entrypoint.sh "$$@"')
# No anonymous PING any more (NOAUTH): the administrator's, its password from its secret file in
# the environment (REDISCLI_AUTH), never on a command line. Healthy means Redis answers PONG,
# which it does only once the append-only file is loaded.
_REDIS_PING = (f'REDISCLI_AUTH="$$(cat /run/secrets/redis_admin_password)" redis-cli --user {ADMIN_USER} ping'
               " | grep -q PONG")


def _secret_path(name: str) -> str:
    return f"{SECRETS_DIR}/{name}"


def env_file_name(role: str) -> str:
    return f"{role}.env"


def _brokers() -> dict[str, Any]:
    return {
        "rabbitmq": {
            "image": "rabbitmq:3.13-management",
            # RabbitMQ keeps its data under its node name, which follows the host name:
            # a fixed one lets a recreated container find its durable queues in the volume.
            "hostname": "rabbitmq",
            "entrypoint": ["sh", "-c", _RABBITMQ_BOOT, "sh"],
            "command": ["rabbitmq-server"],
            # Every role's user, its permissions and topic permissions, the vhost and an administrator.
            "secrets": ["rabbitmq_definitions"],
            # Healthy once the AMQP listener accepts connections (a `ping` passes before that);
            # the check talks to the node over Erlang distribution, with no AMQP login.
            "healthcheck": {"test": ["CMD", "rabbitmq-diagnostics", "-q", "check_port_connectivity"],
                            "interval": "5s", "timeout": "10s", "retries": 30, "start_period": "20s"},
            # Loopback only: AMQP clients and the management UI of this machine, nobody else.
            "ports": ["127.0.0.1:5672:5672", "127.0.0.1:15672:15672"],
            "volumes": ["rabbitmq-data:/var/lib/rabbitmq"],
            "restart": "unless-stopped",
        },
        "redis": {
            "image": "redis:7",
            "entrypoint": ["sh", "-c", _REDIS_BOOT, "sh"],
            "command": ["redis-server", "--appendonly", "yes", "--aclfile", _IN_CONTAINER_ACL],
            # A user per role, the administrator, and a default user nobody can log in as.
            "secrets": ["redis_users", "redis_admin_password"],
            "healthcheck": {"test": ["CMD-SHELL", _REDIS_PING], "interval": "5s", "timeout": "5s", "retries": 30},
            "ports": ["127.0.0.1:6379:6379"],
            "volumes": ["redis-data:/data"],
            "restart": "unless-stopped",
        },
    }


def _toposerve_service(profile: Profile, command: list[str], role: str) -> dict[str, Any]:
    return {
        "profiles": [profile.name],
        # One image for every service; compose builds it once and reuses the layers.
        "build": {"context": "..", "dockerfile": "deploy/Dockerfile"},
        "image": f"${{TOPOSERVE_IMAGE:-{DEFAULT_IMAGE}}}",
        "command": command,
        # The role's own login (TOPOSERVE_AMQP_URL, TOPOSERVE_REDIS_URL) and the namespace its
        # accounts were made for (TOPOSERVE_NAMESPACE), from a file outside this one.
        "env_file": [_secret_path(env_file_name(role))],
        "depends_on": {"rabbitmq": {"condition": "service_healthy"}, "redis": {"condition": "service_healthy"}},
        "restart": "unless-stopped",
        "stop_grace_period": f"{GRACE_PERIOD_S}s",  # SIGTERM drains in-flight work first
    }


def _python_probe(url: str) -> dict[str, Any]:
    """A compose healthcheck: the image has Python, not curl."""
    probe = f"import urllib.request; urllib.request.urlopen('{url}', timeout=2)"
    return {"test": ["CMD", "python", "-c", probe], "interval": "10s", "timeout": "5s", "retries": 3,
            "start_period": "30s"}


def render_compose(profiles: Sequence[Profile]) -> dict[str, Any]:
    """The compose model: the brokers (always on) and, per profile P, services activated by ``--profile P``."""
    services = _brokers()
    for profile in profiles:
        # The profile ships in the image, so its name is enough.
        ingress = _toposerve_service(profile, ["ingress", "--profile", profile.name, "--host", "0.0.0.0",
                                               "--port", str(HTTP_PORT)], ingress_role(profile))
        ingress["ports"] = [f"{HTTP_PORT}:{HTTP_PORT}"]
        # API keys on: the hashed keys file (`toposerve keys hash`) as a compose secret.
        ingress["environment"] = {"TOPOSERVE_API_KEYS_FILE": f"/run/secrets/{API_KEYS_SECRET}"}
        ingress["secrets"] = [API_KEYS_SECRET]
        ingress["healthcheck"] = _python_probe(f"http://127.0.0.1:{HTTP_PORT}/healthz")
        services[f"{profile.name}-ingress"] = ingress
        for stage in stage_workers(profile):  # none for single_process: the ingress runs them
            service = _toposerve_service(profile, ["worker", "--profile", profile.name, "--stage", stage,
                                                   "--metrics-port", str(METRICS_PORT), "--metrics-host", "0.0.0.0"],
                                         stage_role(profile, stage))
            # Inside the compose network only (replicas would clash on a host port):
            # a Prometheus there scrapes `<service>:9100` (DNS lists every replica).
            service["expose"] = [str(METRICS_PORT)]
            # Marks a stage whose event loop is stuck unhealthy (`docker compose ps`).
            service["healthcheck"] = _python_probe(f"http://127.0.0.1:{METRICS_PORT}/healthz")
            service["deploy"] = {"replicas": profile.stages[stage].replicas}
            services[f"{profile.name}-{stage}"] = service
    # Prometheus (scraping every profile's services) and Grafana: `docker compose --profile monitoring`.
    services.update(compose_services())
    return {"name": "toposerve", "services": services, "volumes": {"rabbitmq-data": {}, "redis-data": {}},
            "secrets": {
                # deploy/api-keys.txt by default (relative to compose.yaml): create it before `up`.
                API_KEYS_SECRET: {"file": "${TOPOSERVE_API_KEYS_PATH:-./api-keys.txt}"},
                # `toposerve render compose-secrets` writes these (and the env files).
                "rabbitmq_definitions": {"file": _secret_path(DEFINITIONS_FILE)},
                "redis_users": {"file": _secret_path(REDIS_ACL_FILE)},
                "redis_admin_password": {"file": _secret_path(REDIS_ADMIN_FILE)},
            }}


def render_compose_yaml(profiles: Sequence[Profile]) -> str:
    header = (
        "# Generated by `toposerve render compose -o deploy/compose.yaml` from deploy/profiles/*.yaml:\n"
        "# regenerate rather than edit (a unit test fails when this file is stale).\n"
        "# First write the accounts' files (fresh passwords, into deploy/secrets/, git-ignored):\n"
        "#   toposerve render compose-secrets\n"
        "# Run one profile (deploy/.env turns TOPOSERVE_PROFILE into COMPOSE_PROFILES, default asynchronous):\n"
        "#   TOPOSERVE_PROFILE=prep_pred docker compose -f deploy/compose.yaml up --build\n"
    )
    return header + dump_yaml(render_compose(profiles))


# Compose and `docker run --env-file` both take an unquoted value literally only without blanks,
# quotes, `$` (interpolation) or `#` (a comment): URLs of percent-quoted logins never need them.
_PLAIN_ENV_VALUE = re.compile(r"[A-Za-z0-9._~%:/@?=&+-]*")


def env_file_text(env: dict[str, str]) -> str:
    for key, value in env.items():
        if not _PLAIN_ENV_VALUE.fullmatch(value):
            raise ValueError(f"{key}: a value an env file cannot carry as it is")
    return "".join(f"{key}={value}\n" for key, value in env.items())


def compose_secret_files(accounts: list[Account], passwords: dict[str, str], admins: AdminPasswords,
                         namespace: str) -> dict[str, str]:
    """The files compose.yaml reads, by name (pure: the passwords are given).

    - ``<role>.env`` per role: its URLs in the compose network and ``TOPOSERVE_NAMESPACE``;
    - ``rabbitmq-definitions.json``: vhost ``/``, the administrator, every role's user (a salted
      hash of its password), permissions and topic permissions; no guest;
    - ``redis-users.acl``: the administrator, a user per role that uses Redis, and the default
      user with data rights only and a password nobody has;
    - ``rabbitmq-admin.password``, ``redis-admin.password``: the administrators' (user
      ``toposerve-admin``), for the management UI, redis-cli and Redis's health check;
    - ``accounts.json``: every role's URLs from this machine (the loopback ports compose
      publishes), for ``toposerve accounts url ROLE --file ...``.
    """
    network = logins(accounts, passwords, NETWORK_AMQP_URL, NETWORK_REDIS_URL, namespace)
    files = {env_file_name(role): env_file_text({**login.env(), "TOPOSERVE_NAMESPACE": namespace})
             for role, login in network.roles.items()}
    definitions = with_administrator(rabbitmq_definitions(accounts, passwords), ADMIN_USER, admins.rabbitmq)
    files[DEFINITIONS_FILE] = json.dumps(definitions, indent=2) + "\n"
    files[REDIS_ACL_FILE] = redis_acl_file(redis_acl(accounts, passwords), ADMIN_USER, admins.redis)
    files[RABBITMQ_ADMIN_FILE] = admins.rabbitmq + "\n"
    files[REDIS_ADMIN_FILE] = admins.redis + "\n"
    files[HOST_ACCOUNTS_FILE] = logins(accounts, passwords, HOST_AMQP_URL, HOST_REDIS_URL,
                                       namespace).model_dump_json(indent=2) + "\n"
    return files


def write_secret_files(directory: Path, files: dict[str, str], *, force: bool = False) -> list[Path]:
    """Write ``files`` into ``directory`` (0700), each 0600. Refuses to replace files unless ``force``:
    brokers that are running keep the old passwords until they restart."""
    existing = sorted(name for name in files if (directory / name).exists())
    if existing and not force:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise FileExistsError(f"{directory} already has {shown}")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.chmod(0o700)  # also when it existed: it holds nothing but secrets
    return [write_private(directory / name, text) for name, text in files.items()]
