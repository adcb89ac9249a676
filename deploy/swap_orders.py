"""How ``toposerve swap`` reaches the ``toposerve up`` that runs the live profile: one order in Redis.

The processes of a profile belong to the launcher that started them, so the command only
places an order (``{ns}:lifecycle:swap``, a ``SwapOrder``); the launcher of the live profile
takes it (one launcher: a ``SET NX`` on ``{ns}:lifecycle:swap:taken``), carries it out
(deploy/swap.py) and writes its progress back into it, which the command prints. Stage
accounts may not write these keys (their Redis rules name their own keys only).

Blocking Redis calls: both ends are synchronous programs (a command, the supervisor loop).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Literal

import redis
from pydantic import BaseModel, Field

# A finished order is kept a day (a command that lost its terminal can still read the outcome).
ORDER_TTL_S = 24 * 3600

OrderState = Literal["ordered", "running", "done", "failed"]


class SwapOrder(BaseModel):
    """``toposerve swap``'s order to the `toposerve up` running the live profile, and its progress."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    to: str = Field(description="The new profile: a shipped name or a YAML path (as `up --profile` takes)")
    from_profile: str = Field(description="The live profile when the order was placed")
    timeout_s: float = Field(gt=0, description="Bound of each waiting step (stages starting, handing over, draining)")
    state: OrderState = "ordered"
    taken_by: str | None = None
    lines: list[str] = Field(default_factory=list, description="Progress, in order")
    error: str | None = None
    placed_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")

    @property
    def abandoned(self) -> bool:
        """Unfinished long past what its steps may take (its launcher died mid-way): no longer in the way."""
        bound = timedelta(seconds=4 * self.timeout_s + 60)
        return not self.finished and datetime.now(UTC) - self.placed_at > bound


class OrderNotTaken(RuntimeError):
    """No launcher took the order in time (it is withdrawn)."""


class OrderBook:
    """The one swap order of a namespace."""

    def __init__(self, redis_url: str, namespace: str) -> None:
        self.client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=2)
        self.namespace = namespace
        self.key = f"{namespace}:lifecycle:swap"
        self.taken_key = f"{self.key}:taken"

    def close(self) -> None:
        self.client.close()

    def read(self) -> SwapOrder | None:
        raw = self.client.get(self.key)
        return SwapOrder.model_validate_json(raw) if raw else None

    def write(self, order: SwapOrder) -> None:
        self.client.set(self.key, order.model_dump_json(), ex=ORDER_TTL_S)

    def place(self, order: SwapOrder) -> SwapOrder | None:
        """Place ``order``; the order in progress instead, when there is one (nothing placed then)."""
        current = self.read()
        if current is not None and not current.finished and not current.abandoned:
            return current
        self.client.delete(self.taken_key)
        self.write(order)
        return None

    def take(self, live_profile: str, launcher: str) -> SwapOrder | None:
        """The order for this launcher's profile, taken by it (None: no order, or another launcher took it)."""
        order = self.read()
        if order is None or order.state != "ordered" or order.from_profile != live_profile:
            return None
        if not self.client.set(self.taken_key, order.id, nx=True, ex=ORDER_TTL_S):
            return None
        order.state, order.taken_by = "running", launcher
        self.write(order)
        return order

    def withdraw(self, order: SwapOrder, why: str) -> None:
        """Nobody took ``order``: it fails with ``why`` (unless a launcher took it meanwhile)."""
        if self.client.set(self.taken_key, order.id, nx=True, ex=ORDER_TTL_S):
            order.state, order.error = "failed", why
            self.write(order)

    def follow(self, order: SwapOrder, taken_s: float, overall_s: float, say: Callable[[str], None],
               poll_s: float = 0.2) -> SwapOrder:
        """Pass on the order's progress lines until it is finished; the finished order.

        Raises ``OrderNotTaken`` when no launcher took it within ``taken_s`` (withdrawn), and
        ``TimeoutError`` past ``overall_s`` (a launcher that died mid-way is not waited for ever).
        """
        shown = 0
        placed = time.monotonic()
        while True:
            current = self.read() or order
            for line in current.lines[shown:]:
                say(line)
            shown = len(current.lines)
            if current.finished:
                return current
            if current.state == "ordered" and time.monotonic() - placed > taken_s:
                self.withdraw(current, f"no launcher took the order within {taken_s:g} s")
                if (self.read() or current).state == "failed":
                    raise OrderNotTaken(current.id)
            if time.monotonic() - placed > overall_s:
                raise TimeoutError(current.id)
            time.sleep(poll_s)
