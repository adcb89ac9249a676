"""The wire: message types, topology, AMQP and Redis connections, and the stores on Redis.

Imports nothing else of toposerve; every other package builds on what it lists here.
"""

from toposerve.brokers.background import stop_task
from toposerve.brokers.batches import (
    BatchManifest,
    BatchStatus,
    BatchStore,
    ChunkMeta,
    chunk_id,
    encode_chunk_error,
    encode_chunk_result,
    iter_results,
    new_batch_id,
)
from toposerve.brokers.cache_keys import feature_key, prediction_key
from toposerve.brokers.caches import FeatureCache, PredictionCache, flush_keys
from toposerve.brokers.connections import (
    INGRESS_APP_ID,
    Publisher,
    PublishRefused,
    connect_amqp,
    connect_redis,
    open_confirm_channel,
)
from toposerve.brokers.job_ids import issue_job_id, issued_by
from toposerve.brokers.joins import JoinStore
from toposerve.brokers.logs import configure_logs, current_job
from toposerve.brokers.messages import (
    Envelope,
    Failure,
    FailureCode,
    Features,
    InferenceInputs,
    InferenceRequest,
    JoinTick,
    PartResult,
    Prediction,
    RowPrediction,
    Tensor,
    decode_terminal,
    is_model_name,
    is_terminal,
    read_identity,
    routing_key,
    utc_now,
)
from toposerve.brokers.redaction import redact
from toposerve.brokers.results import CompletionListener, JobError, JobRecord, JobStatus, ResultStore
from toposerve.brokers.settings import Settings
from toposerve.brokers.telemetry_messages import (
    CLIENT_ID_PATTERN,
    N_LATENCY_BUCKETS,
    SHA256_PATTERN,
    LatencyStats,
    Telemetry,
    latency_bucket,
)
from toposerve.brokers.telemetry_store import TelemetryStore, TelemetrySummary
from toposerve.brokers.topic import any_binding_matches, topic_matches
from toposerve.brokers.topology import (
    DeadLetterSpec,
    QueueSpec,
    dead_exchange_name,
    dead_queue_name,
    declare_dead_letters,
    declare_topology,
    exchange_name,
    stage_queue_name,
)
from toposerve.brokers.tracing import TRACEPARENT, continue_trace, current_span, trace_headers

__all__ = [
    "BatchManifest",
    "BatchStatus",
    "BatchStore",
    "CLIENT_ID_PATTERN",
    "ChunkMeta",
    "CompletionListener",
    "Envelope",
    "Failure",
    "FailureCode",
    "FeatureCache",
    "Features",
    "INGRESS_APP_ID",
    "InferenceInputs",
    "InferenceRequest",
    "JobRecord",
    "JobStatus",
    "JobError",
    "JoinStore",
    "JoinTick",
    "LatencyStats",
    "N_LATENCY_BUCKETS",
    "PartResult",
    "Prediction",
    "PredictionCache",
    "PublishRefused",
    "Publisher",
    "DeadLetterSpec",
    "QueueSpec",
    "ResultStore",
    "RowPrediction",
    "SHA256_PATTERN",
    "Settings",
    "TRACEPARENT",
    "Telemetry",
    "TelemetryStore",
    "TelemetrySummary",
    "Tensor",
    "any_binding_matches",
    "chunk_id",
    "connect_amqp",
    "connect_redis",
    "continue_trace",
    "configure_logs",
    "current_job",
    "current_span",
    "dead_exchange_name",
    "dead_queue_name",
    "declare_dead_letters",
    "declare_topology",
    "decode_terminal",
    "encode_chunk_error",
    "encode_chunk_result",
    "exchange_name",
    "flush_keys",
    "feature_key",
    "is_model_name",
    "issue_job_id",
    "issued_by",
    "is_terminal",
    "read_identity",
    "iter_results",
    "latency_bucket",
    "new_batch_id",
    "open_confirm_channel",
    "prediction_key",
    "redact",
    "routing_key",
    "stage_queue_name",
    "stop_task",
    "topic_matches",
    "trace_headers",
    "utc_now",
]
