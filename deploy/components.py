"""Composition root: turns a profile + settings into running parts (stage runners, the ingress app)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from toposerve.api import IngressConfig, LiveProfile, create_app
from toposerve.api.config import StageOutline
from toposerve.brokers import (
    PRODUCES,
    ResultStore,
    Settings,
    any_binding_matches,
    connect_redis,
)
from toposerve.consumers import (
    RedeliveryGuard,
    StageMetrics,
    StageMetricSet,
    StageRunner,
)
from toposerve.consumers.stage_report import ReportedStage, reporter_for
from toposerve.deploy.accounts import ingress_role, settings_for_role, stage_role
from toposerve.deploy.asyncapi import asyncapi_specification
from toposerve.deploy.profile import (
    MODELS_DIR,
    SAMPLE_IMAGE,
    AggregateSpec,
    BatchStoreSpec,
    CustomSpec,
    PredictSpec,
    PreprocessSpec,
    Profile,
    ProfileError,
    StoreSpec,
    TelemetrySpec,
    available_profiles,
    load_profile,
)
from toposerve.deploy.stage_builders import StageContext, build_stage, runs_batches
from toposerve.models import ModelLoadError, ModelRegistry


def models_dir(settings: Settings) -> Path:
    return Path(settings.models_dir) if settings.models_dir else MODELS_DIR


def load_checked_profile(name_or_path: str, settings: Settings) -> Profile:
    """The profile, its models and the versions its policies name checked against the model directory."""
    registry = ModelRegistry(models_dir(settings))
    try:
        versions = registry.versions
    except ModelLoadError as exc:
        raise ProfileError(str(exc)) from exc
    return load_profile(name_or_path, known_models=set(registry.manifests), known_versions=versions,
                        default_versions={name: m.version for name, m in registry.manifests.items()})


def build_stage_runner(profile: Profile, stage_name: str, settings: Settings, replica: int = 0,
                       metrics: StageMetrics | None = None, standby: bool = False) -> StageRunner:
    """``standby``: its queue is declared unbound (a swap binds it when the profile takes over)."""
    if stage_name not in profile.stages:
        raise KeyError(f"profile {profile.name!r} has no stage {stage_name!r}; stages: {', '.join(profile.stages)}")
    settings = settings_for_role(settings, stage_role(profile, stage_name))
    spec = profile.stages[stage_name]
    queue = profile.queue_spec(settings.namespace, stage_name)
    guard = None
    # Quorum queues count deliveries themselves (x-delivery-limit); classic ones need the guard.
    if queue.queue_type == "classic" and settings.max_crash_redeliveries > 0:
        guard = RedeliveryGuard(connect_redis(settings.redis_url, max_connections=8), settings.namespace,
                                queue.name, settings.max_crash_redeliveries)
    outcomes_kept = keeps_outcomes(profile)
    return StageRunner(
        build_stage(StageContext(profile, stage_name, settings, models_dir(settings))),
        settings,
        queue,
        prefetch=spec.prefetch,
        connection_name=f"toposerve-{profile.name}-{stage_name}-{replica}",
        metrics=metrics,
        guard=guard,
        outcomes_kept=outcomes_kept,
        recorder=_pending_recorder(profile, stage_name, settings) if outcomes_kept else None,
        dead_letters=profile.dead_letter_spec,
        bind=not standby,
    )


def _pending_recorder(profile: Profile, stage_name: str, settings: Settings) -> ResultStore | None:
    """For a stage taking requests (in a profile that stores outcomes): records direct publishes as pending."""
    takes_requests = any(any_binding_matches(profile.stages[stage_name].consumes, f"request.{model}")
                         for model in [*profile.models, *profile.groups])
    if not takes_requests:
        return None
    return ResultStore(connect_redis(settings.redis_url, max_connections=8), settings.namespace,
                       profile.ingress.result_ttl_s)


def shipped_batch_profiles() -> list[str]:
    """The shipped profiles that run batches (named when another profile refuses one)."""
    return [name for name in available_profiles() if runs_batches(load_profile(name))]


def keeps_outcomes(profile: Profile) -> bool:
    """Whether a stage of ``profile`` consumes predictions or failures (a store, an aggregate)."""
    keys = [f"{kind}.{model}" for kind in ("prediction", "failure") for model in [*profile.models, *profile.groups]]
    return any(any_binding_matches(spec.consumes, key) for spec in profile.stages.values() for key in keys)


def _stores(profile: Profile, spec: object) -> list[str]:
    """What a stage keeps in Redis, as the operator's view names it."""
    if isinstance(spec, PreprocessSpec):
        return [*(["feature cache"] if spec.feature_cache_ttl_s else []), *(["items"] if spec.data_sources else [])]
    if isinstance(spec, StoreSpec):
        return ["job records", *(["prediction cache"] if profile.ingress.prediction_cache_ttl_s else [])]
    if isinstance(spec, BatchStoreSpec):
        return ["batches", "job records"]
    if isinstance(spec, AggregateSpec):
        return ["joins"]
    if isinstance(spec, TelemetrySpec):
        return ["telemetry"]
    return []


