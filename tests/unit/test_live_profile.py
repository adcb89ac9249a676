"""A swap with no services: the ingress holds, acknowledges, switches, lets through; acknowledgements counted by process; refusals; drain order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support.scripted_pubsub import ScriptedPubSub
from toposerve.api.config import IngressConfig, IngressSpec
from toposerve.api.errors import ApiError
from toposerve.api.live_profile import IngressSwitch, LiveProfile
from toposerve.deploy.live_profile import AckCollector
from toposerve.deploy.profile import load_profile
from toposerve.deploy.swap import DRAIN_ORDER, drain_rank, swap_refusal


def config(profile: str, mode: str) -> IngressConfig:
    return IngressConfig(profile=profile, spec=IngressSpec(mode=mode), models=["iris"], models_dir=Path("."))


class FakeIngress:
    def __init__(self, config: IngressConfig) -> None:
        self.config = config
        self.started = self.closed = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True


class FakeSource:
    def __init__(self) -> None:
        self.news: asyncio.Queue[LiveProfile | None] = asyncio.Queue()
        self.acks: list[str] = []

    async def changes(self) -> AsyncIterator[LiveProfile | None]:
        while True:
            yield await self.news.get()

    async def acknowledge(self, swap_id: str) -> None:
        self.acks.append(swap_id)

    def config_for(self, live: LiveProfile) -> IngressConfig:
        return config(live.profile, "sync")


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.fixture
async def switch() -> AsyncIterator[tuple[IngressSwitch, FakeSource, SimpleNamespace]]:
    app = SimpleNamespace(state=SimpleNamespace())
    old = FakeIngress(config("asynchronous", "async"))
    app.state.ingress = old
    source = FakeSource()
    switch = IngressSwitch(app, old, source, build=FakeIngress, on_switch=lambda old, new: None,  # type: ignore[arg-type]
                           hold_limit_s=0.5)
    switch.start()
    yield switch, source, app
    await switch.close()


def handing_over(swap_id: str = "s1") -> LiveProfile:
    return LiveProfile(profile="asynchronous", source="asynchronous", handing_over_to="synchronous", swap_id=swap_id,
                       all_live=["asynchronous"])


async def test_a_handover_is_acknowledged_only_once_the_writes_inside_have_finished(switch) -> None:
    switch, source, _ = switch
    inside = switch.using("POST")
    inside.__enter__()  # a sync caller waiting for the old profile's answer
    await source.news.put(handing_over())
    await settle()
    assert not switch.open.is_set() and source.acks == []
    held = asyncio.create_task(switch.wait_admission("POST"))
    await switch.wait_admission("GET")  # reads are never held
    await settle()
    assert not held.done()
    inside.__exit__(None, None, None)
    await settle()
    assert source.acks == ["s1"] and not held.done()
    held.cancel()


async def test_the_new_live_profile_serves_the_held_requests_and_the_old_ingress_closes(switch) -> None:
    switch, source, app = switch
    old = app.state.ingress
    await source.news.put(handing_over())
    await settle()
    held = asyncio.create_task(switch.wait_admission("POST"))
    await source.news.put(LiveProfile(profile="synchronous", source="synchronous", all_live=["synchronous"]))
    await asyncio.wait_for(held, 1)
    assert app.state.ingress is switch.current and switch.current is not old
    assert switch.current.config.mode == "sync" and switch.current.started
    await settle()
    assert old.closed


async def test_a_swap_called_off_lets_the_held_requests_through_to_the_same_profile(switch) -> None:
    switch, source, app = switch
    old = app.state.ingress
    await source.news.put(handing_over())
    await settle()
    held = asyncio.create_task(switch.wait_admission("POST"))
    await source.news.put(LiveProfile(profile="asynchronous", source="asynchronous", all_live=["asynchronous"]))
    await asyncio.wait_for(held, 1)
    assert app.state.ingress is old and not old.closed


async def test_a_handover_that_never_ends_is_a_503_past_the_hold_limit(switch) -> None:
    switch, source, _ = switch
    await source.news.put(handing_over())
    await settle()
    with pytest.raises(ApiError) as refused:
        await switch.wait_admission("POST")
    assert refused.value.status == 503 and refused.value.code == "swapping"


async def test_an_ingress_whose_profile_is_still_live_does_not_switch(switch) -> None:
    switch, source, app = switch
    old = app.state.ingress
    await source.news.put(LiveProfile(profile="synchronous", source="synchronous",
                                      all_live=["asynchronous", "synchronous"]))
    await settle()
    assert app.state.ingress is old


def test_swap_refusals_name_what_was_wrong() -> None:
    synchronous, asynchronous = load_profile("synchronous"), load_profile("asynchronous")
    assert "has no live profile" in swap_refusal("ns", [], synchronous, None)
    assert "`toposerve up --profile synchronous`" in swap_refusal("ns", [], synchronous, None)
    assert swap_refusal("ns", ["synchronous"], synchronous, synchronous) == (
        "profile 'synchronous' is already live in namespace 'ns': nothing to swap")
    assert "several live profiles (asynchronous, batch)" in swap_refusal("ns", ["asynchronous", "batch"],
                                                                         synchronous, None)
    single = swap_refusal("ns", ["asynchronous"], load_profile("web_single"), asynchronous)
    assert "'web_single' runs its stages inside the ingress process" in single and "--replace" in single
    assert swap_refusal("ns", ["asynchronous"], synchronous, asynchronous) is None


def test_stages_drain_upstream_first() -> None:
    group = load_profile("horizontal_microservice")
    order = sorted(group.stages, key=lambda name: drain_rank(group.stages[name].kind))
    assert order[0] == "preprocess" and order[-2:] == ["aggregate", "store"]
    assert drain_rank("something_new") == len(DRAIN_ORDER)


async def test_a_handover_counts_processes_not_messages() -> None:
    # Process a acknowledges twice (it re-reads the record every second while it holds), b once,
    # and an acknowledgement of another swap counts for nothing.
    script = ["s1 a", "s1 a", "s0 c", "s1:serving b", "s1 b"]
    client = SimpleNamespace(pubsub=lambda **_: ScriptedPubSub(script))
    async with AckCollector(client, "ns") as acks:  # type: ignore[arg-type]
        assert await acks.wait("s1", expected=2, timeout_s=1) == 2
    async with AckCollector(SimpleNamespace(pubsub=lambda **_: ScriptedPubSub(["s1 a", "s1 a"])), "ns") as acks:
        assert await acks.wait("s1", expected=2, timeout_s=0.2) == 1  # b never answered: the swap is called off


async def test_the_ingress_acknowledges_serving_the_profile_a_swap_made_live(switch) -> None:
    switch, source, _ = switch
    await source.news.put(handing_over("s2"))
    await settle()
    await source.news.put(LiveProfile(profile="synchronous", source="synchronous", swap_id="s2",
                                      all_live=["synchronous"]))
    await settle()
    assert source.acks == ["s2", "s2:serving"]
