"""Batch inputs: CSV (with or without a header), JSONL, or a directory of images.

A source is scanned once before anything is published (row count, fingerprint,
refusal of an empty or unreadable input), then read chunk by chunk. Each chunk is
parsed and validated here with the same rules as the stages (``toposerve.models.preprocessing``):
a bad row is recorded as that row's error and never sent.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import BinaryIO

import numpy as np
import orjson

from toposerve.models import ImagePreprocessing, InputError, InputLimits, ModelManifest, image_to_features, open_image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_F32_MAX = float(np.finfo(np.float32).max)


class BatchInputError(ValueError):
    """The input as a whole cannot be served (unreadable, empty, wrong kind): nothing is published."""


@dataclass
class ParsedChunk:
    index: int
    start: int
    rows: int
    features: np.ndarray  # float32 [sent, n_features]: the good rows, in input order
    errors: dict[int, str] = field(default_factory=dict)  # offset in the chunk -> reason
    names: list[str] | None = None


class BatchSource:
    kind: str = ""

    def __init__(self, name: str, manifest: ModelManifest, limits: InputLimits) -> None:
        self.name = name
        self.manifest = manifest
        self.limits = limits
        self.total = 0
        self.fingerprint = ""

    def chunks(self, chunk_rows: int, skip: set[int] | frozenset[int] = frozenset()) -> Iterator[ParsedChunk]:
        raise NotImplementedError


# ---------------------------------------------------------------------------------- rows


def check_row_values(values: list[float], manifest: ModelManifest) -> str | None:
    """The reason a parsed row cannot be served, or None."""
    expected = manifest.n_features
    if len(values) != expected:
        return (f"has {len(values)} values, model {manifest.name!r} expects {expected} "
                f"({', '.join(manifest.input.features)})")
    for column, value in enumerate(values):
        if not math.isfinite(value):
            return f"value {value} in column {column} is not a finite number"
        if abs(value) > _F32_MAX:
            return f"value {value} in column {column} is too large for float32"
    return None


def _parse_csv_line(line: str, manifest: ModelManifest) -> tuple[list[float] | None, str | None]:
    fields = [f.strip().strip('"').strip() for f in line.split(",")]
    values = []
    for column, text in enumerate(fields):
        try:
            values.append(float(text))
        except ValueError:
            return None, f"value {text[:40]!r} in column {column} is not a number"
    reason = check_row_values(values, manifest)
    return (None, reason) if reason else (values, None)


def _finish_rows(good: list[list[float]], n_features: int) -> np.ndarray:
    if not good:
        return np.zeros((0, n_features), dtype=np.float32)
    return np.asarray(good, dtype=np.float64).astype(np.float32)


def _is_number(text: str) -> bool:
    try:
        float(text.strip().strip('"'))
    except ValueError:
        return False
    return True


def _column_key(name: str) -> str:
    """``Sepal Length (cm)``, ``sepal_length_cm`` and ``sepal_length`` name the same column."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    return key[:-2] if key.endswith("cm") else key


class _LineSource(BatchSource):
    """CSV and JSONL: one row per non-blank line; read twice (scan, then chunks)."""

    def __init__(self, name: str, opener: Callable[[], BinaryIO], manifest: ModelManifest,
                 limits: InputLimits) -> None:
        super().__init__(name, manifest, limits)
        self.opener = opener
        self.skip_first = False
        self._scan()

    def _lines(self) -> Iterator[str]:
        with self.opener() as handle:
            text = io.TextIOWrapper(handle, encoding="utf-8", errors="replace", newline=None)
            first = True
            for line in text:
                stripped = line.strip()
                if not stripped:
                    continue
                if first:
                    first = False
                    if self.skip_first:
                        continue
                yield stripped

    def _scan(self) -> None:
        digest = hashlib.sha256()
        try:
            with self.opener() as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except OSError as exc:
            raise BatchInputError(f"cannot read {self.name}: {exc.strerror or exc}") from exc
        self.fingerprint = digest.hexdigest()
        first: str | None = None
        count = 0
        try:
            for line in self._lines():
                if first is None:
                    first = line
                count += 1
        except (OSError, UnicodeError) as exc:
            raise BatchInputError(f"cannot read {self.name}: {exc}") from exc
        if first is None:
            raise BatchInputError(f"{self.name} is empty: it has no rows")
        self.skip_first = self._is_header(first)
        self.total = count - (1 if self.skip_first else 0)
        if self.total == 0:
            raise BatchInputError(f"{self.name} has a header but no rows")

    def _is_header(self, first: str) -> bool:
        return False

    def chunks(self, chunk_rows: int, skip: set[int] | frozenset[int] = frozenset()) -> Iterator[ParsedChunk]:
        lines = self._lines()
        index = 0
        while True:
            block = list(islice(lines, chunk_rows))
            if not block:
                return
            if index not in skip:
                yield self._parse(index, index * chunk_rows, block)
            index += 1


