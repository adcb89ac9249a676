"""Operators' hands on model versions while a profile runs: promote, roll back, check a new version.

``promote`` makes another version serve (every ingress reads the serving version from Redis for
each request, so the switch needs no restart; a job keeps the version it was given, so in-flight
work finishes on it). It refuses a version the model directory lacks, one whose file does not
load or has another sha256 than its manifest, and one whose input signature differs from the
version serving now. The stages load every version of a policy's model at start, and pick up a
version added later (``toposerve models reload``; consumers/predict.py watches the version files) after the
same checks.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from toposerve.brokers import LoadedReport, ServingChange, ServingVersions, Settings, connect_redis
from toposerve.deploy.profile import Profile
from toposerve.models import ModelLoadError, ModelManifest, ModelRegistry, open_model, signature_problems


class VersionRefused(ValueError):
    """The version change was refused; the message says why (the serving version is unchanged)."""


def policy_of(profile: Profile, model: str):
    policy = profile.versions.get(model)
    if policy is None:
        raise VersionRefused(f"profile {profile.name!r} has no version policy for {model!r}; give it one in the "
                             f"profile's models mapping, e.g. models: {{{model}: {{serve: ...}}}}")
    return policy


def check_candidate(models_dir: Path, model: str, version: str, serving: str) -> ModelManifest:
    """The candidate's manifest, once its file loads (sha256 checked) and its signature matches ``serving``'s."""
    registry = ModelRegistry(models_dir)
    try:
        versions = registry.versions.get(model, {})
    except ModelLoadError as exc:
        raise VersionRefused(f"the model directory {models_dir} cannot be read: {exc}") from exc
    candidate, current = versions.get(version), versions.get(serving)
    if candidate is None:
        raise VersionRefused(f"{model} has no version {version!r} in {models_dir} (versions: {sorted(versions)})")
    if current is not None:
        problems = signature_problems(current, candidate)
        if problems:
            raise VersionRefused(f"{model}@{version} cannot replace {model}@{serving}: {'; '.join(problems)}")
    try:
        open_model(models_dir, candidate)
    except ModelLoadError as exc:
        raise VersionRefused(f"{model}@{version} is refused: {exc}") from exc
    return candidate


def lacking(reports: dict[str, LoadedReport], version: str) -> dict[str, str]:
    """Pure: the stage processes (by instance) that have not loaded ``version``, with what they said."""
    return {instance: report.refused.get(version, "not loaded yet")
            for instance, report in reports.items() if version not in report.loaded}


async def require_loaded(store: ServingVersions, model: str, version: str) -> None:
    """Stages load, then the switch: refused unless every running predict stage process has loaded it."""
    reports = await store.loaded_reports(model)
    if not reports:
        raise VersionRefused(f"no running predict stage reports the versions of {model} it loaded "
                             "(is the profile up in this namespace?)")
    missing = lacking(reports, version)
    if missing:
        said = "; ".join(f"{reports[i].stage} ({i}): {why}" for i, why in sorted(missing.items()))
        raise VersionRefused(f"{model}@{version} is not loaded by every predict stage: {said} "
                             "(`toposerve models reload` waits until it is)")


async def reload(settings: Settings, profile: Profile, models_dir: Path, timeout_s: float = 30.0
                 ) -> dict[str, str]:
    """Check every version of the policies' models in the model directory, and wait until the running
    predict stages have loaded the sound ones; ``model@version`` -> "loaded" or why it is refused."""
    client = connect_redis(settings.redis_url, max_connections=2)
    outcome: dict[str, str] = {}
    try:
        store = ServingVersions(client, settings.namespace)
        registry = ModelRegistry(models_dir)
        known = registry.versions  # reads the version files: the unreadable ones are in refused_files now
        outcome |= {name.removesuffix(".json"): why for name, why in registry.refused_files.items()}
        waiting: dict[str, tuple[str, str]] = {}
        for model in profile.versions:
            serving = await serving_version(store, profile, model)
            for version in sorted(known.get(model, {})):
                try:
                    check_candidate(models_dir, model, version, serving)
                except VersionRefused as exc:
                    outcome[f"{model}@{version}"] = str(exc)
                    continue
                waiting[f"{model}@{version}"] = (model, version)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while waiting:
            for key, (model, version) in list(waiting.items()):
                reports = await store.loaded_reports(model)
                missing = lacking(reports, version)
                refusals = {why for why in missing.values() if why != "not loaded yet"}
                if reports and not missing:
                    outcome[key] = f"loaded by {len(reports)} predict stage process(es)"
                    del waiting[key]
                elif refusals:
                    outcome[key] = "refused by a predict stage: " + "; ".join(sorted(refusals))
                    del waiting[key]
            if waiting and asyncio.get_running_loop().time() > deadline:
                for key in waiting:
                    outcome[key] = f"not loaded by every predict stage within {timeout_s:g} s"
                break
            if waiting:
                await asyncio.sleep(0.2)
        return outcome
    finally:
        await client.aclose()


async def serving_version(store: ServingVersions, profile: Profile, model: str) -> str:
    policy = policy_of(profile, model)
    current = await store.current(model)
    assert current is not None or policy.serve is not None  # load_checked_profile resolved serve
    return current or policy.serve  # type: ignore[return-value]


async def promote(settings: Settings, profile: Profile, models_dir: Path, model: str, version: str) -> ServingChange:
    """``model@version`` serves from now on (checked first); rollback returns to what served until now."""
    client = connect_redis(settings.redis_url, max_connections=2)
    try:
        store = ServingVersions(client, settings.namespace)
        serving = await serving_version(store, profile, model)
        if version == serving:
            raise VersionRefused(f"{model}@{version} serves already")
        check_candidate(models_dir, model, version, serving)
        await require_loaded(store, model, version)
        return await store.promote(model, version, serving)
    finally:
        await client.aclose()


async def rollback(settings: Settings, profile: Profile, models_dir: Path, model: str) -> ServingChange:
    """The version that served before the last promotion serves again."""
    client = connect_redis(settings.redis_url, max_connections=2)
    try:
        store = ServingVersions(client, settings.namespace)
        serving = await serving_version(store, profile, model)
        previous = await store.previous(model)
        if previous is None or previous == serving:
            raise VersionRefused(f"{model}: nothing to roll back to ({model}@{serving} serves and no promotion "
                                 "was made in this namespace)")
        check_candidate(models_dir, model, previous, serving)
        await require_loaded(store, model, previous)
        return await store.promote(model, previous, serving)
    finally:
        await client.aclose()
