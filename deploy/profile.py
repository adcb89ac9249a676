"""Deploy profiles: one YAML file per serving pattern, validated by pydantic.

A profile names the ingress mode, the models and the stages; each stage's queue
is ``{ns}.{profile}.{stage}`` bound to the keys it consumes. A wrong profile fails
at start with the file, the field and the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from brokers.topology import QueueSpec, stage_queue_name

PROFILES_DIR = Path(__file__).parent / "profiles"
MODELS_DIR = Path(__file__).parent / "models"
SAMPLE_IMAGE = Path(__file__).parent / "samples" / "digits" / "digit_3_64x64_rgb.png"

StageName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IngressSpec(_Strict):
    mode: Literal["async", "sync", "sync_async"] = "async"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    result_ttl_s: int = Field(default=3600, ge=1, description="How long job results live in Redis")
    timeout_s: float = Field(default=5.0, gt=0, le=3600, description="Sync: default seconds to wait")
    max_timeout_s: float = Field(default=60.0, gt=0, le=3600, description="Sync: cap on a caller's timeout")
    book_model: str | None = Field(default=None, description="Model of the book-compatible routes")
    sync_async: dict[str, str] = Field(default_factory=dict, description="fast model -> accurate model")
    # web_single: the ingress and every stage in one process (the book's single container).
    single_process: bool = False


class _StageBase(_Strict):
    consumes: list[str] = Field(min_length=1, description="Binding keys of the stage's queue")
    replicas: int = Field(default=1, ge=1, le=64)
    prefetch: int = Field(default=64, ge=1, le=10_000)
    max_queue_length: int | None = Field(default=None, ge=1)


class PreprocessSpec(_StageBase):
    kind: Literal["preprocess"]


class PredictSpec(_StageBase):
    kind: Literal["predict"]
    models: list[str] | None = Field(default=None, description="Models this stage serves (default: all)")
    max_batch_size: int = Field(default=64, ge=1, le=100_000)
    max_batch_delay_ms: float = Field(default=2.0, ge=0, le=10_000)


class StoreSpec(_StageBase):
    kind: Literal["store"]


StageSpec = Annotated[PreprocessSpec | PredictSpec | StoreSpec, Field(discriminator="kind")]


class Profile(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    description: str = ""
    queue_type: Literal["classic", "quorum"] = "classic"
    models: list[str] = Field(min_length=1)
    ingress: IngressSpec = IngressSpec()
    stages: dict[StageName, StageSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _ingress_models_are_profile_models(self) -> Profile:
        named = [m for m in [self.ingress.book_model, *self.ingress.sync_async, *self.ingress.sync_async.values()] if m]
        unknown = sorted(set(named) - set(self.models))
        if unknown:
            raise ValueError(f"ingress names models not in the profile's 'models': {unknown}")
        if self.ingress.sync_async and self.ingress.mode != "sync_async":
            raise ValueError("ingress.sync_async pairs need ingress.mode: sync_async")
        return self

    @model_validator(mode="after")
    def _predict_models_are_profile_models(self) -> Profile:
        for name, stage in self.stages.items():
            if isinstance(stage, PredictSpec) and stage.models:
                unknown = sorted(set(stage.models) - set(self.models))
                if unknown:
                    raise ValueError(f"stage {name!r} serves models not in the profile's 'models': {unknown}")
        return self

    def queue_spec(self, namespace: str, stage_name: str) -> QueueSpec:
        stage = self.stages[stage_name]
        return QueueSpec(
            name=stage_queue_name(namespace, self.name, stage_name),
            binding_keys=stage.consumes,
            queue_type=self.queue_type,
            max_length=stage.max_queue_length,
        )

    def queue_specs(self, namespace: str) -> list[QueueSpec]:
        return [self.queue_spec(namespace, name) for name in self.stages]

    def stage_models(self, stage_name: str) -> list[str]:
        stage = self.stages[stage_name]
        return list(stage.models or self.models) if isinstance(stage, PredictSpec) else list(self.models)


class ProfileError(ValueError):
    pass


def profile_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        return candidate
    return PROFILES_DIR / f"{name_or_path}.yaml"


def available_profiles() -> list[str]:
    return sorted(path.stem for path in PROFILES_DIR.glob("*.yaml"))


def load_profile(name_or_path: str, known_models: set[str] | None = None) -> Profile:
    path = profile_path(name_or_path)
    if not path.is_file():
        raise ProfileError(f"no profile {name_or_path!r} (looked for {path}); available: {', '.join(available_profiles())}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from exc
    try:
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise ProfileError(f"{path}: {problems}") from exc
    if known_models is not None:
        unknown = sorted(set(profile.models) - known_models)
        if unknown:
            raise ProfileError(f"{path}: models: {unknown} are not in the model manifest ({sorted(known_models)})")
    return profile
