"""The edge client's model cache: pull with an ETag, verify the sha256, install atomically.

Layout, per model (the directory names come from the validated model name and
from verified sha256 digests only)::

    <root>/models/<model>/
        current.json            which version is in use (replaced atomically)
        versions/<sha256>/      one installed version: <model>.onnx + manifest.json
        .download-*, .stage-*   work in progress, never read

A download goes to a temporary file and is hashed while it streams; only when its
sha256 matches the server's header (and the manifest) is it installed in its own
version directory, loaded once with ONNX Runtime, and then made current by one
atomic rename of ``current.json``. Until that rename the previous version stays in
use, and it is kept afterwards too, as the rollback; older ones are removed.
A version directory holds a registry manifest, so ``toposerve.models.registry`` loads it
(checking the sha256 again) exactly as the server loads its models.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

import httpx
from pydantic import BaseModel, Field, ValidationError

from toposerve.brokers import SHA256_PATTERN, is_model_name, utc_now
from toposerve.models import Manifest, ModelLoadError, ModelManifest, ModelRegistry
from toposerve.producers.durable_files import fsync_dir, locked, replace_atomically

VERSION_HEADER = "x-model-version"
SHA256_HEADER = "x-model-sha256"
MAX_ARTIFACT_BYTES = 2 * 1024**3
STALE_DOWNLOAD_S = 3600
_SHA256 = re.compile(SHA256_PATTERN)


class EdgeError(RuntimeError):
    """Something the edge client cannot do, with a message for the person running it."""


class ArtifactRejected(EdgeError):
    """A download did not match its announced sha256; nothing was installed."""


class CachePointer(BaseModel):
    """``current.json``: the version in use, and the one before it."""

    model: str
    version: str
    sha256: str = Field(pattern=SHA256_PATTERN)
    etag: str
    server: str
    pulled_at: datetime
    previous_sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    previous_version: str | None = None


@dataclass(frozen=True)
class PullResult:
    model: str
    status: Literal["updated", "unchanged"]
    version: str
    sha256: str
    previous_version: str | None = None


def server_error(response: httpx.Response) -> str:
    """The API's ``{"error": {"code", "message"}}`` as one line, or the status line."""
    try:
        error = response.json()["error"]
        return f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code} {response.reason_phrase}".strip()


