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
@click.option("--repeat", type=click.IntRange(1, 50), default=1, show_default=True,
              help="Interleaved rounds (every target at every concurrency, in turn); the table shows medians")
@click.option("--model", default="iris", show_default=True)
@click.option("--url", default=None, help="Load a running ingress instead of starting the profile")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the JSON report here")
@click.option("--soak", is_flag=True, help="Instead: hold a fraction of capacity for --soak-minutes, watch for growth")
@click.option("--soak-minutes", type=float, default=10.0, show_default=True)
@click.option("--soak-fraction", type=float, default=0.5, show_default=True, help="Fraction of measured capacity")
@click.option("--soak-interval", type=float, default=30.0, show_default=True, help="Seconds per reported interval")
def bench(profile_name: str, concurrencies: tuple[int, ...], duration: float, repeat: int, model: str, url: str | None,
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
                           duration_s=duration, url=url, out=out, say=say, repeat=repeat)
    except LaunchError as exc:
        raise click.ClickException(str(exc)) from exc
    title = f"toposerve bench: profile {profile.name} ({profile.ingress.mode}), model {model}"
    table = Table(title=f"{title}, medians of {repeat} interleaved round(s)")
    for column in ("target", "concurrency", "req/s", "vs baseline", "p50 ms", "p99 ms", "errors", "CPU ms/req"):
        table.add_column(column, justify="right")
    for m in report.medians:
        table.add_row(m.target, str(m.concurrency), f"{m.throughput_rps:,.0f}",
                      "" if m.ratio_to_baseline is None else f"{m.ratio_to_baseline:.2f}x", f"{m.p50_ms:.3f}",
                      f"{m.p99_ms:.3f}", str(m.errors), "" if m.cpu_ms_total is None else f"{m.cpu_ms_total:.3f}")
    console = Console() if Console().is_terminal else Console(width=160)  # a log file: no truncated columns
    console.print(table)
    cpu = Table(title="CPU ms per answered request, per process (from /proc; 'CPU ms/req' above leaves out "
                      "the load generator)")
    roles = sorted({role for m in report.medians for role in m.cpu_ms_per_request})
    for column in ("target", "concurrency", *roles):
        cpu.add_column(column, justify="right")
    for m in report.medians:
        cpu.add_row(m.target, str(m.concurrency),
                    *(f"{m.cpu_ms_per_request[r]:.3f}" if r in m.cpu_ms_per_request else "" for r in roles))
    if roles:
        console.print(cpu)
    if out:
        say(f"report written to {out}")
