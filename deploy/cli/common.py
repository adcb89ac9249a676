"""What every command group shares: how it talks to the user and loads a profile."""

from __future__ import annotations

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
