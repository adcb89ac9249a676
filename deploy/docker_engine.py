"""A private Docker engine for CI and tests: install Debian's ``docker.io`` without letting it
start the default daemon, start ``dockerd`` with its own data dirs and socket, stop it.

Why: the project's machines reach Debian's archive and PyPI but no image registry, and they
are containers themselves (no bridge networking, no iptables). Measured there, a ``dockerd``
started as root with ``--bridge=none --iptables=false`` runs containers on host networking,
which is all the tests and the compose smoke need. Nothing here touches a system-wide engine:
the daemon listens on its own socket under the state dir, so ``DOCKER_HOST`` selects it.

    python -m toposerve.deploy.docker_engine install   # docker.io + debootstrap (root, apt)
    python -m toposerve.deploy.docker_engine start     # prints DOCKER_HOST=unix://...
    python -m toposerve.deploy.docker_engine stop
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Debian packages the container lane needs: the engine, and debootstrap for the base images.
DEBIAN_PACKAGES = ("docker.io", "debootstrap")
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
# invoke-rc.d's contract: a policy-rc.d that exits 101 forbids every service start.
_FORBID_ALL_SERVICES = "#!/bin/sh\n# written by toposerve's docker_engine: no service starts during this install\nexit 101\n"
_READY_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 30.0


class EngineError(RuntimeError):
    """The engine cannot be installed or started here (the caller decides whether to fall back)."""


def default_state_dir() -> Path:
    """Where the engine keeps images and state between runs: outside any checkout, so a CI run
    on a fresh clone finds the images an earlier run built (the cache of base_images)."""
    override = os.environ.get("TOPOSERVE_DOCKER_STATE")
    if override:
        return Path(override)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "toposerve" / "docker"


@dataclass(frozen=True)
class Engine:
    """A private dockerd: its data root, exec root, socket, pid file and log under ``state``."""

    state: Path

    @property
    def socket(self) -> Path:
        return self.state / "docker.sock"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pidfile(self) -> Path:
        return self.state / "dockerd.pid"

    @property
    def log(self) -> Path:
        return self.state / "dockerd.log"

    def env(self) -> dict[str, str]:
        """The environment for docker clients (CLI, SDK, testcontainers) to use this engine."""
        return {**os.environ, "DOCKER_HOST": self.docker_host}

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def answers(self) -> bool:
        """True when the engine answers an API call on our socket."""
        if not self.socket.exists() or shutil.which("docker") is None:
            return False
        done = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], env=self.env(),
                              capture_output=True, text=True, timeout=20, check=False)
        return done.returncode == 0 and bool(done.stdout.strip())

    def start(self) -> None:
        """Start dockerd (no bridge, no iptables: containers use host networking) unless ours
        already runs; returns once it answers. Raises EngineError with its log tail otherwise."""
        if self.pid() is not None and self.answers():
            return
        dockerd = shutil.which("dockerd")
        if dockerd is None:
            raise EngineError("dockerd is not installed (python -m toposerve.deploy.docker_engine install)")
        if os.geteuid() != 0:
            raise EngineError("dockerd needs root here (no rootless setup)")
        for sub in ("data", "exec"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        command = [
            dockerd,
            f"--data-root={self.state / 'data'}",
            f"--exec-root={self.state / 'exec'}",
            f"--pidfile={self.pidfile}",
            f"--host={self.docker_host}",
            # These machines have no bridge and no iptables: host networking only.
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
            "--ip6tables=false",
        ]
        with self.log.open("ab") as log:
            # A session of its own: the daemon outlives this command (CI stops it explicitly).
            subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.answers():
                return
            time.sleep(0.5)
        tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-30:]) if self.log.exists() else ""
        self.stop()
        raise EngineError(f"dockerd did not answer on {self.socket} within {_READY_TIMEOUT_S:.0f} s:\n{tail}")

    def stop(self) -> None:
        """SIGTERM our dockerd (it stops its containers and its containerd), SIGKILL after 30 s;
        then unmount what it left mounted under the state dir (seen: exec/netns/default and the
        data root's own bind mount), so the state dir can be removed and nothing lingers."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            if not _wait_exit(pid, _STOP_TIMEOUT_S):
                os.kill(pid, signal.SIGKILL)
                _wait_exit(pid, 10.0)
        if self.pid() is None:
            self._unmount_leftovers()

    def _unmount_leftovers(self) -> None:
        prefix = f"{self.state.resolve()}/"
        try:
            mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        except OSError:
            return
        # Deepest first: the data root's bind mount holds the overlay mounts below it.
        for point in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", point], capture_output=True, check=False)


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def _guard_allows_no_service(path: Path) -> bool:
    if not (path.is_file() and os.access(path, os.X_OK)):
        return False
    return subprocess.run([str(path), "docker", "start"], capture_output=True, check=False).returncode == 101


def install() -> None:
    """apt-get install docker.io and debootstrap, with a policy-rc.d that forbids every service
    start for the duration (else the package starts a default daemon with bridge + iptables)."""
    missing = [name for name, binary in (("docker.io", "dockerd"), ("debootstrap", "debootstrap"))
               if shutil.which(binary) is None and not Path("/usr/sbin", binary).exists()]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise EngineError(f"{' '.join(missing)} missing and this is not root with apt-get")
    original = POLICY_RC_D.read_bytes() if POLICY_RC_D.exists() else None
    guarded = _guard_allows_no_service(POLICY_RC_D)
    if not guarded:
        POLICY_RC_D.write_text(_FORBID_ALL_SERVICES)
        POLICY_RC_D.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env, check=True,
                       stdout=subprocess.DEVNULL)
    except subprocess.CalledProcessError as exc:
        raise EngineError(f"apt-get install {' '.join(missing)} failed ({exc.returncode})") from exc
    finally:
        if not guarded:
            if original is None:
                POLICY_RC_D.unlink(missing_ok=True)
            else:
                POLICY_RC_D.write_bytes(original)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toposerve.deploy.docker_engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["install", "start", "stop", "status"])
    parser.add_argument("--state", type=Path, default=None, help="state dir (default: $TOPOSERVE_DOCKER_STATE "
                        "or ~/.cache/toposerve/docker)")
    args = parser.parse_args(argv)
    engine = Engine(args.state or default_state_dir())
    try:
        if args.action == "install":
            install()
        elif args.action == "start":
            engine.start()
            print(f"DOCKER_HOST={engine.docker_host}")
        elif args.action == "stop":
            engine.stop()
        else:
            print(f"DOCKER_HOST={engine.docker_host} answers={engine.answers()}")
    except EngineError as exc:
        print(f"docker_engine: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
