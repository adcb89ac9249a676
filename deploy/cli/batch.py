"""``toposerve batch``: submit a file for bulk inference, follow it, read its results, cancel it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click
import orjson

from toposerve.brokers import (
    ALREADY_CANCELLED,
    ALREADY_FINISHED,
    NO_BATCH,
    BatchStore,
    Settings,
    connect_redis,
    iter_results,
)
from toposerve.deploy.cli.common import refuse_over_another_profile, say
from toposerve.deploy.components import load_checked_profile, models_dir, runs_batches
from toposerve.deploy.profile import Profile, ProfileError

DEFAULT_PROFILE = "batch"


def batch_ttl(profile: Profile) -> int:
    """The TTL of batch keys: the profile's ``ingress.result_ttl_s`` (it needs a batch_store stage)."""
    if runs_batches(profile):
        return profile.ingress.result_ttl_s
    raise ProfileError(f"profile {profile.name!r} has no batch_store stage; use --profile batch")


def _setup(profile_name: str) -> tuple[Settings, Profile, int]:
    settings = Settings()
    try:
        profile = load_checked_profile(profile_name, settings)
        return settings, profile, batch_ttl(profile)
    except ProfileError as exc:
        raise click.ClickException(str(exc)) from exc


def make_submitter(settings: Settings, profile: Profile, ttl_s: int, window: int = 64):
    from toposerve.models import load_manifests
    from toposerve.producers import BatchSubmitter

    manifests = load_manifests(models_dir(settings))
    served = {name: manifests[name] for name in profile.models}
    return BatchSubmitter(settings, served, profile.queue_specs(settings.namespace), ttl_s, window=window)


@click.group()
def batch() -> None:
    """Bulk inference from files (the batch pattern): submit, status, results, cancel, bench."""


profile_option = click.option("--profile", "profile_name", default=DEFAULT_PROFILE, show_default=True,
                              help="A profile with a batch_store stage")


@batch.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--model", required=True, help="Model to run every row through")
@click.option("--chunk-rows", type=int, default=10_000, show_default=True, help="Rows per message (one ONNX batch)")
@click.option("--wait", is_flag=True, help="Follow progress until every row is done")
@click.option("--resume", "resume", default=None, metavar="ID", help="Re-send only the chunks batch ID lacks")
@click.option("--window", type=int, default=64, show_default=True, help="Publishes in flight at once")
@profile_option
def submit(path: Path, model: str, chunk_rows: int, wait: bool, resume: str | None, window: int,
           profile_name: str) -> None:
    """Submit PATH (CSV with or without a header, JSONL, or a directory of images); prints the batch id."""
    settings, profile, ttl = _setup(profile_name)
    refuse_over_another_profile(profile, settings)  # the submitter declares (binds) the profile's queues
    code = asyncio.run(_submit(settings, profile, ttl, path, model, chunk_rows, wait, resume, window))
    sys.exit(code)


async def _submit(settings: Settings, profile: Profile, ttl: int, path: Path, model: str, chunk_rows: int,
                  wait: bool, resume: str | None, window: int) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from toposerve.producers import BatchInputError, wait_for_batch

    if model not in profile.models:
        raise click.ClickException(f"unknown model {model!r}; profile {profile.name!r} serves: "
                                   f"{', '.join(profile.models)}")
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    submitter = make_submitter(settings, profile, ttl, window)
    try:
        try:
            source = await asyncio.to_thread(submitter.open, path, model)
        except BatchInputError as exc:
            raise click.ClickException(str(exc)) from exc
        # Progress on stderr, and only on a terminal: stdout carries the batch id alone, so
        # `B=$(toposerve batch submit ...)` captures just that.
        console = Console(stderr=True)
        with Progress(*columns, transient=False, console=console, disable=not console.is_terminal) as bar:
            sent = bar.add_task("published", total=source.total, rate="")

            def created(manifest) -> None:
                say(f"batch {manifest.id}: {manifest.total} rows in {manifest.chunks} chunks of "
                     f"{manifest.chunk_rows}, model {manifest.model}")

            try:
                result = await submitter.submit(source, chunk_rows=chunk_rows, resume=resume,
                                                progress=lambda rows: bar.advance(sent, rows), on_created=created)
            except BatchInputError as exc:
                raise click.ClickException(str(exc)) from exc
            bar.update(sent, rate=f"{result.total / max(result.seconds, 1e-6):,.0f} rows/s")
            status = None
            if wait:
                done = bar.add_task("done", total=result.total, rate="")
                status = await wait_for_batch(submitter.store, result.batch_id,
                                              on_update=lambda n, total: bar.update(done, completed=n))
                bar.update(done, rate=f"{status.rate:,.0f} rows/s")
        say(f"{result.sent_chunks} chunks published, {result.skipped_chunks} skipped (already there), "
             f"{result.bad_rows} bad rows recorded")
        if status is not None:
            say(f"state {status.state}: {status.done} done, {status.failed} failed of {status.total}")
        click.echo(result.batch_id)
        return 0 if status is None or status.state == "succeeded" else 1
    finally:
        await submitter.close()


