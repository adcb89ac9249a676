"""The topology's lifecycle on real RabbitMQ and Redis: one live profile per namespace, `down`, `status`.

The leak this guards against: every profile's durable queues bind to the namespace's one
exchange, so a stopped profile's queues kept a copy of every later message.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support.images import b64, sample_images
from tests.support.processes import REPO, RunningProfile
from toposerve.brokers import InferenceRequest, PublishRefused, ResultStore, Settings, connect_redis, publishing
from toposerve.deploy.components import build_stage_runner
from toposerve.deploy.lifecycle import Lifecycle, OtherProfileLive, open_lifecycle
from toposerve.deploy.local_services import free_port
from toposerve.deploy.profile import Profile, load_profile


def cli_env(settings: Settings) -> dict[str, str]:
    return {**os.environ, "TOPOSERVE_AMQP_URL": settings.amqp_url, "TOPOSERVE_REDIS_URL": settings.redis_url,
            "TOPOSERVE_NAMESPACE": settings.namespace}


async def toposerve(settings: Settings, *args: str, timeout: float = 120) -> tuple[int, str, str]:
    """The command line, in a subprocess, while this event loop keeps running (in-process stages)."""
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "toposerve", *args, cwd=REPO,
                                                   env=cli_env(settings), stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def request(model: str = "iris") -> InferenceRequest:
    return InferenceRequest(id=uuid.uuid4(), model=model, instances=[[5.1, 3.5, 1.4, 0.2]])


async def publish_requests(settings: Settings, profile: Profile | None, count: int) -> list[uuid.UUID]:
    """``count`` requests to ``request.iris``; ``profile``'s queues declared (and bound) first."""
    ids = []
    async with publishing(settings, "test-lifecycle", profile.queue_specs(settings.namespace) if profile else ()) as pub:
        for _ in range(count):
            message = request()
            await pub.publish(message, "request.iris")
            ids.append(message.id)
    return ids


async def depth(lifecycle: Lifecycle, profile: str, stage: str) -> int:
    status = await lifecycle.queue_status(f"{lifecycle.namespace}.{profile}.{stage}")
    assert status.exists, status
    return status.messages


async def test_a_stopped_profiles_queue_collects_copies_until_another_profile_replaces_it(settings: Settings) -> None:
    asynchronous, synchronous = load_profile("asynchronous"), load_profile("synchronous")
    async with open_lifecycle(settings) as lifecycle:
        await lifecycle.claim(asynchronous)
        await publish_requests(settings, asynchronous, 2)  # asynchronous ran, then stopped with 2 waiting

        # The leak, as it was: synchronous's queues bound next to asynchronous's, which gets a copy.
        await publish_requests(settings, synchronous, 1)
        assert await depth(lifecycle, "asynchronous", "preprocess") == 3
        assert await depth(lifecycle, "synchronous", "preprocess") == 1

        # Now: without --replace synchronous is refused, naming the other profile and the commands.
        with pytest.raises(OtherProfileLive) as refused:
            await lifecycle.claim(synchronous)
        message = str(refused.value)
        assert "'asynchronous' live" in message
        assert "`toposerve up --profile synchronous --replace`" in message
        assert "`toposerve down --profile asynchronous`" in message

        said: list[str] = []
        assert await lifecycle.claim(synchronous, replace=True, say=said.append) == ["asynchronous"]
        assert "3 messages kept" in said[0]
        await publish_requests(settings, None, 5)
        assert await depth(lifecycle, "asynchronous", "preprocess") == 3  # kept, and no copies any more
        assert await depth(lifecycle, "synchronous", "preprocess") == 6

        status = await lifecycle.status()
        assert status.live == ["synchronous"]
        states = {p.profile: (p.state, p.messages) for p in status.profiles}
        assert states == {"synchronous": ("live", 6), "asynchronous": ("unbound", 3)}
        # asynchronous taking over again binds it again (its 3 messages are still there to re-predict).
        with pytest.raises(OtherProfileLive):
            await lifecycle.check(asynchronous)
    # Replaced, its 3 messages kept: starting its stages to drain them means taking the traffic back.
    code, _, err = await toposerve(settings, "down", "--profile", "asynchronous")
    assert code == 1 and "3 messages wait" in err, err
    assert "`toposerve up --profile asynchronous --replace` (takes the namespace back from synchronous)" in err


