"""`toposerve swap --to NAME` under a steady load, on real RabbitMQ and Redis, with a real `toposerve up`.

Every request is counted: each one accepted (200 with its answer, or 202 with a job that
must end ``succeeded``) is completed exactly once, none is answered with a 5xx or lost, and
no job's prediction or failure is published twice (a spy queue on the exchange sees every
terminal message that goes through it). A swap whose new profile does not start leaves the
old one serving, under the same load.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.integration.test_lifecycle import _cli_status, cli_env, publish_requests, toposerve
from tests.support.processes import RunningProfile
from tests.support.spy import spy_queue
from toposerve.brokers import ResultStore, Settings, connect_redis
from toposerve.deploy.lifecycle import open_lifecycle
from toposerve.deploy.profile import load_profile

# Starts `toposerve up` and swaps under load: a delivery-invariant test (`-m "not fault"` skips it).
pytestmark = pytest.mark.fault

ROWS = [[5.1, 3.5, 1.4, 0.2], [5.9, 3.0, 4.2, 1.5], [6.7, 3.0, 5.2, 2.3], [4.9, 3.0, 1.4, 0.2]]


@dataclass
class LoadTally:
    """What every caller got, by HTTP status; the ids accepted, by how."""

    statuses: collections.Counter = field(default_factory=collections.Counter)
    answered: list[str] = field(default_factory=list)  # 200: the answer itself
    accepted: list[str] = field(default_factory=list)  # 202: a job to poll
    errors: list[str] = field(default_factory=list)  # 5xx and transport errors, with what was said
    by_phase: collections.Counter = field(default_factory=collections.Counter)  # (status, model)


async def steady_load(base_url: str, models: list[str], stop: asyncio.Event, tally: LoadTally,
                      callers: int = 6, pause_s: float = 0.02) -> None:
    """``callers`` concurrent callers, each posting one request after another (cycling ``models``)."""
    rows = itertools.count()

    async def caller(client: httpx.AsyncClient, index: int) -> None:
        for n in itertools.count(index):
            if stop.is_set():
                return
            model = models[n % len(models)]
            try:
                response = await client.post(f"/v1/models/{model}/predict",
                                             json={"instances": [ROWS[next(rows) % len(ROWS)]]})
            except httpx.HTTPError as exc:
                tally.errors.append(f"{model}: {type(exc).__name__}: {exc}")
                continue
            tally.statuses[response.status_code] += 1
            tally.by_phase[(response.status_code, model)] += 1
            if response.status_code == 200:
                tally.answered.append(response.json()["id"])
            elif response.status_code == 202:
                tally.accepted.append(response.json()["id"])
            elif response.status_code >= 500:
                tally.errors.append(f"{model}: {response.status_code} {response.text}")
            await asyncio.sleep(pause_s)

    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        await asyncio.gather(*(caller(client, i) for i in range(callers)))


async def terminal_messages(settings: Settings, stop: asyncio.Event, seen: collections.Counter) -> None:
    """Count every prediction and failure published on the exchange, by job id and routing key."""
    async with spy_queue(settings, "prediction.#") as predictions, spy_queue(settings, "failure.#") as failures:
        await failures.bind(await predictions.channel.get_exchange(f"{settings.namespace}.inference"), "failure.#")

        async def count(message) -> None:
            async with message.process():
                seen[(json.loads(message.body)["id"], message.routing_key)] += 1

        await predictions.consume(count)
        await failures.consume(count)
        await stop.wait()
        await asyncio.sleep(1.0)  # the last copies


async def wait_for_jobs(settings: Settings, ids: list[str], timeout_s: float = 30) -> dict[str, str | None]:
    """Each job's status once every one has ended (or the timeout passed)."""
    client = connect_redis(settings.redis_url)
    store = ResultStore(client, settings.namespace, 3600)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            records = {i: await store.get(uuid.UUID(i)) for i in ids}
            statuses = {i: r.status.value if r else None for i, r in records.items()}
            if all(s in ("succeeded", "failed") for s in statuses.values()) or time.monotonic() > deadline:
                return statuses
            await asyncio.sleep(0.25)
    finally:
        await client.aclose()


