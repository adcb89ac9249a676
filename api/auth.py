"""Optional API keys and a per-caller rate limit on the ingress (one small ASGI middleware).

Keys come from the settings (``TOPOSERVE_API_KEYS``: comma-separated plain keys, for
development; ``TOPOSERVE_API_KEYS_FILE``: one ``<key-id>:<sha256 hex of the key>`` per
line, made with ``toposerve keys hash``). No key configured: authentication is off (the
local quickstart). A caller sends ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``;
without one the answer is 401 (with ``WWW-Authenticate``), with a wrong one 403. Only
sha256 digests are kept in memory and compared, in constant time.

The key id of the caller (never the key) is available to the routes through
``current_owner()``: jobs record it, and other keys cannot read them (404).

Health endpoints stay open and are not rate-limited.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from toposerve.brokers import Settings

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/health", "/health/all", "/metrics", "/ui"})
# The operator's page and its script hold no data (api/ui_routes.py): what they show comes through keyed routes.
OPEN_PREFIXES = ("/v2/health/", "/ui/")
_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")

_owner: contextvars.ContextVar[str | None] = contextvars.ContextVar("toposerve_key_id", default=None)


def current_owner() -> str | None:
    """The key id of the request being served (None when authentication is off)."""
    return _owner.get()


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_file_line(key_id: str, key: str) -> str:
    """One line of a keys file: ``<key-id>:<sha256 hex of the key>``."""
    if not _KEY_ID.match(key_id):
        raise ValueError(f"key id {key_id!r}: use letters, digits and _.@- (at most 64)")
    return f"{key_id}:{hash_key(key)}"


class KeysError(ValueError):
    """A keys file or variable that cannot be used (the message never holds a key)."""


@dataclass
class ApiKeys:
    digests: list[tuple[str, bytes]] = field(default_factory=list)  # (key id, sha256 digest)

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys:
        keys = cls()
        if settings.api_keys:
            plain = [k.strip() for k in settings.api_keys.split(",") if k.strip()]
            keys.digests += [(f"env-{i}", hashlib.sha256(k.encode()).digest()) for i, k in enumerate(plain, 1)]
        if settings.api_keys_file:
            keys.digests += read_keys_file(Path(settings.api_keys_file))
        return keys

    def identify(self, presented: str) -> str | None:
        """The key id of ``presented``, or None; every stored digest is compared (constant time)."""
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for key_id, stored in self.digests:
            if hmac.compare_digest(digest, stored) and found is None:
                found = key_id
        return found


def read_keys_file(path: Path) -> list[tuple[str, bytes]]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise KeysError(f"TOPOSERVE_API_KEYS_FILE={path}: cannot be read ({exc.strerror})") from None
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key_id, _, hexdigest = line.partition(":")
        key_id, hexdigest = key_id.strip(), hexdigest.strip().lower()
        if not _KEY_ID.match(key_id) or not _HEX.match(hexdigest):
            raise KeysError(f"{path} line {number}: expected '<key-id>:<64 hex digits of sha256(key)>' "
                            "(make one with `toposerve keys hash --id NAME`)")
        found.append((key_id, bytes.fromhex(hexdigest)))
    if not found:
        raise KeysError(f"{path}: no keys in the file")
    return found


class RateLimiter:
    """A token bucket per caller: ``rate`` requests per second on average, ``burst`` at once."""

    MAX_CALLERS = 10_000

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, last refill)

    def wait_s(self, caller: str) -> float:
        """Seconds until ``caller`` has a token (0: now), taking none."""
        now = self.clock()
        tokens, last = self._buckets.get(caller, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def take(self, caller: str) -> float:
        """0 when admitted, else the seconds until a token is there."""
        now = self.clock()
        tokens, last = self._buckets.get(caller, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[caller] = (tokens - 1.0, now)
            self._prune(now)
            return 0.0
        self._buckets[caller] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        if len(self._buckets) <= self.MAX_CALLERS:
            return
        # Callers whose bucket has refilled completely carry no state worth keeping.
        full_after = self.burst / self.rate
        self._buckets = {c: v for c, v in self._buckets.items() if now - v[1] < full_after}


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def presented_key(scope: dict) -> str | None:
    authorization = _header(scope, b"authorization")
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    api_key = _header(scope, b"x-api-key")
    return api_key.strip() if api_key and api_key.strip() else None


async def _reply(send: Callable, status: int, code: str, message: str, headers: dict[str, str]) -> None:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class SecurityMiddleware:
    """API keys (when configured) and the rate limit (when configured), before any route runs."""

    def __init__(self, app: Callable, keys: ApiKeys, limiter: RateLimiter | None,
                 failures: RateLimiter | None = None) -> None:
        self.app = app
        self.keys = keys
        self.limiter = limiter
        # Invalid keys per client address: past the burst, that address is refused (429)
        # before its key is even looked at, so keys cannot be guessed at line speed.
        self.failures = failures or RateLimiter(rate=1.0, burst=20)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or is_open(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        key_id = None
        if self.keys.enabled:
            client = scope.get("client")
            address = client[0] if client else "unknown"
            locked_s = self.failures.wait_s(address)
            if locked_s > 0:
                await _reply(send, 429, "rate_limited",
                             f"too many invalid API keys from this address ({self.failures.burst} at once, then "
                             f"{self.failures.rate:g} per second); retry later",
                             {"Retry-After": str(max(1, math.ceil(locked_s)))})
                return
            key = presented_key(scope)
            if key is None:
                await _reply(send, 401, "unauthenticated",
                             "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                             {"WWW-Authenticate": 'Bearer realm="toposerve"'})
                return
            key_id = self.keys.identify(key)
            if key_id is None:
                self.failures.take(address)
                await _reply(send, 403, "forbidden", "the API key is not valid", {})
                return
        if self.limiter is not None:
            client = scope.get("client")
            caller = f"key:{key_id}" if key_id else f"addr:{client[0] if client else 'unknown'}"
            wait = self.limiter.take(caller)
            if wait > 0:
                await _reply(send, 429, "rate_limited",
                             f"more than {self.limiter.rate:g} requests per second (burst {self.limiter.burst}); "
                             "retry later", {"Retry-After": str(max(1, math.ceil(wait)))})
                return
        token = _owner.set(key_id)
        try:
            await self.app(scope, receive, send)
        finally:
            _owner.reset(token)


def security_options(settings: Settings) -> dict:
    """The middleware's arguments from the settings (raises KeysError for an unusable keys file)."""
    limiter = None
    if settings.rate_limit_per_s:
        burst = settings.rate_limit_burst or max(1, math.ceil(settings.rate_limit_per_s))
        limiter = RateLimiter(settings.rate_limit_per_s, burst)
    failures = RateLimiter(settings.auth_failures_per_s, settings.auth_failures_burst)
    return {"keys": ApiKeys.from_settings(settings), "limiter": limiter, "failures": failures}


def may_read(owner: str | None) -> bool:
    """Whether the current caller may read a job or batch created by ``owner`` (a key id).

    Records without an owner (made with authentication off, or published straight to the
    exchange) are readable by every key; others only by their own key. Callers answer 404
    otherwise, as for an unknown id, so ids cannot be probed.
    """
    caller = current_owner()
    return owner is None or caller is None or hmac.compare_digest(owner.encode(), caller.encode())