async def test_the_same_profile_twice_in_one_namespace_shares_its_queues(settings: Settings) -> None:
    asynchronous = load_profile("asynchronous")
    async with open_lifecycle(settings) as first, open_lifecycle(settings) as second:
        assert await first.claim(asynchronous) == []
        await publish_requests(settings, asynchronous, 1)
        assert await second.claim(asynchronous) == []  # a replica on another machine
        await second.check(asynchronous)
        status = await first.status()
        assert status.live == ["asynchronous"]
        assert [(p.profile, p.messages) for p in status.profiles] == [("asynchronous", 1)]


async def test_unrecorded_queues_of_a_profile_count_as_live(settings: Settings) -> None:
    # Made by a release before the lifecycle existed (or by `batch submit`): bound, so refused over.
    await publish_requests(settings, load_profile("asynchronous"), 1)
    async with open_lifecycle(settings) as lifecycle:
        status = await lifecycle.status()
        assert [(p.profile, p.state, p.recorded) for p in status.profiles] == [("asynchronous", "live", False)]
        with pytest.raises(OtherProfileLive):
            await lifecycle.claim(load_profile("synchronous"))


async def test_up_and_worker_refuse_over_another_live_profile_with_the_commands_to_swap(settings: Settings) -> None:
    async with open_lifecycle(settings) as lifecycle:
        await lifecycle.claim(load_profile("asynchronous"))
        await publish_requests(settings, load_profile("asynchronous"), 1)
    for command in (["up", "--profile", "synchronous", "--port", str(free_port())],
                    ["worker", "--profile", "synchronous", "--stage", "predict"],
                    ["ingress", "--profile", "synchronous", "--port", str(free_port())]):
        code, _, err = await toposerve(settings, *command)
        assert code == 1, (command, err)
        assert f"namespace '{settings.namespace}' has profile 'asynchronous' live" in err, err
        assert "`toposerve up --profile synchronous --replace`" in err and "`toposerve down --profile asynchronous`" in err
    async with open_lifecycle(settings) as lifecycle:  # nothing changed
        assert (await lifecycle.status()).live == ["asynchronous"]


