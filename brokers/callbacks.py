"""Webhooks: a job's outcome POSTed to the caller's URL, signed, retried, bounded.

The ingress checks a request's ``callback`` (``check_callback_url``: scheme, no
credentials in the URL, an allowed host) and registers it in Redis before it publishes
the job; the store stage, once it has written the job's terminal record, takes the
registration (once: GETDEL) and delivers the record (``deliver``), then records how the
delivery went on the job (``JobRecord.callback``).

A delivery is ``POST <url>`` with the job record as JSON and
``X-Toposerve-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>``,
``X-Toposerve-Timestamp`` (Unix seconds: a receiver refuses old ones, so a captured
delivery cannot be replayed later) and ``X-Toposerve-Job``. Any 2xx is delivered;
anything else (or no answer within the timeout) is retried with exponential backoff,
up to ``TOPOSERVE_CALLBACK_MAX_ATTEMPTS`` tries. Redirects are not followed (they
could lead off the allowed hosts).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Literal

import httpx
import redis.asyncio as redis
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from toposerve.brokers.settings import Settings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Toposerve-Signature"
TIMESTAMP_HEADER = "X-Toposerve-Timestamp"
JOB_HEADER = "X-Toposerve-Job"
_MAX_BACKOFF_S = 60.0


class CallbackSpec(BaseModel):
    """A request's ``"callback": {"url": ..., "secret": ...}``."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2048, description="Where the outcome is POSTed; its host must be allowed "
                                                  "(TOPOSERVE_CALLBACK_ALLOWED_HOSTS)")
    secret: SecretStr = Field(min_length=16, max_length=256, description="Key of the HMAC-SHA256 signature "
                                                                        "(X-Toposerve-Signature)")


class CallbackDelivery(BaseModel):
    """How a job's webhook went, recorded on the job."""

    status: Literal["delivered", "failed"]
    attempts: int
    url: str = Field(description="The callback URL without its query (what the logs show too)")
    last_status: int | None = Field(default=None, description="The receiver's last HTTP status, if it answered")
    last_error: str | None = Field(default=None, description="Why the last attempt failed")


class CallbackRefused(ValueError):
    """A callback URL this server will not call; the message says why."""


def _hosts(setting: str) -> set[str]:
    return {host.strip().lower() for host in setting.split(",") if host.strip()}


