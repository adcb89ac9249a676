"""A throwaway RabbitMQ cluster: N private nodes (rabbitmq_server.py) joined with
``rabbitmqctl join_cluster``, on loopback, for tests and for ``toposerve up --cluster N``.

Each node has its own node name, AMQP and distribution ports and data dir; they share the
Erlang cookie of the user they run as (``rabbitmq`` as root, else the caller), which is what
clustering needs. Every node boots with the same administrator and the same definitions
(the accounts of brokers/accounts.py); joining resets nodes 2..N, which then get the first
node's users and permissions, as a joined node always does.
"""

from __future__ import annotations

import json
import secrets
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass

from toposerve.deploy.accounts import ADMIN_USER
from toposerve.deploy.local_services.rabbitmq_server import RabbitMQService, start_rabbitmq
from toposerve.deploy.local_services.server_process import LOOPBACK, ServiceUnavailable


@dataclass(frozen=True)
class RabbitMQCluster:
    """The nodes of one cluster; ``url`` lists their URLs comma-separated (``TOPOSERVE_AMQP_URL``)."""

    nodes: list[RabbitMQService]

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    @property
    def name(self) -> str:
        return "rabbitmq"

    @property
    def workdir(self) -> str:
        return ", ".join(str(node.workdir) for node in self.nodes)

    @property
    def management_url(self) -> str | None:
        return self.nodes[0].management_url

    def node_named(self, erlang_node: str) -> RabbitMQService:
        for node in self.nodes:
            if node.node == erlang_node:
                return node
        raise KeyError(f"no node {erlang_node!r} in this cluster ({', '.join(n.node for n in self.nodes)})")

    def running_nodes(self) -> list[str]:
        """The cluster members that run, as one live node sees them."""
        for node in self.nodes:
            if node.running:
                result = node.ctl("cluster_status", "--formatter", "json", timeout=30)
                if result.returncode == 0:
                    return sorted(json.loads(result.stdout)["running_nodes"])
        return []

    def leader_of(self, queue: str) -> RabbitMQService:
        """The node that leads quorum queue ``queue`` now (asked of a live node)."""
        for node in self.nodes:
            if not node.running:
                continue
            result = node.ctl("list_queues", "-q", "--no-table-headers", "name", "leader", timeout=30)
            if result.returncode != 0:
                continue
            for line in result.stdout.splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[0] == queue:
                    return self.node_named(parts[1])
        raise ServiceUnavailable(f"no live node reports a leader for queue {queue!r}")

    def describe(self) -> str:
        """Queues (type, state, leader, members online, messages, consumers) and bindings, for a failing test."""
        for node in self.nodes:
            if node.running:
                queues = node.ctl("list_queues", "-q", "name", "type", "durable", "state", "leader", "online",
                                  "messages", "consumers", timeout=30)
                bindings = node.ctl("list_bindings", "-q", "source_name", "destination_name", "routing_key",
                                    timeout=30)
                return f"queues (asked {node.node}):\n{queues.stdout}\nbindings:\n{bindings.stdout}"
        return "no node runs"

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()

    def __enter__(self) -> RabbitMQCluster:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def join(node: RabbitMQService, seed: RabbitMQService, *, attempts: int = 3) -> None:
    """Make ``node`` a member of ``seed``'s cluster (its own data is reset first).

    A join can fail at ``start_app`` (mnesia's schema merge: seen in CI as
    ``{badmatch, {error, {normal, {mnesia_app, start, ...}}}}``), so the whole sequence is
    tried again from ``stop_app`` + ``reset``, which clears what the failed attempt left."""
    failure = ""
    for _attempt in range(attempts):
        failure = _join_once(node, seed)
        if not failure:
            return
    raise ServiceUnavailable(f"{node.node} did not join {seed.node} in {attempts} attempts; last: {failure}")


def _join_once(node: RabbitMQService, seed: RabbitMQService) -> str:
    """One join attempt; returns what failed, or "" when the node runs as a member."""
    for args in (("stop_app",), ("reset",), ("join_cluster", seed.node), ("start_app",)):
        result = node.ctl(*args, timeout=120)
        if result.returncode != 0:
            return (f"rabbitmqctl -n {node.node} {' '.join(args)} failed "
                    f"(exit {result.returncode}): {result.stdout}{result.stderr}")
    result = node.ctl("await_startup", "--timeout", "60", timeout=90)
    if result.returncode != 0:
        return f"{node.node} did not come back after joining: {result.stdout}{result.stderr}"
    return ""


def start_rabbitmq_cluster(size: int = 3, *, definitions: dict | None = None, management: bool = False,
                           timeout: float = 90.0, bind: str = LOOPBACK) -> RabbitMQCluster:
    """Start ``size`` private nodes on loopback and join them into one cluster; returns once
    every node runs as a member. With ``definitions`` (as ``start_rabbitmq``): no guest, one
    administrator with a random password on every node, and the accounts imported. ``bind``:
    the address every node's AMQP listener binds to (as ``start_rabbitmq``)."""
    if size < 1:
        raise ValueError(f"a cluster needs at least one node, not {size}")
    admin = (ADMIN_USER, secrets.token_urlsafe(18)) if definitions is not None else None
    with ExitStack() as started, ThreadPoolExecutor(max_workers=size) as pool:
        # In parallel: each node boots (and each joins) in seconds, mostly waiting on its VM.
        booting = [pool.submit(start_rabbitmq, definitions=definitions, admin=admin, timeout=timeout,
                               management=management and i == 0, bind=bind) for i in range(size)]
        for future in booting:  # every node that started is stopped if any did not
            if future.exception() is None:
                started.enter_context(future.result())
        failed = [future.exception() for future in booting if future.exception() is not None]
        if failed:
            raise failed[0]
        nodes = [future.result() for future in booting]
        # One at a time: RabbitMQ's clustering guide has nodes join in turn; two joining the
        # same seed at once race in mnesia's schema merge (the CI failure join() retries).
        for node in nodes[1:]:
            join(node, nodes[0])
        cluster = RabbitMQCluster(nodes)
        members = cluster.running_nodes()
        if members != sorted(n.node for n in nodes):
            raise ServiceUnavailable(f"the cluster runs {members}, expected every node of {[n.node for n in nodes]}")
        started.pop_all()
    return cluster

