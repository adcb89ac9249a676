"""How the ingresses learn that the live profile changes, and how a swap learns they are ready.

The lifecycle record (``{ns}:lifecycle``, deploy/lifecycle.py) is the truth: which profile
is live, and whether it is handing over. Two Redis channels carry the news, each a speed-up
or a count, never the truth itself:

- ``{ns}:lifecycle:changed``: a swap publishes after each write of the record; every ingress
  that follows the namespace is subscribed and re-reads the record (it also re-reads every
  second, in case a message was lost). ``PUBLISH`` answers how many processes received it,
  which is how many acknowledgements a handover waits for;
- ``{ns}:lifecycle:acks``: an ingress publishes a swap's id there once it holds new work and
  has none of the old profile's in flight.

A message on either channel only makes a reader look (anyone who may publish there can at
most make an ingress re-read the record, or a swap go on before an ingress held: that
caller then gets the old profile's answer, or a 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import redis.asyncio as redis

from toposerve.api import IngressConfig, LiveProfile
from toposerve.brokers import Settings, connect_redis
from toposerve.deploy.lifecycle import ProfileRecord

log = logging.getLogger(__name__)

# An ingress re-reads the record this often even when no announcement came.
REREAD_S = 1.0


def changed_channel(namespace: str) -> str:
    return f"{namespace}:lifecycle:changed"


def acks_channel(namespace: str) -> str:
    return f"{namespace}:lifecycle:acks"


def live_of(records: dict[str, ProfileRecord]) -> LiveProfile | None:
    """The live profile of a namespace's records (None: none is live)."""
    live = sorted((r for r in records.values() if r.state == "live"), key=lambda r: r.updated_at)
    if not live:
        return None
    # Replicas' races aside there is one; else the one handing over, else the latest claim.
    record = next((r for r in live if r.handing_over_to), live[-1])
    return LiveProfile(profile=record.profile, source=record.source or record.profile,
                       handing_over_to=record.handing_over_to, swap_id=record.swap_id,
                       all_live=[r.profile for r in live])


async def announce(client: redis.Redis, namespace: str) -> int:
    """Tell the following ingresses the record changed; how many processes heard it."""
    return int(await client.publish(changed_channel(namespace), "changed"))


class RedisLiveProfileSource:
    """What an ingress process follows (api/live_profile.py): the record, woken by announcements."""

    def __init__(self, settings: Settings, config_for: Callable[[LiveProfile], IngressConfig]) -> None:
        self.settings = settings
        self._config_for = config_for
        self.key = f"{settings.namespace}:lifecycle"
        self.client = connect_redis(settings.redis_url, max_connections=4)
        # Names this process in its acknowledgements: a handover counts processes, not messages.
        self.instance = uuid.uuid4().hex

    def config_for(self, live: LiveProfile) -> IngressConfig:
        return self._config_for(live)

    async def acknowledge(self, swap_id: str) -> None:
        await self.client.publish(acks_channel(self.settings.namespace), f"{swap_id} {self.instance}")

    async def _read(self) -> LiveProfile | None:
        raw = await self.client.hgetall(self.key)
        return live_of({(k.decode() if isinstance(k, bytes) else k): ProfileRecord.model_validate_json(v)
                        for k, v in raw.items()})

    async def changes(self) -> AsyncIterator[LiveProfile | None]:
        last: LiveProfile | None = None
        first = True
        backoff = 0.1
        try:
            while True:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                try:
                    await pubsub.subscribe(changed_channel(self.settings.namespace))
                    backoff = 0.1
                    while True:
                        live = await self._read()
                        # Every announcement is passed on (an ingress acknowledges each time it is asked).
                        if first or live != last or live is not None and live.handing_over_to:
                            first, last = False, live
                            yield live
                        deadline = time.monotonic() + REREAD_S
                        while time.monotonic() < deadline:
                            message = await pubsub.get_message(timeout=max(0.01, deadline - time.monotonic()))
                            if message is not None:
                                break
                        else:
                            continue
                except redis.RedisError as exc:
                    log.warning("following the live profile: Redis %s: %s; retrying", type(exc).__name__, exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                finally:
                    with contextlib.suppress(redis.RedisError):
                        await pubsub.aclose()
        finally:
            await self.client.aclose()


class AckCollector:
    """Subscribed before a handover is announced, so no acknowledgement is missed."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.client = client
        self.namespace = namespace
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)

    async def __aenter__(self) -> AckCollector:
        await self.pubsub.subscribe(acks_channel(self.namespace))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pubsub.aclose()

    async def wait(self, swap_id: str, expected: int, timeout_s: float) -> int:
        """Wait until ``expected`` processes acknowledged ``swap_id``; how many did."""
        seen: set[str] = set()
        deadline = time.monotonic() + timeout_s
        while len(seen) < expected and time.monotonic() < deadline:
            message = await self.pubsub.get_message(timeout=max(0.01, deadline - time.monotonic()))
            if message is None:
                continue
            data = message.get("data")
            acked, _, instance = (data.decode() if isinstance(data, bytes) else str(data)).partition(" ")
            if acked == swap_id:
                seen.add(instance)
        return len(seen)
