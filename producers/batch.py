"""The batch submitter: a file -> chunks published straight as ``Features`` to ``features.<model>``.

Order of work, so a crash anywhere is recoverable with ``--resume``:

1. scan the input (refuse an unreadable or empty file, an unknown model) — nothing
   is published yet;
2. record the batch manifest in Redis;
3. for each chunk: record its row errors (bad rows never travel), publish it with
   confirms (a window of many in flight), then mark it published.

A resumed batch re-sends only the chunks that were neither confirmed nor completed;
a chunk id is ``uuid5(batch_id, index)``, so a chunk sent twice is still stored once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import redis.asyncio as redis
from faststream.rabbit import RabbitBroker

from toposerve.brokers import (
    BatchManifest,
    BatchStore,
    ChunkMeta,
    Features,
    Publisher,
    QueueSpec,
    Settings,
    chunk_id,
    connect_redis,
    declare_topology,
    encode_chunk_result,
    inference_exchange,
    make_broker,
    new_batch_id,
    routing_key,
    url_user,
)
from toposerve.models import InputLimits, ModelManifest, encode_tensor
from toposerve.producers.batch_sources import BatchInputError, BatchSource, ParsedChunk, open_source

DEFAULT_CHUNK_ROWS = 10_000
DEFAULT_WINDOW = 64
CHUNK_HEADER = "x-toposerve-batch-chunk"
CHUNK_START_HEADER = "x-toposerve-batch-chunk-start"

Progress = Callable[[int], None]  # rows handed to the broker (or finished at submit) since the last call


@dataclass
class SubmitResult:
    batch_id: str
    total: int
    chunks: int
    sent_chunks: int
    skipped_chunks: int
    bad_rows: int
    seconds: float


class BatchSubmitter:
    """One AMQP connection and one Redis client, for any number of batches."""

    def __init__(self, settings: Settings, manifests: dict[str, ModelManifest], queues: Sequence[QueueSpec],
                 ttl_s: int, window: int = DEFAULT_WINDOW, publisher: Publisher | None = None,
                 redis_client: redis.Redis | None = None) -> None:
        """``publisher``/``redis_client``: share a process's own (the ingress's); they are not closed here."""
        self.settings = settings
        self.manifests = manifests
        self.queues = list(queues)
        self.window = window
        self.limits = InputLimits.of(settings)
        self._owns_redis = redis_client is None
        self.store = BatchStore(redis_client or connect_redis(settings.redis_url), settings.namespace, ttl_s)
        self.broker: RabbitBroker | None = None
        self.publisher: Publisher | None = publisher

    async def __aenter__(self) -> BatchSubmitter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _connect(self) -> Publisher:
        if self.publisher is None:
            self.broker = make_broker(self.settings, "toposerve-batch-submit")
            await self.broker.connect()
            # Declared here too, so chunks are queued even before the stages start.
            await declare_topology(self.broker, self.settings.namespace, self.queues)
            self.publisher = Publisher(self.broker, inference_exchange(self.settings.namespace), timeout_s=60.0,
                                       user_id=url_user(self.settings.amqp_url))
        return self.publisher

    async def close(self) -> None:
        if self.broker is not None:
            await self.broker.stop()
            self.broker = None
            self.publisher = None
        if self._owns_redis:
            await self.store.client.aclose()

    def manifest_of(self, model: str) -> ModelManifest:
        manifest = self.manifests.get(model)
        if manifest is None:
            raise BatchInputError(f"unknown model {model!r}; served: {', '.join(sorted(self.manifests))}")
        return manifest

    def chunk_rows_for(self, chunk_rows: int) -> int:
        if chunk_rows < 1:
            raise BatchInputError("--chunk-rows must be at least 1")
        # The predict stage refuses messages with more rows than max_rows.
        return min(chunk_rows, self.settings.max_rows)

    def open(self, path: Path, model: str) -> BatchSource:
        return open_source(path, self.manifest_of(model), self.limits)

    async def submit_path(self, path: Path, model: str, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                          resume: str | None = None, progress: Progress | None = None,
                          on_created: Callable[[BatchManifest], None] | None = None) -> SubmitResult:
        source = self.open(path, model)
        return await self.submit(source, chunk_rows=chunk_rows, resume=resume, progress=progress,
                                 on_created=on_created)

    async def submit(self, source: BatchSource, chunk_rows: int = DEFAULT_CHUNK_ROWS, resume: str | None = None,
                     progress: Progress | None = None,
                     on_created: Callable[[BatchManifest], None] | None = None,
                     owner: str | None = None,
                     before_publish: Callable[[BatchManifest], Awaitable[None]] | None = None) -> SubmitResult:
        """Publish ``source`` in chunks; ``owner``: the API key id that may read the batch;
        ``before_publish``: awaited once the batch is recorded, before its first chunk goes out."""
        started = time.perf_counter()
        model = source.manifest.name
        skip: set[int] = set()
        if resume is not None:
            manifest = await self.store.manifest(resume)
            if manifest is None:
                raise BatchInputError(f"no batch {resume!r} to resume: it never existed or it expired")
            if manifest.model != model:
                raise BatchInputError(f"batch {resume} is for model {manifest.model!r}, not {model!r}")
            if manifest.fingerprint != source.fingerprint or manifest.total != source.total:
                raise BatchInputError(f"{source.name} is not the input of batch {resume} (its content changed)")
            skip = await self.store.completed(resume) | await self.store.published(resume)
        else:
            rows = self.chunk_rows_for(chunk_rows)
            manifest = BatchManifest(id=new_batch_id(), model=model, total=source.total,
                                     chunks=-(-source.total // rows), chunk_rows=rows, created=time.time(),
                                     source=Path(source.name).name[:200], fingerprint=source.fingerprint,
                                     kind=source.kind, owner=owner)
        publisher = await self._connect()
        if resume is None:
            await self.store.create(manifest)
        if on_created is not None:
            on_created(manifest)
        if before_publish is not None:
            await before_publish(manifest)
        if progress is not None and skip:
            progress(sum(len(manifest.chunk_range(i)) for i in skip))

        window = asyncio.Semaphore(self.window)
        tasks: set[asyncio.Task] = set()
        failure: list[BaseException] = []
        counts = {"sent": 0, "bad": 0}

        async def send(chunk: ParsedChunk) -> None:
            try:
                await self._send_chunk(publisher, manifest, chunk)
                counts["sent"] += 1
                if progress is not None:
                    progress(chunk.rows)
            except BaseException as exc:
                failure.append(exc)
                raise
            finally:
                window.release()

        try:
            for chunk in source.chunks(manifest.chunk_rows, skip):
                counts["bad"] += len(chunk.errors)
                await window.acquire()
                if failure:
                    window.release()
                    break
                task = asyncio.create_task(send(chunk))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(0)  # let confirms and Redis replies in while we parse
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in list(tasks):
                task.cancel()
        if failure:
            raise failure[0]
        return SubmitResult(batch_id=manifest.id, total=manifest.total, chunks=manifest.chunks,
                            sent_chunks=counts["sent"], skipped_chunks=len(skip), bad_rows=counts["bad"],
                            seconds=time.perf_counter() - started)

    async def _send_chunk(self, publisher: Publisher, manifest: BatchManifest, chunk: ParsedChunk) -> None:
        meta = ChunkMeta(sent=len(chunk.features), errors=chunk.errors, names=chunk.names)
        await self.store.record_meta(manifest.id, chunk.index, meta)
        if len(chunk.features) == 0:
            # Every row is bad: nothing to predict, the chunk is complete as it is.
            await self.store.complete_chunk(manifest.id, chunk.index, encode_chunk_result("", [], []), 0, 0)
            return
        body = Features(id=chunk_id(manifest.id, chunk.index), model=manifest.model, batch_id=manifest.id,
                        tensor=encode_tensor(chunk.features))
        await publisher.publish_raw(aio_pika.Message(
            body=body.model_dump_json().encode(), content_type="application/json", message_id=str(body.id),
            type=body.kind, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={CHUNK_HEADER: chunk.index, CHUNK_START_HEADER: chunk.start},
        ), routing_key("features", manifest.model))
        await self.store.mark_published(manifest.id, [chunk.index])


async def wait_for_batch(store: BatchStore, batch_id: str, on_update: Callable[[int, int], None] | None = None,
                         poll_s: float = 0.2, timeout_s: float | None = None):
    """Poll the batch's status until it is no longer running; returns the last status."""
    loop = asyncio.get_running_loop()
    until = None if timeout_s is None else loop.time() + timeout_s
    while True:
        status = await store.status(batch_id)
        if status is None:
            raise BatchInputError(f"no batch {batch_id!r}: it never existed or it expired")
        if on_update is not None:
            on_update(status.done + status.failed, status.total)
        if status.state != "running" or (until is not None and loop.time() >= until):
            return status
        await asyncio.sleep(poll_s)


def connect_store(settings: Settings, ttl_s: int) -> BatchStore:
    return BatchStore(connect_redis(settings.redis_url), settings.namespace, ttl_s)
