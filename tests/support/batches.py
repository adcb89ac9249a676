"""Batch inputs and outputs for tests: iris CSV files, the labels ONNX Runtime gives, stored results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson

from tests.integration.conftest import Stack
from toposerve.brokers.batches import BatchStore, iter_results
from toposerve.brokers.settings import Settings
from toposerve.deploy.cli.batch import batch_ttl, make_submitter
from toposerve.deploy.components import models_dir
from toposerve.models.registry import ModelRegistry
from toposerve.producers.batch import wait_for_batch

IRIS_HEADER = "sepal_length,sepal_width,petal_length,petal_width"


def iris_rows(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.round(rng.uniform([4.3, 2.0, 1.0, 0.1], [7.9, 4.4, 6.9, 2.5], size=(n, 4)), 1)


def write_csv(path: Path, rows: np.ndarray, header: bool) -> Path:
    lines = ([IRIS_HEADER] if header else []) + [",".join(f"{v:g}" for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def onnx_labels(settings: Settings, model: str, rows: np.ndarray) -> list[str]:
    loaded = ModelRegistry(models_dir(settings)).load(model)
    indices, _ = loaded.run(rows.astype(np.float32))
    return [loaded.manifest.labels[i] for i in indices]


def submitter_for(stack: Stack, window: int = 64):
    return make_submitter(stack.settings, stack.profile, batch_ttl(stack.profile), window)


async def submit_and_wait(stack: Stack, path: Path, model: str = "iris", chunk_rows: int = 10, **kw):
    async with submitter_for(stack) as submitter:
        result = await submitter.submit_path(path, model, chunk_rows=chunk_rows, **kw)
        status = await wait_for_batch(submitter.store, result.batch_id, timeout_s=30)
    return result, status


async def read_results(stack: Stack, batch_id: str) -> list[dict]:
    store = BatchStore(stack.results.client, stack.settings.namespace, stack.profile.ingress.result_ttl_s)
    manifest = await store.manifest(batch_id)
    assert manifest is not None
    labels = ModelRegistry(models_dir(stack.settings)).manifests[manifest.model].labels
    lines = b"".join([block async for block in iter_results(store, manifest, labels)])
    return [orjson.loads(line) for line in lines.splitlines()]


