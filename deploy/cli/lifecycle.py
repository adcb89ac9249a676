"""``toposerve status | down``: which profile is live in a namespace; take one down (deploy/lifecycle.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from toposerve.brokers import Settings
from toposerve.deploy.cli.common import say


def _settings(namespace: str | None) -> Settings:
    settings = Settings()
    return settings if namespace is None else settings.model_copy(update={"namespace": namespace})


namespace_option = click.option("--namespace", default=None,
                                help="The namespace (default: TOPOSERVE_NAMESPACE, else toposerve)")


@click.command()
@namespace_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object: the profiles, their queues, depths, consumers")
def status(namespace: str | None, as_json: bool) -> None:
    """The profiles that have queues in the namespace, which one is live, queue depths and consumers."""
    from toposerve.deploy.lifecycle import LifecycleError, open_lifecycle

    settings = _settings(namespace)

    async def run():
        async with open_lifecycle(settings) as lifecycle:
            return await lifecycle.status()

    try:
        found = asyncio.run(run())
    except LifecycleError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(found.model_dump_json(indent=2))
        return
    if not found.profiles:
        click.echo(f"namespace {found.namespace}: no profile has queues here")
        return
    click.echo(f"namespace {found.namespace}: live profile {', '.join(found.live) or 'none'}")
    for profile in found.profiles:
        note = "" if profile.recorded else " (unrecorded: its queues were made without `toposerve up`)"
        click.echo(f"  {profile.profile}: {profile.state}{note}, {profile.messages} messages, "
                   f"{profile.consumers} consumers")
        for queue in profile.queues:
            depth = f"{queue.messages} messages, {queue.consumers} consumers" if queue.exists else "missing"
            click.echo(f"    {queue.name}: {depth}")
    if len(found.live) > 1:
        say(f"more than one profile is live: each gets a copy of every message; keep one with "
            f"`toposerve up --profile {found.live[0]} --replace` or `toposerve down --profile NAME`")


@click.command()
@click.option("--profile", "profile_name", required=True, help="The profile to take down in the namespace")
@namespace_option
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Seconds to wait for the queues to drain")
@click.option("--force", is_flag=True, help="Delete the queues without draining; says how many messages were dropped")
def down(profile_name: str, namespace: str | None, timeout_s: float, force: bool) -> None:
    """Take a profile out of the namespace: stop new work, drain its queues, delete them and its Redis keys.

    Draining needs its stages consuming (`toposerve up --profile NAME` somewhere); stop its
    processes after this, or a stage that starts again makes its queues again.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    from toposerve.deploy.lifecycle import LifecycleError, open_lifecycle, shipped_profiles, with_profile
    from toposerve.deploy.profile import ProfileError, load_profile

    settings = _settings(namespace)
    known = shipped_profiles()
    if Path(profile_name).suffix in (".yaml", ".yml"):  # a profile file of the user's: its name
        try:
            own = load_profile(profile_name)
        except ProfileError as exc:
            raise click.ClickException(str(exc)) from exc
        known, profile_name = with_profile(known, own), own.name
    # On stderr, like every line for the user: stdout keeps the result line.
    progress = Progress(TextColumn("draining"), BarColumn(), MofNCompleteColumn(), TextColumn("messages done"),
                        TimeElapsedColumn(), console=Console(stderr=True), disable=force)
    tasks: list[TaskID] = []  # shown from the first poll of the drain, not before

    def show(left: int, at_start: int) -> None:
        if not tasks:
            progress.start()
            tasks.append(progress.add_task("drain", total=at_start))
        total = max(at_start, left)
        progress.update(tasks[0], total=total, completed=total - left)

    async def run():
        async with open_lifecycle(settings, known) as lifecycle:
            return await lifecycle.take_down(profile_name, timeout_s=timeout_s, force=force, progress=show, say=say)

    try:
        report = asyncio.run(run())
    except LifecycleError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        progress.stop()
    what = (f"dropped {report.dropped_messages} messages" if force or report.dropped_messages
            else "drained, no message dropped")
    click.echo(f"profile {report.profile} is down in namespace {settings.namespace}: {what}; "
               f"deleted {len(report.deleted_queues)} queues ({', '.join(report.deleted_queues)}) and "
               f"{report.deleted_redis_keys} Redis keys")
    say("job results, caches, batches and items belong to the namespace and stay until their TTL; "
        f"stop the processes of {report.profile!r} now (a stage that starts again makes its queues again)")
