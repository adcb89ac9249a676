"""An event loop in a thread of its own, for the sync flavours of the asyncio clients."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """Runs coroutines on a private loop from code without one; ``stop`` runs ``close`` there first."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def stop(self, close: Callable[[], Awaitable[object]]) -> None:
        if self._loop.is_running():
            self.run(_awaited(close))
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)


async def _awaited(close: Callable[[], Awaitable[object]]) -> None:
    await close()
