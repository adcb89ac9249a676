"""Throwaway local RabbitMQ and Redis servers, without Docker.

Why this exists: integration tests need a real broker and a real Redis, and
``toposerve up`` needs them on a developer machine where nothing answers at the
default URLs. Docker is not always usable (some CI sandboxes have an engine that
cannot pull images), but the Debian packages ``rabbitmq-server`` and
``redis-server`` usually are. This module starts *private* instances of them:

- on free loopback ports (AMQP, Erlang distribution, Redis), in a temp dir that
  holds all their data, logs and config;
- with their own RabbitMQ node name, config file, env file and (empty) plugins
  file, so a system-wide node (e.g. ``rabbit@localhost`` on 5672) or its
  ``/etc/rabbitmq`` settings are never used or touched;
- as the ``rabbitmq`` user when running as root (``rabbitmq-server`` refuses to
  run its files otherwise), with the data dir owned by that user.

Every process started here carries a marker environment variable (and runs in
the work dir), so stopping finds and ends all of them (the Erlang VM, its
helpers, a daemonized Redis) even when a pid file is stale or missing; a
``weakref.finalize`` hook kills them at interpreter exit if ``stop()`` was never
called. System-wide servers (e.g. on 5672/6379) are never touched. See
``/work/shared/reference/local-services.md`` for the checked facts behind this.

Typical use::

    with start_rabbitmq() as mq, start_redis(appendonly=True) as rd:
        connect(mq.url, rd.url)
        mq.kill(); mq.restart()      # fault injection: same ports, same data

``tls=TlsFiles(ca, cert, key)`` makes either server listen with TLS only; its ``url``
is then ``amqps://...?cafile=CA`` / ``rediss://...?ssl_ca_certs=CA&ssl_cert_reqs=required``.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, Self
from urllib.parse import urlencode

__all__ = [
    "INSTALL_HINT",
    "LocalService",
    "RabbitMQService",
    "RedisService",
    "ServiceUnavailable",
    "TlsFiles",
    "find_binary",
    "free_port",
    "port_answers",
    "start_rabbitmq",
    "start_redis",
]

LOOPBACK = "127.0.0.1"
INSTALL_HINT = "apt-get install -y rabbitmq-server redis-server"
EXTRA_BIN_DIRS: tuple[str, ...] = ("/usr/sbin", "/usr/lib/rabbitmq/bin", "/usr/local/sbin")
MARKER_ENV = "TOPOSERVE_LOCAL_SERVICE"
RABBITMQ_USER = "rabbitmq"
_LOG_TAIL_LINES = 40
# Process names never killed by the marker sweep: epmd is shared by every
# Erlang node on the machine (if our node happened to start it, it stays).
_SPARED_COMMANDS: frozenset[str] = frozenset({"epmd"})
_SERVER_COMMANDS: frozenset[str] = frozenset({"redis-server", "beam.smp", "erl_child_setup"})


class ServiceUnavailable(RuntimeError):
    """A local service cannot be started (binary missing, or it failed to boot)."""


# --------------------------------------------------------------------------- helpers


def port_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a TCP connect to ``host:port`` succeeds within ``timeout`` s."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A TCP port that is free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def find_binary(name: str) -> Path | None:
    """Locate an executable on PATH, then in /usr/sbin and /usr/lib/rabbitmq/bin."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *EXTRA_BIN_DIRS])
    found = shutil.which(name, path=search)
    return Path(found) if found else None


def _unwrap_rabbitmq_script(path: Path) -> Path:
    """Debian's /usr/sbin/rabbitmq-* are a wrapper that ``su``s to rabbitmq and
    refuses other users; use the real script next to it (we switch user ourselves)."""
    real = path.resolve()
    if real.name == "rabbitmq-script-wrapper":
        sibling = real.parent / path.name
        if sibling.is_file() and os.access(sibling, os.X_OK):
            return sibling
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie still answers kill(0) but is dead for our purposes
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _our_pids(marker: str, workdir: Path) -> list[int]:
    """Live processes of ours (Linux /proc): those whose environment carries
    ``MARKER_ENV=marker``, and server processes whose cwd is our work dir (Redis
    rewrites its process title over the environment block, hiding the marker)."""
    needle = f"{MARKER_ENV}={marker}".encode()
    cwd_wanted = str(workdir)
    found: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            if comm in _SPARED_COMMANDS:
                continue
            ours = needle in (entry / "environ").read_bytes().split(b"\0")
            if not ours and comm in _SERVER_COMMANDS:
                cwd = os.readlink(entry / "cwd").removesuffix(" (deleted)")
                ours = cwd == cwd_wanted
        except OSError:
            continue
        if ours and _pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if _pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _pid_alive(p)]
    return alive


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_ours(marker: str, workdir: Path, extra_pids: tuple[int, ...] = ()) -> None:
    """SIGKILL every process of ours and wait until they are gone.

    With /proc, only processes carrying the marker are touched (a remembered pid
    may have been reused by an unrelated process); without it, ``extra_pids``."""
    has_proc = Path("/proc/self/environ").exists()
    for _ in range(3):  # a dying VM may still spawn a helper: sweep again
        if has_proc:
            pids = _our_pids(marker, workdir)
        else:
            pids = [p for p in extra_pids if _pid_alive(p)]
        if not pids:
            return
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        _wait_gone(pids, 10.0)