async def swap_under_load(settings: Settings, tmp_path: Path, old: str, new: str, models: list[str],
                          swap_args: tuple[str, ...] = ()) -> tuple[LoadTally, collections.Counter, tuple[int, str, str],
                                                                    RunningProfile]:
    up = RunningProfile(old, cli_env(settings), tmp_path / "up.log")
    await asyncio.to_thread(up.wait_ready)
    tally, seen = LoadTally(), collections.Counter()
    stop_load, stop_spy = asyncio.Event(), asyncio.Event()
    spy = asyncio.create_task(terminal_messages(settings, stop_spy, seen))
    await asyncio.sleep(0.5)  # the spy queues bound
    load = asyncio.create_task(steady_load(up.base_url, models, stop_load, tally))
    try:
        await asyncio.sleep(1.5)
        before = sum(tally.statuses.values())
        result = await toposerve(settings, "swap", "--to", new, "--timeout", "30", *swap_args)
        assert sum(tally.statuses.values()) > before  # the load ran through the swap
        await asyncio.sleep(1.5)
    finally:
        stop_load.set()
        await load
    statuses = await wait_for_jobs(settings, tally.accepted)
    stop_spy.set()
    await spy
    assert [s for s in statuses.values() if s != "succeeded"] == [], statuses
    print(f"[fault swap {old} -> {Path(new).stem}] {sum(tally.statuses.values())} requests: "
          f"{dict(sorted(tally.by_phase.items()))}; {len(tally.errors)} errors; swap exit {result[0]}")
    return tally, seen, result, up


def assert_every_request_counted(tally: LoadTally, seen: collections.Counter, up: RunningProfile,
                                 announced_again: frozenset[str] = frozenset()) -> None:
    """``announced_again``: keys an aggregate publishes its kept decision under each time it
    decides (the full set of parts, then the join timeout): the same answer, more than once."""
    assert tally.errors == [], (tally.errors[:5], up.log()[-4000:])
    assert set(tally.statuses) <= {200, 202, 404}, tally.statuses
    ids = tally.answered + tally.accepted
    assert len(ids) == len(set(ids))  # every caller got its own job
    # No prediction or failure published twice (a model group's parts each have a key of their own).
    assert [key for key, n in seen.items() if n > 1 and key[1] not in announced_again] == []
    # Each accepted job ended: a terminal message under its model's own key (once, but for a group's).
    finals = collections.Counter(i for i, key in seen if key.count(".") == 1)
    assert [i for i in tally.accepted if finals[i] == 0] == []
    assert [(i, key) for (i, key), n in seen.items() if key.count(".") == 1 and key not in announced_again
            and n != 1] == []


async def test_swap_asynchronous_to_synchronous_under_load(settings: Settings, tmp_path: Path) -> None:
    tally, seen, (code, out, err), up = await swap_under_load(settings, tmp_path, "asynchronous", "synchronous",
                                                              ["iris"])
    try:
        assert code == 0, err + up.log()[-4000:]
        assert f"namespace {settings.namespace}: swapped from asynchronous to synchronous (sync now)" in out
        assert "on standby" in err and "hand" in err and "asynchronous.predict: drained and stopped" in err, err
        assert_every_request_counted(tally, seen, up)
        # Async before (202, then succeeded), sync after (200 with the answer): the mode switched.
        assert tally.by_phase[(202, "iris")] > 0 and tally.by_phase[(200, "iris")] > 0, tally.by_phase
        status = await _cli_status(settings)
        assert status["live"] == ["synchronous"]
        old = next(p for p in status["profiles"] if p["profile"] == "asynchronous")
        assert old["state"] == "unbound"
        assert sum(q["messages"] for q in old["queues"]) == 0 and sum(q["consumers"] for q in old["queues"]) == 0
    finally:
        assert up.stop() == 0, up.log()[-4000:]


async def test_swap_synchronous_to_prediction_cache_under_load(settings: Settings, tmp_path: Path) -> None:
    tally, seen, (code, _, err), up = await swap_under_load(settings, tmp_path, "synchronous", "prediction_cache",
                                                            ["iris"])
    try:
        assert code == 0, err + up.log()[-4000:]
        assert_every_request_counted(tally, seen, up)
        assert set(tally.statuses) == {200}, tally.statuses  # sync before and after: no caller saw the swap
        async with open_lifecycle(settings) as lifecycle:
            assert (await lifecycle.status()).live == ["prediction_cache"]
        # The new profile answers: a repeated input comes from its cache.
        async with httpx.AsyncClient(base_url=up.base_url) as client:
            await client.post("/v1/models/iris/predict", json={"instances": [ROWS[0]]})
            again = await client.post("/v1/models/iris/predict", json={"instances": [ROWS[0]]})
        assert again.status_code == 200 and again.headers["x-cache"] == "hit", again.headers
    finally:
        assert up.stop() == 0, up.log()[-4000:]


