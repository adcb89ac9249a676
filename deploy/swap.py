"""``toposerve swap --to NAME``: move a namespace's traffic to another profile, live (DESIGN.md, "Lifecycle").

Every profile's queues bind to the namespace's one exchange under the same routing keys
(``features.iris`` is ``features.iris`` whoever consumes it), so two profiles bound at once
each get a copy of every message, at every hop. A live swap therefore never lets the two
overlap; instead, for the short while the old profile's last work drains, the ingress holds
new requests. In order:

1. **standby**: the new profile's stages start with their queues declared *unbound* (nothing
   reaches them yet) and must all consume; one that does not start (a bad handler, a model
   that does not load) calls the swap off: its processes stop, the empty queues it made are
   deleted, and the old profile has not been touched;
2. **hand over**: the old profile's record says it hands over; every ingress that follows
   the namespace (api/live_profile.py) holds new work, lets what is inside finish (a sync
   caller gets the old profile's answer) and acknowledges;
3. **drain**: the old profile's entry keys (``request.*``, ``telemetry.*``) are unbound, then
   its stages are stopped one kind after the other (preprocess, predict, ..., store), each
   once its queue is empty and everything upstream of it has stopped, so nothing is left in
   flight (a stopped process holds no unacknowledged message: it acked them, or they came back);
4. **take over**: the old profile's queues are unbound (kept, empty), the new one's bound,
   the record says the new one is live; the ingresses serve it (its mode, sync or async) and
   let the held requests through.

A step that fails before 4 puts everything back: the old profile's keys are bound again, its
stopped stages start again, the ingresses let the held requests through to it.

The processes belong to whoever runs the profile: ``toposerve up`` takes a swap order from
Redis (``{ns}:lifecycle:swap``, written by ``toposerve swap``) and runs this with its
supervisor behind ``StageProcesses``. This module owns the order of the steps and nothing else.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol

import redis.asyncio as redis

from toposerve.api import serving
from toposerve.brokers import Settings, connect_redis
from toposerve.deploy.lifecycle import (
    Lifecycle,
    LifecycleError,
    ProfileRecord,
    QueueRecord,
    open_lifecycle,
    profile_queues,
    shipped_profiles,
    with_profile,
)
from toposerve.deploy.live_profile import AckCollector, announce
from toposerve.deploy.profile import AggregateSpec, Profile, ProfileError
from toposerve.deploy.swap_orders import SwapOrder

Say = Callable[[str], None]
# Stopped in this order (what feeds what in every shipped topology); other kinds come last.
DRAIN_ORDER = ("preprocess", "predict", "custom", "aggregate", "store", "batch_store", "telemetry")


class SwapFailed(LifecycleError):
    """The swap was called off; the message says why and that the old profile serves on."""


class StageProcesses(Protocol):
    """The stage processes of the profiles being swapped, run by whoever runs them (the launcher)."""

    def start_standby(self, profile: Profile, source: str) -> None:
        """Start every replica of ``profile``'s stages with ``--standby`` (queues declared unbound)."""

    def exited_standby(self) -> str | None:
        """A standby process that exited already: which, and its code (None: all run)."""

    def discard_standby(self) -> None:
        """Stop the standby processes (the swap is called off)."""

    def stop_stage(self, stage: str) -> None:
        """Stop every replica of the old profile's ``stage`` (SIGTERM: they finish what they hold), and wait."""

    def start_stage(self, stage: str) -> None:
        """Start the old profile's ``stage`` again (a swap called off after it was stopped)."""

    def commit(self, profile: Profile, source: str) -> None:
        """The standby processes are the profile's now (they restart as its stages; the ingress follows)."""


