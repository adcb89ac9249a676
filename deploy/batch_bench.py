"""``toposerve batch bench``: a generated iris CSV end to end, next to ONNX Runtime alone.

Measured (figures, not assertions):

- end to end: from the start of the ``toposerve batch submit`` process to the last
  chunk's result stored in Redis (the batch's ``updated`` time, written by the store's
  Lua script), with the predict and batch_store stages as ``toposerve worker``
  processes, as ``toposerve up`` runs them;
- ONNX Runtime alone: the same rows, already parsed, through the same model in
  chunks of the same size, in a process of its own (and CSV parse + ORT, too);
- peak RSS (VmHWM) and CPU seconds of every process, sampled from /proc.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import redis

from toposerve.brokers import Settings
from toposerve.deploy.launcher import Say, ensure_services
from toposerve.deploy.profile import Profile

REPO = Path(__file__).resolve().parents[1]
_CLK = os.sysconf("SC_CLK_TCK")


def write_iris_csv(path: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    data = np.round(rng.uniform([4.3, 2.0, 1.0, 0.1], [7.9, 4.4, 6.9, 2.5], size=(rows, 4)), 1)
    with path.open("w") as handle:
        handle.write("sepal_length_cm,sepal_width_cm,petal_length_cm,petal_width_cm\n")
        np.savetxt(handle, data, fmt="%.1f", delimiter=",")


def proc_stats(pid: int) -> dict[str, float] | None:
    """Peak RSS (MiB) and CPU seconds (user + system) of a live process."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    return {"peak_rss_mib": round(hwm / 1024, 1), "cpu_s": round((int(stat[11]) + int(stat[12])) / _CLK, 2)}


def listener_pid(url: str, default_port: int) -> int | None:
    """The pid listening on a service URL's port (for its CPU and memory figures), via ``ss``."""
    from urllib.parse import urlparse

    port = urlparse(url).port or default_port
    try:
        out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True,
                             timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"pid=(\d+)", out)
    return int(match.group(1)) if match else None


class Sampler:
    """Keeps the last /proc reading of each watched process (so exited ones keep their figures)."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {}
        self.last: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, name: str, pid: int) -> None:
        self.pids[name] = pid

    def sample(self) -> None:
        for name, pid in list(self.pids.items()):
            found = proc_stats(pid)
            if found is not None:  # an exited, unreaped process reads as zeros: keep the highs
                before = self.last.get(name, {})
                self.last[name] = {k: max(v, before.get(k, 0.0)) for k, v in found.items()}

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(0.05)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


_ORT_ALONE = r"""
import json, sys, time
import numpy as np
from pathlib import Path
from toposerve.models import ModelRegistry
models_dir, csv_path, chunk_rows, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
loaded = ModelRegistry(Path(models_dir), intra_op_threads=threads).load("iris")
t0 = time.perf_counter()
data = np.loadtxt(csv_path, delimiter=",", dtype=np.float32, skiprows=1, ndmin=2)
t1 = time.perf_counter()
for start in range(0, len(data), chunk_rows):
    loaded.run(data[start:start + chunk_rows])
t2 = time.perf_counter()
status = Path("/proc/self/status").read_text()
hwm = next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmHWM:"))
print(json.dumps({"rows": len(data), "parse_s": t1 - t0, "ort_s": t2 - t1, "peak_rss_mib": round(hwm / 1024, 1)}))
"""


async def _drop_topology(settings: Settings, profile: Profile) -> None:
    """The bench's own queues and exchanges, so a run leaves nothing on the broker."""
    from toposerve.brokers import connect_amqp, dead_exchange_name, dead_queue_name, exchange_name

    connection = await connect_amqp(settings.amqp_url, "toposerve-batch-bench-cleanup")
    try:
        channel = await connection.channel()
        for spec in profile.queue_specs(settings.namespace):
            await channel.queue_delete(spec.name)
        await channel.queue_delete(dead_queue_name(settings.namespace))
        for name in (exchange_name(settings.namespace), dead_exchange_name(settings.namespace)):
            await channel.exchange_delete(name)
    finally:
        await connection.close()


