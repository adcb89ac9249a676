"""``toposerve up | worker | ingress``: run a whole profile, one stage replica, or the HTTP ingress."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from toposerve.brokers import Settings
from toposerve.deploy.cli.common import checked_profile, refuse_over_another_profile, say
from toposerve.deploy.profile import available_profiles


@click.command()
@click.option("--profile", "profile_name", required=True, help=f"Profile name or YAML path ({', '.join(available_profiles())})")
@click.option("--host", default=None, help="Ingress address (default: the profile's, 127.0.0.1)")
@click.option("--port", type=int, default=None, help="Ingress port (default: the profile's, 8000)")
@click.option("--provision", is_flag=True,
              help="Make an account per role on the RabbitMQ and Redis of TOPOSERVE_AMQP_URL / TOPOSERVE_REDIS_URL "
                   "(their users must be administrators); servers toposerve starts always have them")
@click.option("--management-url", default=None,
              help="RabbitMQ's management API, for --provision (default: the broker's host, port 15672)")
@click.option("--accounts-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where the roles' URLs are kept (0600; default: the user's state directory)")
@click.option("--replace", is_flag=True,
              help="Take the namespace over from another live profile: its queues are unbound (their messages kept)")
@click.option("--cluster", type=click.IntRange(1, 9), default=1, show_default=True,
              help="Nodes of the throwaway RabbitMQ toposerve starts (when TOPOSERVE_AMQP_URL is not set): "
                   "3 runs the profile against a local 3-node cluster")
def up(profile_name: str, host: str | None, port: int | None, provision: bool, management_url: str | None,
       accounts_file: Path | None, replace: bool, cluster: int) -> None:
    """Run the ingress and every stage of a profile on this machine until Ctrl-C."""
    from toposerve.deploy.launcher import LaunchError, run_profile
    from toposerve.deploy.local_services import ServiceUnavailable
    from toposerve.deploy.processes import configure_logging

    configure_logging()
    settings = Settings()
    profile = checked_profile(profile_name, settings)
    try:
        code = run_profile(profile, profile_name, settings, host or profile.ingress.host,
                           port or profile.ingress.port, say, provision=provision, management_url=management_url,
                           accounts_file=accounts_file, replace=replace, cluster=cluster)
    except (LaunchError, ServiceUnavailable) as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(code)


@click.command()
@click.option("--profile", "profile_name", required=True)
@click.option("--stage", required=True, help="Stage name in the profile")
@click.option("--replica", type=int, default=0, help="Replica number (names the connection)")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve Prometheus metrics of this stage on this port (default: off)")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address of the metrics port")
@click.option("--standby", is_flag=True, hidden=True,
              help="Declare the stage's queue unbound and consume it: started by a swap, which binds it")
def worker(profile_name: str, stage: str, replica: int, metrics_port: int | None, metrics_host: str,
           standby: bool) -> None:
    """Run one stage replica (what a container runs)."""
    from toposerve.deploy.processes import configure_logging, install_uvloop, run_stage

    configure_logging()
    settings = Settings()
    profile = checked_profile(profile_name, settings)
    if stage not in profile.stages:
        raise click.ClickException(f"profile {profile.name!r} has no stage {stage!r}; stages: {', '.join(profile.stages)}")
    if not standby:  # a standby stage binds nothing: the swap that started it binds when it takes over
        refuse_over_another_profile(profile, settings)
    install_uvloop()
    asyncio.run(run_stage(profile, stage, settings, replica, metrics_port=metrics_port, metrics_host=metrics_host,
                          standby=standby))


@click.command()
@click.option("--profile", "profile_name", required=True)
@click.option("--host", default=None)
@click.option("--port", type=int, default=None)
@click.option("--access-log/--no-access-log", default=False)
@click.option("--worker", type=int, default=None, hidden=True,
              help="One of the profile's ingress.workers (started by the parent ingress process)")
def ingress(profile_name: str, host: str | None, port: int | None, access_log: bool, worker: int | None) -> None:
    """Run the HTTP ingress of a profile (what a container runs)."""
    from toposerve.deploy.processes import configure_logging, serve_ingress

    configure_logging()
    settings = Settings()
    profile = checked_profile(profile_name, settings)
    if worker is None:  # a worker's parent checked already
        refuse_over_another_profile(profile, settings)
    serve_ingress(profile, settings, host or profile.ingress.host, port or profile.ingress.port, access_log,
                  profile_arg=profile_name, worker=worker)
