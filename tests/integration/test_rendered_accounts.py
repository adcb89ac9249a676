"""The files `toposerve render compose-secrets` writes work on real servers, as compose boots them.

No Docker here: RabbitMQ imports the rendered definitions at boot (a throwaway node, as the
compose service does with load_definitions), and redis-server starts with the rendered ACL file
(`--aclfile`, as the compose service does), probed with compose's own health check command.
Then every role logs in with the password of its env file, and nobody else does.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import aio_pika
import pytest
import redis.asyncio as redis
from aiormq.exceptions import AMQPError
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from toposerve.deploy.accounts import ADMIN_USER, AdminPasswords, new_passwords, profile_accounts, with_login
from toposerve.deploy.compose import (
    DEFINITIONS_FILE,
    REDIS_ACL_FILE,
    REDIS_ADMIN_FILE,
    compose_secret_files,
    env_file_name,
    render_compose,
    write_secret_files,
)
from toposerve.deploy.local_services import find_binary, free_port, start_rabbitmq
from toposerve.deploy.profile import available_profiles, load_profile


def env_of(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line)


def on_port(url: str, scheme: str, port: int, path: str) -> str:
    """A compose-network URL (rabbitmq:5672, redis:6379) with the same login, on this machine's port."""
    parsed = urlparse(url)
    return with_login(f"{scheme}://127.0.0.1:{port}{path}", unquote(parsed.username or ""),
                      unquote(parsed.password or ""))


@pytest.fixture
def rendered(tmp_path: Path, namespace: str) -> tuple[Path, list]:
    accounts = profile_accounts(namespace, *(load_profile(name) for name in available_profiles()))
    files = compose_secret_files(accounts, new_passwords(accounts), AdminPasswords.new(), namespace)
    write_secret_files(tmp_path / "secrets", files)
    return tmp_path / "secrets", accounts


async def test_rabbitmq_boots_with_the_rendered_definitions_every_role_and_no_guest(rendered) -> None:
    directory, accounts = rendered
    definitions = json.loads((directory / DEFINITIONS_FILE).read_text())
    # The throwaway node adds vhost "/" and an administrator of the same name itself; listed twice,
    # RabbitMQ would stop importing (a duplicate user fails the boot import). So the file's
    # administrator is imported once the node is up, and must then log in with its password.
    assert definitions.pop("vhosts") == [{"name": "/"}]
    (admin_user,) = [user for user in definitions["users"] if user["name"] == ADMIN_USER]
    (admin_permission,) = [p for p in definitions["permissions"] if p["user"] == ADMIN_USER]
    assert admin_user["tags"] == ["administrator"] and "password" not in admin_user
    definitions["users"].remove(admin_user)
    definitions["permissions"].remove(admin_permission)
    with start_rabbitmq(definitions=definitions) as broker:
        later = broker.workdir / "admin-definitions.json"  # where the node's user (rabbitmq, as root) reads
        later.write_text(json.dumps({"users": [admin_user], "permissions": [admin_permission]}))
        later.chmod(0o644)
        done = broker.ctl("import_definitions", str(later))
        assert done.returncode == 0, done.stdout + done.stderr
        users = broker.ctl("list_users").stdout
        assert "guest" not in users
        assert any(line.startswith(ADMIN_USER) and "administrator" in line for line in users.splitlines())
        for account in accounts:
            url = on_port(env_of(directory / env_file_name(account.role))["TOPOSERVE_AMQP_URL"], "amqp",
                          broker.port, "/")
            connection = await aio_pika.connect(url)
            await connection.close()
        # The operators' administrator: the password of rabbitmq-admin.password.
        admin = with_login(f"amqp://127.0.0.1:{broker.port}/", ADMIN_USER,
                           (directory / "rabbitmq-admin.password").read_text().strip())
        await (await aio_pika.connect(admin)).close()
        # Refused (how aiormq reports the broker closing the connection varies with timing).
        with pytest.raises((AMQPError, asyncio.CancelledError)):
            await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{broker.port}/")


def _health_check(directory: Path, port: int) -> list[str]:
    """compose.yaml's own Redis health check, pointed at this file and port."""
    redis_service = render_compose([])["services"]["redis"]
    kind, command = redis_service["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    command = command.replace("$$", "$").replace("/run/secrets/redis_admin_password", str(directory / REDIS_ADMIN_FILE))
    return ["sh", "-c", command.replace("redis-cli ", f"redis-cli -p {port} ", 1)]


async def test_redis_boots_with_the_rendered_acl_file_and_its_health_check_passes(rendered, tmp_path: Path) -> None:
    directory, accounts = rendered
    server = find_binary("redis-server")
    if server is None:
        pytest.skip("no redis-server")
    port = free_port()
    process = subprocess.Popen([str(server), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "yes", "--dir", str(tmp_path), "--aclfile",
                                str(directory / REDIS_ACL_FILE)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(_health_check(directory, port), check=False).returncode != 0:
            assert process.poll() is None, "redis-server exited: the ACL file did not load"
            assert time.monotonic() < deadline, "the health check never passed"
            time.sleep(0.1)
        anonymous = redis.Redis(host="127.0.0.1", port=port)
        with pytest.raises((AuthenticationError, ResponseError)):  # NOAUTH: the default user's password is nobody's
            await anonymous.get("x")
        await anonymous.aclose()
        for account in accounts:
            env = env_of(directory / env_file_name(account.role))
            if account.redis is None:
                assert "TOPOSERVE_REDIS_URL" not in env
                continue
            client = redis.Redis.from_url(on_port(env["TOPOSERVE_REDIS_URL"], "redis", port, "/0"))
            assert await client.ping()
            with pytest.raises(NoPermissionError):
                await client.config_get("maxmemory")  # no role administers Redis
            await client.aclose()
    finally:
        process.terminate()
        process.wait(timeout=10)
