"""toposerve.api."""

from toposerve.api.app import create_app
from toposerve.api.auth import key_file_line
from toposerve.api.config import IngressConfig, IngressSpec
from toposerve.api.edge_local import create_edge_app

__all__ = [
    "IngressConfig",
    "IngressSpec",
    "create_app",
    "create_edge_app",
    "key_file_line",
]
