"""A private RabbitMQ node: own node name, ports, config, plugins file and data dir."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from toposerve.deploy.accounts import ADMIN_USER, with_administrator
from toposerve.deploy.local_services.server_process import (
    INSTALL_HINT,
    LOOPBACK,
    MARKER_ENV,
    RABBITMQ_USER,
    LocalService,
    RunAs,
    ServiceUnavailable,
    TlsFiles,
    find_binary,
    free_port,
    port_answers,
    prepare_workdir,
    read_pid,
    send_signal,
    start_or_cleanup,
    wait_gone,
)

# The broker's own cap on a message body (RabbitMQ's default is 128 MiB in 3.x): twice the
# stages' default limit, so the stages' clearer refusal is what a caller normally meets.
MAX_MESSAGE_SIZE = 32 * 1024 * 1024


def _unwrap_rabbitmq_script(path: Path) -> Path:
    """Debian's /usr/sbin/rabbitmq-* are a wrapper that ``su``s to rabbitmq and
    refuses other users; use the real script next to it (we switch user ourselves)."""
    real = path.resolve()
    if real.name == "rabbitmq-script-wrapper":
        sibling = real.parent / path.name
        if sibling.is_file() and os.access(sibling, os.X_OK):
            return sibling
    return path


def _rabbitmq_run_as() -> RunAs:
    if os.geteuid() != 0:
        return RunAs()
    try:
        pw = pwd.getpwnam(RABBITMQ_USER)
    except KeyError:
        return RunAs()  # e.g. a tarball install: run as root with root's cookie
    return RunAs(uid=pw.pw_uid, gid=pw.pw_gid, home=pw.pw_dir, name=pw.pw_name)


@dataclass(eq=False)
class RabbitMQService(LocalService):
    """A private RabbitMQ node (own node name, ports, config and data dir)."""

    node: str = ""
    dist_port: int = 0
    server_bin: Path = Path("rabbitmq-server")
    ctl_bin: Path = Path("rabbitmqctl")
    run_as: RunAs = field(default_factory=RunAs)
    tls: TlsFiles | None = None  # set: the AMQP port speaks TLS only (amqps://)
    # Set: the node boots with this admin instead of guest, and imports these definitions
    # (users, permissions, topic permissions) at boot: accounts without a rabbitmqctl call each.
    admin: tuple[str, str] | None = None
    definitions: dict | None = None
    # Set: the management plugin (HTTP API and UI) on this loopback port.
    management_port: int | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def _pidfile(self) -> Path:
        return self.workdir / "rabbitmq.pid"

    def _ports(self) -> list[int]:
        return [self.port, self.dist_port, *([self.management_port] if self.management_port else [])]

    def _log_files(self) -> list[Path]:
        return [self.workdir / "startup.log", self.workdir / "log" / "rabbit.log"]

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_")) and k not in ("NODENAME", "HOME")
            or k == "ERL_EPMD_PORT"  # keep a non-default epmd port, drop ERL_FLAGS & co
        }
        env["HOME"] = self.run_as.home or os.environ.get("HOME", str(self.workdir))
        if self.run_as.name:
            env["USER"] = env["LOGNAME"] = self.run_as.name
        d = self.workdir
        env.update(
            {
                MARKER_ENV: self._marker,
                "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
                "RABBITMQ_LOG_BASE": str(d / "log"),
                "RABBITMQ_LOGS": str(d / "log" / "rabbit.log"),
                "RABBITMQ_PID_FILE": str(self._pidfile),
                "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
                "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
                # epmd and the distribution stay on loopback (rabbitmqctl reaches the node there);
                # only the AMQP listener follows ``host`` (``bind``).
                "ERL_EPMD_ADDRESS": LOOPBACK,
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
                "RABBITMQ_CTL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            }
        )
        if self.tls is None:
            # The plain listener; with TLS the config file sets the listeners, because
            # RABBITMQ_NODE_PORT would override ``listeners.tcp = none``.
            env["RABBITMQ_NODE_IP_ADDRESS"] = self.host
            env["RABBITMQ_NODE_PORT"] = str(self.port)
        return env

    def _tls_config(self) -> str:
        if self.tls is None:
            return ""
        files = self.tls.install(self.workdir)
        # verify_none: the server asks for no client certificate; clients still verify the server.
        return (
            "listeners.tcp = none\n"
            f"listeners.ssl.default = {self.host}:{self.port}\n"
            f"ssl_options.cacertfile = {files.ca}\n"
            f"ssl_options.certfile = {files.cert}\n"
            f"ssl_options.keyfile = {files.key}\n"
            "ssl_options.verify = verify_none\n"
            "ssl_options.fail_if_no_peer_cert = false\n"
        )

    def _write_config(self) -> None:
        d = self.workdir
        for sub in ("mnesia", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "rabbitmq.conf").write_text(
            "# throwaway node written by toposerve (deploy/local_services)\n"
            "# never block publishers because the disk is fullish\n"
            "disk_free_limit.absolute = 1MB\n"
            "# refuse absurd bodies at the door (the stages refuse past TOPOSERVE_MAX_MESSAGE_BYTES)\n"
            f"max_message_size = {MAX_MESSAGE_SIZE}\n"
            "log.console = false\n"
            "log.file.level = info\n" + self._tls_config() + self._accounts_config() + self._management_config()
        )
        (d / "rabbitmq-env.conf").write_text("# intentionally empty: ignore /etc/rabbitmq/rabbitmq-env.conf\n")
        (d / "enabled_plugins").write_text("[rabbitmq_management].\n" if self.management_port else "[].\n")
        self.run_as.chown_tree(d)

    def _management_config(self) -> str:
        if self.management_port is None:
            return ""
        return f"management.tcp.port = {self.management_port}\nmanagement.tcp.ip = {self.host}\n"

    @property
    def management_url(self) -> str | None:
        return None if self.management_port is None else f"http://{self.host}:{self.management_port}"

    def _accounts_config(self) -> str:
        if self.admin is None:
            return ""
        user, password = self.admin
        lines = [f"default_user = {user}", f"default_pass = {password}", "default_user_tags.administrator = true",
                 "default_permissions.configure = .*", "default_permissions.read = .*",
                 "default_permissions.write = .*"]
        if self.definitions is not None:
            # Definitions imported at boot replace the node's own first-boot setup (the default
            # user and vhost are not made then): they carry the vhost and the admin too.
            path = self.workdir / "definitions.json"
            path.write_text(json.dumps(with_administrator(self.definitions, user, password)))
            path.chmod(0o600)
            lines.append(f"load_definitions = {path}")
        return "\n".join(lines) + "\n"

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl -n NODE ARGS`` against this node (as the right user)."""
        return subprocess.run(
            [str(self.ctl_bin), "-n", self.node, *args],
            env=self._env(),
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **self.run_as.popen_kwargs(),  # type: ignore[arg-type]
        )

    def _launch(self) -> None:
        for p in (self.port, self.dist_port):
            if port_answers(self.host, p):
                raise ServiceUnavailable(f"rabbitmq: port {self.host}:{p} is already in use")
        self._pidfile.unlink(missing_ok=True)  # never read a previous run's pid
        self._write_config()
        # Foreground (not -detached): the console output, where boot errors such as
        # a bad config go, lands in startup.log, and an early exit is seen at once.
        # Own session: no terminal signals; the marker sweep still finds it.
        with open(self.workdir / "startup.log", "ab") as out:
            self._proc = subprocess.Popen(
                [str(self.server_bin)],
                env=self._env(),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self.run_as.popen_kwargs(),  # type: ignore[arg-type]
            )
        self._known_pids.append(self._proc.pid)

    def _reap(self) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._proc = None

    def _wait_ready(self, deadline: float) -> None:
        # 1) the AMQP listener opens at the end of boot; fail fast if the VM died
        while not port_answers(self.host, self.port, timeout=0.2):
            pid = read_pid(self._pidfile)
            if pid is not None:
                self._remember(pid)
            code = self._proc.poll() if self._proc is not None else None
            if code is not None:
                raise self._fail(f"node exited with code {code} during startup")
            if time.monotonic() > deadline:
                raise self._fail(f"did not answer on AMQP port {self.port} within {self.start_timeout:.0f} s")
            time.sleep(0.1)
        # 2) confirm the rabbit app is fully booted
        remaining = max(5, int(deadline - time.monotonic()))
        res = self.ctl("await_startup", "--timeout", str(remaining), timeout=remaining + 15)
        if res.returncode != 0:
            raise self._fail(f"await_startup failed (exit {res.returncode}): {res.stdout}{res.stderr}")
        self._remember(read_pid(self._pidfile))

    def _graceful_shutdown(self, timeout: float) -> bool:
        pid = self.pid
        try:
            stopped = self.ctl("stop", timeout=timeout).returncode == 0
        except subprocess.TimeoutExpired:
            stopped = False
        if pid is None:
            return stopped
        if not wait_gone([pid], timeout if stopped else 0.5):
            return True
        send_signal(pid, signal.SIGTERM)
        return not wait_gone([pid], 10.0)


