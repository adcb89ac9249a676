"""The batch pattern on real RabbitMQ + Redis: files in, chunks through predict, results in input order."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path

import numpy as np
import orjson
import pytest

from tests.integration.conftest import Stack, start_stack
from tests.support.batches import (
    IRIS_HEADER,
    iris_rows,
    onnx_labels,
    read_results,
    submit_and_wait,
    submitter_for,
    write_csv,
)
from tests.support.faults import summary
from tests.support.images import png_bytes, sample_images, truncated
from toposerve.brokers import publishing
from toposerve.brokers.batches import chunk_id
from toposerve.brokers.connections import connect_amqp
from toposerve.brokers.messages import Prediction, RowPrediction
from toposerve.brokers.settings import Settings
from toposerve.producers.batch import wait_for_batch
from toposerve.producers.batch_sources import BatchInputError


@pytest.fixture
async def batch_stack(settings: Settings):
    async for stack in start_stack(settings, "batch"):
        yield stack


async def queued_features(settings: Settings) -> int:
    connection = await connect_amqp(settings.amqp_url, "test-peek")
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"{settings.namespace}.batch.predict", passive=True)
        return queue.declaration_result.message_count
    finally:
        await connection.close()


@pytest.mark.parametrize("header", [True, False])
async def test_csv_with_and_without_header(batch_stack: Stack, tmp_path: Path, header: bool) -> None:
    rows = iris_rows(25)
    result, status = await submit_and_wait(batch_stack, write_csv(tmp_path / "in.csv", rows, header))
    assert (result.total, result.chunks, result.bad_rows) == (25, 3, 0)
    assert (status.state, status.done, status.failed, status.chunks_done) == ("succeeded", 25, 0, 3)
    lines = await read_results(batch_stack, result.batch_id)
    assert [line["row"] for line in lines] == list(range(25))
    assert [line["label"] for line in lines] == onnx_labels(batch_stack.settings, "iris", rows)
    assert all(len(line["probabilities"]) == 3 for line in lines)
    client, ns, ttl = batch_stack.results.client, batch_stack.settings.namespace, batch_stack.profile.ingress.result_ttl_s
    keys = [key async for key in client.scan_iter(f"{ns}:batch:{result.batch_id}*")]
    assert len(keys) == 4  # manifest, meta, published, results: each with the profile's TTL
    ttls = [await client.ttl(key) for key in keys]
    assert all(0 < left <= ttl for left in ttls), ttls


async def test_csv_header_in_another_column_order_is_followed(batch_stack: Stack, tmp_path: Path) -> None:
    rows = iris_rows(5, seed=3)
    path = tmp_path / "swapped.csv"
    path.write_text("petal_width,petal_length,sepal_width,sepal_length\n"
                    + "\n".join(",".join(f"{v:g}" for v in row[::-1]) for row in rows) + "\n")
    result, status = await submit_and_wait(batch_stack, path)
    assert status.state == "succeeded"
    lines = await read_results(batch_stack, result.batch_id)
    assert [line["label"] for line in lines] == onnx_labels(batch_stack.settings, "iris", rows)


async def test_jsonl_lists_and_instances(batch_stack: Stack, tmp_path: Path) -> None:
    rows = iris_rows(12, seed=1)
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(
        orjson.dumps(row.tolist() if i % 2 else {"instances": [row.tolist()]}).decode() for i, row in enumerate(rows)
    ) + "\n\n")
    result, status = await submit_and_wait(batch_stack, path, chunk_rows=5)
    assert (status.state, status.total, status.done) == ("succeeded", 12, 12)
    lines = await read_results(batch_stack, result.batch_id)
    assert [line["label"] for line in lines] == onnx_labels(batch_stack.settings, "iris", rows)


async def test_bad_rows_fail_only_themselves_with_their_reason(batch_stack: Stack, tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("5.1,3.5,1.4,0.2\n"
                    "5.1,3.5,1.4\n"             # wrong arity
                    "6.2,abc,4.5,1.5\n"         # not a number
                    "6.3,3.3,nan,2.5\n"         # not finite
                    "6.7,3.0,5.2,2.3\n")
    result, status = await submit_and_wait(batch_stack, path, chunk_rows=3)
    assert (status.state, status.done, status.failed) == ("partial", 2, 3)
    lines = await read_results(batch_stack, result.batch_id)
    assert [line["status"] for line in lines] == ["succeeded", "failed", "failed", "failed", "succeeded"]
    assert "has 3 values" in lines[1]["error"]["message"] and "expects 4" in lines[1]["error"]["message"]
    assert "'abc'" in lines[2]["error"]["message"] and "not a number" in lines[2]["error"]["message"]
    assert "not a finite number" in lines[3]["error"]["message"]
    assert lines[4]["label"] == onnx_labels(batch_stack.settings, "iris", np.array([[6.7, 3.0, 5.2, 2.3]]))[0]


async def test_a_chunk_of_only_bad_rows_completes_without_being_sent(batch_stack: Stack, tmp_path: Path) -> None:
    path = tmp_path / "allbad.jsonl"
    path.write_text('[1, 2]\n"x"\n[5.1, 3.5, 1.4, 0.2]\n')
    result, status = await submit_and_wait(batch_stack, path, chunk_rows=2)
    assert (status.state, status.done, status.failed, status.chunks_done) == ("partial", 1, 2, 2)
    assert result.sent_chunks == 2


async def test_image_directory(settings: Settings, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    samples = sample_images()
    for path, _ in samples:
        shutil.copy(path, images / path.name)
    (images / "zz_broken.png").write_bytes(truncated(png_bytes((32, 32))))
    (images / "zz_not_an_image.png").write_bytes(b"hello")
    async for stack in start_stack(settings, "batch"):
        result, status = await submit_and_wait(stack, images, model="digits_accurate", chunk_rows=3)
        assert (status.total, status.done, status.failed) == (len(samples) + 2, len(samples), 2)
        lines = await read_results(stack, result.batch_id)
    names = [line["name"] for line in lines]
    assert names == sorted(names)
    by_name = {line["name"]: line for line in lines}
    for path, _ in samples:
        assert by_name[path.name]["status"] == "succeeded"
        assert by_name[path.name]["label"] in [str(d) for d in range(10)]
    assert by_name["zz_broken.png"]["status"] == "failed"
    assert "zz_broken.png" in by_name["zz_broken.png"]["error"]["message"]
    assert "not a PNG or JPEG" in by_name["zz_not_an_image.png"]["error"]["message"]


async def test_refusals_publish_nothing(batch_stack: Stack, tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("\n\n")
    header_only = tmp_path / "header.csv"
    header_only.write_text(IRIS_HEADER + "\n")
    unreadable = tmp_path / "secret.csv"
    unreadable.write_text("5.1,3.5,1.4,0.2\n")
    unreadable.chmod(0)
    async with submitter_for(batch_stack) as submitter:
        with pytest.raises(BatchInputError, match="empty"):
            await submitter.submit_path(empty, "iris")
        with pytest.raises(BatchInputError, match="no rows"):
            await submitter.submit_path(header_only, "iris")
        with pytest.raises(BatchInputError, match="no such file"):
            await submitter.submit_path(tmp_path / "missing.csv", "iris")
        with pytest.raises(BatchInputError, match="unknown model"):
            await submitter.submit_path(header_only, "no_such_model")
        with pytest.raises(BatchInputError, match="takes images"):
            await submitter.submit_path(header_only, "digits_fast")
        import os
        if os.geteuid() != 0:  # root reads anything
            with pytest.raises(BatchInputError, match="cannot read"):
                await submitter.submit_path(unreadable, "iris")
    assert await queued_features(batch_stack.settings) == 0
    assert not [key async for key in batch_stack.results.client.scan_iter(f"{batch_stack.settings.namespace}:batch:*")]


@pytest.mark.fault
async def test_progress_is_exact_under_redelivery(settings: Settings, tmp_path: Path) -> None:
    """Only the store runs: the test plays the predict stage and publishes chunk 0's prediction twice."""
    async for stack in start_stack(settings, "batch", stages=["store"]):
        async with submitter_for(stack) as submitter:
            result = await submitter.submit_path(write_csv(tmp_path / "in.csv", iris_rows(15), False), "iris",
                                                 chunk_rows=10)
            async with publishing(settings, "test-predict") as publisher:
                rows = [RowPrediction(label="setosa", class_index=0, probabilities=[1.0, 0.0, 0.0])]
                for index, n in ((0, 10), (0, 10), (1, 5), (0, 10)):
                    prediction = Prediction(id=chunk_id(result.batch_id, index), model="iris", model_version="1",
                                            batch_id=result.batch_id, rows=rows * n)
                    await publisher.publish(prediction, "prediction.iris")
            status = await wait_for_batch(submitter.store, result.batch_id, timeout_s=10)
            await asyncio.sleep(0.3)  # the last duplicate is stored (or not) by now
            status = await submitter.store.status(result.batch_id)
        assert (status.state, status.done, status.failed, status.chunks_done) == ("succeeded", 15, 0, 2)
        assert stack.runners["store"].stage.duplicates == 2


