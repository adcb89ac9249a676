"""Which profile is live in a namespace, and taking one down: the topology's lifecycle (DESIGN.md, "Lifecycle").

Every profile's queues (``{ns}.{profile}.{stage}``) bind to the one exchange of the
namespace, so the durable queues of a profile that stopped would keep collecting a copy
of every later message. A namespace therefore has at most one bound ("live") profile:

- ``claim`` (``toposerve up``): refuses while another profile is live, unless
  ``replace``, which unbinds the other's queues (their messages stay; the queues stay);
- ``check`` (``toposerve worker`` / ``ingress``): the same refusal, read-only;
- ``take_down`` (``toposerve down``): stop new work, drain, delete the queues and the
  Redis keys only they used;
- ``status`` (``toposerve status``): the profiles with queues here, their depths and consumers.

AMQP 0-9-1 cannot list queues or bindings, and the management API is not always there
(the throwaway brokers run without it), so what is bound is recorded in Redis
(``{ns}:lifecycle``, a hash: profile -> ``ProfileRecord``) by the commands that bind and
unbind, and what exists is asked of the broker (passive declares, exact). Queues of a
shipped profile that exist without a record (made by a release before this one, by
``toposerve batch submit``, or the record expired) are taken as bound: that is what every
queue was before, and erring that way never lets two profiles collect the same messages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Literal

import redis.asyncio as redis
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import AMQPError, ChannelClosed
from pydantic import BaseModel, Field

from toposerve.brokers import Settings, connect_amqp, connect_redis, exchange_name
from toposerve.consumers import delay_queue
from toposerve.deploy.profile import AggregateSpec, Profile, available_profiles, load_profile

# Kept a long time, refreshed by every ``up``: the record must outlive the processes (a
# stopped profile's queues stay bound), yet every Redis key has a TTL (DESIGN.md). When it
# expires the queues are still seen, as unrecorded, hence bound: nothing unsafe follows.
RECORD_TTL_S = 90 * 24 * 3600
# Routing keys only producers outside the pipeline publish (ingress, clients, edge): with
# these unbound a profile takes no new work, while its stages still pass work on inside.
ENTRY_KEY_WORDS = ("request", "telemetry")

Say = Callable[[str], None]
ProfileState = Literal["live", "draining", "unbound"]


class QueueRecord(BaseModel):
    name: str
    binding_keys: list[str]


class ProfileRecord(BaseModel):
    """What a namespace remembers of one profile: its queues and whether they are bound."""

    profile: str
    state: ProfileState
    queues: list[QueueRecord] = Field(min_length=1)
    updated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    # What `up` / `swap --to` was given (a shipped name or a YAML path): what an ingress that
    # follows the namespace loads when this profile becomes live (deploy/live_profile.py).
    source: str | None = None
    # Set by a swap (deploy/swap.py) while this live profile hands the namespace over: the
    # ingresses hold new requests until the profile named here is live.
    handing_over_to: str | None = None
    swap_id: str | None = None


class QueueStatus(BaseModel):
    name: str
    exists: bool
    messages: int = Field(default=0, description="Ready messages (unacknowledged deliveries are not counted)")
    consumers: int = 0


class ProfileStatus(BaseModel):
    profile: str
    state: ProfileState
    recorded: bool = Field(description="False: its queues exist but no toposerve command recorded them (taken as live)")
    queues: list[QueueStatus]
    handing_over_to: str | None = Field(default=None, description="A swap in progress moves its traffic there")

    @property
    def messages(self) -> int:
        return sum(q.messages for q in self.queues)

    @property
    def consumers(self) -> int:
        return sum(q.consumers for q in self.queues)


class NamespaceStatus(BaseModel):
    namespace: str
    live: list[str] = Field(description="Profiles whose queues are bound (at most one, but for replicas' races)")
    profiles: list[ProfileStatus]

    def live_others(self, name: str) -> list[ProfileStatus]:
        """The profiles other than ``name`` that are bound (or still draining)."""
        return [p for p in self.profiles if p.profile != name and p.state != "unbound"]


class DownReport(BaseModel):
    profile: str
    drained: bool = Field(description="Its queues were empty (after draining) when deleted")
    dropped_messages: int
    deleted_queues: list[str]
    deleted_redis_keys: int


class LifecycleError(RuntimeError):
    """A lifecycle command cannot do what was asked; the message says why and what to type instead."""


class LifecycleUnavailable(LifecycleError):
    """The broker or Redis cannot be asked (down, or this account may not read the record)."""


class OtherProfileLive(LifecycleError):
    def __init__(self, namespace: str, wanted: str, others: list[str]) -> None:
        other = others[0]
        super().__init__(
            f"namespace {namespace!r} has profile {', '.join(map(repr, others))} live (its queues are bound to "
            f"{exchange_name(namespace)}); starting {wanted!r} too would give both a copy of every message. "
            f"Either take over (its queues are unbound, their messages kept): "
            f"`toposerve up --profile {wanted} --replace`, or take it down first: `toposerve down --profile {other}`")
        self.others = others


def profile_queues(profile: Profile, namespace: str) -> list[QueueRecord]:
    """Every queue a profile's stages declare: each stage's own, and an aggregate's delay queue."""
    queues = []
    for name, spec in profile.stages.items():
        own = profile.queue_spec(namespace, name)
        queues.append(QueueRecord(name=own.name, binding_keys=own.binding_keys))
        if isinstance(spec, AggregateSpec):
            delay = delay_queue(namespace, own.name, spec.group, profile.groups[spec.group].join_timeout_s)
            queues.append(QueueRecord(name=delay.name, binding_keys=delay.binding_keys))
    return queues


