"""The order of a swap's steps (deploy/swap.py), and what a call-off puts back, on fakes of the broker, Redis and processes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.support.scripted_pubsub import ScriptedPubSub
from toposerve.deploy.lifecycle import ProfileRecord, QueueRecord, QueueStatus, profile_queues
from toposerve.deploy.profile import Profile, load_profile
from toposerve.deploy.swap import ProfileSwap, SwapFailed
from toposerve.deploy.swap_orders import SwapOrder

NS = "ns"


class FakeLifecycle:
    """Queue depths and consumers, the record, and every change asked of them, in order."""

    def __init__(self, old: Profile) -> None:
        self.namespace = NS
        self.depths: dict[str, int] = {q.name: 0 for q in profile_queues(old, NS)}
        self.consumers: dict[str, int] = dict.fromkeys(self.depths, 1)
        self.saved: dict[str, ProfileRecord] = {old.name: ProfileRecord(profile=old.name, state="live",
                                                                        queues=profile_queues(old, NS))}
        self.log: list[str] = []

    async def records(self) -> dict[str, ProfileRecord]:
        return dict(self.saved)

    async def queue_status(self, name: str) -> QueueStatus:
        if name not in self.depths:
            return QueueStatus(name=name, exists=False)
        return QueueStatus(name=name, exists=True, messages=self.depths[name], consumers=self.consumers[name])

    async def save(self, record: ProfileRecord) -> None:
        self.saved[record.profile] = record
        self.log.append(f"save {record.profile} {record.state}" + (" handing over" if record.handing_over_to else ""))

    async def forget(self, profile: str) -> None:
        self.saved.pop(profile, None)
        self.log.append(f"forget {profile}")

    async def unbind(self, queues: list[QueueRecord], entry_only: bool = False) -> None:
        self.log.append(f"unbind {queues[0].name.split('.')[1]}" + (" entry" if entry_only else ""))

    async def bind(self, queues: list[QueueRecord]) -> None:
        self.log.append(f"bind {queues[0].name.split('.')[1]}")

    async def delete_if_empty(self, queues: list[QueueRecord]) -> list[str]:
        gone = [q.name for q in queues if q.name in self.depths and not self.depths[q.name]]
        for name in gone:
            del self.depths[name]
        self.log.append(f"delete {len(gone)} queues")
        return gone


class FakeRedis:
    """One ingress process follows the namespace: it holds, then serves, acknowledging each."""

    def __init__(self, swap_id: str, ingresses: int = 1, answering: bool = True) -> None:
        self.acks = [f"{swap_id} i{n}" for n in range(ingresses)] + [f"{swap_id}:serving i{n}" for n in range(ingresses)]
        self.ingresses = ingresses
        self.answering = answering

    async def publish(self, channel: str, message: str) -> int:
        return self.ingresses

    def pubsub(self, **_: object) -> ScriptedPubSub:
        return ScriptedPubSub(self.acks if self.answering else [])


class FakeStages:
    def __init__(self, lifecycle: FakeLifecycle, new: Profile, starts: bool = True) -> None:
        self.lifecycle = lifecycle
        self.new = new
        self.starts = starts

    def start_standby(self, profile: Profile, source: str) -> None:
        self.lifecycle.log.append(f"standby {profile.name}")
        for queue in profile_queues(profile, NS):
            self.lifecycle.depths.setdefault(queue.name, 0)
            self.lifecycle.consumers[queue.name] = 1 if self.starts else 0

    def exited_standby(self) -> str | None:
        return None if self.starts else "its stage process predict[0] exited with code 1"

    def discard_standby(self) -> None:
        self.lifecycle.log.append("discard standby")

    def stop_stage(self, stage: str) -> None:
        self.lifecycle.log.append(f"stop {stage}")

    def start_stage(self, stage: str) -> None:
        self.lifecycle.log.append(f"start {stage}")

    def commit(self, profile: Profile, source: str) -> None:
        self.lifecycle.log.append(f"commit {profile.name}")


def swap(old: str, new: str, *, starts: bool = True, answering: bool = True) -> tuple[ProfileSwap, FakeLifecycle,
                                                                                        Profile]:
    old_profile, new_profile = load_profile(old), load_profile(new)
    lifecycle = FakeLifecycle(old_profile)
    stages = FakeStages(lifecycle, new_profile, starts=starts)
    return (ProfileSwap(lifecycle, FakeRedis("s1", answering=answering), new_profile, new, stages,  # type: ignore[arg-type]
                        timeout_s=0.3, swap_id="s1", say=lambda _: None, poll_s=0.01), lifecycle, old_profile)


async def test_a_swap_never_binds_both_profiles_and_drains_upstream_first() -> None:
    run, lifecycle, old = swap("asynchronous", "synchronous")
    await run.run(old)
    assert lifecycle.log == [
        "save synchronous unbound", "standby synchronous",          # 1. standby: its queues unbound
        "save asynchronous live handing over",                       # 2. the ingress holds, acknowledges
        "unbind asynchronous entry", "save asynchronous draining",   # 3. no new work, then drain in order
        "stop preprocess", "stop predict", "stop store",
        "unbind asynchronous", "bind synchronous",                   # 4. one profile bound at a time
        "save asynchronous unbound", "save synchronous live", "commit synchronous",
    ]


async def test_a_new_profile_that_does_not_start_leaves_the_old_one_untouched() -> None:
    run, lifecycle, old = swap("asynchronous", "synchronous", starts=False)
    with pytest.raises(SwapFailed, match="'synchronous' did not start: its stage process predict"):
        await run.run(old)
    assert lifecycle.log == ["save synchronous unbound", "standby synchronous", "discard standby",
                             "delete 2 queues", "forget synchronous"]
    assert set(lifecycle.saved) == {"asynchronous"} and lifecycle.saved["asynchronous"].state == "live"


async def test_an_ingress_that_does_not_hold_calls_the_swap_off() -> None:
    run, lifecycle, old = swap("asynchronous", "synchronous", answering=False)
    with pytest.raises(SwapFailed, match="only 0 of 1 ingress processes held new requests"):
        await run.run(old)
    assert lifecycle.log[2:] == ["save asynchronous live handing over", "save asynchronous live",
                                 "discard standby", "delete 2 queues", "forget synchronous"]


async def test_a_drain_past_the_timeout_puts_the_old_profile_back() -> None:
    run, lifecycle, old = swap("asynchronous", "synchronous")
    lifecycle.depths[f"{NS}.asynchronous.predict"] = 5  # a backlog that does not drain in time
    with pytest.raises(SwapFailed, match="5 messages of 'asynchronous' still queued after 0.3 s"):
        await run.run(old)
    assert lifecycle.log[4:] == ["save asynchronous draining", "stop preprocess",
                                 "start preprocess", "bind asynchronous", "save asynchronous live",
                                 "discard standby", "delete 2 queues", "forget synchronous"]
    assert lifecycle.saved["asynchronous"].state == "live" and lifecycle.saved["asynchronous"].handing_over_to is None


async def test_a_stage_that_holds_messages_after_its_turn_drains_again() -> None:
    run, lifecycle, old = swap("asynchronous", "synchronous")
    store = f"{NS}.asynchronous.store"
    stop_stage = run.stages.stop_stage

    def stop_and_leave_one(stage: str) -> None:  # the store's process gives one message back, once
        stop_stage(stage)
        if stage == "store" and lifecycle.log.count("stop store") == 1:
            lifecycle.depths[store] = 1
    run.stages.stop_stage = stop_and_leave_one  # type: ignore[method-assign]
    start_stage = run.stages.start_stage

    def start_and_consume(stage: str) -> None:
        start_stage(stage)
        lifecycle.depths[store] = 0
    run.stages.start_stage = start_and_consume  # type: ignore[method-assign]
    await run.run(old)
    assert lifecycle.log[5:10] == ["stop preprocess", "stop predict", "stop store", "start store", "stop store"]
    assert lifecycle.log[-1] == "commit synchronous"


def test_an_order_left_unfinished_by_a_launcher_that_died_stops_blocking_new_ones() -> None:
    running = SwapOrder(to="synchronous", from_profile="asynchronous", timeout_s=60, state="running")
    assert not running.abandoned and not running.finished
    running.placed_at = datetime.now(UTC) - timedelta(seconds=4 * 60 + 61)
    assert running.abandoned
    assert not SwapOrder(to="x", from_profile="y", timeout_s=1, state="done",
                         placed_at=datetime.now(UTC) - timedelta(days=1)).abandoned  # finished: not abandoned