class CsvSource(_LineSource):
    kind = "csv"

    def _is_header(self, first: str) -> bool:
        # A header is a first line where no field is a number (a bad data row has some).
        fields = [f.strip().strip('"') for f in first.split(",")]
        if any(_is_number(f) for f in fields):
            return False
        names = [_column_key(f) for f in fields]
        features = [_column_key(f) for f in self.manifest.input.features]
        self.order = [names.index(f) for f in features] if sorted(names) == sorted(features) else None
        return True

    order: list[int] | None = None

    def _parse(self, index: int, start: int, block: list[str]) -> ParsedChunk:
        n_features = self.manifest.n_features
        try:
            array = np.loadtxt(block, delimiter=",", dtype=np.float64, ndmin=2, quotechar='"')
        except ValueError:
            array = None
        if array is not None and array.shape == (len(block), n_features):
            if self.order is not None:
                array = array[:, self.order]
            bad = ~np.isfinite(array).all(axis=1) | (np.abs(array) > _F32_MAX).any(axis=1)
            if not bad.any():
                return ParsedChunk(index, start, len(block), array.astype(np.float32))
        # Slow path: some row is wrong; find which and why.
        good: list[list[float]] = []
        errors: dict[int, str] = {}
        for offset, line in enumerate(block):
            values, reason = _parse_csv_line(line, self.manifest)
            if values is None:
                errors[offset] = f"row {start + offset}: {reason}"
            else:
                good.append([values[i] for i in self.order] if self.order is not None else values)
        return ParsedChunk(index, start, len(block), _finish_rows(good, n_features), errors)


class JsonlSource(_LineSource):
    kind = "jsonl"

    def _parse(self, index: int, start: int, block: list[str]) -> ParsedChunk:
        good: list[list[float]] = []
        errors: dict[int, str] = {}
        for offset, line in enumerate(block):
            reason = None
            try:
                data = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                data, reason = None, f"not valid JSON: {exc}"
            if reason is None:
                if isinstance(data, dict):
                    data = data.get("instances")
                    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], list):
                        data = data[0]
                if not isinstance(data, list) or any(isinstance(v, bool) or not isinstance(v, int | float)
                                                     for v in data):
                    reason = ("each line must be one row: a list of numbers or {\"instances\": [numbers]}")
                else:
                    reason = check_row_values([float(v) for v in data], self.manifest)
            if reason is None:
                good.append([float(v) for v in data])
            else:
                errors[offset] = f"row {start + offset}: {reason}"
        return ParsedChunk(index, start, len(block), _finish_rows(good, self.manifest.n_features), errors)


class ImageDirSource(BatchSource):
    kind = "images"

    def __init__(self, path: Path, manifest: ModelManifest, limits: InputLimits) -> None:
        super().__init__(str(path), manifest, limits)
        assert isinstance(manifest.preprocessing, ImagePreprocessing)
        self.spec = manifest.preprocessing
        try:
            entries = sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_file())
        except OSError as exc:
            raise BatchInputError(f"cannot read the directory {path}: {exc.strerror or exc}") from exc
        self.files = entries
        self.total = len(entries)
        if not entries:
            raise BatchInputError(f"the directory {path} has no image files")
        digest = hashlib.sha256()
        for entry in entries:
            try:
                size = entry.stat().st_size
            except OSError:
                size = -1
            digest.update(f"{entry.name}\0{size}\n".encode())
        self.fingerprint = digest.hexdigest()

    def _row(self, path: Path) -> np.ndarray:
        try:
            size = path.stat().st_size
            if size > self.limits.max_image_bytes:
                raise InputError(f"is {size} bytes, more than the limit of {self.limits.max_image_bytes}")
            raw = path.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot be read: {exc.strerror or exc}") from exc
        return image_to_features(open_image(raw, self.limits), self.spec)

    def chunks(self, chunk_rows: int, skip: set[int] | frozenset[int] = frozenset()) -> Iterator[ParsedChunk]:
        for index, start in enumerate(range(0, self.total, chunk_rows)):
            if index in skip:
                continue
            files = self.files[start:start + chunk_rows]
            good: list[np.ndarray] = []
            errors: dict[int, str] = {}
            for offset, path in enumerate(files):
                try:
                    good.append(self._row(path))
                except InputError as exc:
                    errors[offset] = f"{path.name}: {exc.message.replace(chr(39) + 'image' + chr(39), 'image')}"
            features = (np.concatenate(good).astype(np.float32) if good
                        else np.zeros((0, self.manifest.n_features), dtype=np.float32))
            yield ParsedChunk(index, start, len(files), features, errors, names=[p.name for p in files])


def open_source(path: Path, manifest: ModelManifest, limits: InputLimits) -> BatchSource:
    """Scan ``path`` for ``manifest``'s model; ``BatchInputError`` when it cannot be served at all."""
    image_model = isinstance(manifest.preprocessing, ImagePreprocessing)
    if path.is_dir():
        if not image_model:
            raise BatchInputError(f"model {manifest.name!r} takes rows of numbers (CSV or JSONL), not a directory "
                                  "of images")
        return ImageDirSource(path, manifest, limits)
    if image_model:
        raise BatchInputError(f"model {manifest.name!r} takes images: pass a directory of PNG/JPEG files")
    if not path.exists():
        raise BatchInputError(f"cannot read {path}: no such file")
    return bytes_source(str(path), lambda: path.open("rb"), manifest, limits, suffix=path.suffix.lower())


def bytes_source(name: str, opener: Callable[[], BinaryIO], manifest: ModelManifest, limits: InputLimits,
                 suffix: str = "", kind: str | None = None) -> BatchSource:
    """CSV or JSONL from a file or an upload: by ``kind``, else the suffix, else the first character."""
    if isinstance(manifest.preprocessing, ImagePreprocessing):
        raise BatchInputError(f"model {manifest.name!r} takes images: pass a directory of PNG/JPEG files")
    if kind is None:
        if suffix in (".jsonl", ".ndjson"):
            kind = "jsonl"
        elif suffix == ".csv":
            kind = "csv"
        else:
            try:
                with opener() as handle:
                    head = handle.read(4096).lstrip()
            except OSError as exc:
                raise BatchInputError(f"cannot read {name}: {exc.strerror or exc}") from exc
            kind = "jsonl" if head[:1] in (b"[", b"{") else "csv"
    cls = JsonlSource if kind == "jsonl" else CsvSource
    return cls(name, opener, manifest, limits)
