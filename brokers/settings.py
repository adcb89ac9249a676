"""One typed settings object, read from the environment (prefix ``TOPOSERVE_``).

Every process (ingress, stage, CLI) builds a ``Settings`` at startup and passes it
down; nothing reads ``os.environ`` anywhere else.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from toposerve.brokers.amqp_nodes import node_urls


class Settings(BaseSettings):
    # hide_input_in_errors: a refused URL or key must not be echoed (it may carry a password);
    # the validators name what is wrong, masked.
    model_config = SettingsConfigDict(env_prefix="TOPOSERVE_", extra="ignore", hide_input_in_errors=True)

    # amqps:// and rediss:// connect with TLS (README, "Security"). Kept out of repr():
    # the URLs carry the passwords.
    # Several node URLs of one cluster, comma-separated: every connection picks a live node
    # and fails over to another (brokers/amqp_nodes.py).
    amqp_url: str = Field(default="amqp://guest:guest@127.0.0.1:5672/", repr=False)
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", repr=False)
    namespace: str = Field(default="toposerve", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    models_dir: str | None = None  # None: the models shipped in deploy/models
    # A file of per-role logins (written by `toposerve up`, 0600): each process then logs
    # in as its role (deploy/accounts.py); None: every process uses the two URLs above.
    accounts_file: str | None = None

    # Request limits, checked at the ingress (HTTP) and again in the stages (AMQP),
    # because anyone can publish straight to the exchange.
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # Seconds a client may take to send a request's headers, and then its body (408 past them).
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=60.0, gt=0)
    # A stage refuses (dead-letters, with the reason) a message body larger than this
    # before parsing it: anyone can publish to the exchange, and parsing holds the loop.
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_rows: int = Field(default=10_000, ge=1)
    max_image_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=16_000_000, ge=64)

    # Deliveries of one message that ended in an unexpected error before it is
    # dead-lettered (bad input is never retried: it fails at once).
    max_attempts: int = Field(default=3, ge=1)
    # Redeliveries of one message that never settled (its stage process died while
    # handling it) before it is dead-lettered, on classic queues; 0 turns the guard off.
    max_crash_redeliveries: int = Field(default=3, ge=0)

    # Seconds a stage waits for in-flight work after SIGTERM before it exits anyway.
    drain_timeout_s: float = Field(default=10.0, ge=0)
    # Seconds between a predict stage's looks at the model directory for versions dropped in
    # while it runs (loaded after their sha256 and input signature are checked; `toposerve models reload`).
    version_watch_s: float = Field(default=1.0, gt=0)
    # ONNX Runtime threads per predict process (the stages are processes, so keep it small).
    ort_intra_op_threads: int = Field(default=1, ge=0)
    # Log lines: "plain" (human) or "json" (one object per line, with job_id and trace_id).
    log_format: Literal["plain", "json"] = "plain"

    # API keys of the ingress (api/auth.py); none configured: authentication is off.
    # Comma-separated plain keys (development), and/or a file of `<key-id>:<sha256 hex>` lines.
    api_keys: str | None = Field(default=None, repr=False)
    api_keys_file: str | None = None
    # Requests per second per API key (per client address without keys); None: no limit.
    rate_limit_per_s: float | None = Field(default=None, gt=0)
    rate_limit_burst: int | None = Field(default=None, ge=1)
    # Invalid API keys a client address may present: a burst, then so many per second;
    # past that the address gets 429 whatever key it sends, until it is under the rate.
    auth_failures_per_s: float = Field(default=1.0, gt=0)
    auth_failures_burst: int = Field(default=20, ge=1)
    # Webhooks (brokers/callbacks.py): the hosts (host or host:port, comma-separated) a
    # request's callback may name (none: callbacks are refused), the schemes allowed, and
    # the store stage's tries: so many, the first retry after backoff_s, doubling.
    callback_allowed_hosts: str = ""
    callback_schemes: str = "https"
    callback_max_attempts: int = Field(default=5, ge=1, le=20)
    callback_backoff_s: float = Field(default=1.0, gt=0)
    callback_timeout_s: float = Field(default=5.0, gt=0)
    # The Open Inference Protocol over gRPC (api/oip_grpc.py): its own port in each ingress
    # process (None: off), on this address.
    grpc_port: int | None = Field(default=None, ge=1, le=65535)
    grpc_host: str = "127.0.0.1"
    # Server-Sent Events (GET /v1/jobs/{id}/events): seconds between keep-alive comments.
    sse_ping_s: float = Field(default=15.0, gt=0)
    # Clients (edge agent): the key sent to an ingress that requires one.
    api_key: str | None = Field(default=None, repr=False)
    # Key ids (of the keys above) that may act on dead letters over HTTP (replay, discard);
    # other keys may only list them. Authentication off: everyone may (the local quickstart).
    operator_key_ids: str | None = None

    # The operator's view (GET /v1/topology/live, /ui): RabbitMQ's management API, when its
    # plugin is on (http://user:password@host:15672), gives unacked counts and broker rates;
    # None: queue depths and consumers come from AMQP passive declares.
    management_url: str | None = Field(default=None, repr=False)
    # How often the page polls the live topology.
    ui_poll_ms: int = Field(default=1500, ge=250, le=60_000)

    def operator_ids(self) -> frozenset[str]:
        return frozenset(k.strip() for k in (self.operator_key_ids or "").split(",") if k.strip())

    @field_validator("amqp_url")
    @classmethod
    def _node_urls(cls, value: str) -> str:
        return ",".join(node_urls(value))

    @property
    def amqp_nodes(self) -> list[str]:
        """The broker node URLs (one, or a cluster's)."""
        return node_urls(self.amqp_url)
