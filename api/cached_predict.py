"""The prediction-cache path of ``POST /v1/models/{model}/predict``.

The ingress preprocesses the input itself (it needs the canonical tensor to key the
cache), answers a hit at once without touching the queue, and on a miss publishes
the features straight to ``features.<model>`` carrying the cache key, so the store
stage fills the cache. Concurrent identical misses are computed once: one caller
leads (a Redis lock), the others wait for the fill (sync) or are completed by the
store with the leader's answer (async).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import numpy as np
from redis.exceptions import RedisError

from toposerve.api.auth import current_owner
from toposerve.api.entry import features_message
from toposerve.api.errors import ApiError
from toposerve.api.ingress import INPUT_STATUS, Ingress
from toposerve.brokers import (
    Failure,
    InferenceRequest,
    JobRecord,
    JobStatus,
    Prediction,
    RowPrediction,
    prediction_key,
    utc_now,
)
from toposerve.models import InputError, image_b64_to_features, rows_to_features

log = logging.getLogger(__name__)


def request_features(ingress: Ingress, request: InferenceRequest) -> np.ndarray:
    manifest = ingress.manifest(request.model)
    try:
        if request.instances is not None:
            return rows_to_features(request.instances, manifest, ingress.limits)
        assert request.image is not None
        return image_b64_to_features(request.image, manifest, ingress.limits)
    except InputError as exc:
        raise ApiError(INPUT_STATUS.get(exc.code, 422), str(exc.code), exc.message) from exc


def timed_request_features(ingress: Ingress, request: InferenceRequest) -> tuple[np.ndarray, float]:
    """The features and the milliseconds they took: the answer's ``preprocess_ms`` (done here, not in a stage)."""
    started = time.perf_counter()
    features = request_features(ingress, request)
    return features, round((time.perf_counter() - started) * 1000, 3)


async def _cached(ingress: Ingress, key: str) -> list[RowPrediction] | None:
    assert ingress.prediction_cache is not None
    try:
        return await ingress.prediction_cache.get(key)
    except RedisError as exc:
        ingress.stats.cache_errors += 1
        log.warning("prediction cache unavailable (%s): serving through the pipeline", exc)
        return None


def _hit_record(request: InferenceRequest, version: str, rows: list[RowPrediction]) -> JobRecord:
    return JobRecord(id=request.id, model=request.model, status=JobStatus.SUCCEEDED, created_at=request.created_at,
                     model_version=version, predictions=rows, cached=True,
                     timings={"total_ms": round((utc_now() - request.created_at).total_seconds() * 1000, 3)})


async def predict_sync_cached(ingress: Ingress, request: InferenceRequest, timeout_s: float
                              ) -> tuple[JobRecord | Prediction | Failure, str]:
    """The answer and how it was found: ``hit``, ``miss`` (we computed it) or ``coalesced``."""
    cache = ingress.prediction_cache
    assert cache is not None and ingress.cache_fills is not None
    manifest = ingress.manifest(request.model)
    features, preprocess_ms = await asyncio.to_thread(timed_request_features, ingress, request)
    key = prediction_key(ingress.settings.namespace, request.model, manifest.version, features)
    message = features_message(request, features, preprocess_ms)
    message.cache_key = key
    loop = asyncio.get_running_loop()
    until = loop.time() + timeout_s
    waited = False
    while True:
        with ingress.cache_fills.watch(key) as filled:
            rows = await _cached(ingress, key)
            if rows is not None:
                ingress.stats.cache_hits += 1 if not waited else 0
                return _hit_record(request, manifest.version, rows), "coalesced" if waited else "hit"
            remaining = until - loop.time()
            try:
                lead = remaining > 0 and await cache.try_lead(key, str(request.id), remaining)
            except RedisError:
                lead = True  # no single flight without Redis; still serve
            if lead or remaining <= 0:
                ingress.stats.cache_misses += 1
                # The deadline counts from the request's arrival, whatever the cache cost.
                timeout = timeout_s if remaining > 0 else 1e-6
                return await ingress.predict_sync(message, timeout), "miss"
            if not waited:
                ingress.stats.cache_coalesced += 1
            waited = True
            # Another caller computes it: wait for its fill (or its failure), then look again.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(filled), min(remaining, 1.0))


async def submit_async_cached(ingress: Ingress, request: InferenceRequest) -> tuple[JobRecord, str]:
    """The job as accepted (``succeeded`` on a hit, else ``pending``) and ``hit``/``miss``/``coalesced``."""
    cache = ingress.prediction_cache
    assert cache is not None
    manifest = ingress.manifest(request.model)
    features, preprocess_ms = await asyncio.to_thread(timed_request_features, ingress, request)
    key = prediction_key(ingress.settings.namespace, request.model, manifest.version, features)
    rows = await _cached(ingress, key)
    if rows is not None:
        ingress.stats.cache_hits += 1
        record = _hit_record(request, manifest.version, rows)
        record.owner = current_owner()
        try:
            await ingress.results.finish(record)
        except RedisError as exc:
            raise ApiError(503, "store_unavailable", "the result store is unavailable; retry later",
                           {"Retry-After": "1"}) from exc
        return record, "hit"
    message = features_message(request, features, preprocess_ms)
    message.cache_key = key
    pending = JobRecord(id=request.id, model=request.model, status=JobStatus.PENDING, created_at=request.created_at)
    try:
        lead = await cache.try_lead(key, str(request.id), ingress.config.spec.result_ttl_s)
    except RedisError:
        lead = True
    if lead:
        ingress.stats.cache_misses += 1
        await ingress.submit_async(message)
        return pending, "miss"
    # Another job computes the same answer: the store completes this one with it.
    ingress.stats.cache_coalesced += 1
    try:
        await ingress.results.create_pending(request.id, request.model, request.created_at, owner=current_owner())
        await cache.follow(key, str(request.id), ingress.config.spec.result_ttl_s)
        rows = await cache.get(key)  # filled between our miss and our follow: complete now
    except RedisError as exc:
        raise ApiError(503, "store_unavailable", "the result store is unavailable; retry later",
                       {"Retry-After": "1"}) from exc
    if rows is not None:
        record = _hit_record(request, manifest.version, rows)
        record.owner = current_owner()
        await ingress.results.finish(record)
        return record, "coalesced"
    return pending, "coalesced"