def _finalize(
    marker: str, owner_pid: int, workdir: Path, extra_pids: list[int], cleanup_dir: Path | None
) -> None:
    """Last-resort cleanup; also what ``stop()`` ends with. Only in the creating process
    (a forked child inheriting the finalizer must not kill its parent's services)."""
    if os.getpid() != owner_pid:
        return
    _kill_ours(marker, workdir, tuple(extra_pids))
    if cleanup_dir is not None:
        shutil.rmtree(cleanup_dir, ignore_errors=True)


def _read_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _tail(paths: list[Path], lines: int = _LOG_TAIL_LINES) -> str:
    chunks: list[str] = []
    for path in paths:
        try:
            content = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        if content:
            chunks.append(f"--- last {min(lines, len(content))} lines of {path} ---")
            chunks.extend(content[-lines:])
    return "\n".join(chunks) if chunks else "(no log output found)"


@dataclass(frozen=True)
class _RunAs:
    """Who the service processes run as (root switches RabbitMQ to ``rabbitmq``)."""

    uid: int | None = None
    gid: int | None = None
    home: str | None = None
    name: str | None = None

    def popen_kwargs(self) -> dict[str, object]:
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def chown_tree(self, root: Path) -> None:
        if self.uid is None or self.gid is None:
            return
        os.chown(root, self.uid, self.gid)
        for dirpath, dirnames, filenames in os.walk(root):
            for name in (*dirnames, *filenames):
                os.chown(os.path.join(dirpath, name), self.uid, self.gid, follow_symlinks=False)

    def check_traversable(self, path: Path) -> None:
        """The service user must be able to reach ``path`` (e.g. not under /root)."""
        if self.uid is None or self.gid is None:
            return
        for parent in path.resolve().parents:
            st = parent.stat()
            if st.st_uid == self.uid:
                ok = bool(st.st_mode & 0o100)
            elif st.st_gid == self.gid:
                ok = bool(st.st_mode & 0o010)
            else:
                ok = bool(st.st_mode & 0o001)
            if not ok:
                raise ServiceUnavailable(
                    f"user {self.name!r} cannot traverse {parent} to reach {path}; "
                    "use a work dir under a world-traversable directory such as /tmp"
                )


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS listener: the CA that clients verify the server with, and the
    server's certificate and private key."""

    ca: Path
    cert: Path
    key: Path

    def install(self, workdir: Path) -> TlsFiles:
        """Copies in the work dir: the server may run as another user (``rabbitmq``),
        who must read them, and the caller's files may go away before a ``restart()``."""
        target = workdir / "tls"
        target.mkdir(mode=0o700, exist_ok=True)
        copies = TlsFiles(ca=target / "ca.pem", cert=target / "cert.pem", key=target / "key.pem")
        for src, dst in ((self.ca, copies.ca), (self.cert, copies.cert), (self.key, copies.key)):
            shutil.copyfile(src, dst)
            dst.chmod(0o600)
        return copies


def _rabbitmq_run_as() -> _RunAs:
    if os.geteuid() != 0:
        return _RunAs()
    try:
        pw = pwd.getpwnam(RABBITMQ_USER)
    except KeyError:
        return _RunAs()  # e.g. a tarball install: run as root with root's cookie
    return _RunAs(uid=pw.pw_uid, gid=pw.pw_gid, home=pw.pw_dir, name=pw.pw_name)


# --------------------------------------------------------------------------- services


