"""``toposerve cache flush`` and ``toposerve items put``: operators' hands on the two caches.

The prediction cache (``{ns}:pred:*``) and the data cache's feature cache
(``{ns}:features:*``) expire by themselves; flush them after a change the keys cannot
see (items written to Redis by another producer, files changed in a data directory).
Writing an item with ``items put`` drops its cached tensors itself.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from toposerve.brokers import Settings, connect_redis, feature_key, flush_keys
from toposerve.deploy.cli.common import checked_profile, say
from toposerve.deploy.components import models_dir
from toposerve.models import (
    ImagePreprocessing,
    InputError,
    InputLimits,
    RedisSource,
    check_item_id,
    load_manifests,
    open_image,
)

# Single-flight locks and follower sets belong to requests in flight: never flushed.
IN_FLIGHT_SUFFIXES = (":lock", ":followers")


@click.group()
def cache() -> None:
    """The prediction cache and the feature cache: flush."""


@cache.command()
@click.option("--predictions/--no-predictions", default=True, show_default=True, help="Cached answers")
@click.option("--features/--no-features", default=True, show_default=True, help="Cached item tensors (data cache)")
@click.option("--model", default=None, help="Only this model's entries")
@click.option("--item", "item_id", default=None, help="Only this item's tensors (implies --no-predictions)")
def flush(predictions: bool, features: bool, model: str | None, item_id: str | None) -> None:
    """Delete cached answers and/or item tensors of the namespace (TOPOSERVE_NAMESPACE)."""
    settings = Settings()
    ns = settings.namespace
    wanted_model = model or "*"
    patterns: list[tuple[str, str]] = []
    if predictions and item_id is None:
        patterns.append(("predictions", f"{ns}:pred:{wanted_model}:*"))
    if features:
        patterns.append(("features", f"{ns}:features:{wanted_model}:*:{item_id or '*'}"))

    async def run() -> dict[str, int]:
        client = connect_redis(settings.redis_url, max_connections=2)
        try:
            return {what: await flush_keys(client, pattern, keep=IN_FLIGHT_SUFFIXES) for what, pattern in patterns}
        finally:
            await client.aclose()

    for what, count in asyncio.run(run()).items():
        say(f"{count} cached {what} deleted from {ns}")


@click.group()
def items() -> None:
    """Items of the data-cache pattern, kept in Redis: put."""


@items.command()
@click.argument("item_id")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--profile", "profile_name", default="data_cache", show_default=True,
              help="A profile whose preprocess stage reads items from Redis")
def put(item_id: str, path: Path, profile_name: str) -> None:
    """Store the image at PATH as item ITEM_ID, and drop its cached tensors."""
    settings = Settings()
    profile = checked_profile(profile_name, settings)
    if profile.item_ttl_s is None:
        raise click.ClickException(f"profile {profile.name!r} reads no items from Redis")
    raw = path.read_bytes()
    try:
        open_image(raw, InputLimits.of(settings))
        check_item_id(item_id)
    except InputError as exc:
        raise click.ClickException(exc.message) from exc
    manifests = load_manifests(models_dir(settings))
    cached = [feature_key(settings.namespace, name, manifests[name].version, item_id) for name in profile.models
              if isinstance(manifests[name].preprocessing, ImagePreprocessing)]

    async def run() -> None:
        client = connect_redis(settings.redis_url, max_connections=2)
        try:
            await RedisSource(client, settings.namespace).put(item_id, raw, profile.item_ttl_s, cached)
        finally:
            await client.aclose()

    asyncio.run(run())
    say(f"item {item_id} stored ({len(raw)} bytes, for {profile.item_ttl_s} s); {len(cached)} cached tensors dropped")
