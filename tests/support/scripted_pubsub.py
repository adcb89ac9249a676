"""A Redis subscription, scripted: the messages it hands out, for unit tests of its readers."""

from __future__ import annotations

import asyncio


class ScriptedPubSub:
    """Hands out ``messages`` (swap acknowledgements and the like) one per ``get_message``,
    then nothing, after a short wait as a real subscription would."""

    def __init__(self, messages: list[str]) -> None:
        self.messages = list(messages)

    async def subscribe(self, channel: str) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def get_message(self, timeout: float) -> dict | None:
        if self.messages:
            return {"type": "message", "data": self.messages.pop(0).encode()}
        await asyncio.sleep(min(timeout, 0.01))
        return None