def shipped_profiles() -> dict[str, Profile]:
    return {name: load_profile(name) for name in available_profiles()}


class Lifecycle:
    """The lifecycle of one namespace, on a broker connection and a Redis client (``open_lifecycle``)."""

    def __init__(self, namespace: str, connection: AbstractRobustConnection, redis_client: redis.Redis,
                 known: dict[str, Profile] | None = None) -> None:
        self.namespace = namespace
        self.connection = connection
        self.redis = redis_client
        self.known = shipped_profiles() if known is None else known
        self.key = f"{namespace}:lifecycle"

    # ------------------------------------------------------------------ the record

    async def records(self) -> dict[str, ProfileRecord]:
        raw = await self.redis.hgetall(self.key)
        return {(k.decode() if isinstance(k, bytes) else k): ProfileRecord.model_validate_json(v)
                for k, v in raw.items()}

    async def _save(self, record: ProfileRecord) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key, record.profile, record.model_dump_json())
            pipe.expire(self.key, RECORD_TTL_S)
            await pipe.execute()

    async def save(self, record: ProfileRecord) -> None:
        """Write one profile's record (the swap's steps, deploy/swap.py)."""
        await self._save(record)

    async def forget(self, profile: str) -> None:
        """Drop one profile's record (a swap's new profile that did not start, and had none)."""
        await self._forget(profile)

    async def _forget(self, profile: str) -> None:
        await self.redis.hdel(self.key, profile)

    # ------------------------------------------------------------------ the broker

    async def queue_status(self, name: str) -> QueueStatus:
        """Exact depth and consumers (a passive declare); a missing queue closes its channel, so one each."""
        channel = await self.connection.channel(publisher_confirms=False)
        try:
            queue = await channel.declare_queue(name, passive=True)
        except ChannelClosed:  # ChannelNotFoundEntity: no such queue
            return QueueStatus(name=name, exists=False)
        try:
            result = queue.declaration_result
            return QueueStatus(name=name, exists=True, messages=result.message_count or 0,
                               consumers=result.consumer_count or 0)
        finally:
            await channel.close()

    async def _unbind(self, queues: Sequence[QueueRecord], keep: Callable[[str], bool] = lambda key: False) -> None:
        """Unbind ``queues`` from the exchange (but the keys ``keep`` says); a missing queue is skipped."""
        for queue in queues:
            if not (await self.queue_status(queue.name)).exists:
                continue
            channel = await self.connection.channel(publisher_confirms=False)
            try:
                declared = await channel.declare_queue(queue.name, passive=True)
                for key in queue.binding_keys:
                    if not keep(key):
                        await declared.unbind(exchange_name(self.namespace), routing_key=key)
            finally:
                await channel.close()

    async def unbind(self, queues: Sequence[QueueRecord], entry_only: bool = False) -> None:
        """Unbind ``queues`` from the exchange; ``entry_only``: only the keys new work arrives on."""
        await self._unbind(queues, keep=(lambda key: key.split(".", 1)[0] not in ENTRY_KEY_WORDS) if entry_only
                           else (lambda key: False))

    async def bind(self, queues: Sequence[QueueRecord]) -> None:
        """Bind ``queues`` (which exist: their stages declared them) to every key they consume."""
        for queue in queues:
            channel = await self.connection.channel(publisher_confirms=False)
            try:
                declared = await channel.declare_queue(queue.name, passive=True)
                for key in queue.binding_keys:
                    await declared.bind(exchange_name(self.namespace), routing_key=key)
            finally:
                await channel.close()

    async def delete_if_empty(self, queues: Sequence[QueueRecord]) -> list[str]:
        """Delete the queues that exist and hold nothing (a swap's new profile that did not start)."""
        deleted = []
        for queue in queues:
            state = await self.queue_status(queue.name)
            if not state.exists or state.messages:
                continue
            channel = await self.connection.channel(publisher_confirms=False)
            try:
                await channel.queue_delete(queue.name, if_empty=True)
                deleted.append(queue.name)
            except ChannelClosed:  # a message arrived meanwhile: kept
                pass
            finally:
                if not channel.is_closed:
                    await channel.close()
        return deleted

    async def _delete(self, queues: Sequence[QueueRecord]) -> tuple[list[str], int]:
        """Delete the queues that exist: their names, and how many messages they still held."""
        deleted, dropped = [], 0
        for queue in queues:
            if not (await self.queue_status(queue.name)).exists:
                continue
            channel = await self.connection.channel(publisher_confirms=False)
            try:
                result = await channel.queue_delete(queue.name)
                dropped += result.message_count or 0
                deleted.append(queue.name)
            finally:
                await channel.close()
        return deleted, dropped

    # ------------------------------------------------------------------ what is here

    async def status(self) -> NamespaceStatus:
        records = await self.records()
        profiles = []
        for name, record in records.items():
            queues = [await self.queue_status(q.name) for q in record.queues]
            if any(q.exists for q in queues):  # none left (a broker reset): nothing of it is bound
                profiles.append(ProfileStatus(profile=name, state=record.state, recorded=True, queues=queues,
                                              handing_over_to=record.handing_over_to))
        for name, profile in self.known.items():
            if name in records:
                continue
            queues = [await self.queue_status(q.name) for q in profile_queues(profile, self.namespace)]
            if any(q.exists for q in queues):
                profiles.append(ProfileStatus(profile=name, state="live", recorded=False,
                                              queues=[q for q in queues if q.exists]))
        profiles.sort(key=lambda p: (p.state != "live", p.profile))
        return NamespaceStatus(namespace=self.namespace, live=[p.profile for p in profiles if p.state == "live"],
                               profiles=profiles)

    async def _queues_of(self, name: str, records: dict[str, ProfileRecord]) -> list[QueueRecord]:
        if name in records:
            return records[name].queues
        return profile_queues(self.known[name], self.namespace)

    # ------------------------------------------------------------------ commands

    async def check(self, profile: Profile) -> None:
        """Raise ``OtherProfileLive`` when another profile is bound here (the same profile is fine:
        replicas on several machines share its queues)."""
        others = [p.profile for p in (await self.status()).live_others(profile.name)]
        if others:
            raise OtherProfileLive(self.namespace, profile.name, others)

    async def claim(self, profile: Profile, replace: bool = False, say: Say = lambda _: None,
                    source: str | None = None) -> list[str]:
        """Record ``profile`` as the live one, before its processes bind its queues; the profiles it replaced.
        ``source``: what it was loaded from (a name, a YAML path), for ingresses that follow the namespace.

        Another live (or draining) profile: refused, or with ``replace`` its queues are
        unbound (they and their messages stay, for a later restart of it or ``down``).
        """
        status = await self.status()
        others = [p.profile for p in status.live_others(profile.name)]
        if others and not replace:
            raise OtherProfileLive(self.namespace, profile.name, others)
        records = await self.records()
        for other in others:
            queues = await self._queues_of(other, records)
            await self._unbind(queues)
            await self._save(ProfileRecord(profile=other, state="unbound", queues=queues))
            waiting = next(p.messages for p in status.profiles if p.profile == other)
            say(f"profile {other!r} unbound from {exchange_name(self.namespace)} ({waiting} messages kept in its "
                f"queues; `toposerve down --profile {other}` removes them)")
        await self._save(ProfileRecord(profile=profile.name, state="live",
                                       queues=profile_queues(profile, self.namespace), source=source))
        return others

    async def take_down(self, name: str, *, timeout_s: float, force: bool, grace_s: float = 2.0,
                        poll_s: float = 0.25, progress: Callable[[int, int], None] = lambda left, first: None,
                        say: Say = lambda _: None) -> DownReport:
        """``toposerve down``: unbind, drain (unless ``force``), delete the queues and their Redis keys.

        Draining needs the profile's stages consuming: with messages queued and no consumer
        it refuses at once instead of waiting for nothing. ``progress(left, at_start)`` is
        called at each poll.
        """
        records = await self.records()
        if name not in records and name not in self.known:
            raise LifecycleError(f"no profile {name!r} in namespace {self.namespace!r} (shipped profiles: "
                                 f"{', '.join(self.known)}; recorded here: {', '.join(records) or 'none'})")
        queues = await self._queues_of(name, records)
        states = {q.name: await self.queue_status(q.name) for q in queues}
        if not any(s.exists for s in states.values()):
            if name in records:
                await self._forget(name)
            here = [p.profile for p in (await self.status()).profiles]
            raise LifecycleError(f"namespace {self.namespace!r} has no queues of profile {name!r} "
                                 f"(profiles with queues here: {', '.join(here) or 'none'})")
        if not force:
            waiting = sum(s.messages for s in states.values())
            if waiting and not _consumed(states.values()):
                live = [p.profile for p in (await self.status()).live_others(name)]
                # Over another live profile its stages start only by taking the traffic back.
                start = (f"`toposerve up --profile {name} --replace` (takes the namespace back from "
                         f"{', '.join(live)})" if live else f"`toposerve up --profile {name}`")
                raise LifecycleError(
                    f"{waiting} messages wait in the queues of {name!r} and no consumer is attached to them: "
                    f"draining would wait for nothing. Start its stages ({start}) and run "
                    f"`toposerve down --profile {name}` again, or drop them: `toposerve down --profile {name} --force`")
            # New work first: the entry keys, so its stages can still pass work on to each other.
            await self._unbind(queues, keep=lambda key: key.split(".", 1)[0] not in ENTRY_KEY_WORDS)
            await self._save(ProfileRecord(profile=name, state="draining", queues=queues))
            say(f"profile {name!r} takes no new work; draining {waiting} messages (at most {timeout_s:g} s) ...")
            await self._drain(name, queues, waiting, timeout_s, grace_s, poll_s, progress)
        await self._unbind(queues)
        await self._save(ProfileRecord(profile=name, state="unbound", queues=queues))
        deleted, dropped = await self._delete(queues)
        keys = await self._delete_redis_keys([q.name for q in queues])
        await self._forget(name)
        return DownReport(profile=name, drained=dropped == 0, dropped_messages=dropped, deleted_queues=deleted,
                          deleted_redis_keys=keys)

    async def _drain(self, name: str, queues: list[QueueRecord], at_start: int, timeout_s: float, grace_s: float,
                     poll_s: float, progress: Callable[[int, int], None]) -> None:
        """Wait until every queue is empty and stays empty ``grace_s`` (deliveries in flight are not
        visible over AMQP: the grace lets them be acked or come back)."""
        deadline = time.monotonic() + timeout_s
        empty_since: float | None = None
        unconsumed_since: float | None = None
        while True:
            states = [await self.queue_status(q.name) for q in queues]
            left = sum(s.messages for s in states)
            progress(left, at_start)
            now = time.monotonic()
            if left == 0:
                empty_since = empty_since or now
                if now - empty_since >= grace_s:
                    return
            else:
                empty_since = None
            # A stage restarting has no consumer for a moment; gone for longer, nothing will drain.
            unconsumed_since = None if left == 0 or _consumed(states) else (unconsumed_since or now)
            if unconsumed_since is not None and now - unconsumed_since > 5:
                raise LifecycleError(
                    f"the consumers of {name!r} went away with {left} messages left; its queues are kept, "
                    f"unbound from new work. Start its stages and run down again, or `toposerve down "
                    f"--profile {name} --force` to drop them")
            if now >= deadline:
                raise LifecycleError(
                    f"{left} messages of {name!r} still queued after {timeout_s:g} s; its queues are kept, unbound "
                    f"from new work. Run down again with a longer --timeout, or --force to drop them")
            await asyncio.sleep(poll_s)

    async def _delete_redis_keys(self, queue_names: list[str]) -> int:
        """The keys only these queues used: the crash guard's delivery counts (``{ns}:unsettled:{queue}:*``).
        Job records, caches, batches, items and telemetry belong to the namespace (another profile
        serves them, until their TTL), so they stay."""
        deleted = 0
        for queue in queue_names:
            batch = [key async for key in self.redis.scan_iter(match=f"{self.namespace}:unsettled:{queue}:*",
                                                               count=500)]
            if batch:
                deleted += await self.redis.delete(*batch)
        return deleted


