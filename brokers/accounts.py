"""Least-privilege accounts on the bus and in Redis: one per role, and who may write results.

Pure: what each role may do, as RabbitMQ permissions (configure / write / read regexes
over resource names in the vhost), topic permissions (routing-key regexes for publishing
to and binding on the topic exchanges) and Redis ACL rules (key and channel patterns,
command categories). deploy/accounts.py derives the inputs from a profile and applies
them (rabbitmqctl, the management API, ``ACL SETUSER``).

Roles, for namespace ``ns`` (account ``ns.<role>``):

- ``ingress``: declares the topology, publishes ``request.*`` and ``features.*``, reads
  its own reply queue; in Redis, every key of the namespace (jobs, caches, batches).
- one per stage kind (``preprocess``, ``predict``, ``store``, ...): consumes its own
  queues only, publishes only the keys its kind produces (and retries and replies through
  the default exchange), dead-letters to ``ns.dead``; in Redis, what its kind keeps.
- ``client``: direct publishers. Publishes ``request.*`` only; may declare and read only
  server-named queues (``amq.gen-*``) or use RabbitMQ's direct reply-to, and cannot bind
  anything to the inference exchange, so it never sees other callers' requests or results.
- ``results``: a reader of ``prediction.*`` / ``failure.*`` into its own queues, granted
  by the operator on purpose.
- ``edge``: edge clients' telemetry (``telemetry.*``).
- ``submitter``: the batch command line (publishes ``features.*`` chunks).
- ``operator``: dead letters (list, replay) and cache flushes.
- ``monitor``: queue depths only (KEDA's rabbitmq scaler in AMQP mode). A passive queue
  declare needs no permission; a permission entry that matches nothing is what lets the
  account open a connection to the vhost at all. No topic permissions, no Redis.

Results only stages can write: every message toposerve publishes carries the AMQP
``user_id`` of its connection, which RabbitMQ checks against the authenticated user. The
store, the aggregator and the reply router accept a ``Prediction``/``Failure`` only when
that ``user_id`` is a stage account (``trusted_producers``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, Field

from toposerve.brokers.topology import dead_exchange_name, exchange_name

# What each stage kind publishes on the inference exchange (first words of its keys).
# Every stage may fail a job (``failure``) when a message it cannot read names one.
PRODUCES: dict[str, tuple[str, ...]] = {
    "preprocess": ("features", "failure"),
    "predict": ("prediction", "failure", "features"),  # features: a cascade passes the input on
    "aggregate": ("prediction", "failure", "join-wait"),
    "store": ("failure",),
    "batch_store": ("failure",),
    "telemetry": ("failure",),
    "shadow": ("failure",),  # a shadow answers nobody (it records comparisons), but fails unreadable messages
    # A user's stage returns any of toposerve's message types (plus what its ``publishes`` names).
    "custom": ("prediction", "failure", "features", "request"),
}
STAGE_KINDS = tuple(PRODUCES)
# A single-process profile (web_single) runs the ingress and its stages in one process.
SINGLE_PROCESS = "single"
CLIENT_ROLES = ("client", "results", "edge", "submitter", "operator", "monitor")
_NAME = r"[a-z][a-z0-9_]*"


class TopicPermission(BaseModel):
    exchange: str
    write: str = Field(description="Routing keys it may publish with")
    read: str = Field(description="Routing keys it may bind queues with")


class BrokerAccount(BaseModel):
    user: str
    configure: str
    write: str
    read: str
    topics: list[TopicPermission] = Field(default_factory=list)


class RedisAccount(BaseModel):
    user: str
    rules: list[str] = Field(description="ACL SETUSER rules, the password aside")


class Account(BaseModel):
    role: str
    broker: BrokerAccount
    redis: RedisAccount | None = Field(default=None, description="None: the role needs no Redis")


def account_name(namespace: str, role: str) -> str:
    return f"{namespace}.{role}"


def trusted_producers(namespace: str) -> frozenset[str]:
    """The accounts whose terminal messages (predictions, failures) are accepted."""
    return frozenset(account_name(namespace, role) for role in (*STAGE_KINDS, SINGLE_PROCESS))


def url_user(url: str) -> str | None:
    """The user name in an AMQP or Redis URL, the first node's for several (None when it names none)."""
    user = urlparse(url.split(",", 1)[0]).username
    return unquote(user) if user else None


