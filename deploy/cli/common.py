"""What every command group shares: how it talks to the user, loads a profile, and checks the namespace."""

from __future__ import annotations

import asyncio

import click

from toposerve.brokers import Settings
from toposerve.deploy.components import load_checked_profile
from toposerve.deploy.profile import Profile, ProfileError


def say(text: str) -> None:
    """A line for the user, on stderr: stdout stays for what a command outputs (ids, JSON, YAML)."""
    click.echo(f"toposerve: {text}", err=True)


def checked_profile(name: str, settings: Settings | None = None) -> Profile:
    """The profile, checked against the model manifest; a wrong one is a clear error, not a traceback."""
    try:
        return load_checked_profile(name, settings or Settings())
    except ProfileError as exc:
        raise click.ClickException(str(exc)) from exc


def refuse_over_another_profile(profile: Profile, settings: Settings) -> None:
    """Whatever binds a profile's queues (a stage, the ingress, a batch submit) must not over another live profile's.

    When the broker or Redis cannot be asked it starts anyway (it waits for them as it always
    did: in compose or Kubernetes a stage may start before them), and says so.
    """
    from toposerve.deploy.lifecycle import LifecycleError, LifecycleUnavailable, check_namespace

    try:
        asyncio.run(check_namespace(settings, profile))
    except LifecycleUnavailable as exc:
        say(f"could not check which profile is live in namespace {settings.namespace!r} ({exc}); starting anyway")
    except LifecycleError as exc:
        raise click.ClickException(str(exc)) from exc
