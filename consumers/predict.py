"""PredictStage: ``features.<model>`` -> ``prediction.<model>`` with ONNX Runtime and micro-batching."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import ClassVar

import numpy as np
from redis.exceptions import RedisError

from toposerve.brokers import (
    BatchStore,
    CanarySpec,
    Envelope,
    Failure,
    FailureCode,
    Features,
    JobSlice,
    LoadedReport,
    Prediction,
    ServingVersions,
    choose_version,
    published_key,
    stop_task,
    utc_now,
)
from toposerve.consumers.batching import UNCALIBRATED_INLINE_ROWS, MicroBatcher
from toposerve.consumers.metrics import StageMetrics, VersionMetrics
from toposerve.consumers.stage import Outgoing, Stage, outgoing
from toposerve.models import (
    InputError,
    LoadedModel,
    ModelLoadError,
    ModelRegistry,
    TensorError,
    check_features,
    decode_tensor,
    encode_tensor,
    signature_problems,
    to_row_predictions,
)

log = logging.getLogger(__name__)


class PredictStage(Stage):
    kind: ClassVar[str] = "predict"
    input_type: ClassVar[type[Envelope]] = Features

    def __init__(
        self,
        name: str,
        registry: ModelRegistry,
        models: list[str],
        max_batch_size: int = 64,
        max_batch_delay_ms: float = 2.0,
        max_rows: int = 10_000,
        groups: dict[str, str] | None = None,
        cascade: tuple[float, str] | None = None,
        publishes: str | None = None,
        versions: dict[str, list[str]] | None = None,
        reports: ServingVersions | None = None,
        watch_s: float = 1.0,
        canaries: dict[str, CanarySpec] | None = None,
        batches: BatchStore | None = None,
    ) -> None:
        super().__init__(name)
        # A profile with a batch stage: a chunk of a cancelled batch is skipped (one flag read per chunk).
        self.batches = batches
        self.skipped_chunks = 0
        # Models with a version policy: every version the stage loads (the first answers a
        # message that names none); a message naming a version is answered by that one.
        self.versions = versions or {}
        # A message that names no version (a direct publisher's) is given one as the ingress would:
        # the canary for its share of job ids, so a republished job (same id) lands on the same version.
        self.canaries = canaries or {}
        # Where the stage says which versions it loaded (promote waits for every stage to have one);
        # every ``watch_s`` it also loads versions dropped into the model directory since it started.
        self.reports = reports
        self.watch_s = watch_s
        self.instance = f"{name}-{uuid.uuid4().hex[:12]}"
        self.refused: dict[str, tuple[str, str]] = {}  # model_key -> (sha256, why), so a file is judged once
        self._watch: asyncio.Task | None = None
        # A routing-key template ({model}) for predictions that a post-processing stage
        # (``kind: custom``) turns into the job's answer; None: ``prediction.<model>``, final.
        self.publishes = publishes
        self.registry = registry
        self.model_names = models
        # Scatter-gather: features for a group are answered by this stage's member model.
        self.groups = groups or {}
        # Cascade: (threshold, next model): less confident answers go on to the next model.
        self.cascade = cascade
        self.max_rows = max_rows
        self.models: dict[str, LoadedModel] = {}
        self.loaded: dict[str, LoadedModel] = {}  # by model_key: every version, batched apart
        self.version_metrics: VersionMetrics | None = None
        self.batcher = MicroBatcher(self._run, max_batch_size=max_batch_size, max_batch_delay_ms=max_batch_delay_ms)

    async def start(self) -> None:
        # Load (and sha256-check) every model before taking a message; in a thread, so the
        # event loop keeps turning (the liveness heartbeat) while a large model loads.
        self.models, self.loaded = await asyncio.to_thread(self._load)
        size = self.batcher.max_batch_size
        for name, loaded in self.loaded.items():
            try:
                one, full = await asyncio.to_thread(lambda m=loaded: (m.seconds_per_run(1), m.seconds_per_run(size)))
            except Exception as exc:  # noqa: BLE001 - a model that serves but cannot be timed keeps the default
                log.warning("model %s could not be timed (%s); batches up to %d rows run on the event loop",
                            name, exc, UNCALIBRATED_INLINE_ROWS)
                continue
            rows = self.batcher.calibrate(name, one, full)
            log.info("model %s: %.0f us for 1 row, %.0f us for %d; batches up to %d rows run on the event loop",
                     name, one * 1e6, full * 1e6, size, rows)
        if self.versions and self.reports is not None:
            await self._report()  # before the first message: promote may count on this stage at once
            self._watch = asyncio.create_task(self._watch_versions(), name=f"{self.name}-version-watch")

    async def _watch_versions(self) -> None:
        while True:
            await asyncio.sleep(self.watch_s)
            try:
                await self.pick_up_versions()
                await self._report()
            except RedisError as exc:
                log.warning("stage %s cannot report its model versions: %s", self.name, exc)
            except Exception:  # noqa: BLE001 - the watch must outlive any one bad look at the directory
                log.exception("stage %s: looking for new model versions failed", self.name)

    async def pick_up_versions(self) -> list[str]:
        """Load the versions of the policies' models that appeared in the model directory (checked:
        sha256, and the input signature of the version the stage serves); the keys loaded."""
        fresh = await asyncio.to_thread(self.registry.rescan)
        added = []
        for name in self.versions:
            for version, manifest in fresh.get(name, {}).items():
                key = f"{name}@{version}"
                if key in self.loaded:
                    if self.loaded[key].manifest.sha256 != manifest.sha256 and key not in self.refused:
                        why = "its manifest changed on disk; a version is immutable: give the new file a new version"
                        self.refused[key] = (manifest.sha256, why)
                        log.warning("stage %s keeps serving %s as loaded: %s", self.name, key, why)
                    continue
                if self.refused.get(key, ("",))[0] == manifest.sha256:
                    continue
                try:
                    candidate = await asyncio.to_thread(load_checked_version, self.registry, self.models[name], version)
                except ModelLoadError as exc:
                    self.refused[key] = (manifest.sha256, str(exc))
                    log.warning("stage %s refuses %s: %s", self.name, key, exc)
                    continue
                self.refused.pop(key, None)
                self.loaded[key] = candidate
                added.append(key)
                log.info("stage %s loaded %s (sha256 %s)", self.name, key, manifest.sha256[:16])
        return added

    async def _report(self) -> None:
        assert self.reports is not None
        for name in self.versions:
            loaded = sorted(key.split("@", 1)[1] for key in self.loaded if key.split("@", 1)[0] == name)
            refused = {key.split("@", 1)[1]: why for key, (_, why) in self.refused.items()
                       if key.split("@", 1)[0] == name}
            await self.reports.report_loaded(name, self.instance,
                                             LoadedReport(stage=self.name, loaded=loaded, refused=refused))

    async def stop(self) -> None:
        await stop_task(self._watch)
        await self.batcher.close()
        if self.reports is not None:
            await self.reports.client.aclose()
        if self.batches is not None:
            await self.batches.client.aclose()

    def _load(self) -> tuple[dict[str, LoadedModel], dict[str, LoadedModel]]:
        """Each model's answering version (by name), and every loaded version (by ``model_key``)."""
        serving = {}
        for name in self.model_names:
            versions = self.versions.get(name)
            serving[name] = self.registry.load(name, versions[0] if versions else None)
        loaded = {model_key(m): m for m in serving.values()}
        for name, versions in self.versions.items():
            for version in versions[1:]:
                try:
                    candidate = load_checked_version(self.registry, serving[name], version)
                except ModelLoadError as exc:
                    # The served version serves; a broken or incompatible other version is left out.
                    log.warning("stage %s does not load %s@%s: %s", self.name, name, version, exc)
                    continue
                loaded[model_key(candidate)] = candidate
        return serving, loaded

    def instrument(self, metrics: StageMetrics) -> None:
        self.batcher.observe_batch = metrics.batch_size.observe
        self.version_metrics = VersionMetrics(metrics, self.name)

    def _run(self, model: str, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.loaded[model].run(features)

    def part_of(self, message: Envelope) -> str | None:
        return self.groups.get(message.model)

    async def handle(self, message: Envelope) -> list[Outgoing]:
        assert isinstance(message, Features)
        canary = self.canaries.get(message.model)
        if message.version is None and canary is not None and message.model in self.models:
            message.version = choose_version(self.models[message.model].manifest.version, canary, message.id)
        if self.version_metrics is None or message.version is None:
            return await self._handle(message)
        # Versioned jobs are counted and timed per version, side by side (canary against serve).
        started = time.perf_counter()
        model = self.part_of(message) or message.model
        try:
            outputs = await self._handle(message)
        except InputError:
            self.version_metrics.observe(model, message.version, time.perf_counter() - started, failed=1)
            raise
        failed = sum(isinstance(o.body, Failure) for o in outputs)
        self.version_metrics.observe(model, message.version, time.perf_counter() - started,
                                     answered=len(outputs) - failed, failed=failed)
        return outputs

    async def _handle(self, message: Features) -> list[Outgoing]:
        if message.jobs:
            return await self._handle_jobs(message)
        if message.batch_id is not None and await self._cancelled(message.batch_id):
            self.skipped_chunks += 1
            failure = Failure(**message.carried(), stage=self.name, code=FailureCode.CANCELLED,
                              message=f"batch {message.batch_id} was cancelled; this chunk was not predicted")
            return [Outgoing(failure, failure.routing_key())]
        return await self._handle_one(message)

    async def _cancelled(self, batch_id: str) -> bool:
        """Whether the chunk's batch was cancelled. Redis down: the chunk is predicted (a cancel is
        a saving, never a reason to lose or hold a chunk of a batch that runs on)."""
        if self.batches is None:
            return False
        try:
            return await self.batches.is_cancelled(batch_id)
        except (RedisError, OSError) as exc:
            log.warning("could not read batch %s's cancel flag (%s); predicting its chunk", batch_id, exc)
            return False

    async def _handle_jobs(self, message: Features) -> list[Outgoing]:
        """Many jobs in one message: one ONNX call for every live job's rows, an answer each.

        A job whose deadline passed is dropped (``deadline_exceeded``) and a job whose rows are
        bad fails (its own ``Failure``), alone; the others are answered as usual.
        """
        assert message.jobs is not None
        if self.cascade is not None or self.part_of(message) is not None:
            # Cascades and model groups decide per job: each job goes the single way.
            outputs: list[Outgoing] = []
            for job, rows in self._slices(message, _decoded(message)):
                single = Features(**message.job_fields(job), tensor=encode_tensor(rows))
                outputs += [Outgoing(o.body, o.routing_key, o.final, job.traceparent)
                            for o in await self._handle_one(single)]
            return outputs
        loaded = self._model(message)
        carried = message.carried()  # once: every job's answer copies it
        outputs = []
        live: list[tuple[JobSlice, np.ndarray]] = []
        now = utc_now()
        array = _decoded(message)
        whole = _checked(array, loaded, self.max_rows)  # one check for every job's rows, when they all pass
        for job, rows in self._slices(message, array if whole is None else whole):
            if job.deadline is not None and job.deadline <= now:
                failure = Failure(**message.job_fields(job, carried), stage=self.name,
                                  code=FailureCode.DEADLINE_EXCEEDED, message=self.too_late(job.deadline))
            else:
                try:
                    live.append((job, rows if whole is not None else check_features(rows, loaded.manifest, self.max_rows)))
                    continue
                except InputError as exc:
                    failure = Failure(**message.job_fields(job, carried), stage=self.name, code=exc.code,
                                      message=exc.message)
            outputs.append(Outgoing(failure, failure.routing_key(), traceparent=job.traceparent))
        if not live:
            return outputs
        features = live[0][1] if len(live) == 1 else np.concatenate([rows for _, rows in live])
        class_indices, probabilities = await self.batcher.submit(model_key(loaded), features)
        answers = to_row_predictions(class_indices, probabilities, loaded.manifest.labels)  # one conversion for all
        start = 0
        for job, rows in live:
            end = start + len(rows)
            prediction = Prediction(**message.job_fields(job, carried), model_version=loaded.manifest.version,
                                    answered_by=loaded.manifest.name, rows=answers[start:end])
            start = end
            outputs.append(self._answer(prediction, job.traceparent))
        return outputs

    def _answer(self, prediction: Prediction, traceparent: str | None = None) -> Outgoing:
        """The job's answer; or, with ``publishes``, a prediction on its way to a post-processor."""
        if self.publishes is None:
            return Outgoing(prediction, prediction.routing_key(), traceparent=traceparent)  # a part's key has its part
        return Outgoing(prediction, published_key(self.publishes, prediction.kind, prediction.model), final=False,
                        traceparent=traceparent)

    def _slices(self, message: Features, array: np.ndarray) -> list[tuple[JobSlice, np.ndarray]]:
        """Each job with its rows of the tensor (whose row count the message's schema checked)."""
        assert message.jobs is not None
        if array.ndim != 2:
            raise InputError(f"features have shape {list(array.shape)}; a message with jobs needs rows",
                             FailureCode.INVALID_MESSAGE)
        if array.shape[0] > self.max_rows:
            # Each job may be small, but the message is what one ONNX call runs.
            raise InputError(f"features have {array.shape[0]} rows, more than the limit of {self.max_rows}",
                             FailureCode.TOO_LARGE)
        slices, start = [], 0
        for job in message.jobs:
            slices.append((job, array[start:start + job.rows]))
            start += job.rows
        return slices

    def _model(self, message: Features) -> LoadedModel:
        name = self.part_of(message) or message.model
        loaded = self.models.get(name)
        if loaded is None:
            raise InputError(f"model {message.model!r} is not served by stage {self.name!r}",
                             FailureCode.UNKNOWN_MODEL)
        if message.version is None or message.version == loaded.manifest.version:
            return loaded
        version = self.loaded.get(f"{name}@{message.version}")
        if version is None:
            known = sorted(key.split("@", 1)[1] for key in self.loaded if key.split("@", 1)[0] == name)
            raise InputError(f"model {name!r} has no version {message.version!r} at stage {self.name!r} "
                             f"(versions: {known})", FailureCode.UNKNOWN_MODEL)
        return version

    async def _handle_one(self, message: Features) -> list[Outgoing]:
        part = self.part_of(message)
        loaded = self._model(message)
        features = check_features(_decoded(message), loaded.manifest, self.max_rows)
        class_indices, probabilities = await self.batcher.submit(model_key(loaded), features)
        if self.cascade is not None and part is None:
            threshold, next_model = self.cascade
            if float(probabilities.max(axis=1).min()) < threshold:
                # Not sure enough about every row: the next model answers instead (same job).
                return [outgoing(message.model_copy(update={"model": next_model}))]
        prediction = Prediction(
            **message.carried(), model_version=loaded.manifest.version, part=part,
            answered_by=loaded.manifest.name,
            rows=to_row_predictions(class_indices, probabilities, loaded.manifest.labels),
        )
        return [self._answer(prediction)]


def load_checked_version(registry: ModelRegistry, serving: LoadedModel, version: str) -> LoadedModel:
    """Another version of ``serving``'s model, loaded (sha256 checked) if its input signature is the same."""
    candidate = registry.manifest(serving.manifest.name, version)
    if candidate is None:
        raise ModelLoadError(f"no version {version!r}")
    problems = signature_problems(serving.manifest, candidate)
    if problems:
        raise ModelLoadError("; ".join(problems))
    return registry.load(serving.manifest.name, version)


def model_key(loaded: LoadedModel) -> str:
    """``<name>@<version>``: how the stage keys a loaded version (its batches, its calibration)."""
    return f"{loaded.manifest.name}@{loaded.manifest.version}"


def _checked(array: np.ndarray, loaded: LoadedModel, max_rows: int) -> np.ndarray | None:
    """A message's whole tensor as the model's input, or None when some rows fail the checks
    (then each job's rows are checked alone, so only the bad jobs fail)."""
    try:
        return check_features(array, loaded.manifest, max_rows)
    except InputError:
        return None


def _decoded(message: Features) -> np.ndarray:
    """The message's tensor; a wrong encoding fails its job(s) as an invalid message."""
    try:
        return decode_tensor(message.tensor)
    except TensorError as exc:
        raise InputError(str(exc), FailureCode.INVALID_MESSAGE) from exc
