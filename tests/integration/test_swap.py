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

# Starting `toposerve up` and swapping it under load are delivery-invariant tests, and the slow part
# of this file: `-m "not fault"` skips them (the refusals, quick, stay in the inner loop).
under_load = pytest.mark.fault

ROWS = [[5.1, 3.5, 1.4, 0.2], [5.9, 3.0, 4.2, 1.5], [6.7, 3.0, 5.2, 2.3], [4.9, 3.0, 1.4, 0.2]]


@dataclass
class LoadTally:
    """What every caller got, by HTTP status; the ids accepted, by how."""

    statuses: collections.Counter = field(default_factory=collections.Counter)
    answered: list[str] = field(default_factory=list)  # 200: the answer itself
    accepted: list[str] = field(default_factory=list)  # 202: a job to poll
    errors: list[str] = field(default_factory=list)  # 5xx and transport errors, with what was said
    by_phase: collections.Counter = field(default_factory=collections.Counter)  # (status, model)
    answers: list[tuple[float, int, str]] = field(default_factory=list)  # (when it came, status, model)

    def between(self, start: float, end: float) -> collections.Counter:
        """(status, model) of the answers that came in [start, end)."""
        return collections.Counter((status, model) for when, status, model in self.answers if start <= when < end)


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
            tally.answers.append((time.monotonic(), response.status_code, model))
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


@dataclass
class SwapRun:
    """One command's outcome, and when it ran (monotonic)."""

    code: int
    out: str
    err: str
    started: float
    ended: float


async def swaps_under_load(settings: Settings, tmp_path: Path, old: str, targets: list[str], models: list[str],
                           ) -> tuple[LoadTally, collections.Counter, list[SwapRun], RunningProfile]:
    """`toposerve up` of ``old`` under a steady load, then `toposerve swap --to` each of ``targets`` in turn."""
    up = RunningProfile(old, cli_env(settings), tmp_path / "up.log")
    await asyncio.to_thread(up.wait_ready)
    tally, seen, runs = LoadTally(), collections.Counter(), []
    stop_load, stop_spy = asyncio.Event(), asyncio.Event()
    spy = asyncio.create_task(terminal_messages(settings, stop_spy, seen))
    await asyncio.sleep(0.3)  # the spy queues bound
    load = asyncio.create_task(steady_load(up.base_url, models, stop_load, tally))
    try:
        await asyncio.sleep(0.6)
        for target in targets:
            before, started = sum(tally.statuses.values()), time.monotonic()
            code, out, err = await toposerve(settings, "swap", "--to", target, "--timeout", "30")
            runs.append(SwapRun(code, out, err, started, time.monotonic()))
            assert sum(tally.statuses.values()) > before  # the load ran through the swap
            await asyncio.sleep(0.6)
    finally:
        stop_load.set()
        await load
    statuses = await wait_for_jobs(settings, tally.accepted)
    stop_spy.set()
    await spy
    assert [s for s in statuses.values() if s != "succeeded"] == [], statuses
    print(f"[fault swap {old} -> {' -> '.join(Path(t).stem for t in targets)}] {sum(tally.statuses.values())} "
          f"requests: {dict(sorted(tally.by_phase.items()))}; {len(tally.errors)} errors; "
          f"swaps exit {[r.code for r in runs]}, took {[round(r.ended - r.started, 1) for r in runs]} s")
    return tally, seen, runs, up


def assert_every_request_counted(tally: LoadTally, seen: collections.Counter, up: RunningProfile) -> None:
    assert tally.errors == [], (tally.errors[:5], up.log()[-4000:])
    assert set(tally.statuses) <= {200, 202, 404}, tally.statuses
    ids = tally.answered + tally.accepted
    assert len(ids) == len(set(ids))  # every caller got its own job
    # No prediction or failure published twice (a model group's parts each have a key of their own).
    assert [key for key, n in seen.items() if n > 1] == []
    # Each accepted job ended: one terminal message under its model's own key (a group's too:
    # only the input that decided its join publishes the answer).
    finals = collections.Counter(i for i, key in seen if key.count(".") == 1)
    assert [i for i in tally.accepted if finals[i] == 0] == []
    assert [(i, key) for (i, key), n in seen.items() if key.count(".") == 1 and n != 1] == []


def broken_profile(tmp_path: Path) -> Path:
    """A profile one of whose stages cannot start: its handler's module does not exist (found only then)."""
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\nmodels: [iris]\ningress: {mode: sync}\nstages:\n"
                    "  predict: {kind: predict, consumes: ['features.*']}\n"
                    "  post: {kind: custom, handler: 'no_such_module:handle', consumes: ['prediction.*']}\n")
    return path