def _alternatives(patterns: Iterable[str]) -> str:
    items = sorted(set(patterns))
    return "^$" if not items else "^(" + "|".join(items) + ")$"


def _first_words(keys: Iterable[str]) -> str:
    """A topic regex admitting keys that start with any of these words (``request.*`` -> ``^(request)\\.``)."""
    words = sorted({re.escape(key.split(".", 1)[0]) for key in keys})
    return "^$" if not words else "^(" + "|".join(words) + r")\."


def _redis_rules(namespace: str, keys: Iterable[str], channels: bool, read_only: Iterable[str] = ()) -> list[str]:
    ns = namespace
    rules = ["on", "resetkeys", *(f"~{ns}:{pattern}" for pattern in sorted(set(keys))),
             *(f"%R~{ns}:{pattern}" for pattern in sorted(set(read_only))),
             # Read only: which profile is live (deploy/lifecycle.py), checked by every process that binds.
             f"%R~{ns}:lifecycle", "resetchannels"]
    if channels:
        rules.append(f"&{ns}:*")
    # Data commands, scripts, MULTI, pub/sub and the connection's own commands: no
    # administration (CONFIG, FLUSHALL, ACL, DEBUG, KEYS ...).
    return [*rules, "-@all", "+@read", "+@write", "+@keyspace", "+@scripting", "+@transaction", "+@pubsub",
            "+@connection", "-@dangerous"]


class Names:
    """Resource-name regexes of one namespace."""

    def __init__(self, namespace: str) -> None:
        ns = re.escape(namespace)
        self.exchange = f"{ns}\\.inference"
        self.dead = f"{ns}\\.dead"  # the dead-letter exchange and its queue share the name
        self.reply = f"{ns}\\.reply\\.[0-9a-f]+"
        self.any_stage_queue = f"{ns}\\.{_NAME}\\.{_NAME}"
        self.server_named = r"amq\.gen-.*"
        self.default_exchange = r"amq\.default"

    def queues(self, names: Iterable[str]) -> list[str]:
        return [re.escape(name) for name in names]


def stage_account(namespace: str, kind: str, queues: Iterable[str], consumes: Iterable[str],
                  publishes: Iterable[str] = ()) -> Account:
    """A stage kind's account: its ``queues`` (names, delay queues included), their binding keys,
    and the routing keys its stages publish besides their kind's (a ``publishes`` template)."""
    names, queues, consumes = Names(namespace), list(queues), list(consumes)
    own = names.queues(queues)
    broker = BrokerAccount(
        user=account_name(namespace, kind),
        configure=_alternatives([names.exchange, names.dead, *own]),
        write=_alternatives([names.exchange, names.dead, names.default_exchange, *own]),
        read=_alternatives([names.exchange, names.dead, *own]),
        topics=[TopicPermission(exchange=exchange_name(namespace), write=_first_words(
                    [f"{word}.x" for word in PRODUCES[kind]] + list(publishes)), read=_first_words(consumes)),
                TopicPermission(exchange=dead_exchange_name(namespace), write=".*", read=".*")],
    )
    # The crash guard's counts, and the report each replica writes for the operator's view.
    keys = {"unsettled:*", "stage-report:*"}
    keys |= {"preprocess": {"features:*", "items:*", "job:*", "job-owner:*"},
             "store": {"job:*", "job-owner:*", "job-callback:*", "pred:*"},
             "aggregate": {"join:*"},
             "batch_store": {"batch:*", "job:*", "job-owner:*", "job-callback:*"},
             "telemetry": {"telemetry:*"},
             "shadow": {"shadow:*"},
             "predict": {"loaded:*"}}.get(kind, set())
    # The predict stage reads one batch key, a cancelled batch's flag, once per chunk; it writes none.
    read_only = {"batch:*:cancelled"} if kind == "predict" else set()
    return Account(role=kind, broker=broker, redis=RedisAccount(
        user=broker.user, rules=_redis_rules(namespace, keys, channels=True, read_only=read_only)))


