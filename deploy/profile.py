"""Deploy profiles: one YAML file per serving pattern, validated by pydantic.

A profile names the ingress mode, the models and the stages; each stage's queue
is ``{ns}.{profile}.{stage}`` bound to the keys it consumes. A wrong profile fails
at start with the file, the field and the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from toposerve.api import IngressSpec
from toposerve.brokers import (
    DeadLetterSpec,
    QueueSpec,
    VersionPolicy,
    any_binding_matches,
    published_key,
    stage_queue_name,
    versioned_key,
)

DEPLOY_DIR = Path(__file__).parent
PROFILES_DIR = DEPLOY_DIR / "profiles"
MODELS_DIR = Path(__file__).parent / "models"
SAMPLE_IMAGE = Path(__file__).parent / "samples" / "digits" / "digit_3_64x64_rgb.png"

StageName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _StageBase(_Strict):
    consumes: list[str] = Field(min_length=1, description="Binding keys of the stage's queue")
    replicas: int = Field(default=1, ge=1, le=64)
    max_replicas: int | None = Field(default=None, ge=1, le=256,
                                     description="Autoscaling cap (k8s/KEDA); default max(4 x replicas, 4)")
    prefetch: int = Field(default=64, ge=1, le=10_000)
    max_queue_length: int | None = Field(default=None, ge=1)


class DirectorySourceSpec(_Strict):
    kind: Literal["directory"]
    path: str = Field(description="Directory of item files; relative paths are relative to deploy/")

    def resolved(self) -> Path:
        path = Path(self.path)
        return path if path.is_absolute() else (DEPLOY_DIR / path)


class RedisSourceSpec(_Strict):
    kind: Literal["redis"]
    # How long an item written through toposerve (PUT /v1/items/{id}, `toposerve items put`) lives.
    ttl_s: int = Field(default=30 * 24 * 3600, ge=60, description="Seconds an item written through toposerve lives")


DataSourceSpec = Annotated[DirectorySourceSpec | RedisSourceSpec, Field(discriminator="kind")]


class PreprocessSpec(_StageBase):
    kind: Literal["preprocess"]
    # data_cache: where items are loaded from (in order), and how long their
    # preprocessed tensors are cached in Redis (None: no feature cache).
    data_sources: list[DataSourceSpec] = Field(default_factory=list)
    feature_cache_ttl_s: int | None = Field(default=None, ge=1)


class CascadeSpec(_Strict):
    """Answer with this stage's model when it is confident enough, else pass the input on."""

    threshold: float = Field(ge=0, le=1, description="Lowest top probability (of every row) to answer")
    next_model: str = Field(description="The model that gets the input otherwise (features.<next_model>)")


# A routing-key template for a stage's outputs: dot-separated words, {kind} and {model} allowed
# after the first (a literal word: the publishing account is granted keys that start with it).
PublishesTemplate = Annotated[str, Field(pattern=r"^[a-z0-9_-]+(\.([a-z0-9_-]+|\{kind\}|\{model\}))*$",
                                         max_length=128)]


class PredictSpec(_StageBase):
    kind: Literal["predict"]
    # Where predictions go when a post-processing stage (kind: custom) makes the answer,
    # e.g. "scored.{model}": they are then not the job's answer (no sync reply from here).
    publishes: PublishesTemplate | None = Field(
        default=None, description="Routing key of predictions for a post-processor ({model}); default prediction.<model>")
    cascade: CascadeSpec | None = None
    models: list[str] | None = Field(default=None, description="Models this stage serves (default: all)")
    max_batch_size: int = Field(default=64, ge=1, le=100_000)
    max_batch_delay_ms: float = Field(default=2.0, ge=0, le=10_000)


class StoreSpec(_StageBase):
    kind: Literal["store"]


class BatchStoreSpec(_StageBase):
    """Batch pattern: stores batch chunks' results and progress (and ordinary jobs like ``store``)."""

    kind: Literal["batch_store"]  # batch keys live ingress.result_ttl_s, like job records


class TelemetrySpec(_StageBase):
    """Edge AI: aggregates the reports edge clients publish on ``telemetry.<model>``."""

    kind: Literal["telemetry"]
    ttl_s: int = Field(default=7 * 24 * 3600, ge=60, description="Seconds the aggregate lives after the last report")


