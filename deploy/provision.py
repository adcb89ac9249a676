"""Creating the per-role accounts on servers toposerve did not start (``--provision``).

RabbitMQ through its management API (``POST /api/definitions`` adds the users, their
permissions and topic permissions, and leaves every other definition as it was), with
the administrator named in ``TOPOSERVE_AMQP_URL``; Redis with ``ACL SETUSER``, with the
user of ``TOPOSERVE_REDIS_URL``. Passwords of a namespace are kept (its accounts file),
so provisioning again changes nothing that runs.
"""

from __future__ import annotations

import hashlib
from urllib.parse import unquote, urlparse

import httpx
import redis.asyncio as redis

from toposerve.brokers import Account


class ProvisionError(RuntimeError):
    pass


def management_url_for(amqp_url: str) -> str:
    """The management API next to a broker (the first node of a cluster): same host, port 15672
    (15671 for amqps). Definitions imported on one node apply to the whole cluster."""
    parsed = urlparse(amqp_url.split(",", 1)[0])
    scheme, port = ("https", 15671) if parsed.scheme == "amqps" else ("http", 15672)
    return f"{scheme}://{parsed.hostname or '127.0.0.1'}:{port}"


async def provision_rabbitmq(management_url: str, amqp_url: str, definitions: dict) -> None:
    """Import ``definitions`` (users, permissions, topic permissions) as the administrator of ``amqp_url``
    (its first node's login, for a cluster)."""
    parsed = urlparse(amqp_url.split(",", 1)[0])
    admin = (unquote(parsed.username or "guest"), unquote(parsed.password or "guest"))
    vhost = unquote(parsed.path.lstrip("/")) or "/"
    body = {**definitions, "permissions": [{**p, "vhost": vhost} for p in definitions.get("permissions", [])],
            "topic_permissions": [{**p, "vhost": vhost} for p in definitions.get("topic_permissions", [])]}
    try:
        async with httpx.AsyncClient(base_url=management_url, auth=admin, timeout=30) as client:
            response = await client.post("/api/definitions", json=body)
    except httpx.HTTPError as exc:
        raise ProvisionError(f"the management API at {management_url} cannot be reached ({exc}); enable the "
                             "rabbitmq_management plugin or pass --management-url") from exc
    if response.status_code in (401, 403):
        raise ProvisionError(f"the management API at {management_url} refused {admin[0]!r}: provisioning needs "
                             "an administrator in TOPOSERVE_AMQP_URL")
    if response.status_code >= 300:
        raise ProvisionError(f"the management API at {management_url} answered {response.status_code}: "
                             f"{response.text[:300]}")


async def provision_redis(redis_url: str, accounts: list[Account], passwords: dict[str, str]) -> None:
    """``ACL SETUSER`` every role that uses Redis (its rules replaced, its password as a sha256)."""
    client = redis.Redis.from_url(redis_url)
    try:
        for account in accounts:
            if account.redis is None:
                continue
            digest = hashlib.sha256(passwords[account.role].encode()).hexdigest()
            await client.execute_command("ACL", "SETUSER", account.redis.user, "reset", *account.redis.rules,
                                         f"#{digest}")
    except redis.RedisError as exc:
        raise ProvisionError(f"Redis refused to create the accounts ({exc}); provisioning needs a user allowed "
                             "ACL SETUSER in TOPOSERVE_REDIS_URL") from exc
    finally:
        await client.aclose()