async def test_resume_after_a_killed_submitter_sends_only_missing_chunks(batch_stack: Stack, tmp_path: Path) -> None:
    rows = iris_rows(50, seed=7)
    path = write_csv(tmp_path / "in.csv", rows, True)

    class Killed(Exception):
        pass

    published: list[int] = []
    created: list[str] = []

    def die_after_two(n: int) -> None:  # the process dies right after its second chunk is confirmed
        published.append(n)
        if len(published) == 2:
            raise Killed

    async with submitter_for(batch_stack, window=1) as submitter:
        with pytest.raises(Killed):
            await submitter.submit_path(path, "iris", chunk_rows=10, progress=die_after_two,
                                        on_created=lambda m: created.append(m.id))
        batch_id = created[0]
        status = await submitter.store.status(batch_id)
        assert status.total == 50 and status.chunks == 5
        result = await submitter.submit_path(path, "iris", resume=batch_id)
        assert (result.batch_id, result.sent_chunks, result.skipped_chunks) == (batch_id, 3, 2)
        status = await wait_for_batch(submitter.store, batch_id, timeout_s=30)
        with pytest.raises(BatchInputError, match="not the input"):
            await submitter.submit_path(write_csv(tmp_path / "other.csv", iris_rows(50, seed=8), True), "iris",
                                        resume=batch_id)
    assert (status.state, status.done, status.failed, status.chunks_done) == ("succeeded", 50, 0, 5)
    # Nothing predicted twice: the predict stage saw each row once.
    assert batch_stack.runners["predict"].stage.batcher.stats.rows == 50
    lines = await read_results(batch_stack, batch_id)
    assert [line["row"] for line in lines] == list(range(50))
    assert [line["label"] for line in lines] == onnx_labels(batch_stack.settings, "iris", rows)


