"""The batch pattern over HTTP: ``POST /v1/batches``, ``GET /v1/batches`` (a page of them with their
progress), ``GET /v1/batches/{id}``, ``GET /v1/batches/{id}/results``, ``POST /v1/batches/{id}/cancel``.

Listing shows a key its own batches, and an operator key (or anyone, authentication off) every
batch. Cancelling is for the batch's owner or an operator key: the batch is ``cancelled`` at once,
and the predict stage skips its chunks still queued (each one is stored as a ``cancelled`` failure).

A POSTed file (raw CSV/JSONL body with ``?model=``, or multipart with a ``file``
part) goes through the same submitter as ``toposerve batch submit``: it is spooled to
a temporary file, scanned (an empty or unreadable file, or an unknown model, is a
4xx with nothing published), recorded, and published in chunks with confirms before
the 202 answer. Batch keys live the profile's ``ingress.result_ttl_s``.

``submit_router(config)`` adds ``POST /v1/batches`` per app: an admitted route, whose
answers include the profile's overload fallback when it has one.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import os
import tempfile
import uuid
from pathlib import Path

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse
from redis.exceptions import RedisError

from toposerve.api.admission import ADMITTED
from toposerve.api.auth import current_owner, may_read
from toposerve.api.config import IngressConfig
from toposerve.api.errors import ApiError, error_responses
from toposerve.api.ingress import Ingress
from toposerve.api.openapi import (
    ADMISSION_ERRORS,
    BINARY_SCHEMA,
    LOCATION,
    codes,
    header_parameter,
    request_body,
    success,
    with_fallback,
)
from toposerve.api.operator_routes import may_operate
from toposerve.api.responses import json_response
from toposerve.api.schemas import BatchAccepted
from toposerve.brokers import (
    ALREADY_CANCELLED,
    ALREADY_FINISHED,
    NO_BATCH,
    BatchManifest,
    BatchPage,
    BatchStatus,
    BatchStore,
    PublishRefused,
    iter_results,
)
from toposerve.brokers.callbacks import CallbackSpec
from toposerve.models import load_manifests
from toposerve.producers import DEFAULT_CHUNK_ROWS, BatchInputError, BatchSubmitter, bytes_source

router = APIRouter(prefix="/v1")

MAX_UPLOAD_BYTES = 1 << 30  # 1 GiB spooled to a temporary file
MAX_MULTIPART_BYTES = 256 << 20
_KINDS = {"text/csv": "csv", "application/csv": "csv", "application/x-ndjson": "jsonl",
          "application/jsonl": "jsonl", "application/x-jsonlines": "jsonl", "application/jsonlines": "jsonl"}


def _ingress(request: Request) -> Ingress:
    return request.app.state.ingress


def _store(ingress: Ingress) -> BatchStore:
    return BatchStore(ingress.results.client, ingress.settings.namespace, ingress.config.spec.result_ttl_s)


def _batch_id(batch_id: str) -> str:
    try:
        return str(uuid.UUID(batch_id))
    except ValueError:
        raise ApiError(404, "unknown_batch", f"no batch {batch_id!r}: batch ids are UUIDs") from None


def _unavailable(exc: Exception) -> ApiError:
    return ApiError(503, "store_unavailable", f"the result store is unavailable; retry later ({exc})",
                    {"Retry-After": "1"})


async def _readable_manifest(ingress: Ingress, batch_id: str) -> BatchManifest:
    """The batch's manifest; 404 when it does not exist, or (the same answer) when another API key created it."""
    manifest = await _store(ingress).manifest(batch_id)
    if manifest is None or not may_read(manifest.owner):
        raise ApiError(404, "unknown_batch", f"no batch {batch_id}: it never existed or it expired")
    return manifest


async def _spool(request: Request, handle, limit: int, idle_s: float) -> int:
    """Copy the upload to ``handle``; an upload may be long, but not silent for ``idle_s`` (408)."""
    size = 0
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(loop.time() + idle_s) as deadline:
            async for block in request.stream():
                deadline.reschedule(loop.time() + idle_s)
                size += len(block)
                if size > limit:
                    raise ApiError(413, "body_too_large", f"the upload is more than the limit of {limit} bytes")
                await asyncio.to_thread(handle.write, block)
    except TimeoutError:
        raise ApiError(408, "request_timeout", f"the upload sent nothing for {idle_s:g} s",
                       {"Connection": "close"}) from None
    return size


def _multipart_file(raw: bytes, content_type: str) -> tuple[bytes, str, dict[str, str]]:
    """The ``file`` part (or the first part with a file name) and the form's text fields."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    if not message.is_multipart():
        raise ApiError(422, "invalid_request", "the multipart body could not be parsed")
    found: tuple[bytes, str] | None = None
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        filename = part.get_filename()
        payload = part.get_payload(decode=True) or b""
        if filename is not None or name == "file":
            if found is None or name == "file":
                found = (payload, Path(filename or "").suffix.lower())
        elif name:
            fields[str(name)] = payload.decode(errors="replace").strip()
    if found is None:
        raise ApiError(422, "invalid_request", "the multipart body has no file part (send it as 'file')")
    return found[0], found[1], fields


def _callback(ingress: Ingress, request: Request) -> CallbackSpec | None:
    """A batch's webhook, from headers (the body is the file): called with the status once it completes."""
    url, secret = request.headers.get("x-callback-url"), request.headers.get("x-callback-secret")
    if url is None and secret is None:
        return None
    return ingress.check_callback({"url": url, "secret": secret})


