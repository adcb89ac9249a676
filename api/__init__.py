"""The FastAPI ingress: native /v1 API, Open Inference Protocol /v2, book-compatible routes,
health, metrics and auth, over one ``Ingress`` per process (created by the app's lifespan).
"""

from toposerve.api.app import create_app
from toposerve.api.auth import key_file_line
from toposerve.api.config import IngressConfig, IngressSpec
from toposerve.api.edge_local import create_edge_app
from toposerve.api.http_protocol import guarded_protocol
from toposerve.api.live_profile import LiveProfile, LiveProfileSource, serving

__all__ = [
    "IngressConfig",
    "IngressSpec",
    "LiveProfile",
    "LiveProfileSource",
    "create_app",
    "create_edge_app",
    "guarded_protocol",
    "key_file_line",
    "serving",
]