async def test_results_of_a_running_batch_say_pending(settings: Settings, tmp_path: Path) -> None:
    async for stack in start_stack(settings, "batch", stages=[]):
        async with submitter_for(stack) as submitter:
            result = await submitter.submit_path(write_csv(tmp_path / "in.csv", iris_rows(4), False), "iris")
            status = await submitter.store.status(result.batch_id)
        assert (status.state, status.done) == ("running", 0)
        lines = await read_results(stack, result.batch_id)
        assert [line["status"] for line in lines] == ["pending"] * 4
        ttl = await stack.results.client.ttl(f"{settings.namespace}:batch:{result.batch_id}")
        assert 0 < ttl <= stack.profile.ingress.result_ttl_s


# ------------------------------------------------------------------------------ HTTP


async def test_http_post_status_and_streamed_results(batch_stack: Stack) -> None:
    rows = iris_rows(30, seed=5)
    body = IRIS_HEADER + "\n" + "\n".join(",".join(f"{v:g}" for v in row) for row in rows) + "\n5,5\n"
    response = await batch_stack.client.post("/v1/batches?model=iris&chunk_rows=8", content=body,
                                             headers={"content-type": "text/csv"})
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["total"], job["chunks"], job["bad_rows"]) == (31, 4, 1)
    assert response.headers["location"] == f"/v1/batches/{job['id']}"
    for _ in range(100):
        status = (await batch_stack.client.get(job["location"])).json()
        if status["state"] != "running":
            break
        await asyncio.sleep(0.1)
    assert (status["state"], status["done"], status["failed"], status["total"]) == ("partial", 30, 1, 31)
    assert status["rate"] > 0
    response = await batch_stack.client.get(f"{job['location']}/results")
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = [orjson.loads(line) for line in response.content.splitlines()]
    assert [line["row"] for line in lines] == list(range(31))
    assert [line["label"] for line in lines[:30]] == onnx_labels(batch_stack.settings, "iris", rows)
    assert lines[30]["status"] == "failed" and "has 2 values" in lines[30]["error"]["message"]


