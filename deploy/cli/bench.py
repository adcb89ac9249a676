"""``toposerve bench``: throughput and latency of a profile next to baselines measured in the same run."""

from __future__ import annotations

from pathlib import Path

import click

from toposerve.brokers import Settings
from toposerve.deploy.cli.common import checked_profile, say


@click.command()
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
    settings = Settings()
    profile = checked_profile(profile_name, settings)
    if soak:
        from toposerve.deploy.soak import run_soak

        soak_report = run_soak(profile, profile_name, settings, model=model, minutes=soak_minutes,
                               fraction=soak_fraction, interval_s=soak_interval, out=out, say=say)
        for flag in soak_report.flags or ["no growth flagged"]:
            say(f"soak: {flag}")
        return
    try:
        report = run_bench(profile, profile_name, settings, model=model, concurrencies=list(concurrencies),
                           duration_s=duration, url=url, out=out, say=say)
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
        say(f"report written to {out}")
