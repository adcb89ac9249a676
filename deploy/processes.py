"""Entry points of the processes a profile runs: one stage replica, or the ingress."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import subprocess
import sys
import time

import uvicorn

from toposerve.api import guarded_protocol
from toposerve.brokers import Settings, configure_logs
from toposerve.consumers import LoopHeartbeat, serve_metrics
from toposerve.consumers.stage_report import reporter_for
from toposerve.deploy.components import build_app, build_stage_runner
from toposerve.deploy.profile import Profile

log = logging.getLogger("toposerve")


def configure_logging(level: str = "INFO", log_format: str | None = None) -> None:
    """Plain lines, or JSON lines (``TOPOSERVE_LOG_FORMAT=json``) with job_id/trace_id for stage work."""
    configure_logs(level, log_format if log_format is not None else Settings().log_format)
    # aio-pika logs every reconnect attempt at length; its warnings are enough.
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


# Young objects between collections of the youngest generation (CPython's default: 700).
GC_YOUNG_THRESHOLD = 20_000


def settle_heap() -> None:
    """Once a server process has built what it serves (app, routes, stage, schemas): move
    every object made so far out of the cyclic collector's reach (``gc.freeze``) and collect
    young objects less often. A request allocates a few hundred objects, nearly all freed by
    reference counting at once; with CPython's defaults the collector ran every few requests
    and its full passes walked FastAPI's and pydantic's long-lived objects each time: a tenth
    of the ingress's CPU at 64 concurrent callers (py-spy --native). For server processes
    only: a test process that froze each app it builds would keep their garbage for good.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()


async def run_stage(profile: Profile, stage: str, settings: Settings, replica: int = 0,
                    metrics_port: int | None = None, metrics_host: str = "127.0.0.1", standby: bool = False) -> None:
    runner = build_stage_runner(profile, stage, settings, replica, standby=standby)
    settle_heap()
    heartbeat = LoopHeartbeat()
    heartbeat.start()
    if metrics_port is not None:
        # A daemon thread serving this process's registry in the Prometheus text format,
        # and /healthz (is the event loop turning?) for a liveness probe.
        try:
            server = serve_metrics(runner.metrics.registry, metrics_port, metrics_host, heartbeat)
        except OSError as exc:
            # Taken since it was chosen (or by another replica): metrics on a free port
            # are better than a stage that cannot start; the log line names the port.
            log.warning("metrics port %d unavailable (%s); serving metrics on a free port", metrics_port, exc)
            server = serve_metrics(runner.metrics.registry, 0, metrics_host, heartbeat)
        log.info("stage %s.%s metrics on http://%s:%d/metrics (liveness: /healthz)", profile.name, stage,
                 metrics_host, server.server_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("stage %s.%s replica %d starting (namespace %s)", profile.name, stage, replica, settings.namespace)
    reporter = reporter_for(runner, profile.name, replica)
    reporter.start()
    try:
        await runner.run_until(stop)
    finally:
        await reporter.close()
        await heartbeat.close()
    log.info("stage %s.%s replica %d stopped: %s", profile.name, stage, replica, runner.stats)


def ingress_server_config(app: object, settings: Settings, host: str, port: int,
                          access_log: bool = False) -> uvicorn.Config:
    """uvicorn for the ingress: httptools with request deadlines (api/http_protocol.py), uvloop."""
    # uvicorn handles SIGTERM/SIGINT itself: it stops accepting, finishes requests, runs the lifespan exit.
    # No "server: uvicorn" header: it tells a scanner what to try, and the client nothing.
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=access_log,
                          http=guarded_protocol(settings.header_timeout_s), server_header=False,
                          loop="uvloop" if _has_uvloop() else "asyncio", timeout_graceful_shutdown=10)


def serve_ingress(profile: Profile, settings: Settings, host: str, port: int, access_log: bool = False,
                  profile_arg: str | None = None, worker: int | None = None) -> None:
    """One ingress process; with ``ingress.workers: N`` (and ``worker`` unset) a parent of N."""
    if profile.ingress.workers > 1 and worker is None:
        sys.exit(run_ingress_workers(profile, profile_arg or profile.name, host, port, access_log))
    # A process of its own follows the namespace's live profile (toposerve swap); a single-process
    # profile's stages live inside it, so it cannot switch to another profile.
    app = build_app(profile, settings, with_stages=profile.ingress.single_process,
                    follow=not profile.ingress.single_process)
    server = uvicorn.Server(ingress_server_config(app, settings, host, port, access_log))
    settle_heap()
    if worker is None:
        server.run()
    else:
        server.run(sockets=[reuse_port_socket(host, port)])


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket that other processes may bind too: the kernel spreads connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def run_ingress_workers(profile: Profile, profile_arg: str, host: str, port: int, access_log: bool) -> int:
    """N ingress processes on one port until a signal (passed on to each) or until one exits.

    One that exits takes the others down with it and its code is returned: whoever runs this
    (the launcher, a container runtime) restarts the whole, so the port's workers never
    quietly shrink to fewer than the profile asks for.
    """
    argv = [sys.executable, "-m", "toposerve", "ingress", "--profile", profile_arg, "--host", host,
            "--port", str(port), *(["--access-log"] if access_log else [])]
    workers = [subprocess.Popen([*argv, "--worker", str(index)]) for index in range(profile.ingress.workers)]
    log.info("ingress %s: %d workers on %s:%d (pids %s)", profile.name, len(workers), host, port,
             ", ".join(str(w.pid) for w in workers))

    def pass_on(signum: int, _frame: object) -> None:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, pass_on)
    while all(w.poll() is None for w in workers):
        time.sleep(0.2)
    exited = next(w for w in workers if w.poll() is not None)
    code = exited.returncode
    pass_on(signal.SIGTERM, None)
    for w in workers:
        try:
            w.wait(timeout=30)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()
    return code


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True
