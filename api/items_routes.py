"""``PUT /v1/items/{item_id}``: write an item of the data-cache pattern, and forget its cached tensors.

Only in profiles whose preprocess stage reads items from Redis. The body is the image
file itself (PNG or JPEG, ``--data-binary @file``); it is checked like a request's image
(format, size, pixels) before anything is stored. The item's preprocessed tensors are
deleted in the same transaction, so the next request for it sees the new pixels.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response
from redis.exceptions import RedisError

from toposerve.api.body import read_body
from toposerve.api.errors import ApiError, error_responses
from toposerve.api.ingress import INPUT_STATUS, Ingress
from toposerve.api.openapi import BINARY_SCHEMA, LOCATION, request_body, success
from toposerve.api.responses import json_response
from toposerve.api.schemas import ItemWritten
from toposerve.brokers import feature_key
from toposerve.models import ImagePreprocessing, InputError, RedisSource, check_item_id, open_image

router = APIRouter(prefix="/v1", tags=["items"])


@router.put("/items/{item_id}", status_code=201, responses={
    201: success(ItemWritten, "Written; the item's cached tensors are gone", LOCATION),
    **error_responses({
        400: "invalid_item_id; invalid_body: a broken gzip/deflate body; client_disconnected",
        404: "items_not_served: this profile reads no items from Redis",
        408: "request_timeout: the body did not arrive in time (the connection is closed)",
        413: "body_too_large; too_large: more pixels than the limit",
        415: "unsupported_media_type: a Content-Encoding other than gzip and deflate",
        422: "invalid_input: not a PNG or JPEG file, truncated or corrupt",
        503: "store_unavailable",
    }),
}, openapi_extra=request_body(
    # The body is the file itself whatever its Content-Type says (curl --data-binary @file).
    {media: {"schema": BINARY_SCHEMA} for media in ("image/png", "image/jpeg", "application/octet-stream")},
    "The image file (PNG or JPEG), as the predict body's base64 'image' would hold it"))
async def put_item(item_id: str, request: Request) -> Response:
    ingress: Ingress = request.app.state.ingress
    ttl_s = ingress.config.item_ttl_s
    if ttl_s is None:
        raise ApiError(404, "items_not_served", f"profile {ingress.config.profile!r} reads no items from Redis; "
                                                "items are written in a data-cache profile (toposerve up "
                                                "--profile data_cache)")
    try:
        check_item_id(item_id)
    except InputError as exc:
        raise ApiError(400, "invalid_item_id", exc.message) from exc
    raw = await read_body(request, ingress.settings.max_image_bytes, ingress.settings.body_timeout_s)
    try:
        # The format, the size and the pixel count, before storing it (decoding is CPU work).
        await asyncio.to_thread(open_image, raw, ingress.limits)
    except InputError as exc:
        raise ApiError(INPUT_STATUS.get(exc.code, 422), str(exc.code), exc.message) from exc
    namespace = ingress.settings.namespace
    cached = [feature_key(namespace, m.name, m.version, item_id) for m in ingress.manifests.values()
              if isinstance(m.preprocessing, ImagePreprocessing)]
    try:
        await RedisSource(ingress.results.client, namespace).put(item_id, raw, ttl_s, cached)
    except RedisError as exc:
        raise ApiError(503, "store_unavailable", "the item store is unavailable; retry later",
                       {"Retry-After": "1"}) from exc
    return json_response({"item_id": item_id, "bytes": len(raw), "ttl_s": ttl_s}, 201,
                         headers={"Location": f"/v1/items/{item_id}"})
