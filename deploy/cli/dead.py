"""``toposerve dead``: list and replay the dead letters of a namespace (``{ns}.dead``)."""

from __future__ import annotations

import asyncio

import click
import orjson

from toposerve.brokers import Settings
from toposerve.deploy.cli.common import say


@click.group()
def dead() -> None:
    """Dead letters (messages a stage could not process): list, replay."""


@dead.command("list")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, help="At most this many")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line")
def list_dead(limit: int, as_json: bool) -> None:
    """Show each dead letter's job id, message id, routing key, stage, queue, attempts and reason (nothing is removed)."""
    from toposerve.producers import DeadLetters

    settings = Settings()

    async def run():
        async with DeadLetters(settings) as letters:
            return await letters.count(), await letters.list(limit)

    try:
        total, found = asyncio.run(run())
    except (OSError, ConnectionError) as exc:
        raise click.ClickException(f"cannot reach the broker: {exc}") from exc
    for letter in found:
        if as_json:
            click.echo(orjson.dumps(letter.as_dict()).decode())
        else:
            click.echo(f"job={letter.job_id or '-'}  message={letter.message_id or '-'}  "
                       f"key={letter.routing_key or '-'}  stage={letter.stage or '-'}  "
                       f"queue={letter.queue or '-'}  attempts={letter.attempts if letter.attempts is not None else '-'}"
                       f"  reason={letter.reason}")
    say(f"{len(found)} of {total} dead letters in {settings.namespace}.dead shown")


@dead.command()
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter")
@click.option("--id", "ids", multiple=True, help="Job id or AMQP message id to replay; repeat for several")
def replay(replay_all: bool, ids: tuple[str, ...]) -> None:
    """Re-publish dead letters to the inference exchange with their routing key; ack each after its confirm."""
    from toposerve.producers import DeadLetters

    if replay_all == bool(ids):
        raise click.UsageError("give either --all or at least one --id")
    settings = Settings()

    async def run():
        async with DeadLetters(settings) as letters:
            return await letters.replay(None if replay_all else ids)

    try:
        report = asyncio.run(run())
    except (OSError, ConnectionError) as exc:
        raise click.ClickException(f"cannot reach the broker: {exc}") from exc
    for job_id in report.replayed:
        click.echo(f"replayed {job_id}")
    for job_id, why in report.refused:
        click.echo(f"refused {job_id}: {why}")
    for job_id in report.not_found:
        click.echo(f"not found {job_id}")
    say(f"{len(report.replayed)} replayed, {len(report.refused)} refused, {len(report.not_found)} not found")
    if report.refused or report.not_found:
        raise SystemExit(1)
