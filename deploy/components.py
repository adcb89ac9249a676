"""Composition root: turns a profile + settings into running parts (stage runners, the ingress app)."""

from __future__ import annotations

from pathlib import Path

import orjson
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from toposerve.api import IngressConfig, create_app
from toposerve.brokers import (
    FeatureCache,
    JoinStore,
    PredictionCache,
    ResultStore,
    Settings,
    TelemetryStore,
    any_binding_matches,
    connect_redis,
)
from toposerve.consumers import (
    AggregateStage,
    PredictStage,
    PreprocessStage,
    RedeliveryGuard,
    Stage,
    StageMetrics,
    StageMetricSet,
    StageRunner,
    StoreStage,
    TelemetryStage,
    delay_queue,
)
from toposerve.deploy.asyncapi import asyncapi_document
from toposerve.deploy.profile import (
    MODELS_DIR,
    SAMPLE_IMAGE,
    AggregateSpec,
    BatchStoreSpec,
    DirectorySourceSpec,
    PredictSpec,
    PreprocessSpec,
    Profile,
    StoreSpec,
    TelemetrySpec,
    load_profile,
)
from toposerve.models import DirectorySource, InputLimits, ModelRegistry, RedisSource, load_manifests


def models_dir(settings: Settings) -> Path:
    return Path(settings.models_dir) if settings.models_dir else MODELS_DIR


def load_checked_profile(name_or_path: str, settings: Settings) -> Profile:
    return load_profile(name_or_path, known_models=set(load_manifests(models_dir(settings))))


def input_limits(settings: Settings) -> InputLimits:
    return InputLimits(max_rows=settings.max_rows, max_image_bytes=settings.max_image_bytes,
                       max_image_pixels=settings.max_image_pixels)


def build_stage(profile: Profile, stage_name: str, settings: Settings) -> Stage:
    spec = profile.stages[stage_name]
    registry = ModelRegistry(models_dir(settings), intra_op_threads=settings.ort_intra_op_threads)
    models = profile.stage_models(stage_name)
    if isinstance(spec, PreprocessSpec):
        redis_client = connect_redis(settings.redis_url) if (spec.data_sources or spec.feature_cache_ttl_s) else None
        items = [DirectorySource(source.resolved(), name=f"directory {source.path}") if isinstance(source, DirectorySourceSpec)
                 else RedisSource(redis_client, settings.namespace) for source in spec.data_sources]
        manifests = {m: registry.manifests[m] for m in models}
        # A group's request is preprocessed as its members' input (they share it).
        manifests |= {g: registry.manifests[spec_.models[0]] for g, spec_ in profile.groups.items()}
        return PreprocessStage(
            stage_name, manifests, input_limits(settings),
            namespace=settings.namespace, items=items,
            feature_cache=FeatureCache(redis_client, spec.feature_cache_ttl_s) if spec.feature_cache_ttl_s else None,
            key_predictions=profile.ingress.prediction_cache_ttl_s is not None,
        )
    if isinstance(spec, PredictSpec):
        return PredictStage(stage_name, registry, models, max_batch_size=spec.max_batch_size,
                            max_batch_delay_ms=spec.max_batch_delay_ms, max_rows=settings.max_rows,
                            groups=profile.group_parts(stage_name),
                            cascade=(spec.cascade.threshold, spec.cascade.next_model) if spec.cascade else None)
    if isinstance(spec, StoreSpec):
        results = ResultStore(connect_redis(settings.redis_url), settings.namespace, profile.ingress.result_ttl_s)
        cache_ttl = profile.ingress.prediction_cache_ttl_s
        cache = PredictionCache(results.client, settings.namespace, cache_ttl) if cache_ttl else None
        return StoreStage(stage_name, results, prediction_cache=cache)
    if isinstance(spec, AggregateSpec):
        group = profile.groups[spec.group]
        queue = profile.queue_spec(settings.namespace, stage_name)
        joins = JoinStore(connect_redis(settings.redis_url), settings.namespace,
                          ttl_s=max(60, int(group.join_timeout_s * 10), profile.ingress.result_ttl_s))
        species = [registry.manifests[m].labels[0] for m in group.models]  # class 0 = the member's species
        return AggregateStage(stage_name, spec.group, group.models, species, joins,
                              extra_queues=[delay_queue(settings.namespace, queue.name, spec.group,
                                                        group.join_timeout_s)])
    if isinstance(spec, BatchStoreSpec):
        from toposerve.brokers import BatchStore
        from toposerve.consumers import BatchStoreStage
        client = connect_redis(settings.redis_url)
        ttl_s = profile.ingress.result_ttl_s
        return BatchStoreStage(stage_name, BatchStore(client, settings.namespace, ttl_s),
                               ResultStore(client, settings.namespace, ttl_s))
    if isinstance(spec, TelemetrySpec):
        telemetry = TelemetryStore(connect_redis(settings.redis_url), settings.namespace, spec.ttl_s)
        return TelemetryStage(stage_name, telemetry, {m: registry.manifests[m] for m in models})
    raise ValueError(f"stage {stage_name!r} has an unsupported kind")