def _consumed(states: Iterable[QueueStatus]) -> bool:
    """Every queue holding messages has a consumer."""
    return all(s.consumers > 0 for s in states if s.messages)


@asynccontextmanager
async def open_lifecycle(settings: Settings, known: dict[str, Profile] | None = None) -> AsyncIterator[Lifecycle]:
    """The lifecycle of ``settings.namespace`` on the settings' broker and Redis; closed on exit."""
    try:
        connection = await connect_amqp(settings.amqp_url, "toposerve-lifecycle")
    except (OSError, ConnectionError, AMQPError) as exc:
        raise LifecycleUnavailable(f"cannot reach the broker: {type(exc).__name__}: {exc}") from exc
    client = connect_redis(settings.redis_url, max_connections=4)
    try:
        yield Lifecycle(settings.namespace, connection, client, known)
    except redis.RedisError as exc:
        raise LifecycleUnavailable(f"cannot read or write {settings.namespace}:lifecycle in Redis: "
                                   f"{type(exc).__name__}: {exc}") from exc
    finally:
        await connection.close()
        await client.aclose()


def with_profile(known: dict[str, Profile], profile: Profile) -> dict[str, Profile]:
    """The shipped profiles and ``profile`` (which may be a YAML file of the user's)."""
    return {**known, profile.name: profile}


def claim_namespace(settings: Settings, profile: Profile, replace: bool = False, say: Say = lambda _: None,
                    source: str | None = None) -> None:
    """``claim`` from synchronous code (the launcher, before it starts the profile's processes)."""

    async def run() -> None:
        async with open_lifecycle(settings, with_profile(shipped_profiles(), profile)) as lifecycle:
            await lifecycle.claim(profile, replace=replace, say=say, source=source)

    asyncio.run(run())


async def check_namespace(settings: Settings, profile: Profile) -> None:
    """``check`` for a process about to bind ``profile``'s queues (a stage replica, the ingress)."""
    async with open_lifecycle(settings, with_profile(shipped_profiles(), profile)) as lifecycle:
        await lifecycle.check(profile)
