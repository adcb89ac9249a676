"""The ``toposerve`` command line."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from toposerve.brokers import Settings, dead_exchange_name, dead_queue_name, exchange_name
from toposerve.deploy.cli.batch import batch
from toposerve.deploy.cli.dead import dead
from toposerve.deploy.cli.edge import edge
from toposerve.deploy.cli.keys import keys
from toposerve.deploy.cli.render import render
from toposerve.deploy.components import load_checked_profile
from toposerve.deploy.profile import Profile, ProfileError, available_profiles


def _settings() -> Settings:
    return Settings()


def _profile(name: str, settings: Settings) -> Profile:
    try:
        return load_checked_profile(name, settings)
    except ProfileError as exc:
        raise click.ClickException(str(exc)) from exc


def _say(text: str) -> None:
    click.echo(f"toposerve: {text}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Serve ONNX models through RabbitMQ topologies (one deploy profile per serving pattern)."""


@main.command()
@click.option("--profile", "profile_name", required=True, help=f"Profile name or YAML path ({', '.join(available_profiles())})")
@click.option("--host", default=None, help="Ingress address (default: the profile's, 127.0.0.1)")
@click.option("--port", type=int, default=None, help="Ingress port (default: the profile's, 8000)")
def up(profile_name: str, host: str | None, port: int | None) -> None:
    """Run the ingress and every stage of a profile on this machine until Ctrl-C."""
    from toposerve.deploy.launcher import LaunchError, run_profile
    from toposerve.deploy.local_services import ServiceUnavailable
    from toposerve.deploy.processes import configure_logging

    configure_logging()
    settings = _settings()
    profile = _profile(profile_name, settings)
    try:
        code = run_profile(profile, profile_name, settings, host or profile.ingress.host,
                           port or profile.ingress.port, _say)
    except (LaunchError, ServiceUnavailable) as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(code)


@main.command()
@click.option("--profile", "profile_name", required=True)
@click.option("--stage", required=True, help="Stage name in the profile")
@click.option("--replica", type=int, default=0, help="Replica number (names the connection)")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve Prometheus metrics of this stage on this port (default: off)")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address of the metrics port")
def worker(profile_name: str, stage: str, replica: int, metrics_port: int | None, metrics_host: str) -> None:
    """Run one stage replica (what a container runs)."""
    from toposerve.deploy.processes import configure_logging, install_uvloop, run_stage

    configure_logging()
    settings = _settings()
    profile = _profile(profile_name, settings)
    if stage not in profile.stages:
        raise click.ClickException(f"profile {profile.name!r} has no stage {stage!r}; stages: {', '.join(profile.stages)}")
    install_uvloop()
    asyncio.run(run_stage(profile, stage, settings, replica, metrics_port=metrics_port, metrics_host=metrics_host))


@main.command()
@click.option("--profile", "profile_name", required=True)
@click.option("--host", default=None)
@click.option("--port", type=int, default=None)
@click.option("--access-log/--no-access-log", default=False)
def ingress(profile_name: str, host: str | None, port: int | None, access_log: bool) -> None:
    """Run the HTTP ingress of a profile (what a container runs)."""
    from toposerve.deploy.processes import configure_logging, serve_ingress

    configure_logging()
    settings = _settings()
    profile = _profile(profile_name, settings)
    serve_ingress(profile, settings, host or profile.ingress.host, port or profile.ingress.port, access_log)


@main.command()
@click.option("--profile", "profile_name", required=True)
def topology(profile_name: str) -> None:
    """Print the exchanges, queues, bindings and stages of a profile."""
    settings = _settings()
    profile = _profile(profile_name, settings)
    ns = settings.namespace
    click.echo(f"profile {profile.name}: {profile.description}")
    publishes = ("features.<model> for rows (preprocessed in the ingress), request.<model> for images and items"
                 if profile.ingress.preprocess_tabular_in_ingress else "request.<model>")
    click.echo(f"  ingress: mode={profile.ingress.mode} http://{profile.ingress.host}:{profile.ingress.port} "
               f"publishes {publishes}; results live {profile.ingress.result_ttl_s}s")
    click.echo(f"  models: {', '.join(profile.models)}")
    for group, spec in profile.groups.items():
        click.echo(f"  group {group}: {', '.join(spec.models)} (one request to all; joined within "
                   f"{spec.join_timeout_s:g}s by an aggregate stage)")
    click.echo("exchanges:")
    click.echo(f"  {exchange_name(ns)} (topic, durable)")
    click.echo(f"  {dead_exchange_name(ns)} (topic, durable, dead letters) -> queue {dead_queue_name(ns)} [#]")
    click.echo("stages (queue <- bindings):")
    for name, stage in profile.stages.items():
        spec = profile.queue_spec(ns, name)
        knobs = [f"kind={stage.kind}", f"replicas={stage.replicas}", f"prefetch={stage.prefetch}"]
        if stage.kind == "predict":
            knobs += [f"max_batch_size={stage.max_batch_size}", f"max_batch_delay_ms={stage.max_batch_delay_ms}",
                      f"models={','.join(profile.stage_models(name))}"]
        if spec.max_length:
            knobs.append(f"max_queue_length={spec.max_length}")
        click.echo(f"  {name}: {spec.name} ({spec.queue_type}) <- {', '.join(spec.binding_keys)}")
        click.echo(f"      {' '.join(knobs)}")
    click.echo("flow: request.<model> -> preprocess -> features.<model> -> predict -> prediction.<model> "
               "| failure.<model> -> store -> Redis")
    if profile.ingress.preprocess_tabular_in_ingress:
        click.echo("      rows: ingress -> features.<model> -> predict -> ... (the preprocess stage is skipped)")


