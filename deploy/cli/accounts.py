"""``toposerve accounts``: the per-role accounts ``toposerve up`` made (their URLs are in a 0600 file)."""

from __future__ import annotations

from pathlib import Path

import click

from toposerve.brokers import Settings
from toposerve.deploy.accounts import AccountsFile


def _load(namespace: str | None, path: Path | None) -> AccountsFile:
    namespace = namespace or Settings().namespace
    path = path or AccountsFile.path_for(namespace)
    if not path.is_file():
        raise click.ClickException(f"no accounts file {path}: `toposerve up` writes it when it starts the servers")
    return AccountsFile.load(path)


@click.group()
def accounts() -> None:
    """The broker and Redis accounts of a namespace, one per role."""


_namespace = click.option("--namespace", default=None, help="Namespace (default: TOPOSERVE_NAMESPACE or toposerve)")
_file = click.option("--file", "path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="The accounts file (default: the one `toposerve up` wrote for the namespace)")


@accounts.command("list")
@_namespace
@_file
def list_roles(namespace: str | None, path: Path | None) -> None:
    """The roles that have an account, with their user names (no passwords)."""
    from urllib.parse import unquote, urlparse

    for role, login in _load(namespace, path).roles.items():
        click.echo(f"{role}\t{unquote(urlparse(login.amqp_url).username or '-')}")


@accounts.command()
@click.argument("role")
@_namespace
@_file
@click.option("--redis", "redis", is_flag=True, help="The role's Redis URL instead of its AMQP URL")
def url(role: str, namespace: str | None, path: Path | None, redis: bool) -> None:
    """Print ROLE's URL, password included (e.g. `client` for direct publishing)."""
    found = _load(namespace, path)
    if role not in found.roles:
        raise click.ClickException(f"no role {role!r}; roles: {', '.join(found.roles)}")
    value = found.roles[role].redis_url if redis else found.roles[role].amqp_url
    if value is None:
        raise click.ClickException(f"role {role!r} has no Redis account")
    click.echo(value)
