"""One builder per stage kind: a profile's stage spec -> the ``Stage`` that does its work.

``STAGE_BUILDERS`` maps each spec type to its builder, so a new kind is one function
and one entry; ``build_stage`` looks the spec's type up and refuses a kind it lacks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import MappingProxyType

from toposerve.brokers import (
    BatchStore,
    FeatureCache,
    JoinStore,
    PredictionCache,
    ResultStore,
    ServingVersions,
    Settings,
    ShadowStore,
    TelemetryStore,
    connect_redis,
)
from toposerve.brokers.callbacks import CallbackRegistry, CallbackSender
from toposerve.consumers import (
    AggregateStage,
    BatchStoreStage,
    CustomStage,
    PredictStage,
    PreprocessStage,
    ShadowStage,
    Stage,
    StoreStage,
    TelemetryStage,
    delay_queue,
    load_handler,
)
from toposerve.deploy.profile import (
    AggregateSpec,
    BatchStoreSpec,
    CustomSpec,
    DirectorySourceSpec,
    PredictSpec,
    PreprocessSpec,
    Profile,
    ShadowSpec,
    StageSpec,
    StoreSpec,
    TelemetrySpec,
)
from toposerve.models import DirectorySource, InputLimits, ModelManifest, ModelRegistry, RedisSource


@dataclass(frozen=True)
class StageContext:
    """What a builder may use: the profile, the stage's name in it, the settings and the models."""

    profile: Profile
    stage_name: str
    settings: Settings
    models_dir: Path

    @property
    def spec(self) -> StageSpec:
        return self.profile.stages[self.stage_name]

    @cached_property
    def registry(self) -> ModelRegistry:
        return ModelRegistry(self.models_dir, intra_op_threads=self.settings.ort_intra_op_threads)

    def manifests(self) -> dict[str, ModelManifest]:
        """The manifests of the models this stage serves."""
        return {m: self.registry.manifests[m] for m in self.profile.stage_models(self.stage_name)}

    def result_store(self, client=None) -> ResultStore:
        return ResultStore(client or connect_redis(self.settings.redis_url), self.settings.namespace,
                           self.profile.ingress.result_ttl_s)


def _preprocess(ctx: StageContext, spec: PreprocessSpec) -> Stage:
    settings, profile = ctx.settings, ctx.profile
    redis_client = connect_redis(settings.redis_url) if (spec.data_sources or spec.feature_cache_ttl_s) else None
    items = [DirectorySource(source.resolved(), name=f"directory {source.path}")
             if isinstance(source, DirectorySourceSpec) else RedisSource(redis_client, settings.namespace)
             for source in spec.data_sources]
    # A group's request is preprocessed as its members' input (they share it).
    manifests = ctx.manifests() | {g: ctx.registry.manifests[group.models[0]] for g, group in profile.groups.items()}
    return PreprocessStage(
        ctx.stage_name, manifests, InputLimits.of(settings),
        namespace=settings.namespace, items=items,
        feature_cache=FeatureCache(redis_client, spec.feature_cache_ttl_s) if spec.feature_cache_ttl_s else None,
        key_predictions=profile.ingress.prediction_cache_ttl_s is not None,
    )


def runs_batches(profile: Profile) -> bool:
    return any(isinstance(spec, BatchStoreSpec) for spec in profile.stages.values())


def _predict(ctx: StageContext, spec: PredictSpec) -> Stage:
    versions = stage_versions(ctx)
    # Only a profile that runs batches reads their cancel flags: the others' predict stages need no Redis.
    batches = BatchStore(connect_redis(ctx.settings.redis_url), ctx.settings.namespace,
                         ctx.profile.ingress.result_ttl_s) if runs_batches(ctx.profile) else None
    return PredictStage(ctx.stage_name, ctx.registry, ctx.profile.stage_models(ctx.stage_name),
                        max_batch_size=spec.max_batch_size, max_batch_delay_ms=spec.max_batch_delay_ms,
                        max_rows=ctx.settings.max_rows, groups=ctx.profile.group_parts(ctx.stage_name),
                        cascade=(spec.cascade.threshold, spec.cascade.next_model) if spec.cascade else None,
                        publishes=spec.publishes, versions=versions, batches=batches,
                        reports=ServingVersions(connect_redis(ctx.settings.redis_url, max_connections=4),
                                                ctx.settings.namespace) if versions else None,
                        watch_s=ctx.settings.version_watch_s,
                        canaries={m: p.canary for m, p in ctx.profile.versions.items() if p.canary and m in versions})