async def test_http_multipart_jsonl(batch_stack: Stack) -> None:
    rows = iris_rows(6, seed=9)
    data = "\n".join(orjson.dumps(row.tolist()).decode() for row in rows).encode()
    response = await batch_stack.client.post("/v1/batches", files={"file": ("rows.jsonl", data)},
                                             data={"model": "iris"})
    assert response.status_code == 202, response.text
    batch_id = response.json()["id"]
    async with submitter_for(batch_stack) as submitter:
        status = await wait_for_batch(submitter.store, batch_id, timeout_s=30)
    assert (status.state, status.done) == ("succeeded", 6)


async def test_http_refusals(batch_stack: Stack) -> None:
    client = batch_stack.client
    assert (await client.post("/v1/batches?model=nope", content="1,2,3,4\n")).json()["error"]["code"] == \
        "unknown_model"
    empty = await client.post("/v1/batches?model=iris", content="")
    assert empty.status_code == 422 and "empty" in empty.json()["error"]["message"]
    assert (await client.post("/v1/batches", content="1,2,3,4\n")).status_code == 422
    assert (await client.get(f"/v1/batches/{uuid.uuid4()}")).status_code == 404
    assert (await client.get("/v1/batches/not-a-uuid/results")).status_code == 404
    assert await queued_features(batch_stack.settings) == 0


# ------------------------------------------------------------------- CLI and processes


