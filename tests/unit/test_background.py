"""stop_task: a background loop that swallows a cancellation still stops."""

from __future__ import annotations

import asyncio

from toposerve.brokers.background import stop_task


async def _swallows_cancellations(times: int, give_up: asyncio.Event) -> None:
    # What a loop around Python 3.11's wait_for looks like when the race hits: the
    # cancellation is lost and the loop goes round again.
    swallowed = 0
    while not give_up.is_set():
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            if swallowed == times:
                raise
            swallowed += 1


async def test_a_loop_that_swallows_cancellations_is_cancelled_until_it_stops() -> None:
    task = asyncio.create_task(_swallows_cancellations(3, asyncio.Event()))
    await asyncio.sleep(0.03)
    assert await stop_task(task, timeout_s=2)
    assert task.cancelled()


async def test_a_task_that_never_stops_is_given_up_after_the_timeout() -> None:
    give_up = asyncio.Event()
    task = asyncio.create_task(_swallows_cancellations(10**9, give_up))
    await asyncio.sleep(0.03)  # started: a task cancelled before its first step never runs
    assert not await stop_task(task, timeout_s=0.2)
    assert not task.done()
    give_up.set()
    await task


async def test_finished_and_missing_tasks_are_fine() -> None:
    assert await stop_task(None)
    task = asyncio.create_task(asyncio.sleep(0))
    await task
    assert await stop_task(task)