@dataclass(eq=False)
class LocalService(ABC):
    """A throwaway server process on loopback. Use as a context manager, or call
    ``stop()``. ``kill()`` + ``restart()`` simulate a crash and a recovery on the
    same ports with the same data dir."""

    name: str
    url: str
    host: str
    port: int
    workdir: Path
    pid: int | None = field(default=None, init=False)
    start_timeout: float = 60.0
    _owns_workdir: bool = field(default=False, repr=False)
    _marker: str = field(default_factory=lambda: secrets.token_hex(8), repr=False)
    _stopped: bool = field(default=False, init=False, repr=False)
    _known_pids: list[int] = field(default_factory=list, init=False, repr=False)
    _finalizer: weakref.finalize = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Holds no reference to self: runs at stop() or, failing that, at exit.
        self._finalizer = weakref.finalize(
            self,
            _finalize,
            self._marker,
            os.getpid(),
            self.workdir,
            self._known_pids,
            self.workdir if self._owns_workdir else None,
        )

    # -- subclass hooks
    @abstractmethod
    def _launch(self) -> None:
        """Start the server processes (returns once launched, not ready)."""

    @abstractmethod
    def _wait_ready(self, deadline: float) -> None:
        """Block until the server answers; raise ServiceUnavailable on failure."""

    @abstractmethod
    def _graceful_shutdown(self, timeout: float) -> bool:
        """Ask the server to stop cleanly; True when it has exited."""

    @abstractmethod
    def _log_files(self) -> list[Path]: ...

    def _reap(self) -> None:  # noqa: B027 - optional hook
        """Collect our own child process after it exited (no zombies)."""

    # -- public API
    @property
    def running(self) -> bool:
        return self.pid is not None and _pid_alive(self.pid)

    def stop(self) -> None:
        """Clean stop, then make sure no process of ours is left; removes the temp dir
        (when the service created it). Final: a stopped service cannot restart."""
        if self._stopped:
            return
        try:
            if self.running and self._graceful_shutdown(timeout=30.0):
                self._reap()  # before the sweep, so the launcher reaps the VM itself
        finally:
            self._stopped = True
            self.pid = None
            self._finalizer()  # SIGKILL leftovers, rm -r the temp dir
            self._reap()
            self._wait_ports_closed()

    def kill(self) -> None:
        """SIGKILL the server (a crash, for fault tests); data stays for ``restart()``."""
        self._ensure_not_stopped()
        _kill_ours(self._marker, self.workdir, tuple(self._known_pids))
        self._reap()
        self.pid = None
        self._wait_ports_closed()

    def restart(self) -> None:
        """Start again on the same port(s) with the same data dir; clean shutdown first
        if it is running. Returns once the server answers."""
        self._ensure_not_stopped()
        if self.running and self._graceful_shutdown(timeout=30.0):
            self._reap()
        _kill_ours(self._marker, self.workdir, tuple(self._known_pids))
        self._reap()
        self.pid = None
        self._wait_ports_closed()
        self._start()

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        return _tail(self._log_files(), lines)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals
    def _ensure_not_stopped(self) -> None:
        if self._stopped:
            raise RuntimeError(f"{self.name} was stopped (its temp dir is gone); start a new one")

    def _start(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        try:
            self._launch()
            self._wait_ready(deadline)
        except BaseException:
            _kill_ours(self._marker, self.workdir, tuple(self._known_pids))
            self._reap()
            self.pid = None
            raise

    def _ports(self) -> list[int]:
        return [self.port]

    def _wait_ports_closed(self, timeout: float = 5.0) -> None:
        """A dead process's listening sockets can linger for a moment (seen under
        gVisor: the process is a zombie, the port still accepts): wait them out."""
        if not self._known_pids:
            return  # nothing of ours ever ran (e.g. the port was taken by someone else)
        deadline = time.monotonic() + timeout
        while any(port_answers(self.host, p, timeout=0.2) for p in self._ports()):
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)

    def _remember(self, pid: int | None) -> None:
        self.pid = pid
        if pid is not None and pid not in self._known_pids:
            self._known_pids.append(pid)

    def _fail(self, what: str) -> ServiceUnavailable:
        return ServiceUnavailable(f"{self.name} {what} (work dir {self.workdir})\n{self.log_tail()}")


@dataclass(eq=False)
class RabbitMQService(LocalService):
    """A private RabbitMQ node (own node name, ports, config and data dir)."""

    node: str = ""
    dist_port: int = 0
    server_bin: Path = Path("rabbitmq-server")
    ctl_bin: Path = Path("rabbitmqctl")
    run_as: _RunAs = field(default_factory=_RunAs)
    tls: TlsFiles | None = None  # set: the AMQP port speaks TLS only (amqps://)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def _pidfile(self) -> Path:
        return self.workdir / "rabbitmq.pid"

    def _ports(self) -> list[int]:
        return [self.port, self.dist_port]

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
                "ERL_EPMD_ADDRESS": self.host,
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
            "# throwaway node written by deploy/local_services.py\n"
            "# never block publishers because the disk is fullish\n"
            "disk_free_limit.absolute = 1MB\n"
            "log.console = false\n"
            "log.file.level = info\n" + self._tls_config()
        )
        (d / "rabbitmq-env.conf").write_text("# intentionally empty: ignore /etc/rabbitmq/rabbitmq-env.conf\n")
        (d / "enabled_plugins").write_text("[].\n")
        self.run_as.chown_tree(d)

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
            pid = _read_pid(self._pidfile)
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
        self._remember(_read_pid(self._pidfile))

    def _graceful_shutdown(self, timeout: float) -> bool:
        pid = self.pid
        try:
            stopped = self.ctl("stop", timeout=timeout).returncode == 0
        except subprocess.TimeoutExpired:
            stopped = False
        if pid is None:
            return stopped
        if not _wait_gone([pid], timeout if stopped else 0.5):
            return True
        _signal(pid, signal.SIGTERM)
        return not _wait_gone([pid], 10.0)


