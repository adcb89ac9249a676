"""TelemetryStage: ``telemetry.<model>`` (edge clients' reports) -> the model's aggregate in Redis.

Recording is idempotent by report id (``TelemetryStore``), so a redelivery after a
crash between the Redis write and the ack changes nothing. A report for a model
the profile does not serve, or with labels the model does not have, is bad input:
it fails (``failure.<model>``, recorded under the report id) and is acked.
"""

from __future__ import annotations

import logging
from typing import ClassVar

from redis.exceptions import RedisError

from toposerve.brokers import Envelope, FailureCode, Telemetry, TelemetryStore
from toposerve.consumers.stage import Outgoing, Stage, TransientError
from toposerve.models import InputError, ModelManifest

log = logging.getLogger(__name__)


def check_report(report: Telemetry, manifests: dict[str, ModelManifest]) -> None:
    """Pure: refuse a report that does not fit the model it names."""
    manifest = manifests.get(report.model)
    if manifest is None:
        raise InputError(f"model {report.model!r} is not served here; telemetry is kept for: "
                         f"{', '.join(sorted(manifests))}", FailureCode.UNKNOWN_MODEL)
    unknown = sorted(set(report.labels) - set(manifest.labels))
    if unknown:
        raise InputError(f"labels {unknown} are not labels of model {report.model!r} ({', '.join(manifest.labels)})")


class TelemetryStage(Stage):
    kind: ClassVar[str] = "telemetry"
    input_type: ClassVar[type[Envelope]] = Telemetry
    # Reports describe the past: a late one is still worth counting.
    honours_deadline: ClassVar[bool] = False

    def __init__(self, name: str, store: TelemetryStore, manifests: dict[str, ModelManifest]) -> None:
        super().__init__(name)
        self.store = store
        self.manifests = manifests

    async def stop(self) -> None:
        await self.store.client.aclose()

    async def handle(self, message: Envelope) -> list[Outgoing]:
        assert isinstance(message, Telemetry)
        check_report(message, self.manifests)
        try:
            counted = await self.store.record(message)
        except RedisError as exc:
            raise TransientError(f"Redis unavailable: {exc}") from exc
        if not counted:
            log.info("telemetry report %s was already counted (a redelivery or a resend)", message.id)
        return []