async def test_swap_asynchronous_to_horizontal_microservice_under_load(settings: Settings, tmp_path: Path) -> None:
    # The two profiles serve different models: iris before, the iris_species group after
    # (the other one is a 404 unknown_model: refused, never accepted).
    tally, seen, (code, _, err), up = await swap_under_load(settings, tmp_path, "asynchronous",
                                                            "horizontal_microservice", ["iris", "iris_species"])
    try:
        assert code == 0, err + up.log()[-4000:]
        # Each member predicted each group job once (its part's key), the plain model's jobs once.
        assert_every_request_counted(tally, seen, up, announced_again=frozenset({"prediction.iris_species"}))
        assert tally.by_phase[(202, "iris")] > 0 and tally.by_phase[(202, "iris_species")] > 0, tally.by_phase
        assert tally.by_phase[(404, "iris_species")] > 0 and tally.by_phase[(404, "iris")] > 0, tally.by_phase
    finally:
        assert up.stop() == 0, up.log()[-4000:]


async def test_a_swap_whose_new_profile_does_not_start_leaves_the_old_one_serving(settings: Settings,
                                                                                 tmp_path: Path) -> None:
    # A stage that cannot start: its handler's module does not exist (found only when it starts).
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "name: broken\nmodels: [iris]\ningress: {mode: sync}\nstages:\n"
        "  predict: {kind: predict, consumes: ['features.*']}\n"
        "  post: {kind: custom, handler: 'no_such_module:handle', consumes: ['prediction.*']}\n")
    tally, seen, (code, _, err), up = await swap_under_load(settings, tmp_path, "asynchronous", str(broken), ["iris"])
    try:
        assert code == 1, err
        assert "profile 'broken' did not start: its stage process post[0] exited with code 1" in err, err
        assert "the live profile serves on, untouched" in err
        assert_every_request_counted(tally, seen, up)
        assert set(tally.statuses) == {202}, tally.statuses  # async throughout: the ingress never switched
        async with open_lifecycle(settings) as lifecycle:
            status = await lifecycle.status()
            assert status.live == ["asynchronous"]
            assert [p.profile for p in status.profiles] == ["asynchronous"]  # the new one's queues are gone
            assert "broken" not in await lifecycle.records()
    finally:
        assert up.stop() == 0, up.log()[-4000:]


async def test_wrong_swaps_are_refused_with_what_was_wrong(settings: Settings, tmp_path: Path) -> None:
    code, _, err = await toposerve(settings, "swap", "--to", "synchronous")
    assert code == 1 and f"namespace '{settings.namespace}' has no live profile" in err, err
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: [unclosed\n")
    code, _, err = await toposerve(settings, "swap", "--to", str(bad_yaml))
    assert code == 1 and "not valid YAML" in err, err
    missing_model = tmp_path / "missing.yaml"
    missing_model.write_text("name: missing\nmodels: [no_such_model]\ningress: {mode: sync}\n"
                             "stages:\n  predict: {kind: predict, consumes: ['features.*']}\n")
    code, _, err = await toposerve(settings, "swap", "--to", str(missing_model))
    assert code == 1 and "['no_such_model'] are not in the model manifest" in err, err
    code, _, err = await toposerve(settings, "swap", "--to", "nope")
    assert code == 1 and "no profile 'nope'" in err, err
    async with open_lifecycle(settings) as lifecycle:
        await lifecycle.claim(load_profile("asynchronous"))
    await publish_requests(settings, load_profile("asynchronous"), 0)  # its queues, bound: live (no `up` runs it)
    code, _, err = await toposerve(settings, "swap", "--to", "asynchronous")
    assert code == 1 and "profile 'asynchronous' is already live" in err, err
    code, _, err = await toposerve(settings, "swap", "--to", "synchronous", "--wait-taken", "1")
    assert code == 1 and "no `toposerve up --profile asynchronous`" in err and "took the swap order" in err, err
