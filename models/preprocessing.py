"""Pure input transforms: request rows and images -> float32 feature tensors.

One implementation, used by the ingress (to reject bad input with a 4xx before
anything is queued), by the preprocess stage (for messages from any publisher),
and by the edge runner. Every problem raises ``InputError`` with a message that
names what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from toposerve.brokers import FailureCode, Features, InferenceRequest, Settings
from toposerve.models.registry import ImagePreprocessing, ModelManifest
from toposerve.models.tensors import encode_tensor

ACCEPTED_IMAGE_FORMATS = frozenset({"PNG", "JPEG"})
_RESAMPLE = {
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
_DATA_URL_PREFIX = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


class InputError(ValueError):
    """The caller sent something we cannot serve; ``code`` is machine-readable."""

    def __init__(self, message: str, code: FailureCode = FailureCode.INVALID_INPUT) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class InputLimits:
    max_rows: int = 10_000
    max_image_bytes: int = 4 * 1024 * 1024
    max_image_pixels: int = 16_000_000

    @classmethod
    def of(cls, settings: Settings) -> InputLimits:
        """The limits a process runs with (``TOPOSERVE_MAX_*``): the same at the ingress and in the stages."""
        return cls(max_rows=settings.max_rows, max_image_bytes=settings.max_image_bytes,
                   max_image_pixels=settings.max_image_pixels)


def rows_to_features(instances: list[list[float]], manifest: ModelManifest, limits: InputLimits) -> np.ndarray:
    if manifest.preprocessing.kind != "tabular":
        raise InputError(f"model {manifest.name!r} takes an 'image', not 'instances'")
    if not instances:
        raise InputError("'instances' is empty: send at least one row")
    if len(instances) > limits.max_rows:
        raise InputError(
            f"'instances' has {len(instances)} rows, more than the limit of {limits.max_rows}", FailureCode.TOO_LARGE
        )
    expected = manifest.n_features
    for index, row in enumerate(instances):
        if len(row) != expected:
            raise InputError(
                f"instances[{index}] has {len(row)} values, model {manifest.name!r} expects {expected} "
                f"({', '.join(manifest.input.features)})"
            )
    array = np.asarray(instances, dtype=np.float64)
    finite = np.isfinite(array)
    if not finite.all():
        row, column = (int(i) for i in np.argwhere(~finite)[0])
        raise InputError(f"instances[{row}][{column}] is {array[row, column]}: every value must be a finite number")
    # Values beyond float32's range would become inf in the model.
    if np.abs(array).max() > np.finfo(np.float32).max:
        raise InputError("a value in 'instances' is too large for float32")
    return array.astype(np.float32)


def decode_base64_image(data: str, limits: InputLimits) -> bytes:
    """Standard or URL-safe base64, with or without a data: URL prefix or line breaks."""
    text = _WHITESPACE.sub("", _DATA_URL_PREFIX.sub("", data, count=1))
    if not text:
        raise InputError("'image' is empty: send a base64-encoded PNG or JPEG file")
    # Base64 is 4/3 of the raw size: refuse oversized payloads before decoding them.
    size = len(text) * 3 // 4 - len(text) + len(text.rstrip("="))
    if size > limits.max_image_bytes:
        raise InputError(
            f"'image' is about {size} bytes, more than the limit of {limits.max_image_bytes}",
            FailureCode.TOO_LARGE,
        )
    altchars = b"-_" if ("-" in text or "_" in text) else None
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"'image' is not valid base64: {exc}") from exc


def _open_header(raw: bytes, limits: InputLimits) -> Image.Image:
    """Parse the header only; refuse non-images, broken headers and too many pixels."""
    try:
        image = Image.open(io.BytesIO(raw), formats=sorted(ACCEPTED_IMAGE_FORMATS))
    except UnidentifiedImageError as exc:
        raise InputError("'image' is not a PNG or JPEG image") from exc
    except Image.DecompressionBombError as exc:
        raise InputError(f"'image' is too large to decode: {exc}", FailureCode.TOO_LARGE) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # cut inside its header
        raise InputError(f"'image' is truncated or corrupt: {exc}") from exc
    width, height = image.size
    # Checked from the header, before any pixel is decoded: a tiny file can declare
    # gigapixel dimensions (a decompression bomb).
    if width * height > limits.max_image_pixels:
        raise InputError(
            f"'image' is {width}x{height} = {width * height} pixels, more than the limit of {limits.max_image_pixels}",
            FailureCode.TOO_LARGE,
        )
    if width == 0 or height == 0:
        raise InputError("'image' has no pixels")
    return image


def open_image(raw: bytes, limits: InputLimits) -> Image.Image:
    """Open and fully decode an image, refusing non-images, truncation and decompression bombs."""
    image = _open_header(raw, limits)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise InputError(f"'image' is truncated or corrupt ({image.format}): {exc or type(exc).__name__}") from exc
    return image


def image_to_features(image: Image.Image, spec: ImagePreprocessing) -> np.ndarray:
    """Greyscale, resize to the model's size, scale to its training range: a [1, w*h] float32 row."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # Composite on black (the training images' background) so transparent pixels are not noise.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    grey = image.convert(spec.mode)
    if grey.size != (spec.width, spec.height):
        grey = grey.resize((spec.width, spec.height), _RESAMPLE[spec.resample])
    pixels = np.asarray(grey, dtype=np.float32)
    if spec.invert:
        pixels = 255.0 - pixels
    return (pixels * np.float32(spec.scale)).reshape(1, spec.width * spec.height)