async def create_batch(
    request: Request,
    model: str | None = Query(None, description="Model to run every row through"),
    chunk_rows: int = Query(DEFAULT_CHUNK_ROWS, ge=1, le=1_000_000),
) -> Response:
    """Accept a CSV/JSONL file for bulk inference: 202 with the batch id once every chunk is published."""
    ingress = _ingress(request)
    callback = _callback(ingress, request)
    if not ingress.config.batches:
        # Refused before the upload is read: nothing would ever process its chunks here.
        runs = ", ".join(ingress.config.batch_profiles) or "one with a batch_store stage"
        raise ApiError(404, "batches_not_served",
                       f"profile {ingress.config.profile!r} has no batch stage, so it takes no batches; "
                       f"the profile that runs them: {runs} (toposerve up --profile {runs.split(', ')[0]})")
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    descriptor, path = tempfile.mkstemp(prefix="toposerve-batch-", suffix=".upload")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            if media_type == "multipart/form-data":
                buffer = bytearray()

                class _Sink:
                    @staticmethod
                    def write(block: bytes) -> None:
                        buffer.extend(block)

                await _spool(request, _Sink, MAX_MULTIPART_BYTES, ingress.settings.body_timeout_s)
                data, suffix, fields = _multipart_file(bytes(buffer), content_type)
                model = model or fields.get("model")
                handle.write(data)
                kind = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(suffix)
            else:
                await _spool(request, handle, MAX_UPLOAD_BYTES, ingress.settings.body_timeout_s)
                kind = _KINDS.get(media_type)
        if not model:
            raise ApiError(422, "invalid_request", "name the model: ?model=iris")
        manifest = ingress.manifest(model)  # 404 for an unknown model
        try:
            source = await asyncio.to_thread(bytes_source, "upload", lambda: open(path, "rb"), manifest,
                                             ingress.limits, "", kind)
        except BatchInputError as exc:
            raise ApiError(422, "invalid_input", str(exc)) from exc
        submitter = BatchSubmitter(ingress.settings, ingress.manifests, ingress.config.queues,
                                   ingress.config.spec.result_ttl_s, publisher=ingress.publisher,
                                   redis_client=ingress.results.client)
        try:
            # The owner is in the manifest from the start: no one else can read the batch, ever.
            result = await submitter.submit(source, chunk_rows=chunk_rows, owner=current_owner(),
                                            before_publish=None if callback is None else (
                                                lambda manifest: ingress.register_callback(manifest.id, callback)))
        except PublishRefused as exc:
            raise ApiError(503, "broker_unavailable", f"could not publish the batch: {exc}",
                           {"Retry-After": "1"}) from exc
        except RedisError as exc:
            raise _unavailable(exc) from exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    location = f"/v1/batches/{result.batch_id}"
    body = {"id": result.batch_id, "model": model, "total": result.total, "chunks": result.chunks,
            "bad_rows": result.bad_rows, "state": "running", "location": location,
            "results": f"{location}/results"}
    return json_response(body, 202, headers={"Location": location})


_UNKNOWN_BATCH = {404: "unknown_batch: not a batch id, expired, or created with another API key",
                  503: "store_unavailable"}


@router.get("/batches/{batch_id}", responses={200: success(BatchStatus, "The batch's progress"),
                                              **error_responses(_UNKNOWN_BATCH)})
async def get_batch(batch_id: str, request: Request) -> Response:
    """Progress: total, done, failed, rate (rows/s), state running/succeeded/failed/partial."""
    ingress = _ingress(request)
    try:
        await _readable_manifest(ingress, _batch_id(batch_id))
        status = await _store(ingress).status(_batch_id(batch_id))
    except RedisError as exc:
        raise _unavailable(exc) from exc
    if status is None:
        raise ApiError(404, "unknown_batch", f"no batch {batch_id}: it never existed or it expired")
    return Response(status.model_dump_json(), media_type="application/json")


@router.get("/batches", responses={200: success(BatchPage, "The newest batches this caller may see, with progress"),
                                   **error_responses({422: "invalid_request: offset or limit out of range",
                                                      503: "store_unavailable"})})
async def list_batches(request: Request, offset: int = Query(0, ge=0, le=100_000),
                       limit: int = Query(50, ge=1, le=200)) -> Response:
    """A page of batches, newest first: this key's own, or every batch for an operator key."""
    ingress = _ingress(request)
    owner = None if may_operate(request) else current_owner()
    try:
        page = await _store(ingress).page(owner, offset, limit)
    except RedisError as exc:
        raise _unavailable(exc) from exc
    return Response(page.model_dump_json(), media_type="application/json")


