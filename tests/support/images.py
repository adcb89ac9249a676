"""Images for tests: the shipped digit samples, and broken ones made on the fly."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

from PIL import Image

SAMPLES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "samples" / "digits"


def sample_images() -> list[tuple[Path, str]]:
    """(path, true label) for each shipped sample; the label is the file name's second token."""
    return [(path, path.stem.split("_")[1]) for path in sorted(SAMPLES_DIR.iterdir())
            if path.suffix in (".png", ".jpg")]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_bytes(size: tuple[int, int] = (8, 8), mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    # A few rows of zeros; the header is what matters, the decoder must never get this far.
    pixels = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    return data[: int(len(data) * keep)]
