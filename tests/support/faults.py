"""Bookkeeping for fault-injection tests: a steady load, a duplicate counter, a summary.

The load runs in the test's event loop against the in-process ingress (httpx over
ASGI), one POST every ``interval_s``, bounded in count and time. Each POST is
recorded with its status and how long it took, so a test can say what callers saw
while a service was down. ``DoneCounter`` counts the store's ``job-done``
announcements (one per terminal write), so a job written twice shows up.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Self

import redis.asyncio as redis

from tests.integration.conftest import Stack
from tests.support.images import b64, sample_images
from toposerve.brokers import JobDone

# "Quick, never a hang": a refused call is typically answered in milliseconds (the summaries
# report the slowest); a hang would last until the client gives up (5 s). The bound between
# them is loose on purpose, so a loaded CI machine does not fail a test that holds.
NO_HANG_S = 3.0

IRIS_ROWS = {"setosa": [5.1, 3.5, 1.4, 0.2], "versicolor": [5.9, 3.0, 4.2, 1.5], "virginica": [6.7, 3.0, 5.2, 2.3]}


@dataclass(frozen=True)
class Request:
    """One kind of predict call and the label a correct answer carries."""

    model: str
    body: dict
    label: str


def iris_requests() -> list[Request]:
    return [Request("iris", {"instances": [row]}, label) for label, row in IRIS_ROWS.items()]


def digit_requests() -> list[Request]:
    return [Request("digits_fast", {"image": b64(path.read_bytes())}, label) for path, label in sample_images()]


@dataclass
class Sent:
    at: float
    status: int  # 0: the client gave up waiting (a hang); -1: the call raised
    seconds: float
    request: Request
    job_id: str | None = None  # async: the accepted job
    answer: str | None = None  # sync: the label answered

    @property
    def correct(self) -> bool:
        return self.answer == self.request.label


class SteadyLoad:
    """Calls ``_one(i)`` every ``interval_s`` in the background, at most ``max_calls`` times
    and for ``max_seconds``; ``stop()`` waits for the calls still running."""

    def __init__(self, interval_s: float, max_calls: int = 10**9, max_seconds: float = 60.0) -> None:
        self.interval_s = interval_s
        self.max_calls = max_calls
        self.max_seconds = max_seconds
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> Self:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _one(self, i: int) -> None:
        raise NotImplementedError

    async def _run(self) -> None:
        started = time.monotonic()
        pending: set[asyncio.Task] = set()
        i = 0
        while not self._stop.is_set() and i < self.max_calls and time.monotonic() - started < self.max_seconds:
            task = asyncio.create_task(self._one(i))
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)
        if pending:
            await asyncio.wait(pending)


class Load(SteadyLoad):
    """Predict POSTs, one every ``interval_s``, cycling through ``requests``; each recorded in ``sent``."""

    def __init__(self, stack: Stack, requests: list[Request] | None = None, params: dict[str, str] | None = None,
                 interval_s: float = 0.02, max_requests: int = 1500, max_seconds: float = 60.0,
                 client_timeout_s: float = 5.0) -> None:
        super().__init__(interval_s, max_requests, max_seconds)
        self.stack = stack
        self.requests = requests if requests is not None else iris_requests()
        self.params = params or {}  # e.g. a sync deadline: {"timeout": "2"}
        self.client_timeout_s = client_timeout_s
        self.sent: list[Sent] = []

    async def _one(self, i: int) -> None:
        request = self.requests[i % len(self.requests)]
        at = time.monotonic()
        try:
            response = await asyncio.wait_for(
                self.stack.client.post(f"/v1/models/{request.model}/predict", json=request.body, params=self.params),
                self.client_timeout_s)
        except TimeoutError:
            self.sent.append(Sent(at, 0, time.monotonic() - at, request))
            return
        except Exception as exc:  # recorded, never lost: a test then sees status -1
            self.sent.append(Sent(at, -1, time.monotonic() - at, request, answer=repr(exc)))
            return
        sent = Sent(at, response.status_code, time.monotonic() - at, request)
        try:
            if response.status_code == 202:
                sent.job_id = response.json().get("id")
            elif response.status_code == 200:
                sent.answer = response.json()["predictions"][0]["label"]
        except (ValueError, KeyError, IndexError) as exc:
            sent.status, sent.answer = -1, f"unreadable {response.status_code} body: {exc!r}"
        self.sent.append(sent)

    def accepted(self) -> dict[str, str]:
        """Async: job id -> the label its result must carry."""
        return {s.job_id: s.request.label for s in self.sent if s.status == 202 and s.job_id}

    def between(self, start: float, end: float) -> list[Sent]:
        """The POSTs sent and answered within [start, end]."""
        return [s for s in self.sent if start <= s.at and s.at + s.seconds <= end]

    def statuses(self, sent: list[Sent] | None = None) -> Counter[int]:
        return Counter(s.status for s in (self.sent if sent is None else sent))


class DoneCounter:
    """Counts the store's terminal-write announcements per job id; resubscribes after an outage."""

    def __init__(self, url: str, channel: str) -> None:
        self.url = url
        self.channel = channel
        self.counts: Counter[str] = Counter()
        self._task: asyncio.Task | None = None

    def start(self) -> DoneCounter:
        self._task = asyncio.create_task(self._run())
        return self

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def duplicated(self, ids: list[str]) -> int:
        wanted = set(ids)
        return sum(c - 1 for i, c in self.counts.items() if i in wanted and c > 1)

    async def _run(self) -> None:
        while True:
            client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            self.counts[JobDone.parse(message["data"]).job_id] += 1
            except (redis.RedisError, OSError):
                await asyncio.sleep(0.2)
            finally:
                await client.aclose()


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.1) -> float:
    """Seconds until ``predicate()`` held; fails after ``timeout``."""
    waited = await wait_for_condition(predicate, timeout, interval)
    if waited is None:
        raise AssertionError(f"condition not reached within {timeout} s")
    return waited