class ModelCache:
    def __init__(self, root: Path, model: str) -> None:
        if not is_model_name(model):
            raise EdgeError(f"{model!r} is not a model name (lower-case letters, digits and '_')")
        self.root = root
        self.model = model
        self.dir = root / "models" / model

    @property
    def pointer_path(self) -> Path:
        return self.dir / "current.json"

    @property
    def file_name(self) -> str:
        return f"{self.model}.onnx"

    def version_dir(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise EdgeError(f"{sha256!r} is not a sha256 digest")
        return self.dir / "versions" / sha256

    def current(self) -> CachePointer | None:
        try:
            raw = self.pointer_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return CachePointer.model_validate_json(raw)
        except ValidationError as exc:
            raise EdgeError(f"{self.pointer_path} is damaged ({exc.error_count()} problems); "
                            f"delete it and pull {self.model!r} again") from exc

    def registry(self, pointer: CachePointer, intra_op_threads: int = 1) -> ModelRegistry:
        return ModelRegistry(self.version_dir(pointer.sha256), intra_op_threads=intra_op_threads)

    # -- pulling ----------------------------------------------------------------------

    def _url(self, server: str, what: str) -> str:
        return f"{server.rstrip('/')}/v1/models/{self.model}/{what}"

    async def pull(self, client: httpx.AsyncClient, server: str, force: bool = False) -> PullResult:
        """Bring the cache to the server's version; raise ``EdgeError`` (the current version stays) if not."""
        current = self.current()
        installed = current is not None and (self.version_dir(current.sha256) / self.file_name).is_file()
        headers = {"If-None-Match": current.etag} if current is not None and installed and not force else {}
        self.dir.mkdir(parents=True, exist_ok=True)
        download = self.dir / f".download-{uuid.uuid4().hex}.onnx"
        try:
            try:
                async with client.stream("GET", self._url(server, "artifact"), headers=headers) as response:
                    if response.status_code == 304 and current is not None:
                        return PullResult(self.model, "unchanged", current.version, current.sha256)
                    if response.status_code != 200:
                        await response.aread()
                        raise EdgeError(f"the server refused model {self.model!r} ({server_error(response)})")
                    announced, etag, version = self._announced(response)
                    actual = await self._save(response, download)
                manifest = await self._fetch_manifest(client, server)
            except httpx.HTTPError as exc:
                raise EdgeError(f"cannot reach {server} ({type(exc).__name__}: {exc})") from exc
            kept = f"kept version {current.version}" if current else "nothing was installed"
            if actual != announced:
                raise ArtifactRejected(f"download of {self.model!r} rejected: its sha256 is {actual}, the server "
                                       f"announced {announced}; {kept}")
            if manifest.sha256 != announced or manifest.version != version:
                raise EdgeError(f"the server's manifest of {self.model!r} (version {manifest.version}) does not match "
                                f"the file it sent (version {version}); it is probably being updated, retry; {kept}")
            return self._install(download, manifest, etag, server, current)
        finally:
            download.unlink(missing_ok=True)

    def _announced(self, response: httpx.Response) -> tuple[str, str, str]:
        announced = response.headers.get(SHA256_HEADER, "").lower()
        if not _SHA256.fullmatch(announced):
            raise EdgeError(f"the server sent model {self.model!r} without a valid {SHA256_HEADER} header")
        etag = response.headers.get("etag", "")
        if etag.removeprefix("W/") != f'"{announced}"':
            raise EdgeError(f"the server's ETag {etag!r} does not name the sha256 {announced}")
        version = response.headers.get(VERSION_HEADER, "")
        if not version:
            raise EdgeError(f"the server sent model {self.model!r} without a {VERSION_HEADER} header")
        return announced, etag, version

    @staticmethod
    async def _save(response: httpx.Response, path: Path) -> str:
        """Stream the body to ``path`` (fsync'd), hashing as it goes; the hex sha256."""
        digest = hashlib.sha256()
        size = 0
        with path.open("wb") as handle:
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_ARTIFACT_BYTES:
                    raise EdgeError(f"the artifact is larger than {MAX_ARTIFACT_BYTES} bytes; refused")
                digest.update(chunk)
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        return digest.hexdigest()

    async def _fetch_manifest(self, client: httpx.AsyncClient, server: str) -> ModelManifest:
        response = await client.get(self._url(server, "manifest"))
        if response.status_code != 200:
            raise EdgeError(f"the server refused the manifest of {self.model!r} ({server_error(response)})")
        try:
            manifest = ModelManifest.model_validate_json(response.content)
        except ValidationError as exc:
            raise EdgeError(f"the server's manifest of {self.model!r} is not valid: {exc}") from exc
        if manifest.name != self.model:
            raise EdgeError(f"asked for the manifest of {self.model!r}, got one of {manifest.name!r}")
        return manifest

    # -- installing (under the cache's lock: `edge run` and `edge pull` may race) -----

    def _install(self, download: Path, manifest: ModelManifest, etag: str, server: str,
                 seen: CachePointer | None) -> PullResult:
        with locked(self.dir / ".lock"):
            current = self.current()
            target = self.version_dir(manifest.sha256)
            if not self._loads(target):
                self._stage(download, manifest, target)
            previous = current if current is not None and current.sha256 != manifest.sha256 else None
            pointer = CachePointer(
                model=self.model, version=manifest.version, sha256=manifest.sha256, etag=etag, server=server,
                pulled_at=utc_now(),
                previous_sha256=previous.sha256 if previous else (current.previous_sha256 if current else None),
                previous_version=previous.version if previous else (current.previous_version if current else None),
            )
            replace_atomically(self.pointer_path, pointer.model_dump_json(indent=1).encode())
            self._prune(keep={pointer.sha256, pointer.previous_sha256})
        changed = seen is None or seen.sha256 != manifest.sha256
        return PullResult(self.model, "updated" if changed else "unchanged", manifest.version, manifest.sha256,
                          previous_version=seen.version if seen is not None and changed else None)

    def _loads(self, directory: Path) -> bool:
        if not directory.is_dir():
            return False
        try:
            ModelRegistry(directory).load(self.model)
        except (ModelLoadError, ValidationError, OSError, RuntimeError):
            return False
        return True

    def _stage(self, download: Path, manifest: ModelManifest, target: Path) -> None:
        """Build the version directory beside its final place, prove it loads, then rename it in."""
        stage = self.dir / f".stage-{uuid.uuid4().hex}"
        stage.mkdir()
        try:
            download.replace(stage / self.file_name)
            local = manifest.model_copy(update={"file": self.file_name})
            replace_atomically(stage / "manifest.json",
                               Manifest(models={self.model: local}).model_dump_json(indent=1).encode())
            try:
                ModelRegistry(stage).load(self.model)  # the sha256 again, and ONNX Runtime can run it
            except (ModelLoadError, RuntimeError) as exc:
                raise EdgeError(f"model {self.model!r} version {manifest.version} does not load here: {exc}") from exc
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():  # a damaged earlier install of the same version
                shutil.rmtree(target)
            stage.replace(target)
            fsync_dir(target.parent)
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)

    def _prune(self, keep: set[str | None]) -> None:
        versions = self.dir / "versions"
        for directory in versions.iterdir() if versions.is_dir() else ():
            if directory.name not in keep:
                shutil.rmtree(directory, ignore_errors=True)
        for leftover in self.dir.glob(".stage-*"):  # from a crash mid-install (staging holds the lock)
            shutil.rmtree(leftover, ignore_errors=True)
        # Downloads run outside the lock: only remove ones too old to be in progress.
        for leftover in self.dir.glob(".download-*"):
            with contextlib.suppress(OSError):
                if time.time() - leftover.stat().st_mtime > STALE_DOWNLOAD_S:
                    leftover.unlink()
