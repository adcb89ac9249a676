"""A throwaway server process on loopback: free ports, pid files, the marker sweep that ends
every process it started, and running as the ``rabbitmq`` user when root."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import tempfile
import time
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

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


def pid_alive(pid: int) -> bool:
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


def our_pids(marker: str, workdir: Path) -> list[int]:
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
        if ours and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if pid_alive(p)]
    return alive


def send_signal(pid: int, sig: signal.Signals) -> None:
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
            pids = our_pids(marker, workdir)
        else:
            pids = [p for p in extra_pids if pid_alive(p)]
        if not pids:
            return
        for pid in pids:
            send_signal(pid, signal.SIGKILL)
        wait_gone(pids, 10.0)


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


def read_pid(pidfile: Path) -> int | None:
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
class RunAs:
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
        return self.pid is not None and pid_alive(self.pid)

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


# --------------------------------------------------------------------------- factories


def prepare_workdir(workdir: Path | None, prefix: str) -> tuple[Path, bool]:
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix=prefix)).resolve(), True
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir, False


def start_or_cleanup(service: LocalService) -> LocalService:
    try:
        service._start()
    except BaseException:
        service.stop()
        raise
    return service