def check_callback_url(url: str, settings: Settings) -> httpx.URL:
    """The URL if this server may call it, else ``CallbackRefused`` naming the rule it breaks (pure)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise CallbackRefused(f"callback.url is not a URL: {exc}") from None
    schemes = _hosts(settings.callback_schemes)
    if parsed.scheme not in schemes:
        raise CallbackRefused(f"callback.url must use {' or '.join(sorted(schemes))} "
                              f"(TOPOSERVE_CALLBACK_SCHEMES), not {parsed.scheme or 'no scheme'!r}")
    if parsed.userinfo:
        raise CallbackRefused("callback.url must not carry credentials (user:password@); the signature "
                              "(callback.secret) is how the receiver knows the call is ours")
    if not parsed.host:
        raise CallbackRefused("callback.url has no host")
    allowed = _hosts(settings.callback_allowed_hosts)
    host, port = parsed.host.lower(), parsed.port
    if host not in allowed and (port is None or f"{host}:{port}" not in allowed):
        if not allowed:
            raise CallbackRefused("callbacks are off here: no host is allowed (TOPOSERVE_CALLBACK_ALLOWED_HOSTS)")
        raise CallbackRefused(f"callback host {host!r} is not allowed (TOPOSERVE_CALLBACK_ALLOWED_HOSTS)")
    return parsed


def shown_url(url: str) -> str:
    """The URL as logs and records show it: no credentials, no query (it may carry tokens)."""
    parsed = httpx.URL(url)
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{parsed.host}{port}{parsed.path}"


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256(secret, ``<timestamp>.<body>``) (pure)."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def backoff_s(attempt: int, base_s: float) -> float:
    """Seconds before try ``attempt + 1``: base, 2 x base, 4 x base, ... capped (pure)."""
    return min(base_s * 2 ** (attempt - 1), _MAX_BACKOFF_S)


class CallbackRegistry:
    """Registrations in Redis (``{ns}:job-callback:<id>``), living as long as job records."""

    def __init__(self, client: redis.Redis, namespace: str, ttl_s: int) -> None:
        self.client = client
        self.namespace = namespace
        self.ttl_s = ttl_s

    def key(self, job_id: uuid.UUID | str) -> str:
        return f"{self.namespace}:job-callback:{job_id}"

    async def register(self, job_id: uuid.UUID | str, spec: CallbackSpec) -> None:
        stored = _Registration(url=spec.url, secret=spec.secret.get_secret_value())
        await self.client.set(self.key(job_id), stored.model_dump_json(), ex=self.ttl_s)

    async def take(self, job_id: uuid.UUID | str) -> CallbackSpec | None:
        """The registration, removed (a redelivered outcome does not call twice)."""
        raw = await self.client.getdel(self.key(job_id))
        if raw is None:
            return None
        stored = _Registration.model_validate_json(raw)
        return CallbackSpec(url=stored.url, secret=SecretStr(stored.secret))

    async def forget(self, job_id: uuid.UUID | str) -> None:
        await self.client.delete(self.key(job_id))


class _Registration(BaseModel):
    """What Redis holds (the secret in the clear: Redis is the stages' own store)."""

    url: str
    secret: str


async def deliver(http: httpx.AsyncClient, spec: CallbackSpec, job_id: uuid.UUID | str, body: bytes,
                  settings: Settings) -> CallbackDelivery:
    """POST ``body`` (the job record) to the callback until a 2xx or the last try; how it went."""
    url = shown_url(spec.url)
    secret = spec.secret.get_secret_value()
    last_status: int | None = None
    last_error: str | None = None
    for attempt in range(1, settings.callback_max_attempts + 1):
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: signature(secret, timestamp, body),
                   TIMESTAMP_HEADER: timestamp, JOB_HEADER: str(job_id)}
        try:
            response = await http.post(spec.url, content=body, headers=headers,
                                       timeout=settings.callback_timeout_s, follow_redirects=False)
        except httpx.HTTPError as exc:
            last_status, last_error = None, f"{type(exc).__name__}: no answer"
        else:
            last_status = response.status_code
            if response.is_success:
                return CallbackDelivery(status="delivered", attempts=attempt, url=url, last_status=last_status)
            last_error = f"HTTP {response.status_code}"
        log.info("callback %s for job %s: try %d of %d failed (%s)", url, job_id, attempt,
                 settings.callback_max_attempts, last_error)
        if attempt < settings.callback_max_attempts:
            await asyncio.sleep(backoff_s(attempt, settings.callback_backoff_s))
    log.warning("callback %s for job %s: gave up after %d tries (%s)", url, job_id,
                settings.callback_max_attempts, last_error)
    return CallbackDelivery(status="failed", attempts=settings.callback_max_attempts, url=url,
                            last_status=last_status, last_error=last_error)


class CallbackSender:
    """A stage's webhooks: each delivery in a task of its own (retries and their backoff never hold
    the queue), its outcome handed to ``record``; ``close`` lets them finish their try, then cancels."""

    def __init__(self, registry: CallbackRegistry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings
        self._http: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task] = set()

    async def send(self, target: uuid.UUID | str, body: bytes,
                   record: Callable[[CallbackDelivery], Awaitable[None]]) -> bool:
        """Start delivering ``body`` if ``target`` (a job or batch id) has a callback; taken once."""
        spec = await self.registry.take(target)
        if spec is None:
            return False
        try:
            check_callback_url(spec.url, self.settings)  # again here: this process's own allow-list
        except CallbackRefused as exc:
            log.warning("callback %s for %s refused: %s", shown_url(spec.url), target, exc)
            return False
        if self._http is None:
            self._http = httpx.AsyncClient()
        task = asyncio.create_task(self._send(spec, target, body, record), name=f"callback-{target}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _send(self, spec: CallbackSpec, target: uuid.UUID | str, body: bytes,
                    record: Callable[[CallbackDelivery], Awaitable[None]]) -> None:
        assert self._http is not None
        delivery = await deliver(self._http, spec, target, body, self.settings)
        try:
            await record(delivery)
        except Exception as exc:  # the store is down: the delivery happened (or not) all the same
            log.warning("could not record the callback of %s: %s", target, exc)

    async def close(self) -> None:
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=self.settings.drain_timeout_s)
            for task in pending:
                task.cancel()
        if self._http is not None:
            await self._http.aclose()
