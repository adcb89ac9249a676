"""``toposerve render``: deployment files generated from the profiles.

``render k8s --profile P`` writes Kubernetes manifests (deploy/k8s.py); ``render compose``
writes the Docker Compose file for every shipped profile (deploy/compose.py).
"""

from __future__ import annotations

from typing import IO

import click

from toposerve.deploy.cli.common import checked_profile
from toposerve.deploy.compose import DEFAULT_IMAGE, render_compose_yaml
from toposerve.deploy.k8s import render_k8s_yaml
from toposerve.deploy.profile import available_profiles


@click.group()
def render() -> None:
    """Write deployment files generated from the profiles."""


@render.command("k8s")
@click.option("--profile", "profile_name", required=True, help="Profile name or YAML path")
@click.option("--namespace", default="toposerve", show_default=True,
              help="Kubernetes namespace, also used as TOPOSERVE_NAMESPACE (queue prefix)")
@click.option("--image", default=DEFAULT_IMAGE, show_default=True, help="Image built from deploy/Dockerfile")
@click.option("--amqp-secret", default="toposerve-amqp", show_default=True, help="Secret with key 'url' (AMQP URL)")
@click.option("--redis-secret", default="toposerve-redis", show_default=True, help="Secret with key 'url' (Redis URL)")
@click.option("--api-keys-secret", default="toposerve-api-keys", show_default=True,
              help="Secret with key 'keys.txt' (hashed API keys of the ingress, from `toposerve keys hash`)")
@click.option("-o", "--output", type=click.File("w"), default="-", help="Write here (default: stdout)")
def k8s(profile_name: str, namespace: str, image: str, amqp_secret: str, redis_secret: str, api_keys_secret: str,
        output: IO[str]) -> None:
    """Kubernetes manifests for one profile (Deployments, Service, KEDA ScaledObjects)."""
    profile = checked_profile(profile_name)
    try:
        text = render_k8s_yaml(profile, namespace=namespace, image=image, amqp_secret=amqp_secret,
                               redis_secret=redis_secret, api_keys_secret=api_keys_secret)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    output.write(text)


@render.command("compose")
@click.option("-o", "--output", type=click.File("w"), default="-", help="Write here (default: stdout)")
def compose(output: IO[str]) -> None:
    """The Docker Compose file for every shipped profile (what deploy/compose.yaml holds)."""
    profiles = [checked_profile(name) for name in available_profiles()]
    try:
        text = render_compose_yaml(profiles)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    output.write(text)


