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
import uuid

import numpy as np
from redis.exceptions import RedisError

from toposerve.api.auth import current_owner
from toposerve.api.entry import features_message
from toposerve.api.errors import ApiError
from toposerve.api.ingress import INPUT_STATUS, Ingress
from toposerve.brokers import (
    Failure,
    InferenceRequest,
    JobError,
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


async def _release(ingress: Ingress, key: str, job_id: str) -> list[str]:
    """Give the single-flight lock up at once (best effort: it expires with the leader's deadline anyway)."""
    assert ingress.prediction_cache is not None
    try:
        return await ingress.prediction_cache.release(key, job_id)
    except RedisError as exc:
        log.warning("could not release the prediction-cache lock %s (%s); it expires by itself", key, exc)
        return []


async def predict_sync_cached(ingress: Ingress, request: InferenceRequest, timeout_s: float
                              ) -> tuple[JobRecord | Prediction | Failure, str]:
    """The answer and how it was found: ``hit``, ``miss`` (we computed it) or ``coalesced``.

    An error (503 refused, 504 deadline) carries the same ``X-Cache`` header as an answer.
    """
    try:
        return await _predict_sync_cached(ingress, request, timeout_s)
    except ApiError as exc:
        exc.headers.setdefault("X-Cache", "miss")
        raise


async def _predict_sync_cached(ingress: Ingress, request: InferenceRequest, timeout_s: float
                               ) -> tuple[JobRecord | Prediction | Failure, str]:
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
            if remaining <= 0:
                raise ApiError(504, "deadline_exceeded", f"no prediction within the deadline of {timeout_s:g} s: "
                               "an identical request was being computed and did not finish in time",
                               {"X-Cache": "coalesced"})
            try:
                lead = await cache.try_lead(key, str(request.id), remaining)
            except RedisError:
                lead = True  # no single flight without Redis; still serve
            if lead:
                return await _lead_sync(ingress, request, message, key, timeout_s, manifest.version)
            if not waited:
                ingress.stats.cache_coalesced += 1
            waited = True
            # Another caller computes it: wait for its fill (or its giving up), then look again.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(filled), min(remaining, 1.0))


async def _lead_sync(ingress: Ingress, request: InferenceRequest, message, key: str, timeout_s: float,
                     version: str) -> tuple[JobRecord | Prediction | Failure, str]:
    """This caller holds the lock: compute the answer, or give the lock up at once if it cannot."""
    job_id = str(request.id)
    # The answer may have been filled between our miss and our lock (its leader let go):
    # look once more, so identical inputs are computed exactly once.
    rows = await _cached(ingress, key)
    if rows is not None:
        await _release(ingress, key, job_id)
        ingress.stats.cache_hits += 1
        return _hit_record(request, version, rows), "hit"
    ingress.stats.cache_misses += 1
    try:
        # The deadline counts from the request's arrival, whatever the cache cost.
        return await ingress.predict_sync(message, timeout_s), "miss"
    except BaseException:
        # Refused (no consumer, a full queue, the broker away) or past the deadline: the
        # waiters must not sit out this caller's deadline; the next one leads.
        await asyncio.shield(_release(ingress, key, job_id))
        raise


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
        return await _finish_hit(ingress, request, manifest.version, rows), "hit"
    message = features_message(request, features, preprocess_ms)
    message.cache_key = key
    pending = JobRecord(id=request.id, model=request.model, status=JobStatus.PENDING, created_at=request.created_at)
    job_id = str(request.id)
    try:
        lead = await cache.try_lead(key, job_id, ingress.config.spec.result_ttl_s)
    except RedisError:
        lead = True
    if lead:
        rows = await _cached(ingress, key)  # filled between our miss and our lock: no second computation
        if rows is not None:
            await _complete_followers(ingress, await _release(ingress, key, job_id), manifest.version, rows)
            ingress.stats.cache_hits += 1
            return await _finish_hit(ingress, request, manifest.version, rows), "hit"
        ingress.stats.cache_misses += 1
        try:
            await ingress.submit_async(message)
        except ApiError as exc:
            # Not queued: free the lock at once, and end the jobs that followed this one
            # (they were accepted to share its answer, which will not come).
            await _fail_followers(ingress, await _release(ingress, key, job_id), exc)
            raise
        return pending, "miss"
    # Another job computes the same answer: the store completes this one with it.
    ingress.stats.cache_coalesced += 1
    try:
        await ingress.results.create_pending(request.id, request.model, request.created_at, owner=current_owner())
        await cache.follow(key, job_id, ingress.config.spec.result_ttl_s)
        rows = await cache.get(key)  # filled between our miss and our follow: complete now
    except RedisError as exc:
        raise ApiError(503, "store_unavailable", "the result store is unavailable; retry later",
                       {"Retry-After": "1"}) from exc
    if rows is not None:
        return await _finish_hit(ingress, request, manifest.version, rows), "coalesced"
    return pending, "coalesced"


async def _finish_hit(ingress: Ingress, request: InferenceRequest, version: str,
                      rows: list[RowPrediction]) -> JobRecord:
    record = _hit_record(request, version, rows)
    record.owner = current_owner()
    try:
        await ingress.results.finish(record)
    except RedisError as exc:
        raise ApiError(503, "store_unavailable", "the result store is unavailable; retry later",
                       {"Retry-After": "1"}) from exc
    return record


async def _complete_followers(ingress: Ingress, followers: list[str], version: str,
                              rows: list[RowPrediction]) -> None:
    for job_id in followers:
        leader = JobRecord(id=uuid.UUID(job_id), model="", status=JobStatus.SUCCEEDED, created_at=utc_now(),
                           model_version=version, predictions=rows, cached=True)
        await _finish_follower(ingress, job_id, leader)


async def _fail_followers(ingress: Ingress, followers: list[str], refused: ApiError) -> None:
    for job_id in followers:
        failed = JobRecord(id=uuid.UUID(job_id), model="", status=JobStatus.FAILED, created_at=utc_now(),
                           error=JobError(code=refused.code, message=(
                               "this job waited for an identical request that could not be queued "
                               f"({refused.message}); submit it again")))
        await _finish_follower(ingress, job_id, failed)


async def _finish_follower(ingress: Ingress, job_id: str, outcome: JobRecord) -> None:
    """End a follower's pending record as ``outcome`` says (its model and creation time kept)."""
    try:
        current = await ingress.results.get(uuid.UUID(job_id))
        if current is None:
            return
        await ingress.results.finish(outcome.model_copy(update={"model": current.model,
                                                                "created_at": current.created_at,
                                                                "owner": current.owner}))
    except RedisError as exc:
        log.warning("could not end follower job %s (%s); it expires with its TTL", job_id, exc)
