"""Stopping background tasks reliably.

On Python 3.11, ``asyncio.wait_for`` swallows a cancellation that arrives just as its
inner awaitable finishes (bpo-42130), and redis-py can do the same while it connects.
A task in a loop then carries on, and a plain ``task.cancel(); await task`` waits for
ever: an app's shutdown hung on that once in CI. So cancel until the task is done.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


async def stop_task(task: asyncio.Task | None, timeout_s: float = 5.0, grace_s: float = 1.0,
                    retry_s: float = 0.05) -> bool:
    """Cancel ``task`` until it is done or ``timeout_s`` passes; True when it is done.

    After the first cancellation the task gets ``grace_s`` to run its clean-up (closing
    a connection, say) before it is cancelled again.
    """
    if task is None:
        return True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    wait_s = grace_s
    while not task.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            log.warning("background task %s did not stop within %.1f s; leaving it", task.get_name(), timeout_s)
            return False
        task.cancel()
        await asyncio.wait({task}, timeout=min(wait_s, remaining))
        wait_s = retry_s
    if not task.cancelled() and task.exception() is not None:
        log.warning("background task %s had failed: %r", task.get_name(), task.exception())
    return True