def _publishes(spec: object) -> list[str]:
    """The routing-key patterns of a stage's outputs: its kind's, a ``publishes`` template's, a cascade's."""
    words = list(PRODUCES[spec.kind])  # type: ignore[attr-defined]
    template = getattr(spec, "publishes", None)
    if template:
        words = [w for w in words if not (isinstance(spec, PredictSpec) and w == "prediction")]
        return [*(f"{w}.*" for w in words), template.format(kind="*", model="*")]
    if isinstance(spec, PredictSpec) and spec.cascade is None:
        words = [w for w in words if w != "features"]
    return [f"{w}.*" for w in words]


def stage_outlines(profile: Profile, namespace: str) -> dict[str, StageOutline]:
    """Every stage as the operator's view draws it: kind, queue, replicas, keys in and out, Redis stores."""
    return {name: StageOutline(kind=spec.kind, queue=profile.queue_spec(namespace, name).name,
                               replicas=spec.replicas, consumes=list(spec.consumes),
                               publishes=_publishes(spec), stores=_stores(profile, spec))
            for name, spec in profile.stages.items()}


def ingress_config(profile: Profile, settings: Settings) -> IngressConfig:
    """The profile's ingress section as validated, and what its stages decide for the ingress."""
    return IngressConfig(
        profile=profile.name,
        spec=profile.ingress,
        models=profile.models,
        models_dir=models_dir(settings),
        versions=profile.versions,
        queues=profile.queue_specs(settings.namespace),
        groups={name: group.models for name, group in profile.groups.items()},
        answer_queues=[profile.queue_spec(settings.namespace, name).name for name, stage in profile.stages.items()
                       if isinstance(stage, PreprocessSpec | PredictSpec | AggregateSpec | CustomSpec)],
        item_ids=profile.item_ids,
        item_ttl_s=profile.item_ttl_s,
        outcomes_kept=keeps_outcomes(profile),
        batches=runs_batches(profile),
        batch_profiles=[] if runs_batches(profile) else shipped_batch_profiles(),
        sample_image=SAMPLE_IMAGE,
        dead_letters=profile.dead_letter_spec,
        stages=stage_outlines(profile, settings.namespace),
    )


def build_app(profile: Profile, settings: Settings, with_stages: bool = False, follow: bool = False) -> FastAPI:
    """The ingress app; ``with_stages`` runs every stage replica inside it (web_single); ``follow``:
    it switches to the namespace's live profile when a swap moves it (deploy/swap.py)."""
    settings = settings_for_role(settings, ingress_role(profile))
    companions = []
    registry = CollectorRegistry()  # this process's metrics: the ingress's, and its stages' (web_single)
    if with_stages:
        stage_metrics = StageMetricSet(registry)
        # Each reports to the operator's view as a stage process would (consumers/stage_report.py).
        companions = [ReportedStage(runner, reporter_for(runner, profile.name, replica))
                      for name, spec in profile.stages.items() for replica in range(spec.replicas)
                      for runner in [build_stage_runner(profile, name, settings, replica,
                                                        metrics=stage_metrics.for_stage(name))]]
    source = None
    if follow:
        from toposerve.deploy.live_profile import RedisLiveProfileSource

        def config_for(live: LiveProfile) -> IngressConfig:
            return ingress_config(load_checked_profile(live.source, settings), settings)

        source = RedisLiveProfileSource(settings, config_for)
    return create_app(settings, ingress_config(profile, settings), companions=companions, registry=registry,
                      asyncapi=lambda: asyncapi_specification(profile, settings), follow=source)