def test_up_replace_takes_over_and_the_old_profiles_queues_get_no_copies(settings: Settings, tmp_path: Path) -> None:
    async def before() -> None:
        async with open_lifecycle(settings) as lifecycle:
            await lifecycle.claim(load_profile("asynchronous"))
        await publish_requests(settings, load_profile("asynchronous"), 2)

    asyncio.run(before())
    up = RunningProfile("synchronous", cli_env(settings), tmp_path / "up.log", extra=["--replace"])
    try:
        up.wait_ready()
        assert "profile 'asynchronous' unbound" in up.log() and "2 messages kept" in up.log()
        rows = httpx.post(f"{up.base_url}/v1/models/iris/predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]})
        assert rows.status_code == 200 and rows.json()["predictions"][0]["label"] == "setosa"  # features.iris
        path, label = sample_images()[0]
        image = httpx.post(f"{up.base_url}/v1/models/digits_fast/predict", json={"image": b64(path.read_bytes())})
        assert image.status_code == 200 and image.json()["predictions"][0]["label"] == label  # request.digits_fast
    finally:
        assert up.stop() == 0, up.log()

    status = asyncio.run(_cli_status(settings))
    assert status["live"] == ["synchronous"]
    old = next(p for p in status["profiles"] if p["profile"] == "asynchronous")
    assert old["state"] == "unbound"
    assert {q["name"].rsplit(".", 1)[1]: q["messages"] for q in old["queues"]} == {
        "preprocess": 2, "predict": 0, "store": 0}  # its 2 kept, not one copy of the 2 requests above
    code, out, err = asyncio.run(toposerve(settings, "status"))
    assert code == 0, err
    assert f"namespace {settings.namespace}: live profile synchronous" in out
    assert "  asynchronous: unbound, 2 messages, 0 consumers" in out
    assert f"    {settings.namespace}.asynchronous.preprocess: 2 messages, 0 consumers" in out
    assert "  synchronous: live" in out


async def _cli_status(settings: Settings) -> dict:
    code, out, err = await toposerve(settings, "status", "--json")
    assert code == 0, err
    return json.loads(out)


async def test_down_drains_through_the_running_stages_then_deletes_queues_and_keys(settings: Settings) -> None:
    asynchronous = load_profile("asynchronous")
    async with open_lifecycle(settings) as lifecycle:
        await lifecycle.claim(asynchronous)
    ids = await publish_requests(settings, asynchronous, 20)
    redis = connect_redis(settings.redis_url)
    guard_key = f"{settings.namespace}:unsettled:{settings.namespace}.asynchronous.predict:{uuid.uuid4()}"
    await redis.set(guard_key, 1, ex=600)
    runners = [build_stage_runner(asynchronous, stage, settings) for stage in asynchronous.stages]
    for runner in runners:
        await runner.start()
    try:
        code, out, err = await toposerve(settings, "down", "--profile", "asynchronous", "--timeout", "60")
    finally:
        for runner in runners:
            await runner.drain_and_close()
    try:
        assert code == 0, err
        assert "drained, no message dropped; deleted 3 queues" in out and "1 Redis keys" in out, out
        assert "takes no new work; draining" in err
        results = ResultStore(redis, settings.namespace, 3600)
        records = [await results.get(job_id) for job_id in ids]
        assert [r.status.value if r else None for r in records] == ["succeeded"] * 20
        assert await redis.exists(guard_key) == 0
        async with open_lifecycle(settings) as lifecycle:
            assert (await lifecycle.status()).profiles == []
            assert await lifecycle.records() == {}
        with pytest.raises(PublishRefused):  # nothing takes new work any more
            await publish_requests(settings, None, 1)
    finally:
        await redis.aclose()


async def test_down_without_consumers_refuses_and_force_drops_exactly_what_waited(settings: Settings) -> None:
    asynchronous = load_profile("asynchronous")
    async with open_lifecycle(settings) as lifecycle:
        await lifecycle.claim(asynchronous)
    await publish_requests(settings, asynchronous, 7)
    code, _, err = await toposerve(settings, "down", "--profile", "asynchronous")
    assert code == 1
    assert "7 messages wait in the queues of 'asynchronous' and no consumer is attached" in err, err
    assert "`toposerve down --profile asynchronous --force`" in err and "`toposerve up --profile asynchronous`" in err
    async with open_lifecycle(settings) as lifecycle:  # refused before touching anything
        assert await depth(lifecycle, "asynchronous", "preprocess") == 7
        assert (await lifecycle.status()).live == ["asynchronous"]

    code, out, err = await toposerve(settings, "down", "--profile", "asynchronous", "--force")
    assert code == 0, err
    assert "dropped 7 messages; deleted 3 queues" in out, out
    code, out, _ = await toposerve(settings, "status")
    assert code == 0 and out.strip() == f"namespace {settings.namespace}: no profile has queues here"


async def test_wrong_input_is_a_clear_error(settings: Settings) -> None:
    code, _, err = await toposerve(settings, "down", "--profile", "nope")
    assert code == 1 and f"no profile 'nope' in namespace '{settings.namespace}'" in err and "asynchronous" in err
    code, _, err = await toposerve(settings, "down", "--profile", "asynchronous")
    assert code == 1
    assert f"namespace '{settings.namespace}' has no queues of profile 'asynchronous'" in err, err
    code, out, _ = await toposerve(settings, "status", "--json")
    assert code == 0 and json.loads(out) == {"namespace": settings.namespace, "live": [], "profiles": []}