@dataclass(eq=False)
class RedisService(LocalService):
    """A private redis-server (no RDB snapshots; AOF on request)."""

    server_bin: Path = Path("redis-server")
    appendonly: bool = False
    appendfsync: Literal["always", "everysec", "no"] = "always"
    tls: TlsFiles | None = None  # set: the port speaks TLS only (rediss://)

    @property
    def _pidfile(self) -> Path:
        return self.workdir / "redis.pid"

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
                sock.sendall(b"PING\r\n")
                return sock.recv(64)
        except OSError:  # ssl.SSLError included
            return b""

    def _wait_ready(self, deadline: float) -> None:
        grace = time.monotonic() + 2.0
        while True:
            reply = self._ping()
            if reply.startswith(b"+PONG"):
                self._remember(_read_pid(self._pidfile))
                return
            pid = _read_pid(self._pidfile)
            if pid is not None:
                self._remember(pid)
            alive = bool(_our_pids(self._marker, self.workdir)) or (pid is not None and _pid_alive(pid))
            if not alive and time.monotonic() > grace:
                raise self._fail("exited during startup")
            if time.monotonic() > deadline:
                detail = f" (last reply {reply!r})" if reply else ""
                raise self._fail(f"did not answer PING within {self.start_timeout:.0f} s{detail}")
            time.sleep(0.05)

    def _graceful_shutdown(self, timeout: float) -> bool:
        if self.pid is None:
            return True
        _signal(self.pid, signal.SIGTERM)  # redis: clean shutdown, flushes the AOF
        return not _wait_gone([self.pid], timeout)


# --------------------------------------------------------------------------- factories


def _prepare_workdir(workdir: Path | None, prefix: str) -> tuple[Path, bool]:
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix=prefix)).resolve(), True
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir, False


def _start_or_cleanup(service: LocalService) -> LocalService:
    try:
        service._start()
    except BaseException:
        service.stop()
        raise
    return service


def start_rabbitmq(
    workdir: Path | None = None,
    port: int | None = None,
    *,
    dist_port: int | None = None,
    timeout: float = 90.0,
    tls: TlsFiles | None = None,
) -> LocalService:
    """Start a throwaway RabbitMQ node on loopback; returns once AMQP answers.

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
    path, owned = _prepare_workdir(workdir, "toposerve-rabbitmq-")
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
    url = f"amqp://guest:guest@{LOOPBACK}:{amqp_port}/"
    if tls is not None:
        url = f"amqps://guest:guest@{LOOPBACK}:{amqp_port}/?" + urlencode({"cafile": str(tls.ca)}, safe="/")
    service = RabbitMQService(
        name="rabbitmq",
        url=url,
        host=LOOPBACK,
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
    )
    return _start_or_cleanup(service)


def start_redis(
    workdir: Path | None = None,
    port: int | None = None,
    appendonly: bool = False,
    *,
    appendfsync: Literal["always", "everysec", "no"] = "always",
    timeout: float = 30.0,
    tls: TlsFiles | None = None,
) -> LocalService:
    """Start a throwaway redis-server on loopback; returns once PING answers.

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
    path, owned = _prepare_workdir(workdir, "toposerve-redis-")
    redis_port = port if port is not None else free_port()
    url = f"redis://{LOOPBACK}:{redis_port}/0"
    if tls is not None:
        query = urlencode({"ssl_ca_certs": str(tls.ca), "ssl_cert_reqs": "required"}, safe="/")
        url = f"rediss://{LOOPBACK}:{redis_port}/0?{query}"
    service = RedisService(
        name="redis",
        url=url,
        host=LOOPBACK,
        port=redis_port,
        workdir=path,
        start_timeout=timeout,
        _owns_workdir=owned,
        server_bin=server,
        appendonly=appendonly,
        appendfsync=appendfsync,
        tls=tls,
    )
    return _start_or_cleanup(service)


def _main() -> None:  # pragma: no cover - manual smoke check
    started = time.monotonic()
    with start_rabbitmq() as mq, start_redis() as rd:
        print(f"rabbitmq {mq.url} pid {mq.pid}; redis {rd.url} pid {rd.pid}; "
              f"ready in {time.monotonic() - started:.1f} s")  # fmt: skip


if __name__ == "__main__":  # pragma: no cover
    _main()
