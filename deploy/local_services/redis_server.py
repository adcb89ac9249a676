"""A private redis-server: no RDB snapshots, append-only on request, TLS on request."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlencode

from toposerve.deploy.accounts import ADMIN_USER, redis_acl_file
from toposerve.deploy.local_services.server_process import (
    INSTALL_HINT,
    LOOPBACK,
    MARKER_ENV,
    LocalService,
    ServiceUnavailable,
    TlsFiles,
    find_binary,
    free_port,
    our_pids,
    pid_alive,
    port_answers,
    prepare_workdir,
    read_pid,
    send_signal,
    start_or_cleanup,
    wait_gone,
)


@dataclass(eq=False)
class RedisService(LocalService):
    """A private redis-server (no RDB snapshots; AOF on request)."""

    server_bin: Path = Path("redis-server")
    appendonly: bool = False
    appendfsync: Literal["always", "everysec", "no"] = "always"
    tls: TlsFiles | None = None  # set: the port speaks TLS only (rediss://)
    # Set: ACL users (``user ...`` lines of an ACL file) and the admin the probe and ``url``
    # use; the default user gets a password nobody knows, so every connection must log in.
    acl: list[str] | None = None
    admin: tuple[str, str] | None = None

    @property
    def _pidfile(self) -> Path:
        return self.workdir / "redis.pid"

    def _acl_args(self) -> list[str]:
        if self.acl is None:
            return []
        assert self.admin is not None
        # No default user anyone can use: a random password nobody is given, and no admin rights
        # (REDIS_DEFAULT_USER_RULES says why it cannot be switched off instead).
        path = self.workdir / "users.acl"
        path.write_text(redis_acl_file(self.acl, *self.admin))
        path.chmod(0o600)
        return ["--aclfile", str(path)]

    def _listen_args(self) -> list[str]:
        if self.tls is None:
            return ["--port", str(self.port)]
        files = self.tls.install(self.workdir)
        return [
            "--port", "0",  # no plain listener
            "--tls-port", str(self.port),
            "--tls-cert-file", str(files.cert),
            "--tls-key-file", str(files.key),
            "--tls-ca-cert-file", str(files.ca),
            "--tls-auth-clients", "no",  # no client certificates; clients still verify the server
        ]  # fmt: skip

    def _log_files(self) -> list[Path]:
        return [self.workdir / "startup.log", self.workdir / "redis.log"]

    def _launch(self) -> None:
        if port_answers(self.host, self.port):
            raise ServiceUnavailable(f"redis: port {self.host}:{self.port} is already in use")
        self._pidfile.unlink(missing_ok=True)
        env = {**os.environ, MARKER_ENV: self._marker}
        args = [
            str(self.server_bin),
            *self._listen_args(),
            *self._acl_args(),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--dir", str(self.workdir),
            "--daemonize", "yes",
            "--pidfile", str(self._pidfile),
            "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        with open(self.workdir / "startup.log", "ab") as out:
            proc = subprocess.run(
                args, env=env, cwd=self.workdir, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, timeout=30, check=False,
            )  # fmt: skip
        if proc.returncode != 0:
            raise self._fail(f"redis-server exited with {proc.returncode}")

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=0.5)
        if self.tls is None:
            return sock
        try:  # the probe verifies the server like a client would
            context = ssl.create_default_context(cafile=str(self.tls.ca))
            return context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise

    def _ping(self) -> bytes:
        try:
            with self._connect() as sock:
                if self.admin is not None:
                    user, password = self.admin
                    sock.sendall(f"AUTH {user} {password}\r\n".encode())
                    if not sock.recv(64).startswith(b"+OK"):
                        return b""
                sock.sendall(b"PING\r\n")
                return sock.recv(64)
        except OSError:  # ssl.SSLError included
            return b""

    def _wait_ready(self, deadline: float) -> None:
        grace = time.monotonic() + 2.0
        while True:
            reply = self._ping()
            if reply.startswith(b"+PONG"):
                self._remember(read_pid(self._pidfile))
                return
            pid = read_pid(self._pidfile)
            if pid is not None:
                self._remember(pid)
            alive = bool(our_pids(self._marker, self.workdir)) or (pid is not None and pid_alive(pid))
            if not alive and time.monotonic() > grace:
                raise self._fail("exited during startup")
            if time.monotonic() > deadline:
                detail = f" (last reply {reply!r})" if reply else ""
                raise self._fail(f"did not answer PING within {self.start_timeout:.0f} s{detail}")
            time.sleep(0.05)

    def _graceful_shutdown(self, timeout: float) -> bool:
        if self.pid is None:
            return True
        send_signal(self.pid, signal.SIGTERM)  # redis: clean shutdown, flushes the AOF
        return not wait_gone([self.pid], timeout)


def start_redis(
    workdir: Path | None = None,
    port: int | None = None,
    appendonly: bool = False,
    *,
    appendfsync: Literal["always", "everysec", "no"] = "always",
    timeout: float = 30.0,
    tls: TlsFiles | None = None,
    acl: list[str] | None = None,
    bind: str = LOOPBACK,
) -> LocalService:
    """Start a throwaway redis-server on loopback; returns once PING answers.

    ``bind``: the address it listens on and ``url`` names (another local address, reachable
    from test hosts: tests/support/netns.py).

    ``acl``: ACL users (lines ``user NAME on #SHA256 ~keys ...``); then no one can log in as the
    default user, an admin with a random password is made, and ``url`` logs in as that admin.

    ``url`` is ``redis://127.0.0.1:PORT/0``. ``appendonly=True`` keeps data across
    ``kill()`` + ``restart()`` (fsync on every write by default, so a SIGKILL
    loses nothing that was acknowledged). With ``tls`` the port speaks TLS only and ``url``
    is ``rediss://127.0.0.1:PORT/0?ssl_ca_certs=CA&ssl_cert_reqs=required``.
    """
    server = find_binary("redis-server")
    if server is None:
        raise ServiceUnavailable(
            "redis-server not found (looked on PATH, in /usr/sbin and /usr/lib/rabbitmq/bin). "
            f"Install it with: {INSTALL_HINT}"
        )
    path, owned = prepare_workdir(workdir, "toposerve-redis-")
    redis_port = port if port is not None else free_port()
    admin = (ADMIN_USER, secrets.token_urlsafe(18)) if acl is not None else None
    login = f"{admin[0]}:{admin[1]}@" if admin else ""
    url = f"redis://{login}{bind}:{redis_port}/0"
    if tls is not None:
        query = urlencode({"ssl_ca_certs": str(tls.ca), "ssl_cert_reqs": "required"}, safe="/")
        url = f"rediss://{login}{bind}:{redis_port}/0?{query}"
    service = RedisService(
        name="redis",
        url=url,
        host=bind,
        port=redis_port,
        workdir=path,
        start_timeout=timeout,
        _owns_workdir=owned,
        server_bin=server,
        appendonly=appendonly,
        appendfsync=appendfsync,
        tls=tls,
        acl=acl,
        admin=admin,
    )
    return start_or_cleanup(service)

