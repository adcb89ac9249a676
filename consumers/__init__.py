"""The stages: preprocess, predict (ONNX Runtime, micro-batching), store, aggregate, telemetry,
a user's own (custom), the settlement policy that gives each of them the delivery guarantees
(ack after confirm, failures, retries, dead letters) and the runner that puts them on FastStream.
"""

from toposerve.consumers.aggregate import AggregateStage, delay_queue
from toposerve.consumers.batch_store import BatchStoreStage
from toposerve.consumers.crash_guard import RedeliveryGuard
from toposerve.consumers.custom import CustomStage, HandlerError, load_handler
from toposerve.consumers.liveness import LoopHeartbeat
from toposerve.consumers.metrics import StageMetrics, StageMetricSet, serve_metrics
from toposerve.consumers.predict import PredictStage
from toposerve.consumers.preprocess import PreprocessStage
from toposerve.consumers.runner import StageRunner
from toposerve.consumers.settlement import Outlets, Settlement, Trust
from toposerve.consumers.shadow import ShadowStage
from toposerve.consumers.stage import Outgoing, Stage, StageStats, TransientError, outgoing
from toposerve.consumers.store import StoreStage
from toposerve.consumers.telemetry import TelemetryStage

__all__ = [
    "AggregateStage",
    "BatchStoreStage",
    "CustomStage",
    "HandlerError",
    "LoopHeartbeat",
    "Outgoing",
    "Outlets",
    "PredictStage",
    "PreprocessStage",
    "RedeliveryGuard",
    "Settlement",
    "ShadowStage",
    "Stage",
    "StageMetricSet",
    "StageMetrics",
    "StageRunner",
    "StageStats",
    "StoreStage",
    "TelemetryStage",
    "TransientError",
    "Trust",
    "delay_queue",
    "load_handler",
    "outgoing",
    "serve_metrics",
]
