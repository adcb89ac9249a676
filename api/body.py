"""Reading request bodies: content type, encoding, size limit and JSON parsing, with clear errors."""

from __future__ import annotations

import asyncio
import json
import zlib

from fastapi import Request
from starlette.requests import ClientDisconnect

from toposerve.api.errors import ApiError

# curl -d sends application/x-www-form-urlencoded unless told otherwise; the README's
# one-line examples rely on it, so a JSON body under that type is accepted too.
_ACCEPTED_TYPES = ("application/json", "application/x-www-form-urlencoded", "text/json")
# Content-Encoding -> the zlib window bits that decode it (gzip header, or zlib's own).
_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def check_content_type(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type and media_type not in _ACCEPTED_TYPES and not media_type.endswith("+json"):
        raise ApiError(415, "unsupported_media_type",
                       f"content type {media_type!r} is not supported; send JSON (application/json)")


def _decoder(request: Request) -> zlib._Decompress | None:
    """A streaming decoder for the body's Content-Encoding; None for an identity body."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding not in _ENCODINGS:
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Encoding {encoding!r} is not supported; send the body as is, gzip or deflate")
    return zlib.decompressobj(_ENCODINGS[encoding])


async def read_body(request: Request, max_bytes: int, timeout_s: float = 60.0) -> bytes:
    """The body, decoded (gzip, deflate); more than ``max_bytes`` on the wire or decoded is a 413,
    and a body that has not all arrived within ``timeout_s`` is a 408 (the connection is closed).

    The decoded size is counted as the body streams in, so a small compressed body that
    inflates without bound (a "zip bomb") is refused at the limit, not after it.
    """
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_body(request, max_bytes)
    except TimeoutError:
        raise ApiError(408, "request_timeout", f"the request body did not arrive within {timeout_s:g} s",
                       {"Connection": "close"}) from None
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client went away before sending the whole body",
                       {"Connection": "close"}) from None


async def _read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, "body_too_large", f"body is {declared} bytes, more than the limit of {max_bytes}")
    decoder = _decoder(request)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        if decoder is not None:
            # At most one byte past the limit: enough to know it is too large.
            chunk = _inflate(request, decoder.decompress, chunk, max_bytes - size + 1)
        size += len(chunk)
        if size > max_bytes:  # chunked uploads carry no length, and compressed ones inflate: count as we go
            raise ApiError(413, "body_too_large", f"body is more than the limit of {max_bytes} bytes"
                                                  + (" once decompressed" if decoder is not None else ""))
        chunks.append(chunk)
    if decoder is not None:
        if not decoder.eof:
            raise ApiError(400, "invalid_body", f"the {request.headers['content-encoding']} body is truncated")
        if decoder.unused_data:
            raise ApiError(400, "invalid_body", f"data follows the end of the {request.headers['content-encoding']} "
                                                "stream")
    return b"".join(chunks)


def _inflate(request: Request, decompress, chunk: bytes, limit: int) -> bytes:
    try:
        return decompress(chunk, limit)
    except zlib.error as exc:
        raise ApiError(400, "invalid_body",
                       f"the body is not valid {request.headers['content-encoding']}: {exc}") from exc


def parse_json(body: bytes) -> object:
    """JSON text -> Python values; every way it can be wrong is a ``ValueError`` naming the problem."""
    try:
        # The standard parser on purpose: it reads NaN and Infinity, so the caller is
        # told which value is not finite instead of a bare syntax error.
        return json.loads(body)
    except UnicodeDecodeError as exc:
        raise ValueError(f"the body is not UTF-8: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError as exc:
        raise ValueError("the body is nested too deeply") from exc
    except ValueError as exc:  # e.g. an integer literal past Python's 4,300-digit conversion limit
        raise ValueError(f"the body holds a value that cannot be read: {exc}") from exc


async def read_json(request: Request, max_bytes: int, timeout_s: float = 60.0) -> object:
    check_content_type(request)
    body = await read_body(request, max_bytes, timeout_s)
    if not body.strip():
        raise ApiError(400, "invalid_json", "the body is empty; send a JSON object")
    try:
        return parse_json(body)
    except ValueError as exc:
        raise ApiError(400, "invalid_json", str(exc)) from exc
