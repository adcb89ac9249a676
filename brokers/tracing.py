"""W3C Trace Context (``traceparent``) carried in AMQP message headers.

The ingress takes the caller's ``traceparent`` (or starts a trace), and every hop
publishes with a span id of its own under the same trace id, so one request can
be followed across processes. A malformed header is ignored (a new trace starts);
it is never the caller's error.

``current_span`` holds the span of the work in hand: the HTTP request at the
ingress, the message being handled in a stage. Publishers read it for headers,
log formatters for ``trace_id``.
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar
from dataclasses import dataclass

TRACEPARENT = "traceparent"

_HEX = frozenset("0123456789abcdef")
_VERSION_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
# A later version may append fields; the first four keep their format (W3C §3.2.4).
_FUTURE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


@dataclass(frozen=True, slots=True)
class TraceContext:
    trace_id: str  # 32 lowercase hex digits, not all zero
    span_id: str   # 16 lowercase hex digits, not all zero
    flags: str = "01"

    @property
    def header(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def child(self) -> TraceContext:
        """The next hop: the same trace, a new span id."""
        return TraceContext(self.trace_id, _span_id(), self.flags)


def _span_id() -> str:
    while True:
        span = os.urandom(8).hex()
        if span != _ZERO_SPAN:
            return span


def new_trace() -> TraceContext:
    """A new trace: version 00, random trace and span ids, sampled (flags 01)."""
    while True:
        trace = os.urandom(16).hex()
        if trace != _ZERO_TRACE:
            return TraceContext(trace, _span_id(), "01")


def parse_traceparent(value: object) -> TraceContext | None:
    """A valid ``traceparent`` header, else ``None`` (strict: lowercase hex, no all-zero ids)."""
    if isinstance(value, bytes | bytearray):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str) or len(value) < 55 or len(value) > 512:
        return None
    match = _VERSION_00.fullmatch(value)
    if match is None:
        match = _FUTURE.fullmatch(value)
        if match is None or match.group(1) in ("00", "ff"):
            return None
        trace_id, span_id, flags = match.group(2), match.group(3), match.group(4)
    else:
        trace_id, span_id, flags = match.groups()
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return TraceContext(trace_id, span_id, flags)


def continue_trace(value: object) -> TraceContext:
    """This hop's span: a child of the incoming ``traceparent``, or the root of a new trace."""
    parent = parse_traceparent(value) if value is not None else None
    return parent.child() if parent is not None else new_trace()


current_span: ContextVar[TraceContext | None] = ContextVar("toposerve_span", default=None)


def trace_headers() -> dict[str, object] | None:
    """AMQP headers carrying the current span (``None`` outside any traced work)."""
    span = current_span.get()
    return None if span is None else {TRACEPARENT: span.header}
