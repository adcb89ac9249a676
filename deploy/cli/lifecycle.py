"""``toposerve status | down``: which profile is live in a namespace; take one down (deploy/lifecycle.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from toposerve.brokers import Settings
from toposerve.deploy.cli.common import checked_profile, say


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
        if profile.handing_over_to:
            note += f" (handing over to {profile.handing_over_to}: a swap is in progress)"
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


@click.command()
@click.option("--to", "to", required=True, help="The profile to move the namespace's traffic to (name or YAML path)")
@namespace_option
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="Seconds each step may take (the new stages starting, the ingresses holding, the old draining)")
@click.option("--wait-taken", "taken_s", type=click.FloatRange(min=1), default=10.0, show_default=True,
              help="Seconds to wait for the `toposerve up` of the live profile to take the order")
def swap(to: str, namespace: str | None, timeout_s: float, taken_s: float) -> None:
    """Move the namespace's traffic to another profile, live: no accepted request lost or answered twice.

    The `toposerve up` running the live profile does it: it starts the new profile's stages
    (their queues unbound), has the ingress hold new requests while the old profile's queues
    drain, stops the old stages, binds the new profile's queues, and the ingress serves it
    (sync or async). A new profile that does not start leaves the old one serving, untouched.
    """
    import redis

    from toposerve.deploy.lifecycle import LifecycleError, open_lifecycle, shipped_profiles, with_profile
    from toposerve.deploy.profile import ProfileError, load_profile
    from toposerve.deploy.swap import swap_refusal
    from toposerve.deploy.swap_orders import OrderBook, OrderNotTaken, SwapOrder

    settings = _settings(namespace)
    new = checked_profile(to, settings)  # bad YAML, a model not in the manifest: said now, nothing touched

    async def live_now() -> tuple[list[str], dict]:
        async with open_lifecycle(settings, with_profile(shipped_profiles(), new)) as lifecycle:
            return (await lifecycle.status()).live, await lifecycle.records()

    try:
        live, records = asyncio.run(live_now())
    except LifecycleError as exc:
        raise click.ClickException(str(exc)) from exc
    old = None
    if len(live) == 1:
        source = records[live[0]].source if live[0] in records else None
        try:
            old = load_profile(source or live[0])
        except ProfileError:
            old = None  # a YAML of the user's that is not here: the launcher running it knows it
    refusal = swap_refusal(settings.namespace, live, new, old)
    if refusal is not None:
        raise click.ClickException(refusal)
    book = OrderBook(settings.redis_url, settings.namespace)
    try:
        order = SwapOrder(to=to, from_profile=live[0], timeout_s=timeout_s)
        busy = book.place(order)
        if busy is not None:
            raise click.ClickException(f"a swap of namespace {settings.namespace!r} to {busy.to!r} is in progress "
                                       f"(ordered {busy.placed_at:%H:%M:%S} UTC); wait for it, see `toposerve status`")
        # Each of its steps is bounded by timeout_s.
        current = book.follow(order, taken_s, overall_s=taken_s + 4 * timeout_s + 30, say=say)
    except OrderNotTaken:
        raise click.ClickException(
            f"no `toposerve up --profile {live[0]}` in namespace {settings.namespace!r} took the swap order within "
            f"{taken_s:g} s: a live swap is carried out by the launcher that runs the live profile's processes. "
            f"Where they run elsewhere (compose, Kubernetes), start the new profile with "
            f"`toposerve up --profile {new.name} --replace` instead") from None
    except TimeoutError:
        raise click.ClickException(f"the swap to {to!r} did not finish in time; `toposerve status` shows what is "
                                   f"live") from None
    except redis.RedisError as exc:
        raise click.ClickException(f"cannot place or follow the swap order in Redis "
                                   f"({type(exc).__name__}: {exc})") from exc
    finally:
        book.close()
    if current.state == "failed":
        raise click.ClickException(f"swap to {to!r} failed: {current.error}")
    click.echo(f"namespace {settings.namespace}: swapped from {live[0]} to {new.name} "
               f"({new.ingress.mode} now)")
