"""Composition root: turns a profile + settings into running parts (stage runners, the ingress app)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from api.app import create_app
from api.ingress import IngressConfig
from brokers.connections import connect_redis
from brokers.results import ResultStore
from brokers.settings import Settings
from consumers.predict import PredictStage
from consumers.preprocess import PreprocessStage
from consumers.preprocessing import InputLimits
from consumers.registry import ModelRegistry, load_manifests
from consumers.stage import Stage, StageRunner
from consumers.store import StoreStage
from deploy.profile import MODELS_DIR, SAMPLE_IMAGE, PredictSpec, PreprocessSpec, Profile, StoreSpec, load_profile


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
        return PreprocessStage(stage_name, {m: registry.manifests[m] for m in models}, input_limits(settings))
    if isinstance(spec, PredictSpec):
        return PredictStage(stage_name, registry, models, max_batch_size=spec.max_batch_size,
                            max_batch_delay_ms=spec.max_batch_delay_ms, max_rows=settings.max_rows)
    if isinstance(spec, StoreSpec):
        results = ResultStore(connect_redis(settings.redis_url), settings.namespace, profile.ingress.result_ttl_s)
        return StoreStage(stage_name, results)
    raise ValueError(f"stage {stage_name!r} has an unsupported kind")


def build_stage_runner(profile: Profile, stage_name: str, settings: Settings, replica: int = 0) -> StageRunner:
    if stage_name not in profile.stages:
        raise KeyError(f"profile {profile.name!r} has no stage {stage_name!r}; stages: {', '.join(profile.stages)}")
    spec = profile.stages[stage_name]
    return StageRunner(
        build_stage(profile, stage_name, settings),
        settings,
        profile.queue_spec(settings.namespace, stage_name),
        prefetch=spec.prefetch,
        connection_name=f"toposerve-{profile.name}-{stage_name}-{replica}",
    )


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
    )


def build_app(profile: Profile, settings: Settings, with_stages: bool = False) -> FastAPI:
    """The ingress app; ``with_stages`` runs every stage replica inside it (web_single)."""
    companions = []
    if with_stages:
        companions = [build_stage_runner(profile, name, settings, replica)
                      for name, spec in profile.stages.items() for replica in range(spec.replicas)]
    return create_app(settings, ingress_config(profile, settings), companions=companions)