def run_batch_bench(settings: Settings, profile: Profile, rows: int, chunk_rows: int, say: Say) -> dict:
    from toposerve.deploy.components import models_dir

    settings, services = ensure_services(settings, say)
    namespace = f"bench-{os.getpid()}"
    settings = settings.model_copy(update={"namespace": namespace})
    env = {**os.environ, "TOPOSERVE_AMQP_URL": settings.amqp_url, "TOPOSERVE_REDIS_URL": settings.redis_url,
           "TOPOSERVE_NAMESPACE": namespace, "TOPOSERVE_MAX_ROWS": str(max(chunk_rows, settings.max_rows))}
    workers: list[tuple[str, subprocess.Popen]] = []
    report: dict = {"rows": rows, "chunk_rows": chunk_rows, "profile": profile.name,
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                "platform": platform.platform()}}
    try:
        with tempfile.TemporaryDirectory(prefix="toposerve-batch-bench-") as tmp:
            csv_path = Path(tmp) / "iris.csv"
            started = time.perf_counter()
            write_iris_csv(csv_path, rows)
            say(f"wrote {rows:,} rows to {csv_path} ({csv_path.stat().st_size / 1e6:.1f} MB) in "
                f"{time.perf_counter() - started:.1f} s")

            # ONNX Runtime alone, in a process of its own, on the same rows and chunks.
            alone = subprocess.run(
                [sys.executable, "-c", _ORT_ALONE, str(models_dir(settings)), str(csv_path), str(chunk_rows),
                 str(settings.ort_intra_op_threads)], cwd=REPO, env=env, capture_output=True, text=True, check=True)
            ort = json.loads(alone.stdout)
            report["onnxruntime_alone"] = {
                "inference_rows_per_s": round(ort["rows"] / ort["ort_s"]),
                "parse_and_inference_rows_per_s": round(ort["rows"] / (ort["parse_s"] + ort["ort_s"])),
                "inference_s": round(ort["ort_s"], 3), "csv_parse_s": round(ort["parse_s"], 3),
                "peak_rss_mib": ort["peak_rss_mib"],
            }
            say(f"ONNX Runtime alone: {report['onnxruntime_alone']['inference_rows_per_s']:,} rows/s")

            with Sampler() as sampler:
                for name, url, port in (("rabbitmq", settings.amqp_url, 5672), ("redis", settings.redis_url, 6379)):
                    pid = listener_pid(url, port)
                    if pid is not None:
                        sampler.watch(name, pid)
                baseline_cpu = {name: (proc_stats(pid) or {}).get("cpu_s", 0.0) for name, pid in sampler.pids.items()}
                logs = Path(tmp)
                for stage, spec in profile.stages.items():
                    for replica in range(spec.replicas):  # one process per replica, as `toposerve up` runs them
                        name = f"{stage}-{replica}"
                        log = (logs / f"{name}.log").open("wb")
                        process = subprocess.Popen(
                            [sys.executable, "-m", "toposerve", "worker", "--profile", profile.name,
                             "--stage", stage, "--replica", str(replica)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
                        workers.append((name, process))
                        sampler.watch(f"stage {name}", process.pid)
                deadline = time.monotonic() + 60
                for name, process in workers:
                    while "consuming" not in (logs / f"{name}.log").read_text(errors="replace"):
                        if process.poll() is not None or time.monotonic() > deadline:
                            raise RuntimeError((logs / f"{name}.log").read_text(errors="replace"))
                        time.sleep(0.05)

                t0_wall = time.time()
                t0 = time.perf_counter()
                submit = subprocess.Popen(
                    [sys.executable, "-m", "toposerve", "batch", "submit", str(csv_path), "--model", "iris",
                     "--chunk-rows", str(chunk_rows), "--profile", profile.name],
                    cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                sampler.watch("submitter", submit.pid)
                out, err = submit.communicate()
                submit_s = time.perf_counter() - t0
                if submit.returncode != 0:
                    raise RuntimeError(f"batch submit failed:\n{err}")
                batch_id = out.strip().splitlines()[-1]
                client = redis.Redis.from_url(settings.redis_url)
                key = f"{namespace}:batch:{batch_id}"
                while True:
                    fields = {k.decode(): v.decode() for k, v in client.hgetall(key).items()}
                    if int(fields.get("done", 0)) + int(fields.get("failed", 0)) >= rows:
                        break
                    if time.perf_counter() - t0 > 600:
                        raise RuntimeError(f"batch not finished after 600 s: {fields}")
                    time.sleep(0.02)
                end_to_end = float(fields["updated"]) - t0_wall
                for stale in client.scan_iter(f"{namespace}:*"):  # the bench's keys: gone now, not in 24 h
                    client.delete(stale)
                client.close()
                sampler.sample()
                report["end_to_end"] = {
                    "rows_per_s": round(rows / end_to_end), "seconds": round(end_to_end, 3),
                    "submitter_seconds": round(submit_s, 3), "done": int(fields["done"]),
                    "failed": int(fields["failed"]), "chunks": int(fields["chunks"]), "batch_id": batch_id,
                }
                report["processes"] = dict(sampler.last)
                for name, before in baseline_cpu.items():  # long-running servers: the bench's share only
                    if name in report["processes"]:
                        report["processes"][name]["cpu_s"] = round(report["processes"][name]["cpu_s"] - before, 2)
                        report["processes"][name]["peak_rss_mib_since_start"] = \
                            report["processes"][name].pop("peak_rss_mib")
            say(f"end to end: {report['end_to_end']['rows_per_s']:,} rows/s "
                f"({end_to_end:.2f} s for {rows:,} rows)")
    finally:
        for _, process in workers:
            if process.poll() is None:
                process.terminate()
        for _, process in workers:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        if not services:  # throwaway servers go away with their data; long-running ones keep nothing of ours
            try:
                asyncio.run(_drop_topology(settings, profile))
            except Exception as exc:  # noqa: BLE001 - the figures matter more than the cleanup
                say(f"could not delete the bench's queues ({exc})")
        for service in reversed(services):
            service.stop()
    return report
