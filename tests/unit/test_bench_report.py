"""deploy/bench.py's report arithmetic and deploy/proc_cpu.py's readings of /proc."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from toposerve.deploy.bench import PLAIN, BenchRun, medians_of
from toposerve.deploy.proc_cpu import CpuMeter, available, cpu_seconds, pid_listening_on, with_descendants
from toposerve.producers import LatencySummary

linux_only = pytest.mark.skipif(not available(), reason="reads /proc")


def run(target: str, concurrency: int, rps: float, cpu: dict[str, float], repetition: int = 0) -> BenchRun:
    summary = LatencySummary(requests=int(rps), errors=0, duration_s=1.0, throughput_rps=rps, p50_ms=1.0,
                             p90_ms=2.0, p99_ms=3.0, mean_ms=1.0, max_ms=4.0)
    return BenchRun(target=target, concurrency=concurrency, repetition=repetition, summary=summary,
                    cpu_ms_per_request=cpu)


def test_medians_over_repetitions_and_the_ratio_to_the_plain_server_at_the_same_concurrency() -> None:
    runs = [run("synchronous", 64, rps, {"ingress": ing, "load generator": 9.0}, i)
            for i, (rps, ing) in enumerate([(100, 1.0), (300, 3.0), (200, 2.0)])]
    runs += [run(PLAIN, 64, rps, {"plain server": 0.2}, i) for i, rps in enumerate([400, 500, 600])]
    runs += [run("synchronous", 1, 50, {"ingress": 1.5})]
    medians = {(m.target, m.concurrency): m for m in medians_of(runs)}
    sync = medians[("synchronous", 64)]
    assert (sync.repetitions, sync.throughput_rps, sync.ratio_to_baseline) == (3, 200, 0.4)
    assert sync.cpu_ms_per_request == {"ingress": 2.0, "load generator": 9.0}
    assert sync.cpu_ms_total == 2.0  # the load generator is not the server's cost
    assert medians[(PLAIN, 64)].ratio_to_baseline is None
    assert medians[("synchronous", 1)].ratio_to_baseline is None  # no plain run at c=1


@linux_only
def test_cpu_seconds_grow_with_work_and_a_gone_process_reads_zero() -> None:
    before = cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    assert cpu_seconds(os.getpid()) - before >= 0.1
    assert cpu_seconds(2 ** 22 + 12345) == 0.0


@linux_only
def test_the_listener_of_a_port_is_found() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert pid_listening_on(server.getsockname()[1]) == os.getpid()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        assert pid_listening_on(closed.getsockname()[1]) is None  # bound, not listening


@linux_only
def test_a_roles_cpu_counts_its_children_but_not_another_roles() -> None:
    busy = ("import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
            "print('burnt', flush=True)\ntime.sleep(3)\n")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        assert child.pid in with_descendants([os.getpid()])
        assert child.pid not in with_descendants([os.getpid()], stop_at=frozenset({child.pid}))
        meter = CpuMeter({"me": [os.getpid()], "sleeper": [child.pid]})
        meter.start()
        # A new child of "me", during the window; it says when it has burnt its 0.3 s (however
        # long that takes on a loaded machine) and then sleeps.
        worker = subprocess.Popen([sys.executable, "-c", busy], stdout=subprocess.PIPE, text=True)
        assert worker.stdout is not None and worker.stdout.readline() == "burnt\n"
        used = meter.stop()
        worker.kill()
        worker.wait()
        assert used["me"] >= 0.25  # the child that started in the window counts whole
        assert used["sleeper"] < 0.05
    finally:
        child.kill()
        child.wait()
