"""The ingress's connections and its one job: validate a request, record it, publish it.

``IngressConfig`` (api/config.py) is what the composition root (deploy/) hands the
app; the ``Ingress`` object is created and closed by the FastAPI lifespan, never global.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

from aio_pika.abc import AbstractRobustConnection
from pydantic import ConfigDict, Field, ValidationError
from redis.exceptions import RedisError

from toposerve.api.auth import current_owner
from toposerve.api.coalescing import FeatureCoalescer
from toposerve.api.config import IngressConfig
from toposerve.api.entry import preprocess_rows, queues_on_path
from toposerve.api.errors import ApiError, describe_validation_errors
from toposerve.api.replies import ReplyRouter
from toposerve.api.stage_monitor import StageMonitor
from toposerve.api.versions import IngressVersions
from toposerve.brokers import (
    INGRESS_APP_ID,
    TRACEPARENT,
    CompletionListener,
    Envelope,
    Failure,
    FailureCode,
    Features,
    InferenceInputs,
    InferenceRequest,
    JobSlice,
    Prediction,
    PredictionCache,
    Publisher,
    PublishRefused,
    ResultStore,
    ServingVersions,
    Settings,
    connect_amqp,
    connect_redis,
    current_span,
    declare_dead_letters,
    declare_topology,
    inference_exchange,
    issue_job_id,
    make_broker,
    prediction_key,
    trace_headers,
    trusted_producers,
    url_user,
    utc_now,
)
from toposerve.brokers.callbacks import CallbackRefused, CallbackRegistry, CallbackSpec, check_callback_url
from toposerve.models import (
    InputError,
    InputLimits,
    ModelManifest,
    ModelRegistry,
    check_image_header,
    check_item_id,
    collect_versions,
    load_manifests,
    read_version_manifest,
    rows_to_features,
    version_manifest_paths,
)


@dataclass
class IngressStats:
    """Counters of this ingress process, served at GET /v1/stats."""

    cache_hits: int = 0
    cache_misses: int = 0
    cache_coalesced: int = 0
    cache_errors: int = 0
    in_flight: int = 0
    shed: int = 0


def one_of_required(*fields: str) -> dict:
    """For a body's JSON schema: at least one of ``fields`` is there (the validator wants exactly one, not null)."""
    return {"anyOf": [{"required": [field]} for field in fields]}


class PredictBody(InferenceInputs):
    """``POST /v1/models/{model}/predict``: exactly one input, and optionally a webhook (async jobs)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=one_of_required("instances", "image", "item_id"))

    callback: CallbackSpec | None = Field(default=None, description="Async jobs: POST the outcome here, signed "
                                                                    "(see README, Webhooks)")


INPUT_STATUS = {FailureCode.TOO_LARGE: 413, FailureCode.UNKNOWN_MODEL: 404, FailureCode.UNKNOWN_ITEM: 404}


def validate_predict_body(data: object, example: str) -> PredictBody:
    """A parsed JSON body -> ``PredictBody``, or a 422 naming what is wrong."""
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_request", f"the body must be a JSON object such as {example}")
    try:
        return PredictBody.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", describe_validation_errors(exc.errors())) from exc


def group_manifest(group: str, members: list[ModelManifest]) -> ModelManifest:
    """How a model group looks to callers: its members' input, one label per member (its species)."""
    first = members[0]
    return first.model_copy(update={
        "name": group,
        "version": "+".join(f"{m.name}:{m.version}" for m in members),
        "labels": [m.labels[0] for m in members],  # class 0 of each binary member is its species
        "description": f"model group of {', '.join(m.name for m in members)}, answered together",
        "metrics": {},
    })


