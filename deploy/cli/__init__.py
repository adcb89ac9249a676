"""The ``toposerve`` command line: one module per command group, gathered here.

serve (up, worker, ingress), lifecycle (status, down, swap), describe (topology, asyncapi, profiles), bench, batch,
dead, cache (cache, items), accounts, edge, keys, render, models (promote, rollback, versions); common holds what they share.
"""

from __future__ import annotations

import click

from toposerve.deploy.cli.accounts import accounts
from toposerve.deploy.cli.batch import batch
from toposerve.deploy.cli.bench import bench
from toposerve.deploy.cli.cache import cache, items
from toposerve.deploy.cli.dead import dead
from toposerve.deploy.cli.describe import asyncapi, profiles, topology
from toposerve.deploy.cli.edge import edge
from toposerve.deploy.cli.keys import keys
from toposerve.deploy.cli.lifecycle import down, status, swap
from toposerve.deploy.cli.models import models
from toposerve.deploy.cli.render import render
from toposerve.deploy.cli.serve import ingress, up, worker
from toposerve.deploy.cli.ui import ui


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Serve ONNX models through RabbitMQ topologies (one deploy profile per serving pattern)."""


for command in (up, down, status, swap, worker, ingress, topology, asyncapi, profiles, bench, batch, dead, cache, items,
                accounts, edge, keys, render, models, ui):
    main.add_command(command)


if __name__ == "__main__":
    main()
