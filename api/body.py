"""Reading request bodies: content type, size limit and JSON parsing, with clear errors."""

from __future__ import annotations

import json

from fastapi import Request

from toposerve.api.errors import ApiError

# curl -d sends application/x-www-form-urlencoded unless told otherwise; the README's
# one-line examples rely on it, so a JSON body under that type is accepted too.
_ACCEPTED_TYPES = ("application/json", "application/x-www-form-urlencoded", "text/json")


def check_content_type(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type and media_type not in _ACCEPTED_TYPES and not media_type.endswith("+json"):
        raise ApiError(415, "unsupported_media_type",
                       f"content type {media_type!r} is not supported; send JSON (application/json)")


async def read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, "body_too_large", f"body is {declared} bytes, more than the limit of {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:  # chunked uploads carry no length: count as we go
            raise ApiError(413, "body_too_large", f"body is more than the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, max_bytes: int) -> object:
    check_content_type(request)
    body = await read_body(request, max_bytes)
    if not body.strip():
        raise ApiError(400, "invalid_json", "the body is empty; send a JSON object")
    try:
        # The standard parser on purpose: it reads NaN and Infinity, so the caller is
        # told which value is not finite instead of a bare syntax error.
        return json.loads(body)
    except UnicodeDecodeError as exc:
        raise ApiError(400, "invalid_json", f"the body is not UTF-8: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc.msg} at line {exc.lineno} "
                                            f"column {exc.colno}") from exc
    except RecursionError as exc:
        raise ApiError(400, "invalid_json", "the body is nested too deeply") from exc