@under_load
async def test_swap_asynchronous_to_synchronous_to_prediction_cache_under_load_after_one_that_does_not_start(
        settings: Settings, tmp_path: Path) -> None:
    # One `toposerve up`, three swaps in a row under the same load (each a minute less than its own test).
    tally, seen, (failed, to_sync, to_cache), up = await swaps_under_load(
        settings, tmp_path, "asynchronous", [str(broken_profile(tmp_path)), "synchronous", "prediction_cache"],
        ["iris"])
    try:
        # The new profile that does not start: called off, the old one served on untouched.
        assert failed.code == 1, failed.err
        assert "profile 'broken' did not start: its stage process post[0] exited with code 1" in failed.err
        assert "the live profile serves on, untouched" in failed.err
        assert set(tally.between(failed.started, to_sync.started)) == {(202, "iris")}  # async all along
        # asynchronous -> synchronous: 202 (then succeeded) before, 200 with the answer after.
        assert to_sync.code == 0, to_sync.err + up.log()[-4000:]
        assert f"namespace {settings.namespace}: swapped from asynchronous to synchronous (sync now)" in to_sync.out
        assert "on standby" in to_sync.err and "asynchronous.predict: drained and stopped" in to_sync.err
        assert "1 ingress processes serve it" in to_sync.err, to_sync.err
        assert set(tally.between(to_sync.ended, to_cache.started)) == {(200, "iris")}, tally.by_phase
        # synchronous -> prediction_cache: sync on both sides, so no caller sees anything but 200.
        assert to_cache.code == 0, to_cache.err + up.log()[-4000:]
        assert set(tally.between(to_sync.ended, time.monotonic())) == {(200, "iris")}, tally.by_phase
        assert_every_request_counted(tally, seen, up)
        assert tally.by_phase[(202, "iris")] > 0 and tally.by_phase[(200, "iris")] > 0, tally.by_phase

        status = await _cli_status(settings)
        assert status["live"] == ["prediction_cache"]
        states = {p["profile"]: p for p in status["profiles"]}
        assert set(states) == {"prediction_cache", "synchronous", "asynchronous"}  # broken's queues are gone
        for old in ("synchronous", "asynchronous"):  # unbound, drained, no consumer left
            assert states[old]["state"] == "unbound"
            assert [(q["messages"], q["consumers"]) for q in states[old]["queues"]] == [(0, 0)] * len(
                states[old]["queues"])
        async with open_lifecycle(settings) as lifecycle:
            assert "broken" not in await lifecycle.records()
        # The new profile answers: a repeated input comes from its cache.
        async with httpx.AsyncClient(base_url=up.base_url) as client:
            await client.post("/v1/models/iris/predict", json={"instances": [ROWS[0]]})
            again = await client.post("/v1/models/iris/predict", json={"instances": [ROWS[0]]})
        assert again.status_code == 200 and again.headers["x-cache"] == "hit", again.headers
    finally:
        assert up.stop() == 0, up.log()[-4000:]


@under_load
async def test_swap_asynchronous_to_horizontal_microservice_under_load(settings: Settings, tmp_path: Path) -> None:
    # The two profiles serve different models: iris before, the iris_species group after
    # (the other one is a 404 unknown_model: refused, never accepted).
    tally, seen, (swapped,), up = await swaps_under_load(settings, tmp_path, "asynchronous",
                                                         ["horizontal_microservice"], ["iris", "iris_species"])
    try:
        assert swapped.code == 0, swapped.err + up.log()[-4000:]
        # Each member predicted each group job once (its part's key), the plain model's jobs once.
        assert_every_request_counted(tally, seen, up)
        assert set(tally.between(0, swapped.started)) == {(202, "iris"), (404, "iris_species")}
        assert set(tally.between(swapped.ended, time.monotonic())) == {(202, "iris_species"), (404, "iris")}
    finally:
        assert up.stop() == 0, up.log()[-4000:]


async def test_wrong_swaps_are_refused_with_what_was_wrong(settings: Settings, tmp_path: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: [unclosed\n")
    missing_model = tmp_path / "missing.yaml"
    missing_model.write_text("name: missing\nmodels: [no_such_model]\ningress: {mode: sync}\n"
                             "stages:\n  predict: {kind: predict, consumes: ['features.*']}\n")
    # Independent commands: run side by side.
    (code, _, no_live), (code2, _, bad), (code3, _, missing), (code4, _, unknown) = await asyncio.gather(
        toposerve(settings, "swap", "--to", "synchronous"), toposerve(settings, "swap", "--to", str(bad_yaml)),
        toposerve(settings, "swap", "--to", str(missing_model)), toposerve(settings, "swap", "--to", "nope"))
    assert code == 1 and f"namespace '{settings.namespace}' has no live profile" in no_live, no_live
    assert code2 == 1 and "not valid YAML" in bad, bad
    assert code3 == 1 and "['no_such_model'] are not in the model manifest" in missing, missing
    assert code4 == 1 and "no profile 'nope'" in unknown, unknown

    async with open_lifecycle(settings) as lifecycle:
        await lifecycle.claim(load_profile("asynchronous"))
    await publish_requests(settings, load_profile("asynchronous"), 0)  # its queues, bound: live (no `up` runs it)
    (code, _, same), (code2, _, untaken) = await asyncio.gather(
        toposerve(settings, "swap", "--to", "asynchronous"),
        toposerve(settings, "swap", "--to", "synchronous", "--wait-taken", "1"))
    assert code == 1 and "profile 'asynchronous' is already live" in same, same
    assert code2 == 1 and "no `toposerve up --profile asynchronous`" in untaken, untaken
    assert "took the swap order" in untaken and "`toposerve up --profile synchronous --replace`" in untaken
    async with open_lifecycle(settings) as lifecycle:  # nothing changed
        assert (await lifecycle.status()).live == ["asynchronous"]