@batch.command()
@click.argument("batch_id")
@profile_option
def status(batch_id: str, profile_name: str) -> None:
    """Print a batch's progress as JSON: total, done, failed, rate, state."""
    settings, _, ttl = _setup(profile_name)

    async def run() -> bytes:
        store = BatchStore(connect_redis(settings.redis_url), settings.namespace, ttl)
        try:
            found = await store.status(batch_id)
        finally:
            await store.client.aclose()
        if found is None:
            raise click.ClickException(f"no batch {batch_id!r}: it never existed or it expired")
        return orjson.dumps(found.model_dump(), option=orjson.OPT_INDENT_2)

    click.echo(asyncio.run(run()).decode())


@batch.command()
@click.argument("batch_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write JSONL here (default: standard output)")
@profile_option
def results(batch_id: str, output: Path | None, profile_name: str) -> None:
    """One JSON line per input row, in input order: the prediction or the row's error."""
    settings, _, ttl = _setup(profile_name)

    async def run() -> None:
        from toposerve.models import load_manifests

        store = BatchStore(connect_redis(settings.redis_url), settings.namespace, ttl)
        try:
            manifest = await store.manifest(batch_id)
            if manifest is None:
                raise click.ClickException(f"no batch {batch_id!r}: it never existed or it expired")
            labels = load_manifests(models_dir(settings))[manifest.model].labels
            out = output.open("wb") if output is not None else sys.stdout.buffer
            try:
                async for block in iter_results(store, manifest, labels):
                    out.write(block)
            finally:
                if output is not None:
                    out.close()
                else:
                    out.flush()
        finally:
            await store.client.aclose()

    asyncio.run(run())


@batch.command()
@click.argument("batch_id")
@profile_option
def cancel(batch_id: str, profile_name: str) -> None:
    """Cancel a running batch: its chunks not predicted yet are skipped (their rows fail with
    ``cancelled``); prints its status as JSON. The CLI's own batches have no owner key, so this is
    how they are cancelled (over HTTP only an operator key may)."""
    settings, _, ttl = _setup(profile_name)

    async def run() -> bytes:
        store = BatchStore(connect_redis(settings.redis_url), settings.namespace, ttl)
        try:
            found = await store.cancel(batch_id)
            status = await store.status(batch_id)
        finally:
            await store.client.aclose()
        if found == NO_BATCH or status is None:
            raise click.ClickException(f"no batch {batch_id!r}: it never existed or it expired")
        if found == ALREADY_CANCELLED:
            raise click.ClickException(f"batch {batch_id} is already cancelled")
        if found == ALREADY_FINISHED:
            raise click.ClickException(f"batch {batch_id} has finished ({status.state!r}); nothing to cancel")
        return orjson.dumps(status.model_dump(), option=orjson.OPT_INDENT_2)

    click.echo(asyncio.run(run()).decode())


@batch.command()
@click.option("--rows", type=int, default=1_000_000, show_default=True)
@click.option("--chunk-rows", type=int, default=10_000, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the JSON report")
@profile_option
def bench(rows: int, chunk_rows: int, out: Path | None, profile_name: str) -> None:
    """Generate an iris CSV of --rows rows, run it end to end, and compare with ONNX Runtime alone."""
    from toposerve.deploy.batch_bench import run_batch_bench

    settings, profile, ttl = _setup(profile_name)
    report = run_batch_bench(settings, profile, rows=rows, chunk_rows=chunk_rows, say=say)
    text = orjson.dumps(report, option=orjson.OPT_INDENT_2).decode()
    click.echo(text)
    if out is not None:
        out.write_text(text)
