"""What puts work in: the HTTP SDK (http_client), the AMQP client, the batch submitter, dead-letter replay, the load generator, the edge runtime
and its agent (model cache, telemetry spool).
"""

from toposerve.producers.batch import DEFAULT_CHUNK_ROWS, BatchSubmitter, wait_for_batch
from toposerve.producers.batch_sources import BatchInputError, bytes_source
from toposerve.producers.client import ClientError, InferenceClient, SyncInferenceClient
from toposerve.producers.dead_letters import DeadLetters
from toposerve.producers.edge import EdgeRuntime, client_id_of
from toposerve.producers.edge_agent import EdgeAgent, spool_and_forward, spool_dir
from toposerve.producers.edge_cache import EdgeError, ModelCache
from toposerve.producers.edge_spool import DEFAULT_MAX_REPORTS, Spool
from toposerve.producers.edge_telemetry import ForwardResult
from toposerve.producers.http_client import (
    AsyncClient,
    Client,
    HttpApiError,
    InvalidRequest,
    JobFailed,
    NotFound,
    ServerError,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from toposerve.producers.loadgen import LatencySummary, one_job, run_closed_loop, run_in_process_baseline

__all__ = [
    "AsyncClient",
    "Client",
    "HttpApiError",
    "InvalidRequest",
    "JobFailed",
    "NotFound",
    "ServerError",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "ClientError",
    "InferenceClient",
    "SyncInferenceClient",
    "BatchInputError",
    "BatchSubmitter",
    "DEFAULT_CHUNK_ROWS",
    "DEFAULT_MAX_REPORTS",
    "DeadLetters",
    "EdgeAgent",
    "EdgeError",
    "EdgeRuntime",
    "ForwardResult",
    "LatencySummary",
    "ModelCache",
    "Spool",
    "bytes_source",
    "client_id_of",
    "one_job",
    "run_closed_loop",
    "run_in_process_baseline",
    "spool_and_forward",
    "spool_dir",
    "wait_for_batch",
]
