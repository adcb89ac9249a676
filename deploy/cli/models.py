"""``toposerve models promote|rollback|reload|versions``: which version of a model serves, changed while the profile runs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import click

from toposerve.brokers import ServingVersions, Settings, connect_redis
from toposerve.deploy.cli.common import checked_profile, say
from toposerve.deploy.components import models_dir
from toposerve.deploy.profile import Profile
from toposerve.deploy.version_ops import VersionRefused, policy_of, promote, reload, rollback, serving_version
from toposerve.models import ModelRegistry

T = TypeVar("T")
PROFILE_OPTION = click.option("--profile", "profile_name", required=True, help="The running profile (name or path)")


@click.group()
def models() -> None:
    """Model versions: list them, promote one to serve, roll back (no restart, no lost request)."""


def run_operation(profile_name: str, operation: Callable[[Settings, Profile, Path], Awaitable[T]]) -> T:
    """An operation on the running profile's versions; a refusal is a clear error (exit 1), not a traceback."""
    settings = Settings()
    profile = checked_profile(profile_name, settings)
    try:
        return asyncio.run(operation(settings, profile, models_dir(settings)))
    except VersionRefused as exc:
        raise click.ClickException(str(exc)) from exc


@models.command("promote")
@PROFILE_OPTION
@click.argument("model")
@click.argument("version")
def promote_command(profile_name: str, model: str, version: str) -> None:
    """Make MODEL@VERSION serve (after checking its file, sha256 and input signature)."""
    change = run_operation(profile_name, lambda settings, profile, folder: promote(settings, profile, folder, model,
                                                                                  version))
    say(f"{model}@{change.version} serves now (was {change.previous}; `toposerve models rollback` returns to it)")


@models.command("rollback")
@PROFILE_OPTION
@click.argument("model")
def rollback_command(profile_name: str, model: str) -> None:
    """Make the version that served before the last promotion serve again."""
    change = run_operation(profile_name, lambda settings, profile, folder: rollback(settings, profile, folder, model))
    say(f"{model}@{change.version} serves again (was {change.previous})")


@models.command("reload")
@PROFILE_OPTION
@click.option("--timeout", "timeout_s", default=30.0, show_default=True, help="Seconds to wait for the stages")
def reload_command(profile_name: str, timeout_s: float) -> None:
    """Check the versions in the model directory (sha256, loading, input signature against the serving one)
    and wait until the running predict stages loaded the sound ones; a refused one is said, and exits 1."""
    outcome = run_operation(profile_name, lambda settings, profile, folder: reload(settings, profile, folder,
                                                                                  timeout_s))
    for key, what in sorted(outcome.items()):
        click.echo(f"{key}: {what}")
    refused = sorted(key for key, what in outcome.items() if not what.startswith("loaded"))
    if refused:
        raise click.ClickException(f"refused: {', '.join(refused)}; the versions serving are unchanged")


@models.command("versions")
@PROFILE_OPTION
@click.argument("model")
def versions_command(profile_name: str, model: str) -> None:
    """MODEL's versions in the model directory and the one serving, as JSON."""
    settings = Settings()
    profile = checked_profile(profile_name, settings)
    try:
        policy = policy_of(profile, model)
    except VersionRefused as exc:
        raise click.ClickException(str(exc)) from exc

    async def serving() -> str:
        client = connect_redis(settings.redis_url, max_connections=2)
        try:
            return await serving_version(ServingVersions(client, settings.namespace), profile, model)
        finally:
            await client.aclose()

    known = ModelRegistry(models_dir(settings)).versions.get(model, {})
    click.echo(json.dumps({"model": model, "serving": asyncio.run(serving()),
                           "canary": policy.canary.model_dump() if policy.canary else None, "shadow": policy.shadow,
                           "versions": {v: {"sha256": m.sha256, "test_accuracy": m.metrics.get("test_accuracy")}
                                        for v, m in sorted(known.items())}}, indent=2))