def stage_versions(ctx: StageContext) -> dict[str, list[str]]:
    """The versions a predict stage loads for each model with a policy: the served one first, then every
    other version in the model directory (so a promotion or an explicit version needs no restart)."""
    served = ctx.profile.stage_models(ctx.stage_name)
    versions = {}
    for model, policy in ctx.profile.versions.items():
        if model in served:
            serve = policy.serve or ctx.registry.manifests[model].version
            versions[model] = [serve, *sorted(set(ctx.registry.versions[model]) - {serve})]
    return versions


def callback_sender(ctx: StageContext, client: object) -> CallbackSender:
    registry = CallbackRegistry(client, ctx.settings.namespace, ctx.profile.ingress.result_ttl_s)  # type: ignore[arg-type]
    return CallbackSender(registry, ctx.settings)


def _store(ctx: StageContext, spec: StoreSpec) -> Stage:
    results = ctx.result_store()
    cache_ttl = ctx.profile.ingress.prediction_cache_ttl_s
    cache = PredictionCache(results.client, ctx.settings.namespace, cache_ttl) if cache_ttl else None
    return StoreStage(ctx.stage_name, results, prediction_cache=cache, callbacks=callback_sender(ctx, results.client))


def _aggregate(ctx: StageContext, spec: AggregateSpec) -> Stage:
    settings, profile = ctx.settings, ctx.profile
    group = profile.groups[spec.group]
    queue = profile.queue_spec(settings.namespace, ctx.stage_name)
    joins = JoinStore(connect_redis(settings.redis_url), settings.namespace,
                      ttl_s=max(60, int(group.join_timeout_s * 10), profile.ingress.result_ttl_s))
    species = [ctx.registry.manifests[m].labels[0] for m in group.models]  # class 0 = the member's species
    return AggregateStage(ctx.stage_name, spec.group, group.models, species, joins,
                          extra_queues=[delay_queue(settings.namespace, queue.name, spec.group, group.join_timeout_s)],
                          partial_answers=group.partial_answers)


def extra_queue_names(profile: Profile, namespace: str, stage_name: str) -> list[str]:
    """The queues a stage declares besides its own (an aggregate's delay queue)."""
    spec = profile.stages[stage_name]
    if not isinstance(spec, AggregateSpec):
        return []
    queue = profile.queue_spec(namespace, stage_name)
    return [delay_queue(namespace, queue.name, spec.group, profile.groups[spec.group].join_timeout_s).name]


def _batch_store(ctx: StageContext, spec: BatchStoreSpec) -> Stage:
    client = connect_redis(ctx.settings.redis_url)
    batches = BatchStore(client, ctx.settings.namespace, ctx.profile.ingress.result_ttl_s)
    return BatchStoreStage(ctx.stage_name, batches, ctx.result_store(client), callbacks=callback_sender(ctx, client))


def _telemetry(ctx: StageContext, spec: TelemetrySpec) -> Stage:
    telemetry = TelemetryStore(connect_redis(ctx.settings.redis_url), ctx.settings.namespace, spec.ttl_s)
    return TelemetryStage(ctx.stage_name, telemetry, ctx.manifests())


def _shadow(ctx: StageContext, spec: ShadowSpec) -> Stage:
    store = ShadowStore(connect_redis(ctx.settings.redis_url), ctx.settings.namespace, ctx.profile.ingress.result_ttl_s)
    return ShadowStage(ctx.stage_name, ctx.registry, ctx.profile.versions, store, max_rows=ctx.settings.max_rows)


def _custom(ctx: StageContext, spec: CustomSpec) -> Stage:
    return CustomStage(ctx.stage_name, load_handler(spec.handler), publishes=spec.publishes)


StageBuilder = Callable[[StageContext, StageSpec], Stage]

STAGE_BUILDERS: Mapping[type, StageBuilder] = MappingProxyType({
    PreprocessSpec: _preprocess,
    PredictSpec: _predict,
    StoreSpec: _store,
    AggregateSpec: _aggregate,
    BatchStoreSpec: _batch_store,
    TelemetrySpec: _telemetry,
    CustomSpec: _custom,
    ShadowSpec: _shadow,
})


def build_stage(ctx: StageContext) -> Stage:
    spec = ctx.spec
    builder = STAGE_BUILDERS.get(type(spec))
    if builder is None:
        raise ValueError(f"stage {ctx.stage_name!r} has kind {spec.kind!r}, which no builder makes")
    return builder(ctx, spec)
