"""The Docker Compose file, rendered from the profiles (``toposerve render compose``).

deploy/compose.yaml is this module's output, committed; a unit test fails when it is stale.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from toposerve.deploy.k8s import GRACE_PERIOD_S, HTTP_PORT, METRICS_PORT, dump_yaml, stage_workers
from toposerve.deploy.profile import Profile

COMPOSE_FILE = Path(__file__).parent / "compose.yaml"
API_KEYS_SECRET = "toposerve_api_keys"
DEFAULT_IMAGE = f"toposerve:{version('toposerve')}"

# Compose interpolates these from the shell or deploy/.env. The guest account of the
# broker's own container is the default: it exists only inside the compose network.
_CONTAINER_ENV = {
    "TOPOSERVE_AMQP_URL": "${TOPOSERVE_AMQP_URL:-amqp://guest:guest@rabbitmq:5672/}",
    "TOPOSERVE_REDIS_URL": "${TOPOSERVE_REDIS_URL:-redis://redis:6379/0}",
    "TOPOSERVE_NAMESPACE": "${TOPOSERVE_NAMESPACE:-toposerve}",
}


def _brokers() -> dict[str, Any]:
    return {
        "rabbitmq": {
            "image": "rabbitmq:3.13-management",
            # RabbitMQ keeps its data under its node name, which follows the host name:
            # a fixed one lets a recreated container find its durable queues in the volume.
            "hostname": "rabbitmq",
            # Healthy once the AMQP listener accepts connections (a `ping` passes before that).
            "healthcheck": {"test": ["CMD", "rabbitmq-diagnostics", "-q", "check_port_connectivity"],
                            "interval": "5s", "timeout": "10s", "retries": 30, "start_period": "20s"},
            # Loopback only: AMQP clients and the management UI of this machine, nobody else.
            "ports": ["127.0.0.1:5672:5672", "127.0.0.1:15672:15672"],
            "volumes": ["rabbitmq-data:/var/lib/rabbitmq"],
            "restart": "unless-stopped",
        },
        "redis": {
            "image": "redis:7",
            "command": ["redis-server", "--appendonly", "yes"],
            "healthcheck": {"test": ["CMD", "redis-cli", "ping"], "interval": "5s", "timeout": "5s", "retries": 30},
            "ports": ["127.0.0.1:6379:6379"],
            "volumes": ["redis-data:/data"],
            "restart": "unless-stopped",
        },
    }


def _toposerve_service(profile: Profile, command: list[str]) -> dict[str, Any]:
    return {
        "profiles": [profile.name],
        # One image for every service; compose builds it once and reuses the layers.
        "build": {"context": "..", "dockerfile": "deploy/Dockerfile"},
        "image": f"${{TOPOSERVE_IMAGE:-{DEFAULT_IMAGE}}}",
        "command": command,
        "environment": dict(_CONTAINER_ENV),
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
                                               "--port", str(HTTP_PORT)])
        ingress["ports"] = [f"{HTTP_PORT}:{HTTP_PORT}"]
        # API keys on: the hashed keys file (`toposerve keys hash`) as a compose secret.
        ingress["environment"]["TOPOSERVE_API_KEYS_FILE"] = f"/run/secrets/{API_KEYS_SECRET}"
        ingress["secrets"] = [API_KEYS_SECRET]
        ingress["healthcheck"] = _python_probe(f"http://127.0.0.1:{HTTP_PORT}/healthz")
        services[f"{profile.name}-ingress"] = ingress
        for stage in stage_workers(profile):  # none for single_process: the ingress runs them
            service = _toposerve_service(profile, ["worker", "--profile", profile.name, "--stage", stage,
                                                   "--metrics-port", str(METRICS_PORT), "--metrics-host", "0.0.0.0"])
            # Inside the compose network only (replicas would clash on a host port):
            # a Prometheus there scrapes `<service>:9100` (DNS lists every replica).
            service["expose"] = [str(METRICS_PORT)]
            # Marks a stage whose event loop is stuck unhealthy (`docker compose ps`).
            service["healthcheck"] = _python_probe(f"http://127.0.0.1:{METRICS_PORT}/healthz")
            service["deploy"] = {"replicas": profile.stages[stage].replicas}
            services[f"{profile.name}-{stage}"] = service
    return {"name": "toposerve", "services": services, "volumes": {"rabbitmq-data": {}, "redis-data": {}},
            # deploy/api-keys.txt by default (relative to compose.yaml): create it before `up`.
            "secrets": {API_KEYS_SECRET: {"file": "${TOPOSERVE_API_KEYS_PATH:-./api-keys.txt}"}}}


def render_compose_yaml(profiles: Sequence[Profile]) -> str:
    header = (
        "# Generated by `toposerve render compose -o deploy/compose.yaml` from deploy/profiles/*.yaml:\n"
        "# regenerate rather than edit (a unit test fails when this file is stale).\n"
        "# Run one profile (deploy/.env turns TOPOSERVE_PROFILE into COMPOSE_PROFILES, default asynchronous):\n"
        "#   TOPOSERVE_PROFILE=prep_pred docker compose -f deploy/compose.yaml up --build\n"
    )
    return header + dump_yaml(render_compose(profiles))
