"""The running profile as a graph: ingress -> exchange -> queues -> stages -> stores.

Derived from the ``IngressConfig`` the ingress runs with (its queue specs and stage
outlines, which deploy/ makes from the profile that declares the topology), never
drawn by hand. Pure functions: the live figures are added by api/topology_live.py,
the page (api/ui/) only draws what it is given, at the positions laid out here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from toposerve.api.config import IngressConfig
from toposerve.brokers import dead_queue_name, exchange_name

NodeKind = Literal["ingress", "exchange", "queue", "stage", "store", "dead"]

# Columns of the drawing, left to right; rows are spread evenly within a column.
COLUMNS: dict[str, int] = {"ingress": 0, "exchange": 1, "queue": 2, "stage": 3, "store": 4, "dead": 4}
COLUMN_WIDTH = 210
ROW_HEIGHT = 86
MARGIN = 20


class Node(BaseModel):
    id: str
    kind: NodeKind
    label: str
    stage: str | None = Field(default=None, description="Queue and stage nodes: the stage they belong to")
    detail: str = ""
    replicas: int | None = Field(default=None, description="Stage nodes: replicas the profile declares")
    x: int = 0
    y: int = 0


class Edge(BaseModel):
    source: str
    target: str
    keys: list[str] = Field(default_factory=list, description="Routing keys (patterns) on this edge")
    kind: Literal["publish", "binding", "consume", "store", "dead_letter", "reply"] = "publish"


class TopologyGraph(BaseModel):
    profile: str
    mode: str
    namespace: str
    nodes: list[Node]
    edges: list[Edge]
    width: int
    height: int


def queue_node_id(queue: str) -> str:
    return f"queue:{queue}"


def stage_node_id(stage: str) -> str:
    return f"stage:{stage}"


def store_node_id(store: str) -> str:
    return f"store:{store}"


INGRESS_ID = "ingress"


def _ingress_keys(config: IngressConfig) -> list[str]:
    keys = ["request.*"]
    if config.spec.preprocess_tabular_in_ingress or config.spec.prediction_cache_ttl_s:
        keys.append("features.*")
    return keys


def topology_graph(config: IngressConfig, namespace: str) -> TopologyGraph:
    """Nodes and edges of ``config``'s profile in ``namespace``, laid out in columns."""
    exchange = exchange_name(namespace)
    dead = dead_queue_name(namespace)
    nodes = [Node(id=INGRESS_ID, kind="ingress", label="ingress", detail=f"{config.mode} · {config.profile}"),
             Node(id=f"exchange:{exchange}", kind="exchange", label=exchange, detail="topic exchange")]
    edges = [Edge(source=INGRESS_ID, target=f"exchange:{exchange}", keys=_ingress_keys(config))]
    stores: list[str] = ["job records"] if config.outcomes_kept or config.mode != "sync" else []
    if config.spec.prediction_cache_ttl_s:
        stores.append("prediction cache")
    edges += [Edge(source=INGRESS_ID, target=store_node_id(s), kind="store") for s in stores]
    answer_queues = set(config.answer_queues)
    for name, stage in config.stages.items():
        queue_id, stage_id = queue_node_id(stage.queue), stage_node_id(name)
        nodes.append(Node(id=queue_id, kind="queue", label=stage.queue, stage=name))
        nodes.append(Node(id=stage_id, kind="stage", label=name, stage=name, replicas=stage.replicas,
                          detail=f"{stage.kind} · {stage.replicas} replica{'s' if stage.replicas > 1 else ''}"))
        edges.append(Edge(source=f"exchange:{exchange}", target=queue_id, keys=stage.consumes, kind="binding"))
        edges.append(Edge(source=queue_id, target=stage_id, kind="consume"))
        if stage.publishes:
            edges.append(Edge(source=stage_id, target=f"exchange:{exchange}", keys=stage.publishes))
        for store in stage.stores:
            if store not in stores:
                stores.append(store)
            edges.append(Edge(source=stage_id, target=store_node_id(store), kind="store"))
        edges.append(Edge(source=stage_id, target=f"dead:{dead}", kind="dead_letter"))
        if stage.queue in answer_queues and config.mode != "async":
            edges.append(Edge(source=stage_id, target=INGRESS_ID, kind="reply", keys=["reply_to"]))
    nodes += [Node(id=store_node_id(s), kind="store", label=s, detail="Redis") for s in stores]
    nodes.append(Node(id=f"dead:{dead}", kind="dead", label=dead, detail="dead letters"))
    width, height = _lay_out(nodes)
    return TopologyGraph(profile=config.profile, mode=config.mode, namespace=namespace, nodes=nodes, edges=edges,
                         width=width, height=height)


def _lay_out(nodes: list[Node]) -> tuple[int, int]:
    """Positions nodes in their columns (in place); returns the drawing's size."""
    columns: dict[int, list[Node]] = {}
    for node in nodes:
        columns.setdefault(COLUMNS[node.kind], []).append(node)
    rows = max(len(column) for column in columns.values())
    height = 2 * MARGIN + rows * ROW_HEIGHT
    for index, column in columns.items():
        offset = (rows - len(column)) * ROW_HEIGHT // 2  # a short column is centred
        for row, node in enumerate(column):
            node.x = MARGIN + index * COLUMN_WIDTH
            node.y = MARGIN + offset + row * ROW_HEIGHT
    return 2 * MARGIN + (max(columns) + 1) * COLUMN_WIDTH, height
