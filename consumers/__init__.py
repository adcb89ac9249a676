"""The stages: preprocess, predict (ONNX Runtime, micro-batching), store, aggregate, telemetry,
and the runner that gives each of them the delivery guarantees (ack after confirm, dead letters).
"""

from toposerve.consumers.aggregate import AggregateStage, delay_queue
from toposerve.consumers.batch_store import BatchStoreStage
from toposerve.consumers.crash_guard import RedeliveryGuard
from toposerve.consumers.liveness import LoopHeartbeat
from toposerve.consumers.metrics import StageMetrics, StageMetricSet, serve_metrics
from toposerve.consumers.predict import PredictStage
from toposerve.consumers.preprocess import PreprocessStage
from toposerve.consumers.stage import Stage, StageRunner
from toposerve.consumers.store import StoreStage
from toposerve.consumers.telemetry import TelemetryStage

__all__ = [
    "AggregateStage",
    "BatchStoreStage",
    "LoopHeartbeat",
    "PredictStage",
    "PreprocessStage",
    "RedeliveryGuard",
    "Stage",
    "StageMetricSet",
    "StageMetrics",
    "StageRunner",
    "StoreStage",
    "TelemetryStage",
    "delay_queue",
    "serve_metrics",
]