def start_rabbitmq(
    workdir: Path | None = None,
    port: int | None = None,
    *,
    dist_port: int | None = None,
    timeout: float = 90.0,
    tls: TlsFiles | None = None,
    definitions: dict | None = None,
    management: bool = False,
    admin: tuple[str, str] | None = None,
    bind: str = LOOPBACK,
) -> RabbitMQService:
    """Start a throwaway RabbitMQ node on loopback; returns once AMQP answers.

    ``bind``: the address its AMQP (and management) listener binds to, and ``url`` names:
    another local address reachable from test hosts (tests/support/netns.py); the Erlang
    distribution stays on loopback.

    ``definitions`` (RabbitMQ's definitions format: users, permissions, topic permissions):
    imported at boot, and the node has no guest account: an admin with a random password
    (or ``admin``: user, password; the nodes of a cluster share one) instead, whom ``url`` names.

    ``url`` is ``amqp://guest:guest@127.0.0.1:PORT/``. Without ``workdir`` a temp dir
    is created and removed by ``stop()``; a given ``workdir`` is kept. With ``tls`` the
    port speaks TLS only and ``url`` is ``amqps://guest:guest@127.0.0.1:PORT/?cafile=CA``.
    """
    server, ctl = find_binary("rabbitmq-server"), find_binary("rabbitmqctl")
    if server is None or ctl is None:
        missing = " and ".join(n for n, p in (("rabbitmq-server", server), ("rabbitmqctl", ctl)) if p is None)
        raise ServiceUnavailable(
            f"{missing} not found (looked on PATH, in /usr/sbin and /usr/lib/rabbitmq/bin). "
            f"Install it with: {INSTALL_HINT}"
        )
    run_as = _rabbitmq_run_as()
    path, owned = prepare_workdir(workdir, "toposerve-rabbitmq-")
    try:
        run_as.check_traversable(path)
    except ServiceUnavailable:
        if owned:
            shutil.rmtree(path, ignore_errors=True)
        raise
    amqp_port = port if port is not None else free_port()
    dport = dist_port if dist_port is not None else free_port()
    while dport == amqp_port:
        dport = free_port()
    if admin is None and definitions is not None:
        admin = (ADMIN_USER, secrets.token_urlsafe(18))
    login = f"{admin[0]}:{admin[1]}" if admin else "guest:guest"
    url = f"amqp://{login}@{bind}:{amqp_port}/"
    if tls is not None:
        url = f"amqps://{login}@{bind}:{amqp_port}/?" + urlencode({"cafile": str(tls.ca)}, safe="/")
    service = RabbitMQService(
        name="rabbitmq",
        url=url,
        host=bind,
        port=amqp_port,
        workdir=path,
        start_timeout=timeout,
        _owns_workdir=owned,
        node=f"toposerve-{secrets.token_hex(4)}@localhost",
        dist_port=dport,
        server_bin=_unwrap_rabbitmq_script(server),
        ctl_bin=_unwrap_rabbitmq_script(ctl),
        run_as=run_as,
        tls=tls,
        admin=admin,
        definitions=definitions,
        management_port=free_port() if management else None,
    )
    return start_or_cleanup(service)