def image_b64_to_features(data: str, manifest: ModelManifest, limits: InputLimits) -> np.ndarray:
    if not isinstance(manifest.preprocessing, ImagePreprocessing):
        raise InputError(f"model {manifest.name!r} takes 'instances' (rows of numbers), not an 'image'")
    return image_to_features(open_image(decode_base64_image(data, limits), limits), manifest.preprocessing)


def check_image_header(data: str, manifest: ModelManifest, limits: InputLimits) -> None:
    """The ingress's cheap check: base64, format, dimensions and file structure, no full decode."""
    if not isinstance(manifest.preprocessing, ImagePreprocessing):
        raise InputError(f"model {manifest.name!r} takes 'instances' (rows of numbers), not an 'image'")
    raw = decode_base64_image(data, limits)
    image = _open_header(raw, limits)
    if image.format == "JPEG":
        # JPEG has no checksums and verify() does nothing for it; a complete file ends
        # with the EOI marker. Without it, decode to be sure (rare: only broken files).
        if not raw.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
            open_image(raw, limits)
        return
    try:
        image.verify()  # PNG: walks every chunk and its CRC, so truncation is caught here
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"'image' is truncated or corrupt: {exc}") from exc


def check_features(array: np.ndarray, manifest: ModelManifest, max_rows: int) -> np.ndarray:
    """Validate a features tensor from the wire against the model's input; float32 [N, F]."""
    if array.ndim != 2 or array.shape[1] != manifest.n_features:
        raise InputError(
            f"features have shape {list(array.shape)}, model {manifest.name!r} expects [N, {manifest.n_features}]",
            FailureCode.INVALID_MESSAGE,
        )
    if array.shape[0] == 0:
        raise InputError("features have no rows", FailureCode.INVALID_MESSAGE)
    if array.shape[0] > max_rows:
        raise InputError(f"features have {array.shape[0]} rows, more than the limit of {max_rows}",
                         FailureCode.TOO_LARGE)
    features = array.astype(np.float32, copy=False)
    if not np.isfinite(features).all():
        raise InputError("features contain NaN or infinite values", FailureCode.INVALID_MESSAGE)
    return features


def derived_features(request: InferenceRequest, features: np.ndarray, timings: dict[str, float]) -> Features:
    """Pure: the ``Features`` message for ``request`` (same id, model, deadline, ...), with ``timings``.
    The preprocess stage publishes it; so does the ingress when it preprocesses rows itself."""
    message = Features(**request.carried(), tensor=encode_tensor(features))
    message.timings = timings
    return message
