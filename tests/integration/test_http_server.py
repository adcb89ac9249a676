"""The ingress's HTTP server on a real socket: request smuggling shapes and slow clients.

- ``Content-Length`` together with ``Transfer-Encoding: chunked``: 400, connection closed
  (RFC 9112 section 6.3), never read as chunked on a connection that stays open;
- headers that drip in slower than ``TOPOSERVE_HEADER_TIMEOUT_S``: 408, connection closed;
- a body that has not all arrived within ``TOPOSERVE_BODY_TIMEOUT_S``: 408, connection closed;
- and a well-formed request on the same server is served.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
import uvicorn

from toposerve.brokers.settings import Settings
from toposerve.deploy.components import build_app, load_checked_profile
from toposerve.deploy.local_services import free_port
from toposerve.deploy.processes import ingress_server_config

ROW = b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}'


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[int]:
    settings = settings.model_copy(update={"header_timeout_s": 1.0, "body_timeout_s": 1.0})
    profile = load_checked_profile("synchronous", settings)
    port = free_port()
    server = uvicorn.Server(ingress_server_config(build_app(profile, settings, with_stages=False), settings,
                                                  "127.0.0.1", port))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    yield port
    server.should_exit = True
    await task


async def exchange(port: int, *parts: bytes, pause_s: float = 0.0, wait_s: float = 4.0) -> tuple[bytes, bool]:
    """Send ``parts`` (with pauses between) while reading, until the server closes or ``wait_s``
    passes: (what came back, whether the server closed the connection). Reading goes on while
    writing, so an answer sent before the server closes is kept even if a later write is reset."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()

    async def read_all() -> bool:
        try:
            while chunk := await reader.read(65536):
                received.extend(chunk)
        except ConnectionError:
            pass
        return True

    reading = asyncio.create_task(read_all())
    try:
        for index, part in enumerate(parts):
            if index and pause_s:
                await asyncio.wait({reading}, timeout=pause_s)
            if reading.done():
                break
            try:
                writer.write(part)
                await writer.drain()
            except ConnectionError:
                break
        done, _ = await asyncio.wait({reading}, timeout=wait_s)
        return bytes(received), bool(done)
    finally:
        reading.cancel()
        writer.close()


def status_and_error(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]


async def test_content_length_with_chunked_is_refused_and_the_connection_closed(server: int) -> None:
    smuggled = (b"POST /v1/models/iris/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                + f"{len(ROW):x}\r\n".encode() + ROW + b"\r\n0\r\n\r\n")
    response, closed = await exchange(server, smuggled)
    status, error = status_and_error(response)
    assert status == 400 and error["code"] == "bad_request" and closed
    assert b"connection: close" in response.lower()


async def test_headers_that_drip_in_get_408_and_the_connection_closed(server: int) -> None:
    started = time.monotonic()
    parts = [b"GET /healthz HTTP/1.1\r\n", b"Host: x\r\n", b"X-Slow: 1\r\n", b"X-Slow: 2\r\n", b"\r\n"]
    response, closed = await exchange(server, *parts, pause_s=0.6)
    status, error = status_and_error(response)
    assert status == 408 and error["code"] == "request_timeout" and closed
    assert time.monotonic() - started < 3


async def test_a_body_that_trickles_in_gets_408_and_the_connection_closed(server: int) -> None:
    head = (b"POST /v1/models/iris/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(ROW)}\r\n\r\n".encode())
    response, closed = await exchange(server, head, ROW[:5], ROW[5:10], ROW[10:], pause_s=0.7)
    status, error = status_and_error(response)
    assert status == 408 and error["code"] == "request_timeout" and closed


async def test_a_well_formed_request_on_the_same_server_is_served(server: int) -> None:
    response, _ = await exchange(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", wait_s=1.0)
    assert response.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in response


async def test_pipelined_requests_and_a_head_request_are_all_answered_whole(server: int) -> None:
    """The head of a response waits for its body (one write); a HEAD answer, which has no body,
    and pipelined requests behind it must still all arrive, on a connection kept open."""
    get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    head = b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    response, closed = await exchange(server, get + head + get, wait_s=1.5)
    assert not closed  # kept alive: everything below arrived without the server closing
    assert response.count(b"HTTP/1.1 ") == 3, response
    assert response.count(b'"status":"ok"') == 2  # the two GETs have bodies, the HEAD none


async def test_a_response_leaves_in_one_write() -> None:
    """Status line, headers and body reach the socket together: one system call, one wake-up of
    the client per response (uvicorn alone writes the head and the body apart)."""
    from toposerve.api.http_protocol import HeadWithBody

    class Recording:
        def __init__(self) -> None:
            self.writes: list[bytes] = []
            self.closed = False

        def write(self, data: bytes) -> None:
            self.writes.append(bytes(data))

        def close(self) -> None:
            self.closed = True

        def is_closing(self) -> bool:
            return self.closed

    sink = Recording()
    transport = HeadWithBody(sink)  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert sink.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]  # informational: at once
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert len(sink.writes) == 1  # the head waits for its body
    transport.write(b"{}")
    assert sink.writes[1] == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
    assert not transport.is_closing()  # the rest is the transport's

    for status in (b"204 No Content", b"304 Not Modified"):
        bodiless = Recording()
        HeadWithBody(bodiless).write(b"HTTP/1.1 " + status + b"\r\n\r\n")  # type: ignore[arg-type]
        assert len(bodiless.writes) == 1  # no body follows: at once

    crashed = Recording()
    held = HeadWithBody(crashed)  # type: ignore[arg-type]
    held.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
    held.close()  # the app failed after starting its answer: the head still goes, then the close
    assert crashed.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"] and crashed.closed
