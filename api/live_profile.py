"""The ingress follows the namespace's live profile: it holds new work while a swap hands over, then serves the new one.

A swap (deploy/swap.py) moves a namespace from one profile to another while callers keep
calling. The ingress's part, owned here:

- when its profile starts handing over, it **holds** every request that would put work in
  (POST, PUT, ...; reads pass), waits for the ones already inside to finish (a sync caller's
  answer comes from the old stages, still running), then acknowledges: from then on nothing
  of the old mode is in flight here, so the swap may unbind and drain the old profile;
- when the new profile is live, it starts an ``Ingress`` for it (its mode, models and queues),
  serves every held and later request with it, and closes the old one once the requests that
  were using it are done;
- when the swap is called off (the new profile failed to start), it lets the held requests
  through to the old profile, which never stopped.

Where the live profile is read (Redis, the lifecycle record) is the composition root's
business: it hands over a ``LiveProfileSource``. The state lives on the ``IngressSwitch``
the app's lifespan makes, never in module globals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from toposerve.api.config import IngressConfig
from toposerve.api.errors import ApiError, api_error_response
from toposerve.api.ingress import Ingress

log = logging.getLogger(__name__)

# Methods that only read: never held (job polls, health, metrics go on during a swap).
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def serving(swap_id: str) -> str:
    """What an ingress acknowledges once it serves the profile a swap made live."""
    return f"{swap_id}:serving"


class LiveProfile(BaseModel):
    """The namespace's live profile, as an ingress needs it."""

    profile: str
    source: str  # what to load it from: a shipped profile's name, or a YAML path
    handing_over_to: str | None = None
    swap_id: str | None = None
    # Every profile recorded live (two, for a moment, when replicas race): an ingress whose own
    # profile is among them keeps serving it.
    all_live: list[str] = []


class LiveProfileSource(Protocol):
    def changes(self) -> AsyncIterator[LiveProfile | None]:
        """The live profile now, and again after every change (None: no profile recorded as live)."""
        ...

    async def acknowledge(self, swap_id: str) -> None:
        """Tell the swap that this process holds new work and has none of the old profile's in flight."""
        ...

    def config_for(self, live: LiveProfile) -> IngressConfig:
        """The ingress configuration of ``live`` (raises when it cannot be loaded)."""
        ...


@dataclass
class _Use:
    """Requests inside the app that use one ``Ingress``: all of them, and those that put work in."""

    requests: int = 0
    writes: int = 0


class IngressSwitch:
    """The app's current ``Ingress``, switched to the namespace's live profile as it changes."""

    def __init__(self, app: object, current: Ingress, source: LiveProfileSource,
                 build: Callable[[IngressConfig], Ingress], on_switch: Callable[[Ingress, Ingress], None],
                 hold_limit_s: float = 60.0) -> None:
        self.app = app
        self.current = current
        self.source = source
        self.build = build
        self.on_switch = on_switch  # (old, new): e.g. the metrics follow the new ingress
        self.hold_limit_s = hold_limit_s
        self.open = asyncio.Event()
        self.open.set()
        self.holding_for: str | None = None  # the swap id new work is held for
        self._uses: dict[int, _Use] = {id(current): _Use()}
        self._idle = asyncio.Condition()
        self._waiting = 0  # tasks waiting for requests to end (only then is an end announced)
        self._task: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()
        self._replaced: list[Ingress] = []  # replaced, not closed yet

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="ingress-follows-live-profile")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._closing):
            task.cancel()
        for ingress in self._replaced:  # still in use at shutdown: closed now, like the current one
            await ingress.close()
        self._replaced.clear()
        self.open.set()

    # ------------------------------------------------------------------ requests

    async def wait_admission(self, method: str) -> None:
        """A request that puts work in waits while a handover holds new work (bounded)."""
        if method in READ_METHODS or self.open.is_set():
            return
        try:
            await asyncio.wait_for(self.open.wait(), self.hold_limit_s)
        except TimeoutError:
            raise ApiError(503, "swapping", f"the namespace is swapping profiles and the new one did not take "
                                            f"over within {self.hold_limit_s:g} s; retry",
                           {"Retry-After": "1"}) from None

    @contextlib.contextmanager
    def using(self, method: str) -> Iterator[None]:
        """Counts a request on the ingress it is served by (entered right after ``wait_admission``)."""
        writes = method not in READ_METHODS
        use = self._uses.setdefault(id(self.current), _Use())
        use.requests += 1
        use.writes += writes
        try:
            yield
        finally:
            use.requests -= 1
            use.writes -= writes
            if self._waiting:
                asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._idle:
            self._idle.notify_all()

    async def _wait_until(self, done: Callable[[], bool]) -> None:
        self._waiting += 1
        try:
            async with self._idle:
                await self._idle.wait_for(done)
        finally:
            self._waiting -= 1

    # ------------------------------------------------------------------ following the namespace

    async def _follow(self) -> None:
        async for live in self.source.changes():
            try:
                await self._apply(live)
            except Exception:  # a profile that cannot be served here: keep serving the current one
                log.exception("could not follow the namespace's live profile %s", live)

    async def _apply(self, live: LiveProfile | None) -> None:
        if live is None:
            return
        if live.profile == self.current.config.profile:
            if live.handing_over_to is not None and live.swap_id is not None:
                await self._hold(live.swap_id)
            elif not self.open.is_set():
                log.info("swap called off: serving profile %s again", live.profile)
                self.holding_for = None
                self.open.set()
            return
        if self.current.config.profile in live.all_live:
            return
        await self._switch(live)

    async def _hold(self, swap_id: str) -> None:
        if self.holding_for != swap_id:
            self.holding_for = swap_id
            self.open.clear()
            log.info("profile %s hands over (swap %s): holding new requests", self.current.config.profile, swap_id)
        use = self._uses[id(self.current)]
        # The requests already inside finish with the old profile (sync callers get its answers).
        await self._wait_until(lambda: use.writes == 0)
        await self.source.acknowledge(swap_id)

    async def _switch(self, live: LiveProfile) -> None:
        old = self.current
        new = self.build(self.source.config_for(live))
        await new.start()
        self._uses[id(new)] = _Use()
        self.current = new
        self.app.state.ingress = new  # type: ignore[attr-defined]
        self.on_switch(old, new)
        self.holding_for = None
        self.open.set()
        log.info("now serving profile %s (%s), was %s (%s)", new.config.profile, new.config.mode,
                 old.config.profile, old.config.mode)
        if live.swap_id is not None:  # the swap that made it live counts the ingresses serving it
            await self.source.acknowledge(serving(live.swap_id))
        self._replaced.append(old)
        task = asyncio.create_task(self._close_when_unused(old), name="close-replaced-ingress")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_when_unused(self, old: Ingress) -> None:
        use = self._uses[id(old)]
        await self._wait_until(lambda: use.requests == 0)
        del self._uses[id(old)]
        self._replaced.remove(old)
        await old.close()


class HandoverGate:
    """ASGI middleware: every request passes ``IngressSwitch.admitted`` (when the app follows a namespace)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        switch: IngressSwitch | None = getattr(scope["app"].state, "switch", None) if scope["type"] == "http" else None
        if switch is None:
            await self.app(scope, receive, send)
            return
        try:
            await switch.wait_admission(scope["method"])
        except ApiError as exc:
            await api_error_response(exc)(scope, receive, send)
            return
        with switch.using(scope["method"]):  # no await since the admission: the ingress it counts serves it
            await self.app(scope, receive, send)
