"""Items for the data-cache pattern: validated ids, and the sources that hold the raw data.

An item id is checked before anything else touches it: nothing built from a
request becomes a path unless it is a plain name, and the resolved path must still
lie inside the source's directory.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Protocol

import redis.asyncio as redis

from toposerve.brokers import FailureCode
from toposerve.models.preprocessing import InputError

# Letters, digits, '.', '_' and '-'; starts with a letter or digit; no '..' anywhere.
_ITEM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def check_item_id(item_id: str) -> str:
    """Return the id if it is a plain name; raise ``InputError`` (400) otherwise."""
    if not _ITEM_ID.fullmatch(item_id) or ".." in item_id:
        shown = item_id.encode("unicode_escape").decode()[:80]
        raise InputError(
            f"item_id {shown!r} is not valid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..' (no paths)",
            FailureCode.INVALID_INPUT,
        )
    return item_id


class ItemSource(Protocol):
    name: str

    async def load(self, item_id: str) -> bytes | None:
        """The item's raw bytes, or None when this source does not have it."""


class DirectorySource:
    """Files named ``<item_id><suffix>`` directly inside one directory."""

    def __init__(self, directory: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES, name: str | None = None) -> None:
        # The name shows in error messages: the configured path, not the server's layout.
        self.name = name or f"directory {directory.name}"
        self.directory = directory.resolve()
        self.suffixes = suffixes

    async def load(self, item_id: str) -> bytes | None:
        check_item_id(item_id)
        for suffix in self.suffixes:
            path = (self.directory / f"{item_id}{suffix}").resolve()
            # Defence in depth: the id check already rules out traversal.
            if path.parent != self.directory:
                return None
            if path.is_file():
                return await asyncio.to_thread(path.read_bytes)
        return None


class RedisSource:
    """Items stored as bytes under ``{namespace}:items:<item_id>`` (put there by any producer)."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.name = "redis"
        self.client = client
        self.prefix = f"{namespace}:items:"

    async def load(self, item_id: str) -> bytes | None:
        check_item_id(item_id)
        return await self.client.get(self.prefix + item_id)