class ShadowSpec(_StageBase):
    """Shadow versions: a second binding on the models' features keys; runs the serving and the shadow
    version on each copy and records whether they agreed (added by the profile when a policy names a shadow)."""

    kind: Literal["shadow"]


class AggregateSpec(_StageBase):
    kind: Literal["aggregate"]
    group: str = Field(description="The model group whose parts this stage joins")


class CustomSpec(_StageBase):
    """A user's stage: a function over toposerve's message types (consumers/custom.py)."""

    kind: Literal["custom"]
    handler: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$", description="module:function")
    publishes: PublishesTemplate | None = Field(
        default=None, description="Routing key of every output ({kind}, {model}); default each output's own")


class GroupSpec(_Strict):
    """A model group: one request, answered by every member, joined by an aggregate stage."""

    models: list[str] = Field(min_length=2)
    join_timeout_s: float = Field(default=2.0, gt=0, le=600)
    # When a member fails or misses the join timeout: answer with the members that did
    # (the answer says ``partial: true``, the missing members' scores are null), or fail
    # the job (``incomplete``, naming the missing members).
    partial_answers: bool = Field(default=False, description="Answer with the members that answered, marked partial")


StageSpec = Annotated[PreprocessSpec | PredictSpec | StoreSpec | TelemetrySpec | AggregateSpec | BatchStoreSpec
                      | CustomSpec | ShadowSpec, Field(discriminator="kind")]


