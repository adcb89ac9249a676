"""Several RabbitMQ nodes behind one setting: ``TOPOSERVE_AMQP_URL`` may list a cluster's node
URLs, comma-separated; a connection picks a live node and, when its node dies, moves to another.

Neither aio-pika 9 (issue mosquito/aio-pika#141, open) nor FastStream 0.7 (one URL per
``RabbitBroker``) takes several hosts. aio-pika's ``connect_robust`` does take a
``connection_class``: ``FailoverConnection`` is aio-pika's own ``RobustConnection`` (same
reconnect loop, same restore of channels, queues and consumers) that, each time its
connection closes or an attempt fails, aims its next attempt at the next node. One URL: the
plain ``RobustConnection``, exactly as before.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

from aio_pika import RobustConnection
from aio_pika.abc import TimeoutType
from aio_pika.exceptions import AMQPConnectionError
from yarl import URL

from toposerve.brokers.redaction import redact

log = logging.getLogger(__name__)

AMQP_SCHEMES = ("amqp", "amqps")
# Seconds between two attempts while a process starts: each goes to another node, so a node
# that is down at startup costs little.
FIRST_CONNECT_INTERVAL_S = 0.5
# Seconds before reconnecting once connected (aio-pika's default). Not shorter on purpose:
# on RabbitMQ 3.10 a channel reopened on another node that publishes to a quorum queue
# while that queue still elects a new leader (its leader died with the node) had every later
# publish nacked, for good; reconnecting 1 s after the kill did that, 5 s did not
# (tests/integration/test_fault_injection_cluster.py; README, "A RabbitMQ cluster").
RECONNECT_INTERVAL_S = 5.0
# Seconds of nothing but nacks before a connection is remade: that stuck state was seen too
# (a publishing channel nacked for good after a failover, with the queue healthy, its leader
# elected, and other channels publishing to it fine). A queue at its bound nacks some
# publishes, not all for this long while its consumers drain it.
NACKED_FOR_S = 10.0


def node_urls(value: str) -> list[str]:
    """The node URLs in ``value`` (comma-separated, blanks around commas ignored).

    Raises ``ValueError`` naming the bad entry (password masked): an empty entry, another
    scheme than amqp/amqps, no host, or a port that is not a number (no port: 5672/5671).
    """
    entries = [entry.strip() for entry in value.split(",")]
    for position, entry in enumerate(entries, start=1):
        shown = redact(entry) or "''"
        if not entry:
            raise ValueError(f"AMQP URL entry {position} of {len(entries)} is empty (comma-separated node URLs)")
        try:
            url = URL(entry)
            _ = url.port  # a port that is not a number raises here
        except ValueError as exc:
            raise ValueError(f"AMQP URL entry {position} ({shown}) is not a URL: {redact(str(exc))}") from None
        if url.scheme not in AMQP_SCHEMES:
            raise ValueError(f"AMQP URL entry {position} ({shown}) must start with amqp:// or amqps://")
        if not url.host:
            raise ValueError(f"AMQP URL entry {position} ({shown}) names no host")
    return entries


def first_node(value: str) -> str:
    """The first node's URL: where the logins, the management API and user ids are read from."""
    return node_urls(value)[0]


def masked_nodes(urls: list[str]) -> str:
    return ", ".join(redact(url) for url in urls)


class FailoverConnection(RobustConnection):
    """A ``RobustConnection`` over several nodes: every close or failed attempt moves it to the
    next node, so the reconnect loop cycles through the cluster until one takes it.

    The first ``connect`` fails (``AMQPConnectionError``, naming the nodes, passwords masked)
    once every node has refused once, instead of looping for ever: a process that starts
    with no node up says so, as with one URL. Later losses are retried without end, like
    aio-pika's robust connection.
    """

    def __init__(self, url: URL, loop: asyncio.AbstractEventLoop | None = None, *, nodes: tuple[str, ...],
                 **kwargs: Any) -> None:
        # The URL's own parameters stay in force (aio-pika reads them only without kwargs).
        kwargs = {**dict(URL(url).query), **kwargs, "fail_fast": False}
        super().__init__(url, loop=loop, **kwargs)
        self.reconnect_interval = FIRST_CONNECT_INTERVAL_S
        # What the caller added to the first URL (FastStream puts the connection name there) goes to every node.
        self.nodes = tuple(URL(node).update_query(URL(url).query) for node in nodes)
        self._node_index = 0
        self._failures_before_first = 0
        self._last_error: BaseException | None = None
        self._every_node_failed: asyncio.Future[None] = self.loop.create_future()
        self._nacked_since: float | None = None
        self._remaking: asyncio.Task[None] | None = None

    @property
    def node(self) -> str:
        """The node this connection is on (or tries next), password masked."""
        return str(self)

    async def _on_connection_close(self, closing: asyncio.Future) -> None:
        if not self.connection_attempt and not closing.cancelled() and closing.exception() is not None:
            self._last_error = closing.exception()
            self._failures_before_first += 1
            if self._failures_before_first >= len(self.nodes) and not self._every_node_failed.done():
                self._every_node_failed.set_result(None)
        self._node_index = (self._node_index + 1) % len(self.nodes)
        self.url = self.nodes[self._node_index]
        await super()._on_connection_close(closing)

    def note_confirm(self, acked: bool) -> None:
        """A publish on this connection was confirmed (``acked``) or nacked; after ``NACKED_FOR_S``
        of nacks only, the connection is remade (new channels, restored by aio-pika)."""
        now = self.loop.time()
        if acked:
            self._nacked_since = None
            return
        if self._nacked_since is None:
            self._nacked_since = now
        elif now - self._nacked_since >= NACKED_FOR_S and (self._remaking is None or self._remaking.done()):
            self._nacked_since = None
            log.warning("every publish on %s was nacked for %.0f s: remaking the connection", self, NACKED_FOR_S)
            self._remaking = self.loop.create_task(self._remake())

    async def _remake(self) -> None:
        try:
            await self.reconnect()
        except Exception as exc:  # noqa: BLE001 - the robust loop keeps trying; this only logs
            log.warning("remaking %s failed: %s: %s", self, type(exc).__name__, redact(str(exc)))

    async def _on_connected(self) -> None:
        await super()._on_connected()
        self.reconnect_interval = RECONNECT_INTERVAL_S

    async def connect(self, timeout: TimeoutType = None) -> None:
        if self.connection_attempt:  # connected before: aio-pika's reconnect path
            await super().connect(timeout)
            return
        attempt = asyncio.ensure_future(super().connect(timeout))
        await asyncio.wait({attempt, self._every_node_failed}, return_when=asyncio.FIRST_COMPLETED)
        if attempt.done():
            attempt.result()
            return
        attempt.cancel()
        await asyncio.gather(attempt, return_exceptions=True)
        await self.close()
        reason = redact(f"{type(self._last_error).__name__}: {self._last_error}") if self._last_error else "refused"
        raise AMQPConnectionError(f"no RabbitMQ node accepted a connection "
                                  f"({masked_nodes([str(n) for n in self.nodes])}); last error: {reason}")


def failover_connection_class(urls: list[str]) -> Callable[..., FailoverConnection]:
    """What ``connect_robust(connection_class=...)`` calls to make a connection over ``urls``."""
    return functools.partial(FailoverConnection, nodes=tuple(urls))
