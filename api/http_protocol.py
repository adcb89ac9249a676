"""The ingress's HTTP/1.1 server protocol: uvicorn's httptools (llhttp) parser, with deadlines.

- A request that carries both ``Content-Length`` and ``Transfer-Encoding`` (the shape of
  request smuggling) is refused by llhttp; the answer is 400 and the connection is closed,
  as RFC 9112 section 6.3 asks (h11, uvicorn's other parser, read such a request as
  chunked and kept the connection open).
- Headers must arrive within ``header_timeout_s`` of a request's first byte (or of the
  connection being opened): a client that drips them (slowloris) is answered 408 and
  disconnected. The body has its own deadline, kept where it is read (``api/body.py``).
- Protocol-level refusals use the API's error shape, ``{"error": {"code", "message"}}``.
- A response's status line and headers leave with its first body bytes, in one write
  (``HeadWithBody``): uvicorn writes them apart, which costs a system call and, worse, wakes
  the client twice per response (once to read headers alone).
"""

from __future__ import annotations

import asyncio

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol


def guarded_protocol(header_timeout_s: float) -> type[HttpToolsProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)``, with this header deadline."""

    class GuardedHttpProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm_header_timer()

        def on_headers_complete(self) -> None:
            self._cancel_header_timer()
            super().on_headers_complete()
            # The cycle uvicorn just made for this request (after an upgrade, which is refused,
            # the previous one: already wrapped). HEAD answers have no body bytes to wait for.
            cycle = getattr(self, "cycle", None)
            if cycle is not None and cycle.scope["method"] != "HEAD" and not isinstance(cycle.transport, HeadWithBody):
                cycle.transport = HeadWithBody(cycle.transport)

        def on_response_complete(self) -> None:
            # Between requests the keep-alive timeout applies, not ours.
            self._cancel_header_timer()
            cycle = getattr(self, "cycle", None)
            if cycle is not None and isinstance(cycle.transport, HeadWithBody):
                # A safety net: uvicorn writes every body message, even an empty one, which sends
                # the head, so nothing should be waiting here.
                cycle.transport.flush()
            super().on_response_complete()

        def send_400_response(self, msg: str) -> None:
            self._refuse(400, "bad_request", f"{msg} (malformed request line or headers, or both "
                                             "Content-Length and Transfer-Encoding)")

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self._refuse(408, "request_timeout", f"the request headers did not arrive within {header_timeout_s:g} s")

        def _refuse(self, status: int, code: str, message: str) -> None:
            body = orjson.dumps({"error": {"code": code, "message": message}})
            head = [STATUS_LINE[status], b"content-type: application/json\r\n",
                    b"content-length: " + str(len(body)).encode() + b"\r\n", b"connection: close\r\n"]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            self.transport.write(b"".join([*head, b"\r\n", body]))
            self.transport.close()

    return GuardedHttpProtocol


class HeadWithBody:
    """One response's transport: the status line and headers (uvicorn's first write) wait for the
    first body bytes and go out with them; ``flush`` and ``close`` send a head still waiting.
    Informational answers (``100 Continue``) and answers without a body (204, 304) pass at
    once. Anything else is the transport's."""

    __slots__ = ("_transport", "_head", "_head_seen")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head: bytes | None = None
        self._head_seen = False

    def write(self, data: bytes) -> None:
        if not self._head_seen:
            if data.startswith((b"HTTP/1.1 1", b"HTTP/1.1 204", b"HTTP/1.1 304")):
                self._transport.write(data)
                return
            self._head_seen = True
            self._head = bytes(data)
            return
        if self._head is not None:
            data, self._head = self._head + data, None
        self._transport.write(data)

    def flush(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)
