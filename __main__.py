"""``python -m toposerve``: the ``toposerve`` command line (toposerve/deploy/cli)."""

from toposerve.deploy.cli import main

main()
