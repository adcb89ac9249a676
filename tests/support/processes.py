"""Stage processes for tests that kill or stop them (the real `toposerve worker`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Self

import httpx

from toposerve.brokers.settings import Settings

REPO = Path(__file__).resolve().parents[2]


class WorkerProcess:
    """``module``: what runs ``worker`` (``tests.support.crashing_worker`` for one that crashes).
    ``prefix``: what the command runs under (``ip netns exec NS``: on a test host, tests/support/netns.py)."""

    def __init__(self, settings: Settings, profile: str, stage: str, log_dir: Path,
                 module: str = "toposerve", prefix: Sequence[str] = ()) -> None:
        self.settings = settings
        self.profile = profile
        self.stage = stage
        self.module = module
        self.prefix = list(prefix)
        self.log_path = log_dir / f"{stage}.log"
        self.process: subprocess.Popen | None = None
        self._log_start = 0  # where the current process's lines begin (a restart appends)

    def env(self) -> dict[str, str]:
        return {**os.environ, "TOPOSERVE_AMQP_URL": self.settings.amqp_url,
                "TOPOSERVE_REDIS_URL": self.settings.redis_url, "TOPOSERVE_NAMESPACE": self.settings.namespace,
                "TOPOSERVE_DRAIN_TIMEOUT_S": str(self.settings.drain_timeout_s),
                "TOPOSERVE_MAX_CRASH_REDELIVERIES": str(self.settings.max_crash_redeliveries),
                **({"TOPOSERVE_ACCOUNTS_FILE": self.settings.accounts_file} if self.settings.accounts_file else {})}

    def arguments(self) -> list[str]:
        return ["worker", "--profile", self.profile, "--stage", self.stage]

    def start(self) -> Self:
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            # ``ip netns exec`` execs the command itself: ``process`` is the worker's own pid.
            self.process = subprocess.Popen([*self.prefix, sys.executable, "-m", self.module, *self.arguments()],
                                            env=self.env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_consuming(self, timeout: float = 30) -> None:
        """Blocks until the current process consumes (in async tests: ``await asyncio.to_thread(...)``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if f"consuming {self.settings.namespace}" in self.current_log():
                return
            assert self.process is not None and self.process.poll() is None, self.log()
            time.sleep(0.05)
        raise AssertionError(f"{self.stage} did not start consuming:\n{self.log()}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def terminate(self, timeout: float = 60) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def log(self) -> str:
        """Every line of every process started so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def current_log(self) -> str:
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as handle:
            handle.seek(self._log_start)
            return handle.read().decode(errors="replace")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class IngressProcess(WorkerProcess):
    """A real `toposerve ingress --profile P` on ``host:port`` (under ``prefix``, as a worker)."""

    def __init__(self, settings: Settings, profile: str, log_dir: Path, host: str, port: int,
                 prefix: Sequence[str] = ()) -> None:
        super().__init__(settings, profile, "ingress", log_dir, prefix=prefix)
        self.base_url = f"http://{host}:{port}"
        self.host, self.port = host, port

    def arguments(self) -> list[str]:
        return ["ingress", "--profile", self.profile, "--host", self.host, "--port", str(self.port)]

    def env(self) -> dict[str, str]:
        return {**super().env(), "TOPOSERVE_MAX_ROWS": str(self.settings.max_rows),
                "TOPOSERVE_MAX_BODY_BYTES": str(self.settings.max_body_bytes)}

    def wait_ready(self, timeout: float = 60) -> None:
        """Blocks until ``/readyz`` answers 200."""

        def still_running() -> None:
            assert self.process is not None and self.process.poll() is None, self.log()

        wait_ingress_ready(self.base_url, still_running, timeout, interval=0.2)


def wait_ingress_ready(base_url: str, still_running: Callable[[], None], timeout: float, interval: float) -> None:
    """Blocks until ``base_url``'s ``/readyz`` answers 200; ``still_running`` raises when what serves it died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        still_running()
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    raise AssertionError(f"the ingress never became ready at {base_url}")


@contextmanager
def stage_processes(settings: Settings, profile: str, stages: Iterable[str], log_dir: Path,
                    prefixes: Mapping[str, Sequence[str]] | None = None) -> Iterator[dict[str, WorkerProcess]]:
    """One `toposerve worker` per stage, each consuming before this yields; all stopped after.
    ``prefixes``: per stage, what it runs under (``ip netns exec NS``)."""
    procs = {stage: WorkerProcess(settings, profile, stage, log_dir, prefix=(prefixes or {}).get(stage, ())).start()
             for stage in stages}
    try:
        for proc in procs.values():
            proc.wait_consuming()
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


class RunningProfile:
    """A real `toposerve up --profile P` on a free port, its output in a log file."""

    def __init__(self, profile: str, env: dict[str, str], log_path: Path, extra: list[str] | None = None) -> None:
        from toposerve.deploy.local_services import free_port

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process = subprocess.Popen(
            [sys.executable, "-m", "toposerve", "up", "--profile", profile, "--port", str(self.port), *(extra or [])],
            cwd=REPO, env={**os.environ, **env}, stdout=log_path.open("w"), stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while "ready:" not in self.log():
            assert self.process.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.1)

    def stop(self, timeout: float = 30) -> int | None:
        """Ctrl-C, as a user would; killed if it does not stop in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