class Ingress:
    def __init__(self, settings: Settings, config: IngressConfig) -> None:
        self.settings = settings
        self.config = config
        all_manifests = load_manifests(config.models_dir)
        self.manifests: dict[str, ModelManifest] = {name: all_manifests[name] for name in config.models}
        every_version = collect_versions(all_manifests, [read_version_manifest(path) for path in
                                                         version_manifest_paths(config.models_dir)])
        for group, members in config.groups.items():
            self.manifests[group] = group_manifest(group, [all_manifests[m] for m in members])
        self.limits = InputLimits.of(settings)
        # Requests go out through FastStream; the reply router and the stage monitor keep a
        # plain aio-pika connection (brokers/connections.connect_amqp says why).
        self.broker = make_broker(settings, f"toposerve-ingress-{config.profile}")
        self.connection: AbstractRobustConnection | None = None
        self.publisher: Publisher | None = None
        self.results = ResultStore(connect_redis(settings.redis_url), settings.namespace, config.spec.result_ttl_s)
        # Every version of a model with a policy; the one version of any other model (or group).
        known = {name: {m.version: m} for name, m in self.manifests.items()}
        known |= {name: every_version[name] for name in config.versions}
        self.versions = IngressVersions(config.versions, known, ServingVersions(self.results.client, settings.namespace),
                                        rescan=lambda: ModelRegistry(config.models_dir).versions)
        self.completions = CompletionListener(self.results.client, self.results.done_channel)
        self.callbacks = CallbackRegistry(self.results.client, settings.namespace, config.spec.result_ttl_s)
        self.replies: ReplyRouter | None = None
        self.monitor: StageMonitor | None = None
        self.stats = IngressStats()
        self.prediction_cache: PredictionCache | None = None
        self._coalescers: dict[str, FeatureCoalescer] = {}
        self.cache_fills: CompletionListener | None = None
        if config.spec.prediction_cache_ttl_s:
            self.prediction_cache = PredictionCache(self.results.client, settings.namespace,
                                                    config.spec.prediction_cache_ttl_s)
            self.cache_fills = CompletionListener(self.results.client, self.prediction_cache.filled_channel)

    async def start(self) -> None:
        namespace = self.settings.namespace
        await self.broker.connect()
        await declare_dead_letters(self.broker, namespace, self.config.dead_letters)
        # Declaring the stage queues here too means an accepted request is queued
        # even when its stage has not started yet.
        await declare_topology(self.broker, namespace, self.config.queues)
        self.publisher = Publisher(self.broker, inference_exchange(namespace), app_id=INGRESS_APP_ID,
                                   user_id=url_user(self.settings.amqp_url))
        self.connection = await connect_amqp(self.settings.amqp_url, f"toposerve-ingress-{self.config.profile}-replies")
        self.completions.start()
        if self.cache_fills is not None:
            self.cache_fills.start()
        # Every mode can answer synchronously (sync profiles, and protocols that are
        # sync by nature, like the Open Inference Protocol's infer).
        self.replies = ReplyRouter(self.connection, self.settings.namespace, trusted=self.trusted_producers())
        await self.replies.start()
        self.monitor = StageMonitor(self.connection, [q.name for q in self.config.queues])
        await self.monitor.start()

    async def close(self) -> None:
        for coalescer in self._coalescers.values():
            await coalescer.close()
        if self.monitor is not None:
            await self.monitor.close()
        await self.completions.close()
        if self.cache_fills is not None:
            await self.cache_fills.close()
        if self.connection is not None:
            await self.connection.close()
        await self.broker.stop()
        await self.results.client.aclose()

    def trusted_producers(self) -> frozenset[str]:
        """Whose answers a sync caller may be given: the namespace's stage accounts (and this
        process's own account, when every role shares one)."""
        own = url_user(self.settings.amqp_url)
        return trusted_producers(self.settings.namespace) | ({own} if own else set())

    def manifest(self, model: str) -> ModelManifest:
        manifest = self.manifests.get(model)
        if manifest is None:
            raise ApiError(404, "unknown_model",
                           f"unknown model {model!r}; this profile serves: {', '.join(sorted(self.manifests))}")
        return manifest

    def version_manifest(self, model: str, version: str | None) -> ModelManifest:
        """The manifest of ``model`` at ``version`` (None: the model's own); ApiError 404 for an
        unknown model or version. The protocol routes (OIP, TF Serving) wrap the 404 in their shape."""
        manifest = self.manifest(model)
        return manifest if version is None else self.versions.manifest(model, version)

    def parse_predict_body(self, model: str, data: object) -> InferenceRequest:
        """Validate a predict body for ``model`` the way the stages will, so bad input is a 4xx now."""
        manifest = self.manifest(model)
        body = validate_predict_body(data, '{"instances": [[5.1, 3.5, 1.4, 0.2]]}')
        try:
            if body.instances is not None:
                rows_to_features(body.instances, manifest, self.limits)
            elif body.image is not None:
                check_image_header(body.image, manifest, self.limits)
            elif not self.config.item_ids:
                raise InputError(f"'item_id' needs a data-cache profile; profile {self.config.profile!r} "
                                 "takes 'instances' or 'image'")
            else:
                try:
                    check_item_id(body.item_id or "")
                except InputError as exc:
                    # Refused before anything touches a file or a queue.
                    raise ApiError(400, "invalid_item_id", exc.message) from exc
        except InputError as exc:
            raise ApiError(INPUT_STATUS.get(exc.code, 422), str(exc.code), exc.message) from exc
        return InferenceRequest(id=issue_job_id(self.settings.namespace, current_owner()), model=model, created_at=utc_now(),
                                instances=body.instances, image=body.image, item_id=body.item_id)

    def take_callback(self, data: object) -> CallbackSpec | None:
        """A predict body's ``callback``, removed from it and checked (422 naming the problem), or None.

        Only jobs the store stage ends can call back: async jobs (and sync_async's accurate job).
        """
        if not isinstance(data, dict) or "callback" not in data:
            return None
        raw = data.pop("callback")
        if self.config.mode == "sync" or not self.config.outcomes_kept:
            raise ApiError(422, "invalid_callback", f"callback is for async jobs; profile {self.config.profile!r} "
                                                    "answers synchronously (use an async profile)")
        if self.prediction_cache is not None:
            raise ApiError(422, "invalid_callback", "callback is not offered with the prediction cache (a cached "
                                                    "answer never reaches the store stage)")
        return self.check_callback(raw)

    def check_callback(self, raw: object) -> CallbackSpec:
        """A callback as the caller gave it -> the checked ``CallbackSpec``, or a 422 naming the problem."""
        try:
            spec = CallbackSpec.model_validate(raw)
            check_callback_url(spec.url, self.settings)
        except ValidationError as exc:
            errors = [{**e, "loc": ("callback", *e["loc"])} for e in exc.errors()]
            raise ApiError(422, "invalid_callback", describe_validation_errors(errors)) from exc
        except CallbackRefused as exc:
            raise ApiError(422, "invalid_callback", str(exc)) from exc
        return spec

    async def register_callback(self, job_id: uuid.UUID | str, spec: CallbackSpec) -> None:
        """Before the job is published: the store may end it at once."""
        try:
            await self.callbacks.register(job_id, spec)
        except RedisError as exc:
            raise ApiError(503, "store_unavailable", "the result store is unavailable; retry later",
                           {"Retry-After": "1"}) from exc

    def entry_kind(self, model: str) -> str:
        """The kind of message a request for ``model`` enters the topology as (no cache involved)."""
        tabular = self.manifest(model).preprocessing.kind == "tabular"
        return "features" if self.config.spec.preprocess_tabular_in_ingress and tabular else "request"

    def entry_message(self, request: Envelope) -> Envelope:
        """What to publish for ``request``: itself, or its Features when the profile preprocesses rows here.

        The rows are converted again rather than threaded through every route from
        ``parse_predict_body``: a few microseconds, and the tensor always matches the
        request being published (a sync_async follow-up is a copy for another model).
        """
        if not (self.config.spec.preprocess_tabular_in_ingress and isinstance(request, InferenceRequest)
                and request.instances is not None):
            return request
        manifest = self.manifest(request.model)
        try:
            message, features = preprocess_rows(request, manifest, self.limits)
        except InputError as exc:  # validated already; kept so a change there cannot become a 500
            raise ApiError(INPUT_STATUS.get(exc.code, 422), str(exc.code), exc.message) from exc
        if self.prediction_cache is not None:
            # As the preprocess stage does for such profiles (key_predictions): the same
            # canonical tensor, so the store fills the cache under the key the ingress reads.
            message.cache_key = prediction_key(self.settings.namespace, request.model, manifest.version, features)
        return message

    async def submit_async(self, request: Envelope) -> None:
        """Record the job as pending, then publish it; if the broker refuses, forget the job.

        ``request`` is an ``InferenceRequest``, or ``Features`` when the ingress has
        already preprocessed the input (prediction-cache profiles, to key the cache).
        Tabular requests become ``Features`` here when the profile says so.
        """
        assert self.publisher is not None
        message = self.entry_message(request)
        try:
            await self.results.create_pending(request.id, request.model, request.created_at, owner=current_owner())
        except RedisError as exc:
            raise ApiError(503, "store_unavailable", "the result store is unavailable; retry later",
                           {"Retry-After": "1"}) from exc
        try:
            await self.publisher.publish(message, message.routing_key(), headers=trace_headers())
        except PublishRefused as exc:
            try:
                await self.results.delete(request.id)
            except RedisError:
                pass  # the pending record expires with its TTL
            self.refused(exc)

    @contextlib.contextmanager
    def admission(self) -> Iterator[None]:
        """Admit a predict request, or shed it at once when this process is at its bound."""
        limit = self.config.spec.max_in_flight
        if limit is not None and self.stats.in_flight >= limit:
            self.overloaded(f"{self.stats.in_flight} requests in flight, the bound is {limit}")
        self.stats.in_flight += 1
        try:
            yield
        finally:
            self.stats.in_flight -= 1

    def overloaded(self, why: str) -> NoReturn:
        self.stats.shed += 1
        raise Overloaded(why, self.config.spec.overload_fallback)

    def refused(self, exc: PublishRefused) -> NoReturn:
        """Map a refused publish: a full queue is overload (shed), anything else unavailability."""
        if exc.reason == "rejected":
            self.overloaded(f"a queue is at its bound: {exc}")
        raise ApiError(503, "broker_unavailable", f"the request could not be queued: {exc}",
                       {"Retry-After": "1"}) from exc

    def timeout_for(self, requested: float | None) -> float:
        """The caller's timeout (query or header), else the profile's; past the profile's cap a 422."""
        if requested is None:
            return self.config.spec.timeout_s
        if not requested > 0:  # also refuses NaN
            raise ApiError(422, "invalid_request", f"timeout must be a positive number of seconds, got {requested}")
        limit = self.config.spec.max_timeout_s
        if requested > limit:
            # Said, not silently shortened: the caller would otherwise get a 504 it did not ask for.
            raise ApiError(422, "invalid_request", f"timeout {requested:g} s is more than this profile's limit "
                                                   f"of {limit:g} s (ingress.max_timeout_s)")
        return requested

    def answer_queues(self, entry_kind: str) -> list[str] | None:
        """The queues an answer to a message of ``entry_kind`` passes through (None: every queue)."""
        if not self.config.answer_queues:
            return None
        return queues_on_path(self.config.queues, self.config.answer_queues, entry_kind)

    def require_stages(self, entry_kind: str = "request") -> None:
        """503 now, rather than a 504 later, when a stage on the request's path has no consumer."""
        if self.monitor is None:
            return
        if self.monitor.error is not None:
            raise ApiError(503, "broker_unavailable", f"the broker cannot be reached: {self.monitor.error}",
                           {"Retry-After": "1"})
        # Only the stages a sync answer passes through matter (not a store or telemetry),
        # and not a preprocess stage the message skips (features published by the ingress).
        idle = self.monitor.without_consumers(self.answer_queues(entry_kind))
        if idle:
            raise ApiError(503, "no_consumer", f"no stage is consuming {', '.join(idle)}; retry when it is up",
                           {"Retry-After": "1"})

    def coalescers(self) -> list[FeatureCoalescer]:
        return list(self._coalescers.values())

    def coalescer(self, request: Envelope) -> FeatureCoalescer | None:
        """The coalescer ``request`` goes through (None: it is published on its own).

        Rows the ingress preprocesses, for a model (not a group: each member answers its part),
        in a profile without a prediction cache (its key is per request).
        """
        spec = self.config.spec
        if (spec.coalesce_max_jobs <= 1 or not spec.preprocess_tabular_in_ingress or self.prediction_cache is not None
                or not isinstance(request, InferenceRequest) or request.instances is None
                or request.model in self.config.groups):
            return None
        # One coalescer per model version: a message is for one version (a model without versions: its name).
        key = request.model if request.version is None else f"{request.model}@{request.version}"
        coalescer = self._coalescers.get(key)
        if coalescer is None:
            coalescer = self._coalescers[key] = FeatureCoalescer(
                request.model, self._publish_coalesced, max_jobs=spec.coalesce_max_jobs,
                max_rows=self.settings.max_rows, window_s=spec.coalesce_window_ms / 1000, version=request.version)
        return coalescer

    async def _publish_coalesced(self, message: Features, ttl_s: float, traceparent: str | None) -> None:
        assert self.publisher is not None and self.replies is not None
        await self.publisher.publish(
            message, message.routing_key(), reply_to=self.replies.queue_name,
            correlation_id=str(message.id), persistent=False, expiration_s=ttl_s,
            headers={TRACEPARENT: traceparent} if traceparent else {})

    async def predict_sync(self, request: Envelope, timeout_s: float) -> Prediction | Failure:
        """Publish with a reply address and wait for the terminal message, at most ``timeout_s``."""
        assert self.publisher is not None and self.replies is not None
        request.deadline = request.created_at + timedelta(seconds=timeout_s)
        coalescer = self.coalescer(request)
        message = request if coalescer is not None else self.entry_message(request)  # a Features copy: the deadline
        self.require_stages("features" if coalescer is not None else message.kind)
        await self._claim(request)
        correlation_id = str(request.id)
        future = self.replies.expect(correlation_id)
        try:
            remaining = (request.deadline - utc_now()).total_seconds()
            if remaining <= 0:
                raise TimeoutError
            # Bounded by the deadline: during a broker failover a publish can wait seconds on a
            # reconnecting channel (seen in CI: a caller with a 2 s deadline unanswered at 5 s);
            # the caller gets its 504 at the deadline, and a late copy expires unread. (A coalesced
            # publish goes on for the other jobs in it: the coalescer shields it.)
            async with asyncio.timeout(remaining):
                if coalescer is not None:
                    assert isinstance(request, InferenceRequest) and request.instances is not None
                    started = time.perf_counter()
                    features = rows_to_features(request.instances, self.manifest(request.model), self.limits)
                    span = current_span.get()
                    await coalescer.submit(JobSlice(
                        id=request.id, rows=len(features), created_at=request.created_at, deadline=request.deadline,
                        traceparent=span.header if span is not None else None,
                        timings={**request.timings,
                                 "preprocess_ms": round((time.perf_counter() - started) * 1000, 3)},
                    ), features)
                else:
                    await self.publisher.publish(
                        message, message.routing_key(), reply_to=self.replies.queue_name,
                        correlation_id=correlation_id, persistent=False, expiration_s=remaining,
                        headers=trace_headers(),
                    )
            remaining = (request.deadline - utc_now()).total_seconds()
            return await self.replies.wait(future, max(remaining, 0.0))
        except PublishRefused as exc:
            self.refused(exc)
        except TimeoutError as exc:
            raise ApiError(504, "deadline_exceeded",
                           f"no prediction within the deadline of {timeout_s:g} s; the request was dropped") from exc
        finally:
            self.replies.forget(correlation_id)

    async def _claim(self, request: Envelope) -> None:
        """With API keys on, in a profile whose store keeps outcomes: the answer belongs to this key."""
        owner = current_owner()
        if owner is None or not self.config.outcomes_kept:
            return
        try:
            await self.results.claim(request.id, owner)
        except RedisError as exc:
            # Without the claim the stored answer would be readable by any key: refuse instead.
            raise ApiError(503, "store_unavailable", "the result store is unavailable; retry later",
                           {"Retry-After": "1"}) from exc

    def accurate_model_for(self, model: str) -> str | None:
        return self.config.spec.sync_async.get(model)

    def follow_up_request(self, request: InferenceRequest, model: str) -> InferenceRequest:
        """The same input for another model, as a job of its own."""
        return request.model_copy(update={"id": issue_job_id(self.settings.namespace, current_owner()), "model": model,
                                          "deadline": None, "timings": {}})


class Overloaded(ApiError):
    """Shed: 503 + Retry-After, or the profile's fallback answer (rendered by the app's handler)."""

    def __init__(self, why: str, fallback: dict | None) -> None:
        super().__init__(503, "overloaded", f"overloaded, retry later: {why}", {"Retry-After": "1"})
        self.fallback = fallback


FAILURE_STATUS = {
    FailureCode.INVALID_INPUT: 422,
    FailureCode.INVALID_MESSAGE: 422,
    FailureCode.UNKNOWN_MODEL: 404,
    FailureCode.UNKNOWN_ITEM: 404,
    FailureCode.TOO_LARGE: 413,
    FailureCode.INCOMPLETE: 502,  # members of a model group did not answer
    FailureCode.DEADLINE_EXCEEDED: 504,
    FailureCode.INTERNAL: 500,
}
