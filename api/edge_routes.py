"""Edge AI routes: model artifacts for edge clients, and what those clients report back.

- ``GET|HEAD /v1/models/{model}/artifact``: the ONNX file, with ``X-Model-Version``,
  ``X-Model-Sha256``, a strong ``ETag`` (the sha256) and ``Repr-Digest``;
  ``If-None-Match`` with the current ETag answers 304, so polling clients cost a
  header exchange. The file is hashed before it is served (cached per file
  identity): a file that does not match its manifest is never handed out.
- ``GET /v1/models/{model}/manifest``: the model's manifest entry (input, outputs,
  labels, preprocessing), which the client needs to run the file.
- ``GET /v1/models/{model}/telemetry``: the aggregate of the clients' reports.

They answer in profiles with a stage that consumes ``telemetry.<model>`` (edge_ai);
elsewhere 404 ``edge_disabled`` says so. Read from the profile's queues, so there is
no flag to keep in step with the topology.
"""

from __future__ import annotations

import asyncio
import base64
import os
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from redis.exceptions import RedisError

from toposerve.api.errors import ApiError, error_responses
from toposerve.api.ingress import Ingress
from toposerve.api.openapi import BINARY_SCHEMA, header_parameter, success
from toposerve.api.responses import json_response
from toposerve.brokers import TelemetryStore, TelemetrySummary, any_binding_matches, routing_key
from toposerve.models import ModelManifest, file_sha256

router = APIRouter(prefix="/v1")

VERSION_HEADER = "X-Model-Version"
SHA256_HEADER = "X-Model-Sha256"


def strong_etag(sha256: str) -> str:
    return f'"{sha256}"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Pure: does an ``If-None-Match`` header match ``etag``? (RFC 9110: weak comparison, ``*`` matches.)"""
    if not if_none_match:
        return False
    for candidate in if_none_match.split(","):
        tag = candidate.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


def _ingress(request: Request) -> Ingress:
    return request.app.state.ingress


def serves_edge(ingress: Ingress, model: str) -> bool:
    keys = [key for queue in ingress.config.queues for key in queue.binding_keys]
    return any_binding_matches(keys, routing_key("telemetry", model))


def edge_manifest(request: Request, model: str) -> tuple[Ingress, ModelManifest]:
    ingress = _ingress(request)
    manifest = ingress.manifest(model)  # 404 unknown_model
    if not serves_edge(ingress, model):
        raise ApiError(404, "edge_disabled",
                       f"profile {ingress.config.profile!r} does not distribute models to edge clients "
                       f"(no stage consumes telemetry.{model}); start the edge_ai profile")
    return ingress, manifest


@dataclass(frozen=True)
class _FileIdentity:
    path: Path
    inode: int
    size: int
    mtime_ns: int