@router.post("/batches/{batch_id}/cancel", responses={
    200: success(BatchStatus, "Cancelled: its chunks still queued are skipped"),
    **error_responses({403: "forbidden: neither the key that created the batch nor an operator key",
                       404: "unknown_batch: not a batch id, or expired",
                       409: "batch_finished: it already ended (the message names its state), or was cancelled",
                       503: "store_unavailable"}),
})
async def cancel_batch(batch_id: str, request: Request) -> Response:
    """Cancel a running batch (its owner, or an operator key): it ends ``cancelled``, with what was done kept."""
    ingress = _ingress(request)
    store = _store(ingress)
    batch_id = _batch_id(batch_id)
    try:
        manifest = await store.manifest(batch_id)
        if manifest is None:
            raise ApiError(404, "unknown_batch", f"no batch {batch_id}: it never existed or it expired")
        caller = current_owner()
        if not (may_operate(request) or caller == manifest.owner):
            raise ApiError(403, "forbidden", f"batch {batch_id} may be cancelled only by the key that created it "
                                             "or an operator key (its id in TOPOSERVE_OPERATOR_KEY_IDS)")
        found = await store.cancel(batch_id)
        status = await store.status(batch_id)
    except RedisError as exc:
        raise _unavailable(exc) from exc
    if found == NO_BATCH or status is None:
        raise ApiError(404, "unknown_batch", f"no batch {batch_id}: it expired")
    if found == ALREADY_CANCELLED:
        raise ApiError(409, "batch_finished", f"batch {batch_id} is already cancelled")
    if found == ALREADY_FINISHED:
        raise ApiError(409, "batch_finished", f"batch {batch_id} already finished with state {status.state!r} "
                                              f"({status.done} of {status.total} rows predicted)")
    return Response(status.model_dump_json(), media_type="application/json")


@router.get("/batches/{batch_id}/results", response_class=StreamingResponse, responses={
    200: {"description": "One JSON object per line and input row, in input order: row, status (succeeded, failed, "
                         "pending), then label, class_index, probabilities, model_version, or error",
          "content": {"application/x-ndjson": {"schema": {"type": "string"}}}},
    **error_responses(_UNKNOWN_BATCH),
})
async def get_batch_results(batch_id: str, request: Request) -> StreamingResponse:
    """JSONL, streamed: one line per input row in input order (prediction, error, or pending)."""
    ingress = _ingress(request)
    store = _store(ingress)
    try:
        manifest = await _readable_manifest(ingress, _batch_id(batch_id))
    except RedisError as exc:
        raise _unavailable(exc) from exc
    known = ingress.manifests.get(manifest.model) or load_manifests(ingress.config.models_dir).get(manifest.model)
    labels = known.labels if known is not None else []
    return StreamingResponse(iter_results(store, manifest, labels), media_type="application/x-ndjson")


_CSV_OR_JSONL = {"schema": {"type": "string"}}
_SUBMIT_RESPONSES: dict[int | str, dict] = {
    202: success(BatchAccepted, "Recorded, and every chunk published: follow Location", LOCATION),
    **error_responses(codes(ADMISSION_ERRORS, {
        404: "batches_not_served: this profile has no batch stage; unknown_model",
        408: "request_timeout: the upload sent nothing for too long (the connection is closed)",
        413: "body_too_large",
        422: "invalid_request: no model named, chunk_rows out of range, a multipart body without a file part; "
             "invalid_callback: X-Callback-Url or X-Callback-Secret refused (the message says why); "
             "invalid_input: an empty or unreadable file, or a model that takes images",
        503: "broker_unavailable; store_unavailable",
    })),
}
_UPLOAD = request_body({
    "text/csv": _CSV_OR_JSONL,
    "application/x-ndjson": _CSV_OR_JSONL,
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {**BINARY_SCHEMA, "description": "The CSV or JSONL file (its name's suffix says which)"},
        "model": {"type": "string", "description": "The model, when ?model= is not given"},
    }}},
}, "The rows: CSV (a header row, then one row of numbers per line) or JSON lines, as the body or as a multipart "
   "'file' part. Other content types are read as JSON lines when they start with '[' or '{', else as CSV.",
   [header_parameter("X-Callback-Url", "A webhook called with the batch's status once it completes (see README, "
                     "Webhooks); its host must be allowed"),
    header_parameter("X-Callback-Secret", "The key of the webhook's HMAC-SHA256 signature (16 to 256 characters)")])


def submit_router(config: IngressConfig) -> APIRouter:
    """``POST /v1/batches``, documented for ``config``'s profile."""
    submit = APIRouter(prefix="/v1")
    # status_code only names the main answer in the document: the route returns its Response itself.
    submit.post("/batches", status_code=202, dependencies=ADMITTED, responses=with_fallback(config, _SUBMIT_RESPONSES),
                openapi_extra=_UPLOAD)(create_batch)
    return submit