def cli(*args: str, settings: Settings, timeout: float = 120):
    import os
    import subprocess
    import sys

    env = {**os.environ, "TOPOSERVE_AMQP_URL": settings.amqp_url, "TOPOSERVE_REDIS_URL": settings.redis_url,
           "TOPOSERVE_NAMESPACE": settings.namespace}
    return subprocess.run([sys.executable, "-m", "toposerve", "batch", *args], cwd=Path(__file__).parents[2],
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.fault
def test_cli_submit_wait_status_results_with_stages_killed_mid_batch(
    amqp_url: str, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """Worker processes are SIGKILLed while chunks are in flight; every row still ends exactly once."""
    import time

    from tests.support.processes import WorkerProcess

    settings = Settings(amqp_url=amqp_url, redis_url=redis_url, namespace=namespace, drain_timeout_s=5)
    rows = iris_rows(6000, seed=11)
    path = write_csv(tmp_path / "in.csv", rows, True)
    refused = cli("submit", str(tmp_path / "missing.csv"), "--model", "iris", settings=settings)
    assert refused.returncode != 0 and "no such file" in refused.stderr
    refused = cli("submit", str(path), "--model", "nope", settings=settings)
    assert refused.returncode != 0 and "unknown model 'nope'" in refused.stderr
    submitted = cli("submit", str(path), "--model", "iris", "--chunk-rows", "10", settings=settings)
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip().splitlines()[-1]
    assert str(uuid.UUID(batch_id)) == batch_id
    workers = []
    try:
        for stage in ("predict", "store"):
            workers.append(WorkerProcess(settings, "batch", stage, tmp_path).start())
        import redis as sync_redis

        progress = sync_redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 30
        while int(progress.hget(f"{namespace}:batch:{batch_id}", "chunks_done") or 0) < 20:
            assert time.monotonic() < deadline, workers[0].log() + workers[1].log()
            time.sleep(0.005)
        for worker in workers:  # mid-batch
            worker.kill()
        restarted_at = time.monotonic()
        progress.close()
        status = orjson.loads(cli("status", batch_id, settings=settings).stdout)
        assert status["state"] == "running" and status["total"] == 6000 and status["chunks_done"] < 600
        workers = [WorkerProcess(settings, "batch", stage, tmp_path).start() for stage in ("predict", "store")]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = orjson.loads(cli("status", batch_id, settings=settings).stdout)
            if status["state"] != "running":
                break
            time.sleep(0.3)
    finally:
        for worker in workers:
            worker.stop()
    summary("sigkill predict+store batch", sent=1, accepted=1, completed=int(status["state"] == "succeeded"),
            lost=status["total"] - status["done"] - status["failed"], duplicated=max(0, status["chunks_done"] - 600),
            recover_s=time.monotonic() - restarted_at, rows=status["total"], rows_done=status["done"])
    assert (status["state"], status["done"], status["failed"], status["chunks_done"]) == ("succeeded", 6000, 0, 600)
    out = tmp_path / "out.jsonl"
    assert cli("results", batch_id, "-o", str(out), settings=settings).returncode == 0
    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [line["row"] for line in lines] == list(range(6000))
    assert [line["label"] for line in lines] == onnx_labels(settings, "iris", rows)
    waited = cli("submit", str(path), "--model", "iris", "--resume", batch_id, "--wait", settings=settings)
    assert waited.returncode == 0, waited.stderr
    assert "0 chunks published, 600 skipped" in waited.stderr


async def test_the_batch_store_stores_ordinary_jobs_too(settings: Settings) -> None:
    """A prediction that is not a recorded batch's chunk (even with a batch_id) becomes a job record."""
    async for stack in start_stack(settings, "batch", stages=["store"]):
        async with publishing(settings, "test-jobs") as publisher:
            rows = [RowPrediction(label="setosa", class_index=0, probabilities=[0.9, 0.05, 0.05])] * 2
            jobs = [Prediction(id=uuid.uuid4(), model="iris", model_version="1", batch_id=batch, rows=rows)
                    for batch in (None, "my-own-label")]
            for job in jobs:
                await publisher.publish(job, "prediction.iris")
        for job in jobs:
            for _ in range(100):
                record = await stack.results.get(job.id)
                if record is not None:
                    break
                await asyncio.sleep(0.05)
            assert record is not None and record.status == "succeeded"
            assert record.predictions == rows


@pytest.mark.parametrize("profile_name", ["asynchronous", "synchronous"])
async def test_a_profile_without_a_batch_stage_refuses_batches_naming_the_one_that_runs_them(
        settings: Settings, profile_name: str) -> None:
    async for stack in start_stack(settings, profile_name):
        response = await stack.client.post("/v1/batches", params={"model": "iris"},
                                           content=b"5.1,3.5,1.4,0.2\n", headers={"content-type": "text/csv"})
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        assert error["code"] == "batches_not_served" and profile_name in error["message"]
        assert "toposerve up --profile batch" in error["message"]


def test_cli_submit_prints_only_the_batch_id_on_stdout_when_it_is_not_a_terminal(
        amqp_url: str, redis_url: str, namespace: str, tmp_path: Path) -> None:
    """`B=$(toposerve batch submit ...)` must capture the id alone: no progress bar on a pipe."""
    settings = Settings(amqp_url=amqp_url, redis_url=redis_url, namespace=namespace)
    path = write_csv(tmp_path / "in.csv", iris_rows(50, seed=3), True)
    submitted = cli("submit", str(path), "--model", "iris", "--chunk-rows", "10", settings=settings)
    assert submitted.returncode == 0, submitted.stderr
    assert str(uuid.UUID(submitted.stdout.strip())) + "\n" == submitted.stdout  # one line: the id
    assert "━" not in submitted.stderr and "rows/s" not in submitted.stderr  # no bar on stderr either
    assert "chunks published" in submitted.stderr