class ProfileSwap:
    """One swap of ``lifecycle``'s namespace from its live profile to ``new`` (a validated profile)."""

    def __init__(self, lifecycle: Lifecycle, redis_client: redis.Redis, new: Profile, source: str,
                 stages: StageProcesses, timeout_s: float, swap_id: str, say: Say, poll_s: float = 0.1) -> None:
        self.lifecycle = lifecycle
        self.redis = redis_client
        self.new = new
        self.source = source
        self.stages = stages
        self.timeout_s = timeout_s
        self.swap_id = swap_id
        self.say = say
        self.poll_s = poll_s
        self.namespace = lifecycle.namespace
        # What was there before the swap (a call-off removes only what it made).
        self._known_before = False
        self._existed: set[str] = set()

    async def run(self, old: Profile) -> None:
        records = await self.lifecycle.records()
        old_record = records.get(old.name) or ProfileRecord(profile=old.name, state="live",
                                                            queues=profile_queues(old, self.namespace))
        new_queues = profile_queues(self.new, self.namespace)
        self._known_before = self.new.name in records
        self._existed = {q.name for q in new_queues if (await self.lifecycle.queue_status(q.name)).exists}
        await self._standby(new_queues)
        try:
            await self._hand_over(old_record)
        except BaseException:
            await self._remove_standby(new_queues)
            raise
        stopped: list[str] = []
        try:
            await self.lifecycle.unbind(old_record.queues, entry_only=True)
            await self._save(old_record, state="draining")
            await self._drain(old, stopped)
        except BaseException as exc:
            await self._put_back(old_record, stopped)
            await self._remove_standby(new_queues)
            if isinstance(exc, SwapFailed):
                raise
            raise SwapFailed(f"the swap failed while {old.name!r} drained ({type(exc).__name__}: {exc}); "
                             f"profile {old.name!r} is bound again and serves on") from exc
        await self._take_over(old_record, new_queues)

    # ------------------------------------------------------------------ 1. standby

    async def _standby(self, queues: list[QueueRecord]) -> None:
        # Recorded unbound first: queues of a shipped profile without a record count as live.
        await self.lifecycle.save(ProfileRecord(profile=self.new.name, state="unbound", queues=queues,
                                                source=self.source))
        self.say(f"starting the stages of {self.new.name!r} on standby (queues declared, not bound): "
                 f"{', '.join(self.new.stages)}")
        try:
            self.stages.start_standby(self.new, self.source)
            await self._wait_consuming()
        except BaseException:
            await self._remove_standby(queues)
            raise

    async def _remove_standby(self, queues: list[QueueRecord]) -> None:
        """A swap called off: the standby processes stop, the empty queues they made go, and their record."""
        self.stages.discard_standby()
        await self.lifecycle.delete_if_empty([q for q in queues if q.name not in self._existed])
        if not self._known_before:
            await self.lifecycle.forget(self.new.name)

    async def _wait_consuming(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        wanted = {self.new.queue_spec(self.namespace, name).name: spec.replicas
                  for name, spec in self.new.stages.items()}
        while True:
            exited = self.stages.exited_standby()
            if exited is not None:
                raise SwapFailed(f"profile {self.new.name!r} did not start: {exited}; the swap is called off and "
                                 f"the live profile serves on, untouched (its log says why)")
            waiting = [name for name, replicas in wanted.items()
                       if (await self.lifecycle.queue_status(name)).consumers < replicas]
            if not waiting:
                self.say(f"every stage of {self.new.name!r} consumes")
                return
            if time.monotonic() > deadline:
                raise SwapFailed(f"profile {self.new.name!r} did not start within {self.timeout_s:g} s (no consumer "
                                 f"on {', '.join(waiting)}); the swap is called off and the live profile serves on, "
                                 f"untouched")
            await asyncio.sleep(self.poll_s)

    # ------------------------------------------------------------------ 2. hand over

    async def _hand_over(self, old: ProfileRecord) -> None:
        try:
            async with AckCollector(self.redis, self.namespace) as acks:
                await self._save(old, state="live", handing_over_to=self.new.name, swap_id=self.swap_id)
                following = await announce(self.redis, self.namespace)
                self.say(f"{old.profile!r} hands over: {following} ingress processes to hold new requests ...")
                acked = await acks.wait(self.swap_id, following, self.timeout_s)
        except BaseException:
            await self._call_off_hand_over(old)
            raise
        if acked < following:
            await self._call_off_hand_over(old)
            raise SwapFailed(f"only {acked} of {following} ingress processes held new requests within "
                             f"{self.timeout_s:g} s (a sync caller still waiting?); the swap is called off and "
                             f"{old.profile!r} serves on")

    async def _call_off_hand_over(self, old: ProfileRecord) -> None:
        await self._save(old, state="live")
        await announce(self.redis, self.namespace)

    # ------------------------------------------------------------------ 3. drain

    async def _drain(self, old: Profile, stopped: list[str]) -> None:
        deadline = time.monotonic() + self.timeout_s
        order = sorted(old.stages, key=lambda name: drain_rank(old.stages[name].kind))
        pending = order
        while pending:
            for stage in pending:
                await self._wait_empty(old.name, self._queues_of(old, stage), deadline)
                self.stages.stop_stage(stage)
                if stage not in stopped:
                    stopped.append(stage)
                self.say(f"  {old.name}.{stage}: drained and stopped")
            # A stage stopped too early for this topology (a custom kind fed later), or whose process
            # gave back what it held: it runs again and drains again. The order is speed, not safety.
            pending = [stage for stage in order if await self._left(self._queues_of(old, stage))]
            for stage in pending:
                self.stages.start_stage(stage)

    def _queues_of(self, profile: Profile, stage: str) -> list[str]:
        """A stage's queue, and an aggregate's delay queue (where a join's timeouts wait)."""
        own = profile.queue_spec(self.namespace, stage).name
        extra = [q.name for q in profile_queues(profile, self.namespace) if q.name.startswith(own + ".")]
        return [own, *extra] if isinstance(profile.stages[stage], AggregateSpec) else [own]

    async def _left(self, queues: Sequence[str]) -> int:
        return sum([(await self.lifecycle.queue_status(name)).messages for name in queues])

    async def _wait_empty(self, profile: str, queues: Sequence[str], deadline: float) -> None:
        while (left := await self._left(queues)) > 0:
            if time.monotonic() > deadline:
                raise SwapFailed(f"{left} messages of {profile!r} still queued after {self.timeout_s:g} s "
                                 f"({', '.join(queues)}); the swap is called off and {profile!r} serves on. "
                                 f"Swap again with a longer --timeout, or when it has less to do")
            await asyncio.sleep(self.poll_s)

    async def _put_back(self, old: ProfileRecord, stopped: list[str]) -> None:
        for stage in stopped:
            self.stages.start_stage(stage)
        await self.lifecycle.bind(old.queues)
        await self._save(old, state="live")
        await announce(self.redis, self.namespace)

    # ------------------------------------------------------------------ 4. take over

    async def _take_over(self, old: ProfileRecord, new_queues: list[QueueRecord]) -> None:
        await self.lifecycle.unbind(old.queues)
        await self.lifecycle.bind(new_queues)
        await self._save(old, state="unbound")
        async with AckCollector(self.redis, self.namespace) as acks:
            await self.lifecycle.save(ProfileRecord(profile=self.new.name, state="live", queues=new_queues,
                                                    source=self.source, swap_id=self.swap_id))
            following = await announce(self.redis, self.namespace)
            self.stages.commit(self.new, self.source)
            # Past this point nothing is put back (the old stages are gone): a late ingress is said, not undone.
            serving_now = await acks.wait(serving(self.swap_id), following, min(self.timeout_s, 30.0))
        if serving_now < following:
            self.say(f"warning: only {serving_now} of {following} ingress processes serve {self.new.name!r} yet; the "
                     f"others hold their requests until they do (their logs say why)")
        self.say(f"profile {self.new.name!r} is live ({self.new.ingress.mode}); {serving_now} ingress processes "
                 f"serve it; "
                 f"{old.profile!r} is unbound, its queues kept empty (`toposerve down --profile {old.profile} "
                 f"--force` removes them)")

    async def _save(self, record: ProfileRecord, state: str, handing_over_to: str | None = None,
                    swap_id: str | None = None) -> None:
        await self.lifecycle.save(record.model_copy(update={
            "state": state, "handing_over_to": handing_over_to, "swap_id": swap_id,
            "updated_at": datetime.now(UTC)}))


def drain_rank(kind: str) -> int:
    return DRAIN_ORDER.index(kind) if kind in DRAIN_ORDER else len(DRAIN_ORDER)


def swap_refusal(namespace: str, live: list[str], new: Profile, old: Profile | None) -> str | None:
    """Why this swap cannot be done (a message naming what was wrong), or None."""
    if not live:
        return (f"namespace {namespace!r} has no live profile, so there is nothing to swap from; start "
                f"{new.name!r} with `toposerve up --profile {new.name}`")
    if len(live) > 1:
        return (f"namespace {namespace!r} has several live profiles ({', '.join(live)}); keep one with "
                f"`toposerve up --profile NAME --replace` first")
    if live[0] == new.name:
        return f"profile {new.name!r} is already live in namespace {namespace!r}: nothing to swap"
    for profile in (p for p in (old, new) if p is not None):
        if profile.ingress.single_process:
            return (f"profile {profile.name!r} runs its stages inside the ingress process (single_process), so "
                    f"it cannot hand over live; use `toposerve up --profile {new.name} --replace`")
    return None


async def carry_out(order: SwapOrder, old: Profile, settings: Settings, stages: StageProcesses, say: Say) -> Profile:
    """Swap the namespace from ``old`` (run by ``stages``' owner) to ``order.to``; the new profile, live.

    Raises ``LifecycleError`` (``SwapFailed``) with what was wrong and what serves now.
    """
    from toposerve.deploy.components import load_checked_profile

    try:
        new = load_checked_profile(order.to, settings)
    except ProfileError as exc:
        raise SwapFailed(f"{exc}; the swap is called off and {old.name!r} serves on, untouched") from exc
    async with open_lifecycle(settings, with_profile(with_profile(shipped_profiles(), old), new)) as lifecycle:
        live = (await lifecycle.status()).live
        refusal = swap_refusal(settings.namespace, live, new, old)
        if refusal is None and live != [old.name]:
            refusal = f"profile {old.name!r} is no longer the live one in namespace {settings.namespace!r}"
        if refusal is not None:
            raise SwapFailed(refusal)
        client = connect_redis(settings.redis_url, max_connections=4)
        try:
            await ProfileSwap(lifecycle, client, new, order.to, stages, order.timeout_s, order.id, say).run(old)
        finally:
            await client.aclose()
    return new