def build_stage_runner(profile: Profile, stage_name: str, settings: Settings, replica: int = 0,
                       metrics: StageMetrics | None = None) -> StageRunner:
    if stage_name not in profile.stages:
        raise KeyError(f"profile {profile.name!r} has no stage {stage_name!r}; stages: {', '.join(profile.stages)}")
    spec = profile.stages[stage_name]
    queue = profile.queue_spec(settings.namespace, stage_name)
    guard = None
    # Quorum queues count deliveries themselves (x-delivery-limit); classic ones need the guard.
    if queue.queue_type == "classic" and settings.max_crash_redeliveries > 0:
        guard = RedeliveryGuard(connect_redis(settings.redis_url, max_connections=8), settings.namespace,
                                queue.name, settings.max_crash_redeliveries)
    outcomes_kept = keeps_outcomes(profile)
    return StageRunner(
        build_stage(profile, stage_name, settings),
        settings,
        queue,
        prefetch=spec.prefetch,
        connection_name=f"toposerve-{profile.name}-{stage_name}-{replica}",
        metrics=metrics,
        guard=guard,
        outcomes_kept=outcomes_kept,
        recorder=_pending_recorder(profile, stage_name, settings) if outcomes_kept else None,
    )


def _pending_recorder(profile: Profile, stage_name: str, settings: Settings) -> ResultStore | None:
    """For a stage taking requests (in a profile that stores outcomes): records direct publishes as pending."""
    takes_requests = any(any_binding_matches(profile.stages[stage_name].consumes, f"request.{model}")
                         for model in [*profile.models, *profile.groups])
    if not takes_requests:
        return None
    return ResultStore(connect_redis(settings.redis_url, max_connections=8), settings.namespace,
                       profile.ingress.result_ttl_s)


def keeps_outcomes(profile: Profile) -> bool:
    """Whether a stage of ``profile`` consumes predictions or failures (a store, an aggregate)."""
    keys = [f"{kind}.{model}" for kind in ("prediction", "failure") for model in [*profile.models, *profile.groups]]
    return any(any_binding_matches(spec.consumes, key) for spec in profile.stages.values() for key in keys)


def ingress_config(profile: Profile, settings: Settings) -> IngressConfig:
    return IngressConfig(
        profile=profile.name,
        mode=profile.ingress.mode,
        models=profile.models,
        models_dir=models_dir(settings),
        queues=profile.queue_specs(settings.namespace),
        result_ttl_s=profile.ingress.result_ttl_s,
        timeout_s=profile.ingress.timeout_s,
        max_timeout_s=profile.ingress.max_timeout_s,
        book_model=profile.ingress.book_model or profile.models[0],
        sync_async_pairs=profile.ingress.sync_async,
        sample_image=SAMPLE_IMAGE,
        prediction_cache_ttl_s=profile.ingress.prediction_cache_ttl_s,
        item_ids=profile.item_ids,
        max_in_flight=profile.ingress.max_in_flight,
        groups={name: group.models for name, group in profile.groups.items()},
        answer_queues=[profile.queue_spec(settings.namespace, name).name for name, stage in profile.stages.items()
                       if isinstance(stage, PreprocessSpec | PredictSpec | AggregateSpec)],
        overload_fallback=profile.ingress.overload_fallback,
        preprocess_tabular=profile.ingress.preprocess_tabular_in_ingress,
    )


def build_app(profile: Profile, settings: Settings, with_stages: bool = False) -> FastAPI:
    """The ingress app; ``with_stages`` runs every stage replica inside it (web_single)."""
    companions = []
    registry = CollectorRegistry()  # this process's metrics: the ingress's, and its stages' (web_single)
    if with_stages:
        stage_metrics = StageMetricSet(registry)
        companions = [build_stage_runner(profile, name, settings, replica, metrics=stage_metrics.for_stage(name))
                      for name, spec in profile.stages.items() for replica in range(spec.replicas)]
    return create_app(settings, ingress_config(profile, settings), companions=companions, registry=registry,
                      asyncapi=lambda: orjson.dumps(asyncapi_document(profile, settings)))