class Profile(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    description: str = ""
    queue_type: Literal["classic", "quorum"] = "classic"
    # Quorum queues count deliveries: past this many, a message is dead-lettered even
    # when it crashes its consumer every time (a classic queue cannot tell).
    delivery_limit: int | None = Field(default=None, ge=1, le=1000)
    # ``models: [iris, digits_fast]``, or a mapping that also says which versions serve and how:
    # ``models: {iris: {serve: "2", canary: {version: "3", percent: 10}}, digits_fast: {}}`` (the
    # policies land in ``versions``; a model without one serves its manifest.json version).
    models: list[str] = Field(min_length=1)
    versions: dict[str, VersionPolicy] = Field(default_factory=dict, description="Version policy per model")
    ingress: IngressSpec = IngressSpec()
    groups: dict[str, GroupSpec] = Field(default_factory=dict, description="Model groups (scatter-gather)")
    # Bounds of the namespace's dead-letter queue (the oldest are dropped past them).
    dead_letters: DeadLetterSpec = DeadLetterSpec()
    stages: dict[StageName, StageSpec] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _models_mapping_names_versions(cls, data: object) -> object:
        if not (isinstance(data, dict) and isinstance(data.get("models"), dict)):
            return data
        if "versions" in data:
            raise ValueError("give version policies either in 'models' (a mapping) or in 'versions', not both")
        policies = {name: policy for name, policy in data["models"].items() if policy}
        return {**data, "models": list(data["models"]), "versions": policies}

    @model_validator(mode="after")
    def _version_policies_are_for_models(self) -> Profile:
        unknown = sorted(set(self.versions) - set(self.models))
        if unknown:
            raise ValueError(f"versions: {unknown} are not in the profile's 'models'")
        if self.versions and self.ingress.prediction_cache_ttl_s is not None:
            # Cached answers are keyed by the model's manifest version, not by the version that answered.
            raise ValueError("version policies and ingress.prediction_cache_ttl_s cannot be combined: cached "
                             "answers would not say which version gave them")
        grouped = sorted(set(self.versions) & {m for g in self.groups.values() for m in g.models})
        if grouped:
            raise ValueError(f"versions: {grouped} are members of a model group; a group's members serve one version")
        return self

    @model_validator(mode="after")
    def _shadows_have_a_stage(self) -> Profile:
        # A shadow version gets a copy of its model's features through a queue of its own.
        shadowed = [model for model, policy in self.versions.items() if policy.shadow is not None]
        if not shadowed or any(isinstance(stage, ShadowSpec) for stage in self.stages.values()):
            return self
        if "shadow" in self.stages:
            raise ValueError("a shadow version adds a stage named 'shadow'; this profile has a stage of that "
                             "name that is not a shadow stage")
        self.stages["shadow"] = ShadowSpec(kind="shadow", consumes=[key for model in shadowed
                                                     for key in (f"features.{model}", f"features.{model}.*")],
                                           prefetch=256)
        return self

    @model_validator(mode="after")
    def _versioned_keys_have_a_consumer(self) -> Profile:
        # A versioned job travels as request.<model>.v<version> / features.<model>.v<version>:
        # the stages must be bound to those keys too (``request.*.*``, ``features.*.*``), or it would
        # be unroutable. (``#`` works too, but AsyncAPI channel addresses cannot hold it.)
        kinds = {"request": (PreprocessSpec, "preprocess"), "features": (PredictSpec, "predict")}
        for model, policy in self.versions.items():
            # A policy without versions serves the manifest's, unknown here: any version word stands for it.
            for version in policy.versions() or ["1"]:
                for kind, (spec_type, stage_kind) in kinds.items():
                    patterns = [p for s in self.stages.values() if isinstance(s, spec_type) for p in s.consumes]
                    key = versioned_key(kind, model, version)
                    if patterns and not any_binding_matches(patterns, key):
                        raise ValueError(f"models.{model}: no {stage_kind} stage consumes {key} "
                                         f"(bind e.g. '{kind}.*.*')")
        return self
    @property
    def dead_letter_spec(self) -> DeadLetterSpec:
        """``dead_letters`` with the profile's queue type unless it names its own."""
        return self.dead_letters.model_copy(update={"queue_type": self.dead_letters.queue_type or self.queue_type})

    @model_validator(mode="after")
    def _kept_sync_answers_have_a_store(self) -> Profile:
        # ingress.keep_sync_answers_s: a store stage takes every outcome's copy (the predict
        # stage then publishes it, as in an async profile), and job records live that long.
        keep = self.ingress.keep_sync_answers_s
        if keep is None:
            return self
        self.ingress.result_ttl_s = keep
        if not any(isinstance(stage, StoreSpec | BatchStoreSpec) for stage in self.stages.values()):
            if "store" in self.stages:
                raise ValueError("ingress.keep_sync_answers_s adds a stage named 'store'; this profile has a "
                                 "stage of that name that is not a store")
            self.stages["store"] = StoreSpec(kind="store", consumes=["prediction.*", "failure.*"])
        return self

    @model_validator(mode="after")
    def _groups_are_sound(self) -> Profile:
        for name, group in self.groups.items():
            if name in self.models:
                raise ValueError(f"group {name!r} has the name of a model")
            unknown = sorted(set(group.models) - set(self.models))
            if unknown:
                raise ValueError(f"group {name!r} has models not in the profile's 'models': {unknown}")
        for name, stage in self.stages.items():
            if isinstance(stage, PredictSpec) and stage.cascade and stage.cascade.next_model not in self.models:
                raise ValueError(f"stage {name!r} cascades to {stage.cascade.next_model!r}, not in 'models'")
            if isinstance(stage, AggregateSpec) and stage.group not in self.groups:
                raise ValueError(f"stage {name!r} aggregates group {stage.group!r}, which is not in 'groups'")
        return self

    @model_validator(mode="after")
    def _ingress_models_are_profile_models(self) -> Profile:
        named = [m for m in [self.ingress.book_model, *self.ingress.sync_async, *self.ingress.sync_async.values()] if m]
        unknown = sorted(set(named) - set(self.models) - set(self.groups))
        if unknown:
            raise ValueError(f"ingress names models not in the profile's 'models': {unknown}")
        if self.ingress.sync_async and self.ingress.mode != "sync_async":
            raise ValueError("ingress.sync_async pairs need ingress.mode: sync_async")
        return self

    @model_validator(mode="after")
    def _ingress_features_have_a_consumer(self) -> Profile:
        # Features published by the ingress must reach a predict stage, or every tabular
        # request would be unroutable.
        if self.ingress.preprocess_tabular_in_ingress:
            patterns = [p for s in self.stages.values() if isinstance(s, PredictSpec) for p in s.consumes]
            orphans = [m for m in [*self.models, *self.groups] if not any_binding_matches(patterns, f"features.{m}")]
            if orphans:
                raise ValueError("ingress.preprocess_tabular_in_ingress: no predict stage consumes "
                                 f"{', '.join(f'features.{m}' for m in orphans)}")
        return self

    @model_validator(mode="after")
    def _published_predictions_have_a_consumer(self) -> Profile:
        # A predict stage's ``publishes`` key must reach a stage (its post-processor), or every
        # prediction would be refused as unroutable and its job would never end.
        for name, stage in self.stages.items():
            if isinstance(stage, PredictSpec) and stage.publishes:
                patterns = [p for other, s in self.stages.items() if other != name for p in s.consumes]
                keys = [published_key(stage.publishes, "prediction", m) for m in self.stage_models(name)]
                orphans = [key for key in keys if not any_binding_matches(patterns, key)]
                if orphans:
                    raise ValueError(f"stage {name!r} publishes {', '.join(orphans)}, which no other stage consumes")
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
            delivery_limit=self.delivery_limit if self.queue_type == "quorum" else None,
        )

    def queue_specs(self, namespace: str) -> list[QueueSpec]:
        return [self.queue_spec(namespace, name) for name in self.stages]

    @property
    def item_ttl_s(self) -> int | None:
        """The TTL of items written to Redis (None: no Redis item source, items cannot be written)."""
        sources = [source for stage in self.stages.values() if isinstance(stage, PreprocessSpec)
                   for source in stage.data_sources if isinstance(source, RedisSourceSpec)]
        return sources[0].ttl_s if sources else None

    @property
    def item_ids(self) -> bool:
        """Requests may name items (a preprocess stage has data sources)."""
        return any(isinstance(s, PreprocessSpec) and s.data_sources for s in self.stages.values())

    def stage_models(self, stage_name: str) -> list[str]:
        stage = self.stages[stage_name]
        return list(stage.models or self.models) if isinstance(stage, PredictSpec) else list(self.models)

    def group_parts(self, stage_name: str) -> dict[str, str]:
        """Predict stages: for each group, the member model this stage answers with."""
        served = self.stage_models(stage_name)
        parts = {}
        for group, spec in self.groups.items():
            members = [m for m in spec.models if m in served]
            if len(members) > 1:
                raise ProfileError(f"stage {stage_name!r} serves several members of group {group!r}: {members}; "
                                   "give each member its own predict stage")
            if members:
                parts[group] = members[0]
        return parts


