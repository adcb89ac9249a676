"""``toposerve render``: deployment files generated from the profiles.

``render k8s --profile P`` writes Kubernetes manifests (deploy/k8s.py) and ``render compose``
the Docker Compose file for every shipped profile (deploy/compose.py); neither holds a
credential. ``render k8s-secrets`` and ``render compose-secrets`` write what they read instead:
an account per role with fresh passwords, into files only this user can read (0600).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO

import click

from toposerve.deploy.accounts import AdminPasswords, new_passwords, profile_accounts, write_private
from toposerve.deploy.cli.common import checked_profile
from toposerve.deploy.compose import (
    DEFAULT_IMAGE,
    DEFAULT_SECRETS_DIR,
    compose_secret_files,
    render_compose_yaml,
    write_secret_files,
)
from toposerve.deploy.k8s import (
    DEFAULT_RABBITMQ_CLUSTER,
    DEFAULT_SECRET_PREFIX,
    render_k8s_secrets_yaml,
    render_k8s_yaml,
)
from toposerve.deploy.profile import available_profiles


@click.group()
def render() -> None:
    """Write deployment files generated from the profiles."""


_k8s_namespace = click.option("--namespace", default="toposerve", show_default=True,
                              help="Kubernetes namespace, also used as TOPOSERVE_NAMESPACE (queue and account prefix)")
_secret_prefix = click.option("--secret-prefix", default=DEFAULT_SECRET_PREFIX, show_default=True,
                              help="Names of the per-role Secrets (PREFIX-ROLE) and of the accounts' objects")


@render.command("k8s")
@click.option("--profile", "profile_name", required=True, help="Profile name or YAML path")
@_k8s_namespace
@click.option("--image", default=DEFAULT_IMAGE, show_default=True, help="Image built from deploy/Dockerfile")
@_secret_prefix
@click.option("--rabbitmq-cluster", default=DEFAULT_RABBITMQ_CLUSTER, show_default=True,
              help="The RabbitmqCluster (in the namespace) the topology operator makes the accounts on")
@click.option("--api-keys-secret", default="toposerve-api-keys", show_default=True,
              help="Secret with key 'keys.txt' (hashed API keys of the ingress, from `toposerve keys hash`)")
@click.option("--rabbitmq-replicas", type=click.IntRange(0, 99), default=0, show_default=True,
              help="Also render the RabbitmqCluster (Cluster Operator) with this many nodes, e.g. 3; "
                   "0: --rabbitmq-cluster names an existing one")
@click.option("-o", "--output", type=click.File("w"), default="-", help="Write here (default: stdout)")
def k8s(profile_name: str, namespace: str, image: str, secret_prefix: str, rabbitmq_cluster: str,
        api_keys_secret: str, rabbitmq_replicas: int, output: IO[str]) -> None:
    """Kubernetes manifests for one profile (Deployments, Service, KEDA ScaledObjects, broker accounts).

    No credential in them: the pods read their role's URLs from the Secrets `render k8s-secrets` writes.
    """
    profile = checked_profile(profile_name)
    try:
        text = render_k8s_yaml(profile, namespace=namespace, image=image, secret_prefix=secret_prefix,
                               rabbitmq_cluster=rabbitmq_cluster, api_keys_secret=api_keys_secret,
                               rabbitmq_replicas=rabbitmq_replicas)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    output.write(text)


@render.command("k8s-secrets")
@click.option("--profile", "profile_name", required=True, help="Profile name or YAML path")
@_k8s_namespace
@click.option("--amqp-host", default=DEFAULT_RABBITMQ_CLUSTER, show_default=True,
              help="HOST[:PORT] of RabbitMQ from the pods (the RabbitmqCluster's Service has its name)")
@click.option("--redis-host", default="redis", show_default=True, help="HOST[:PORT] of Redis from the pods")
@_secret_prefix
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write here, 0600; '-' for stdout  [default: deploy/secrets/k8s-NAMESPACE.yaml]")
@click.option("--force", is_flag=True, help="Replace an existing file (new passwords for every account)")
def k8s_secrets(profile_name: str, namespace: str, amqp_host: str, redis_host: str, secret_prefix: str,
                output: Path | None, force: bool) -> None:
    """The Secrets of `render k8s`, with fresh passwords: per role its User's credentials and its URLs,
    and Redis's ACL file and administrator. Apply the file and never commit it."""
    profile = checked_profile(profile_name)
    path = output or DEFAULT_SECRETS_DIR / f"k8s-{namespace}.yaml"
    if str(path) != "-" and path.exists() and not force:
        raise click.ClickException(f"{path} exists: its passwords may be in use (--force replaces them)")
    accounts = profile_accounts(namespace, profile)
    try:
        text = render_k8s_secrets_yaml(profile, namespace=namespace, passwords=new_passwords(accounts),
                                       admins=AdminPasswords.new(), amqp_host=amqp_host, redis_host=redis_host,
                                       secret_prefix=secret_prefix)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if str(path) == "-":
        sys.stdout.write(text)
        return
    write_private(path, text)
    click.echo(f"wrote {path} (0600): the Secrets of {len(accounts)} accounts "
               f"({', '.join(a.role for a in accounts)}) and of Redis's ACL file and administrator")
    click.echo(f"apply it with `kubectl apply -f {path}`; keep it out of version control")


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


@render.command("monitoring")
@click.option("-o", "--output", "directory", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory to write into (deploy/monitoring is what compose.yaml mounts)")
def monitoring(directory: Path) -> None:
    """Prometheus' scrape config (every shipped profile's services), Grafana's provisioning and dashboard."""
    from toposerve.deploy.monitoring import write_monitoring_files

    profiles = [checked_profile(name) for name in available_profiles()]
    for path in write_monitoring_files(directory, profiles):
        click.echo(f"wrote {path}")


@render.command("compose-secrets")
@click.option("--namespace", envvar="TOPOSERVE_NAMESPACE", default="toposerve", show_default=True,
              help="Namespace of the accounts (TOPOSERVE_NAMESPACE of the services); env TOPOSERVE_NAMESPACE")
@click.option("-o", "--output", "directory", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_SECRETS_DIR, show_default=True,
              help="Directory (0700) that compose.yaml reads as TOPOSERVE_SECRETS_DIR (default ./secrets beside it)")
@click.option("--force", is_flag=True, help="Replace existing files (then restart rabbitmq and redis)")
def compose_secrets(namespace: str, directory: Path, force: bool) -> None:
    """What deploy/compose.yaml reads, with fresh passwords: an env file per role, RabbitMQ's
    definitions, Redis's ACL file and the administrators' passwords, for every shipped profile."""
    profiles = [checked_profile(name) for name in available_profiles()]
    accounts = profile_accounts(namespace, *profiles)
    files = compose_secret_files(accounts, new_passwords(accounts), AdminPasswords.new(), namespace)
    try:
        written = write_secret_files(directory, files, force=force)
    except FileExistsError as exc:
        raise click.ClickException(f"{exc}: running brokers may use their passwords (--force replaces "
                                   "them; then restart rabbitmq and redis)") from exc
    click.echo(f"wrote {len(written)} files (0600) into {directory} (0700), namespace {namespace}:")
    for path in written:
        click.echo(f"  {path}")
    click.echo("  users: toposerve-admin (administrator) and " + ", ".join(a.broker.user for a in accounts))