@main.command()
@click.option("--profile", "profile_name", required=True)
@click.option("--concurrency", "-c", "concurrencies", type=int, multiple=True, default=(1, 64), show_default=True,
              help="Closed-loop workers; repeat for several runs")
@click.option("--duration", type=float, default=10.0, show_default=True, help="Seconds measured per run")
@click.option("--model", default="iris", show_default=True)
@click.option("--url", default=None, help="Load a running ingress instead of starting the profile")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the JSON report here")
@click.option("--soak", is_flag=True, help="Instead: hold a fraction of capacity for --soak-minutes, watch for growth")
@click.option("--soak-minutes", type=float, default=10.0, show_default=True)
@click.option("--soak-fraction", type=float, default=0.5, show_default=True, help="Fraction of measured capacity")
@click.option("--soak-interval", type=float, default=30.0, show_default=True, help="Seconds per reported interval")
def bench(profile_name: str, concurrencies: tuple[int, ...], duration: float, model: str, url: str | None,
          out: Path | None, soak: bool, soak_minutes: float, soak_fraction: float, soak_interval: float) -> None:
    """Measure throughput and latency percentiles of a profile next to an in-process baseline."""
    from rich.console import Console
    from rich.table import Table

    from toposerve.deploy.bench import run_bench
    from toposerve.deploy.launcher import LaunchError
    from toposerve.deploy.processes import configure_logging

    configure_logging("WARNING")
    settings = _settings()
    profile = _profile(profile_name, settings)
    if soak:
        from toposerve.deploy.soak import run_soak

        soak_report = run_soak(profile, profile_name, settings, model=model, minutes=soak_minutes,
                               fraction=soak_fraction, interval_s=soak_interval, out=out, say=_say)
        for flag in soak_report.flags or ["no growth flagged"]:
            _say(f"soak: {flag}")
        return
    try:
        report = run_bench(profile, profile_name, settings, model=model, concurrencies=list(concurrencies),
                           duration_s=duration, url=url, out=out, say=_say)
    except LaunchError as exc:
        raise click.ClickException(str(exc)) from exc
    table = Table(title=f"toposerve bench: profile {profile.name} ({profile.ingress.mode}), model {model}")
    for column in ("target", "concurrency", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors"):
        table.add_column(column, justify="right")
    for run in report.runs:
        s = run.summary
        table.add_row(run.target, str(run.concurrency), f"{s.throughput_rps:,.0f}", f"{s.p50_ms:.3f}",
                      f"{s.p90_ms:.3f}", f"{s.p99_ms:.3f}", str(s.errors))
    Console().print(table)
    if out:
        _say(f"report written to {out}")


@main.command()
@click.option("--profile", "profile_name", default="asynchronous", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["json", "yaml"]), default="json", show_default=True)
def asyncapi(profile_name: str, fmt: str) -> None:
    """Print the AsyncAPI 3.0 document of a profile's message contracts (routing keys, schemas)."""
    import json

    import yaml

    from toposerve.deploy.asyncapi import asyncapi_document

    settings = _settings()
    document = asyncapi_document(_profile(profile_name, settings), settings)
    if fmt == "yaml":
        click.echo(yaml.safe_dump(document, sort_keys=False, allow_unicode=True), nl=False)
    else:
        click.echo(json.dumps(document, indent=2))


@main.command()
def profiles() -> None:
    """List the profiles that ship with toposerve."""
    for name in available_profiles():
        click.echo(name)


main.add_command(edge)

main.add_command(render)

main.add_command(batch)

main.add_command(dead)

main.add_command(keys)


if __name__ == "__main__":
    main()
