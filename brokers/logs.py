"""Log lines: plain (default) or one JSON object per line (``TOPOSERVE_LOG_FORMAT=json``).

JSON lines carry ``time``, ``level``, ``logger``, ``message`` and, for work on a
job, ``job_id``, ``model``, ``stage`` and ``trace_id``: a stage sets ``current_job``
around each message, the ingress sets the trace span per HTTP request.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from datetime import UTC, datetime

import orjson

from toposerve.brokers.tracing import current_span

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"

# (job_id, model, stage) of the message in hand; a tuple so setting it costs one allocation.
current_job: ContextVar[tuple[str, str, str] | None] = ContextVar("toposerve_job", default=None)


class JobContextFilter(logging.Filter):
    """Adds ``job_id``, ``model``, ``stage`` and ``trace_id`` to records (``None`` outside a job)."""

    def filter(self, record: logging.LogRecord) -> bool:
        job = current_job.get()
        if job is not None:
            record.job_id, record.model, record.stage = job
        span = current_span.get()
        if span is not None:
            record.trace_id = span.trace_id
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; context fields only when set."""

    FIELDS = ("job_id", "model", "stage", "trace_id")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        for name in self.FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logs(level: str = "INFO", log_format: str = "plain") -> None:
    """Configure the root logger of this process (a no-op when it has handlers, like ``basicConfig``)."""
    handler = logging.StreamHandler()
    handler.addFilter(JobContextFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(PLAIN_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
