"""toposerve.api."""

from toposerve.api.app import create_app
from toposerve.api.auth import key_file_line
from toposerve.api.edge_local import create_edge_app
from toposerve.api.ingress import IngressConfig

__all__ = [
    "IngressConfig",
    "create_app",
    "create_edge_app",
    "key_file_line",
]
