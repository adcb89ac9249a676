"""The routing topology as data: exchange and queue names, stage queues and their bindings.

A profile (deploy/) is turned into ``QueueSpec``s; this module knows nothing about
profiles, and nothing about the broker: brokers/bus.py declares these on it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


def exchange_name(namespace: str) -> str:
    return f"{namespace}.inference"


def dead_exchange_name(namespace: str) -> str:
    return f"{namespace}.dead"


def dead_queue_name(namespace: str) -> str:
    # A queue may share its name with an exchange: they are different kinds of object.
    return f"{namespace}.dead"


def stage_queue_name(namespace: str, profile: str, stage: str) -> str:
    return f"{namespace}.{profile}.{stage}"


class QueueSpec(BaseModel):
    name: str
    binding_keys: list[str] = Field(min_length=1)
    queue_type: Literal["classic", "quorum"] = "classic"
    max_length: int | None = Field(default=None, ge=1, description="Bound; publishes past it are rejected")
    delivery_limit: int | None = Field(default=None, ge=1, description="Quorum queues: deliveries before dead-lettering")
    # Delay queues: messages wait ``message_ttl_ms``, then are dead-lettered to this
    # exchange and routing key (how a join timeout comes back to its aggregate stage).
    message_ttl_ms: int | None = Field(default=None, ge=1)
    dead_letter_exchange: str | None = None
    dead_letter_routing_key: str | None = None

    def arguments(self, namespace: str) -> dict[str, object]:
        args: dict[str, object] = {
            "x-queue-type": self.queue_type,
            # Rejected (requeue=False) and over-limit deliveries go to the dead-letter exchange.
            "x-dead-letter-exchange": self.dead_letter_exchange or dead_exchange_name(namespace),
        }
        if self.dead_letter_routing_key is not None:
            args["x-dead-letter-routing-key"] = self.dead_letter_routing_key
        if self.message_ttl_ms is not None:
            args["x-message-ttl"] = self.message_ttl_ms
        if self.max_length is not None:
            args["x-max-length"] = self.max_length
            args["x-overflow"] = "reject-publish"
        if self.queue_type == "quorum" and self.delivery_limit is not None:
            args["x-delivery-limit"] = self.delivery_limit
        return args


class DeadLetterSpec(BaseModel):
    """Bounds of ``{ns}.dead``: poison or huge messages must not fill the broker's disk or memory.

    Past a bound the oldest dead letters are dropped (``drop-head``), so the newest,
    the ones an operator is looking at, stay listable and replayable.
    """

    max_length: int | None = Field(default=100_000, ge=1, description="Dead letters kept at most")
    max_bytes: int | None = Field(default=256 * 1024 * 1024, ge=1024, description="Bytes of bodies kept at most")
    # None: the profile's queue type. On a cluster a classic queue lives on one node; while that
    # node is down, declaring it fails, and so does every robust channel that must restore it.
    queue_type: Literal["classic", "quorum"] | None = None

    def arguments(self) -> dict[str, object]:
        args: dict[str, object] = {"x-overflow": "drop-head"}
        if self.queue_type == "quorum":
            args["x-queue-type"] = "quorum"
        if self.max_length is not None:
            args["x-max-length"] = self.max_length
        if self.max_bytes is not None:
            args["x-max-length-bytes"] = self.max_bytes
        return args