async def wait_for_condition(predicate: Callable[[], Awaitable[bool]], timeout: float,
                             interval: float = 0.1) -> float | None:
    """Seconds until ``predicate()`` held, or None after ``timeout`` (for a caller that reports first)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await predicate():
            return time.monotonic() - started
        await asyncio.sleep(interval)
    return None


async def records(stack: Stack, ids: list[str]) -> dict[str, dict]:
    found = await asyncio.gather(*(stack.results.get(uuid.UUID(i)) for i in ids))
    return {i: r.model_dump(mode="json") for i, r in zip(ids, found, strict=True) if r is not None}


async def all_terminal(stack: Stack, ids: list[str]) -> bool:
    try:
        found = await records(stack, ids)
    except redis.RedisError:
        return False
    return len(found) == len(ids) and all(r["status"] != "pending" for r in found.values())


async def readyz(stack: Stack) -> tuple[int, dict]:
    response = await stack.client.get("/readyz")
    return response.status_code, response.json()


async def is_ready(stack: Stack) -> bool:
    return (await readyz(stack))[0] == 200


def summary(scenario: str, *, sent: int, accepted: int, completed: int, lost: int, duplicated: int | None,
            recover_s: float | None, **extra: object) -> str:
    """One line per scenario, the same shape everywhere; tests/conftest.py collects them at the end
    of the pytest output. ``duplicated`` None: not observable in that scenario (shown as n/a)."""
    recover = "n/a" if recover_s is None else f"{recover_s:.2f}s"
    duplicated = "n/a" if duplicated is None else duplicated
    tail = "".join(f" {k}={v}" for k, v in extra.items())
    line = (f"[fault {scenario}] sent={sent} accepted={accepted} completed={completed} "
            f"lost={lost} duplicated={duplicated} recover={recover}{tail}")
    print(f"\n{line}")
    return line


async def check_exactly_once(stack: Stack, load: Load, done: DoneCounter, scenario: str, recovered_s: float | None,
                             extra_ids: list[str] = ()) -> None:
    """Every accepted async job (and ``extra_ids``) ended once, succeeded, with the right label.

    ``lost``: jobs still pending (or gone) after a minute; ``duplicated``: jobs whose terminal
    record was written more than once (the store announces each write it makes; its Lua
    script writes only the first terminal state, and this would catch it if it did not).
    """
    accepted = load.accepted()
    ids = [*accepted, *extra_ids]
    await wait_for_condition(lambda: all_terminal(stack, ids), timeout=60, interval=0.25)
    found = await records(stack, ids)
    completed = sum(1 for r in found.values() if r["status"] == "succeeded")
    lost = len(ids) - len(found) + sum(1 for r in found.values() if r["status"] == "pending")
    # Announcements can lag the records a little; a Redis outage can hide some (never add any).
    await asyncio.sleep(0.5)
    duplicated = done.duplicated(ids)
    summary(scenario, sent=len(load.sent) + len(extra_ids), accepted=len(ids), completed=completed, lost=lost,
            duplicated=duplicated, recover_s=recovered_s, announced=len(done.counts))
    assert lost == 0
    assert duplicated == 0
    assert completed == len(ids), [r for r in found.values() if r["status"] != "succeeded"][:3]
    for job_id, label in accepted.items():
        assert [p["label"] for p in found[job_id]["predictions"]] == [label]
