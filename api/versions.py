"""The ingress's side of model versions: which version a request goes to, and which versions exist.

A model with a version policy gets every request tagged with a version (``Envelope.version``,
which puts it in the routing key): the one the URL names, else the canary for its share
of job ids, else the serving version, the promoted one when an operator promoted one
(read from Redis for each request, so every ingress process switches at once). A model
without a policy has one version, its manifest's; naming another is a 404.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from redis.exceptions import RedisError

from toposerve.api.errors import ApiError
from toposerve.brokers import Envelope, ServingVersions, VersionPolicy, choose_version
from toposerve.models import ModelLoadError, ModelManifest, signature_problems

# How often an ingress renews a promotion it reads (its TTL is 90 days): hourly is plenty.
KEEP_PROMOTION_EVERY_S = 3600.0
# At most this often an ask for an unknown version reads the model directory's version files again.
RESCAN_EVERY_S = 1.0


class IngressVersions:
    def __init__(self, policies: dict[str, VersionPolicy], manifests: dict[str, dict[str, ModelManifest]],
                 serving: ServingVersions, keep_every_s: float = KEEP_PROMOTION_EVERY_S,
                 rescan: Callable[[], dict[str, dict[str, ModelManifest]]] | None = None) -> None:
        self.policies = policies
        # model -> version -> manifest, for every model the profile serves.
        self.manifests = manifests
        self.serving = serving
        # The last serving version read from Redis, used while Redis cannot be read.
        self._last_read: dict[str, str] = {}
        self.keep_every_s = keep_every_s
        self._kept_at: dict[str, float] = {}
        # The version files of the model directory, read again when a request names a version this
        # ingress does not know (one dropped in later, `toposerve models reload`); None: never.
        self.rescan = rescan
        self._rescanned_at = -RESCAN_EVERY_S

    def known(self, model: str) -> list[str]:
        return sorted(self.manifests.get(model, {}))

    def manifest(self, model: str, version: str) -> ModelManifest:
        """``model``'s manifest for ``version``; a 404 naming the versions it has."""
        manifest = self.manifests.get(model, {}).get(version)
        if manifest is None and model in self.policies:
            manifest = self._learn(model, version)
        if manifest is None or (model not in self.policies and version != self.default_version(model)):
            offered = self.known(model) if model in self.policies else [self.default_version(model)]
            raise ApiError(404, "unknown_version", f"model {model!r} has no version {version!r} served here; "
                                                   f"versions: {offered}")
        return manifest

    def _learn(self, model: str, version: str) -> ModelManifest | None:
        """``model@version`` when the model directory has gained it since this ingress started (read
        at most once a second, whoever asks); a version whose signature differs from the serving
        one's is not taken (the predict stages refuse it too)."""
        now = time.monotonic()
        if self.rescan is None or now - self._rescanned_at < RESCAN_EVERY_S:
            return None
        self._rescanned_at = now
        try:
            on_disk = self.rescan()
        except ModelLoadError:  # e.g. a version described twice: the stages refuse it too
            return None
        for name, versions in on_disk.items():
            known = self.manifests.get(name)
            if name not in self.policies or known is None:
                continue
            reference = known.get(self.default_version(name))
            for found in versions.values():
                if found.version not in known and (reference is None or not signature_problems(reference, found)):
                    known[found.version] = found
        return self.manifests.get(model, {}).get(version)

    def default_version(self, model: str) -> str:
        policy = self.policies.get(model)
        if policy is not None and policy.serve is not None:
            return policy.serve
        return next(iter(self.manifests[model]))

    async def serving_version(self, model: str) -> str:
        """The version that serves ``model`` now: the promoted one, else the profile's ``serve``."""
        try:
            promoted = await self.serving.current(model)
        except RedisError:
            promoted = self._last_read.get(model)
        if promoted is not None:
            self._last_read[model] = promoted
            await self._keep(model)
            return promoted
        self._last_read.pop(model, None)
        return self.default_version(model)

    async def _keep(self, model: str) -> None:
        """Renew a promotion this process serves by, now and then (a failed renewal is tried next time)."""
        now = time.monotonic()
        if now - self._kept_at.get(model, -self.keep_every_s - 1.0) < self.keep_every_s:
            return
        try:
            await self.serving.keep(model)
        except RedisError:
            return
        self._kept_at[model] = now

    async def route(self, request: Envelope, explicit: str | None = None) -> str | None:
        """Tag ``request`` with the version that is to answer it (and return it); None for a model
        without a policy (its only version answers)."""
        if explicit is not None:
            self.manifest(request.model, explicit)
        policy = self.policies.get(request.model)
        if policy is None:
            return None
        version = explicit or choose_version(await self.serving_version(request.model), policy.canary, request.id)
        request.version = version
        return version
