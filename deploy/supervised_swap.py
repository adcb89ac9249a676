"""The launcher's side of a swap: it takes the order and lends its supervisor's processes (deploy/swap.py).

``toposerve up`` owns the processes of the profile it runs, so it is the one that can start
the new profile's stages and stop the old one's. ``SwapDesk.poll`` runs in its supervision
loop: an order for its profile (deploy/swap_orders.py) is taken and carried out there, while
the ingress (a child process that follows the namespace) switches by itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable

import redis

from toposerve.brokers import Settings
from toposerve.deploy.launcher import STANDBY, Child, Supervisor, stage_children, terminate
from toposerve.deploy.profile import Profile
from toposerve.deploy.swap import carry_out
from toposerve.deploy.swap_orders import OrderBook, SwapOrder

log = logging.getLogger(__name__)
Say = Callable[[str], None]
# How often the supervision loop looks for an order (one Redis GET).
ORDER_POLL_S = 0.5


class SupervisedStages:
    """``StageProcesses`` over a supervisor: the old profile's stages are its children; the new
    profile's run beside them on standby until the swap commits."""

    def __init__(self, supervisor: Supervisor, stop_timeout_s: float) -> None:
        self.supervisor = supervisor
        self.stop_timeout_s = stop_timeout_s
        self.standby: list[Child] = []
        self.stopped: dict[str, list[Child]] = {}

    def start_standby(self, profile: Profile, source: str) -> None:
        self.standby = stage_children(profile, source, standby=True)
        for child in self.standby:
            self.supervisor.start(child)

    def exited_standby(self) -> str | None:
        for child in self.standby:
            code = child.process.poll() if child.process is not None else None
            if code is not None:
                return f"its stage process {child.name} exited with code {code}"
        return None

    def discard_standby(self) -> None:
        terminate(self.standby, self.stop_timeout_s)
        self.standby = []

    def stop_stage(self, stage: str) -> None:
        # Out of the supervisor first, or it would restart what the swap stops.
        children = [c for c in self.supervisor.children if c.stage == stage]
        self.supervisor.children = [c for c in self.supervisor.children if c.stage != stage]
        self.stopped.setdefault(stage, []).extend(children)
        terminate(children, self.stop_timeout_s)

    def start_stage(self, stage: str) -> None:
        children = self.stopped.pop(stage, [])
        for child in children:
            self.supervisor.start(child)
        self.supervisor.children.extend(children)

    def commit(self, profile: Profile, source: str) -> None:
        # Restarted later (a crash), they start as the live profile's stages: bound, checked.
        for child in self.standby:
            child.argv = [arg for arg in child.argv if arg != STANDBY]
        self.supervisor.children.extend(self.standby)
        self.standby = []
        self.stopped.clear()
        for child in self.supervisor.children:
            if child.stage is None and "--profile" in child.argv:  # the ingress follows by itself; a restart too
                child.argv[child.argv.index("--profile") + 1] = source


class SwapDesk:
    """Takes the swap orders for the profile this launcher runs, and carries them out."""

    def __init__(self, settings: Settings, profile: Profile, supervisor: Supervisor, say: Say) -> None:
        self.settings = settings
        self.profile = profile
        self.supervisor = supervisor
        self.say = say
        self.book = OrderBook(settings.redis_url, settings.namespace)
        self.launcher = f"{socket.gethostname()}:{os.getpid()}"
        self._next_look = 0.0
        self._unreachable = False

    def close(self) -> None:
        self.book.close()

    def poll(self) -> None:
        now = time.monotonic()
        if now < self._next_look:
            return
        self._next_look = now + ORDER_POLL_S
        try:
            order = self.book.take(self.profile.name, self.launcher)
        except redis.RedisError as exc:
            if not self._unreachable:  # said once, not every half second
                self.say(f"cannot look for swap orders in Redis ({type(exc).__name__}: {exc})")
            self._unreachable = True
            return
        self._unreachable = False
        if order is not None:
            self._carry_out(order)

    def _carry_out(self, order: SwapOrder) -> None:
        started = time.monotonic()

        def report(line: str) -> None:
            line = f"[{time.monotonic() - started:5.1f} s] {line}"  # where the time goes, for whoever waits
            order.lines.append(line)
            self.book.write(order)
            self.say(line)

        report(f"swap {order.id}: {self.profile.name!r} -> {order.to!r}, taken by {self.launcher}")
        stages = SupervisedStages(self.supervisor, self.settings.drain_timeout_s + 5)
        try:
            new = asyncio.run(carry_out(order, self.profile, self.settings, stages, report))
        except Exception as exc:  # noqa: BLE001 - whatever went wrong is the order's answer; the launcher serves on
            log.debug("swap %s failed", order.id, exc_info=True)
            order.state, order.error = "failed", str(exc) or type(exc).__name__
            self.book.write(order)
            self.say(f"swap failed: {order.error}")
            return
        self.profile = new
        order.state = "done"
        self.book.write(order)