class ArtifactHashes:
    """sha256 of model files, recomputed only when a file's identity (inode, size, mtime) changes."""

    def __init__(self) -> None:
        self._known: dict[Path, tuple[_FileIdentity, str]] = {}

    async def sha256(self, path: Path) -> str:
        stat = await asyncio.to_thread(os.stat, path)
        identity = _FileIdentity(path, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        known = self._known.get(path)
        if known is not None and known[0] == identity:
            return known[1]
        digest = await asyncio.to_thread(file_sha256, path)
        self._known[path] = (identity, digest)
        return digest


def _hashes(request: Request) -> ArtifactHashes:
    hashes = getattr(request.app.state, "artifact_hashes", None)
    if hashes is None:
        hashes = request.app.state.artifact_hashes = ArtifactHashes()
    return hashes


def _model_headers(manifest: ModelManifest) -> dict[str, str]:
    return {
        "ETag": strong_etag(manifest.sha256),
        VERSION_HEADER: manifest.version,
        SHA256_HEADER: manifest.sha256,
        # Clients may keep the file but must ask again (cheaply, with If-None-Match) before trusting it.
        "Cache-Control": "no-cache",
    }


_HEADER_TEXT = {
    "ETag": "The file's sha256, quoted (a strong ETag)",
    VERSION_HEADER: "The model's version",
    SHA256_HEADER: "The file's sha256 (hex)",
    "Cache-Control": "no-cache: keep the file, but ask again (If-None-Match) before trusting it",
    "Repr-Digest": "sha-256 of the file (RFC 9530)",
}


def _header_docs(*names: str) -> dict[str, dict]:
    """The document's description of the headers an answer carries."""
    return {name: {"schema": {"type": "string"}, "description": _HEADER_TEXT[name]} for name in names}

_MODEL_HEADERS = ("ETag", VERSION_HEADER, SHA256_HEADER, "Cache-Control")
_EDGE_ERRORS = {404: "unknown_model; edge_disabled: no stage of this profile consumes the model's telemetry"}
_ARTIFACT_ERRORS = error_responses({
    **_EDGE_ERRORS, 500: "artifact_unavailable: the file cannot be read; artifact_mismatch: the file does not "
                         "match its manifest's sha256, and is not served"})
_IF_NONE_MATCH = header_parameter("If-None-Match", "The ETag of the file the client has: 304 if it is current")


def _artifact_responses(body: dict | None) -> dict[int | str, dict]:
    ok: dict = {"description": "The model's ONNX file", "headers": _header_docs(*_MODEL_HEADERS, "Repr-Digest")}
    if body is not None:
        ok["content"] = body
    return {200: ok, 304: {"description": "Not modified: If-None-Match names the current file",
                           "headers": _header_docs(*_MODEL_HEADERS)}, **_ARTIFACT_ERRORS}


# GET and HEAD are two routes, so the document has an operation id for each.
@router.get("/models/{model}/artifact", response_class=FileResponse,
            responses=_artifact_responses({"application/octet-stream": {"schema": BINARY_SCHEMA}}),
            openapi_extra={"parameters": [_IF_NONE_MATCH]})
async def artifact(model: str, request: Request) -> Response:
    return await _artifact(model, request)


@router.head("/models/{model}/artifact", response_class=Response, responses=_artifact_responses(None),
             openapi_extra={"parameters": [_IF_NONE_MATCH]})
async def artifact_head(model: str, request: Request) -> Response:
    """The artifact's headers (version, sha256, ETag) without the file."""
    return await _artifact(model, request)


async def _artifact(model: str, request: Request) -> Response:
    ingress, manifest = edge_manifest(request, model)
    path = ingress.config.models_dir / manifest.file  # names from the manifest only, never from the request
    headers = _model_headers(manifest)
    if etag_matches(request.headers.get("if-none-match"), headers["ETag"]):
        return Response(status_code=304, headers=headers)
    try:
        actual = await _hashes(request).sha256(path)
    except OSError as exc:
        raise ApiError(500, "artifact_unavailable", f"the file of model {model!r} cannot be read") from exc
    if actual != manifest.sha256:
        raise ApiError(500, "artifact_mismatch",
                       f"the file of model {model!r} does not match its manifest's sha256; it is not served")
    headers["Repr-Digest"] = f"sha-256=:{base64.b64encode(bytes.fromhex(actual)).decode()}:"
    return FileResponse(path, media_type="application/octet-stream", headers=headers,
                        filename=f"{manifest.name}-{manifest.version}.onnx")


@router.get("/models/{model}/manifest", responses={
    200: success(ModelManifest, "The model's manifest entry", _header_docs(*_MODEL_HEADERS)),
    **error_responses(_EDGE_ERRORS)})
async def manifest(model: str, request: Request) -> Response:
    _, found = edge_manifest(request, model)
    return json_response(found.model_dump(mode="json"), headers=_model_headers(found))


@router.get("/models/{model}/telemetry", responses={
    200: success(TelemetrySummary, "The aggregate of the edge clients' reports"),
    **error_responses({**_EDGE_ERRORS, 503: "store_unavailable"})})
async def telemetry(model: str, request: Request) -> Response:
    ingress, _ = edge_manifest(request, model)
    store = TelemetryStore(ingress.results.client, ingress.settings.namespace)
    try:
        summary = await store.summary(model)
    except RedisError as exc:
        raise ApiError(503, "store_unavailable", "the telemetry store is unavailable; retry later",
                       {"Retry-After": "1"}) from exc
    return Response(summary.model_dump_json(), media_type="application/json")