def ingress_account(namespace: str, role: str = "ingress") -> Account:
    """The ingress declares every stage queue (so accepted work waits for its stage), binds them
    (``.*`` topic reads, for their keys), publishes requests and features, reads its reply queue."""
    names = Names(namespace)
    broker = BrokerAccount(
        user=account_name(namespace, role),
        configure=_alternatives([names.exchange, names.dead, names.any_stage_queue, names.reply]),
        write=_alternatives([names.exchange, names.dead, names.any_stage_queue]),
        # Reading a queue is needed to declare one with a dead-letter exchange (RabbitMQ's rule).
        read=_alternatives([names.exchange, names.dead, names.reply, names.any_stage_queue]),
        topics=[TopicPermission(exchange=exchange_name(namespace), write=r"^(request|features)\.",
                                read=".*"),
                TopicPermission(exchange=dead_exchange_name(namespace), write="^$", read=".*")],
    )
    return Account(role=role, broker=broker,
                   redis=RedisAccount(user=broker.user, rules=_redis_rules(namespace, ["*"], channels=True)))


def single_process_account(namespace: str, queues: Iterable[str], consumes: Iterable[str] = (),
                           publishes: Iterable[str] = ()) -> Account:
    """web_single: one process, the ingress and every stage; a stage account (its answers are trusted)."""
    ingress = ingress_account(namespace, SINGLE_PROCESS)
    names = Names(namespace)
    own = names.queues(queues)
    broker = ingress.broker.model_copy(update={
        "write": _alternatives([names.exchange, names.dead, names.any_stage_queue, names.default_exchange]),
        "read": _alternatives([names.exchange, names.dead, names.reply, *own]),
        "topics": [TopicPermission(exchange=exchange_name(namespace),
                                   write=_first_words([f"{w}.x" for kind in PRODUCES for w in PRODUCES[kind]]
                                                      + ["request.x", *publishes]), read=".*"),
                   TopicPermission(exchange=dead_exchange_name(namespace), write=".*", read=".*")],
    })
    del consumes  # the ingress's ``.*`` topic reads already cover every stage's binding keys
    return Account(role=SINGLE_PROCESS, broker=broker, redis=ingress.redis)


def client_account(namespace: str, role: str = "client") -> Account:
    """Direct publishers (``request.*``) and the other roles outside the topology."""
    names = Names(namespace)
    inference, dead = exchange_name(namespace), dead_exchange_name(namespace)
    own = names.server_named
    if role == "client":  # publish requests; replies through direct reply-to or a server-named queue
        broker = BrokerAccount(user=account_name(namespace, role), configure=_alternatives([own]),
                               write=_alternatives([names.exchange]), read=_alternatives([own]),
                               topics=[TopicPermission(exchange=inference, write=r"^request\.", read="^$")])
    elif role == "results":  # bind own queues to outcomes only
        broker = BrokerAccount(user=account_name(namespace, role), configure=_alternatives([own]),
                               write=_alternatives([own]), read=_alternatives([names.exchange, own]),
                               topics=[TopicPermission(exchange=inference, write="^$",
                                                       read=r"^(prediction|failure)\.")])
    elif role == "edge":  # edge clients' telemetry
        broker = BrokerAccount(user=account_name(namespace, role), configure="^$",
                               write=_alternatives([names.exchange]), read="^$",
                               topics=[TopicPermission(exchange=inference, write=r"^telemetry\.", read="^$")])
    elif role == "submitter":  # the batch command line: declares stage queues, publishes chunks
        broker = BrokerAccount(user=account_name(namespace, role),
                               configure=_alternatives([names.exchange, names.dead, names.any_stage_queue]),
                               write=_alternatives([names.exchange, names.any_stage_queue]),
                               read=_alternatives([names.exchange, names.any_stage_queue]),
                               topics=[TopicPermission(exchange=inference, write=r"^features\.", read=".*")])
        return Account(role=role, broker=broker, redis=RedisAccount(
            user=broker.user, rules=_redis_rules(namespace, ["batch:*"], channels=True)))
    elif role == "operator":  # dead letters: list (passively), replay under their original keys
        broker = BrokerAccount(user=account_name(namespace, role), configure=_alternatives([names.exchange]),
                               write=_alternatives([names.exchange, names.dead]),
                               read=_alternatives([names.dead]),
                               topics=[TopicPermission(exchange=inference, write=".*", read="^$"),
                                       TopicPermission(exchange=dead, write="^$", read="^$")])
        return Account(role=role, broker=broker, redis=RedisAccount(
            user=broker.user, rules=_redis_rules(namespace, ["*"], channels=True)))
    elif role == "monitor":  # reads queue depths (passive declares) and may do nothing else
        broker = BrokerAccount(user=account_name(namespace, role), configure="^$", write="^$", read="^$")
    else:
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(CLIENT_ROLES)}")
    return Account(role=role, broker=broker)
