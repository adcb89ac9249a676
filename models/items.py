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


def item_key(namespace: str, item_id: str) -> str:
    return f"{namespace}:items:{check_item_id(item_id)}"


class RedisSource:
    """Items stored as bytes under ``{namespace}:items:<item_id>``.

    Written with ``put``, which also drops the item's cached tensors, so a changed item is
    never answered from its old pixels (``PUT /v1/items/{id}``, ``toposerve items put``).
    A producer that writes the key itself must flush them (``toposerve cache flush``).
    """

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.name = "redis"
        self.client = client
        self.namespace = namespace

    async def load(self, item_id: str) -> bytes | None:
        return await self.client.get(item_key(self.namespace, item_id))

    async def put(self, item_id: str, data: bytes, ttl_s: int, cached: list[str]) -> None:
        """Store the item (with a TTL) and delete ``cached``, its tensors' keys, in one transaction."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(item_key(self.namespace, item_id), data, ex=ttl_s)
            if cached:
                pipe.delete(*cached)
            await pipe.execute()