class ProfileError(ValueError):
    pass


# Each stage spec's ``kind`` literal: the tags of the StageSpec union.
STAGE_KINDS = frozenset(get_args(spec.model_fields["kind"].annotation)[0] for spec in get_args(get_args(StageSpec)[0]))


def field_path(loc: tuple[int | str, ...]) -> str:
    """A validation error's location as the YAML reads: ``stages.predict.max_batch_size``.

    Pydantic puts a discriminated union's tag into the location (``stages.predict.predict...``,
    the stage's name then its kind); the file has no such level, so it is left out.
    """
    parts = [str(part) for part in loc]
    if len(parts) >= 3 and parts[0] == "stages" and parts[2] in STAGE_KINDS:
        del parts[2]
    if parts and parts[0] == "versions":
        parts[0] = "models"  # the policies are written in the models mapping
    return ".".join(parts)


def profile_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        return candidate
    return PROFILES_DIR / f"{name_or_path}.yaml"


def available_profiles() -> list[str]:
    return sorted(path.stem for path in PROFILES_DIR.glob("*.yaml"))


def resolve_versions(profile: Profile, known_versions: Mapping[str, Mapping[str, object]],
                     default_versions: Mapping[str, str]) -> list[str]:
    """Fill each policy's ``serve`` with the model's manifest.json version when not given, and say
    which named versions the model directory lacks (empty: all there)."""
    problems = []
    for model, policy in profile.versions.items():
        if policy.serve is None and model in default_versions:
            policy.serve = default_versions[model]
        known = sorted(known_versions.get(model, {}))
        named = {"serve": policy.serve, "canary.version": policy.canary.version if policy.canary else None,
                 "shadow": policy.shadow}
        problems += [f"models.{model}.{field}: {model} has no version {version!r} (versions: {known})"
                     for field, version in named.items() if version is not None and version not in known]
    return problems


def load_profile(name_or_path: str, known_models: set[str] | None = None,
                 known_versions: Mapping[str, Mapping[str, object]] | None = None,
                 default_versions: Mapping[str, str] | None = None) -> Profile:
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
        problems = "; ".join(f"{field_path(err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors())
        raise ProfileError(f"{path}: {problems}") from exc
    if known_models is not None:
        unknown = sorted(set(profile.models) - known_models)
        if unknown:
            raise ProfileError(f"{path}: models: {unknown} are not in the model manifest ({sorted(known_models)})")
    if known_versions is not None:
        problems = resolve_versions(profile, known_versions, default_versions or {})
        if problems:
            raise ProfileError(f"{path}: {'; '.join(problems)}")
    return profile
