"""Several versions of a model side by side: where they are kept, and when one may replace another.

``manifest.json`` holds one entry per model name (its first version); every further
version is a pair of files next to it, ``<name>@<version>.onnx`` and
``<name>@<version>.json`` (one ``ModelManifest``), so a new version is dropped into the
directory without rewriting the shared manifest. A manifest without a ``version`` is
version 1.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import ValidationError

from toposerve.models.manifests import ModelLoadError, ModelManifest

# A version's own manifest file: <model>@<version>.json (names as brokers/messages.py allows).
_VERSION_FILE = re.compile(r"^([a-z0-9][a-z0-9_]{0,63})@([0-9A-Za-z_-]{1,32})\.json$")


def version_file_name(name: str, version: str) -> str:
    return f"{name}@{version}.json"


def version_manifest_paths(models_dir: Path) -> list[Path]:
    """The ``<name>@<version>.json`` files of ``models_dir``, sorted."""
    return sorted(path for path in models_dir.glob("*@*.json") if _VERSION_FILE.match(path.name))


def read_version_manifest(path: Path) -> ModelManifest:
    """One version's manifest; its name and version must be the file's."""
    match = _VERSION_FILE.match(path.name)
    if match is None:
        raise ModelLoadError(f"{path.name} is not named <model>@<version>.json")
    try:
        manifest = ModelManifest.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise ModelLoadError(f"cannot read the version manifest {path}: {exc}") from exc
    except ValidationError as exc:
        raise ModelLoadError(f"{path}: not a valid model manifest: {exc}") from exc
    if (manifest.name, manifest.version) != match.groups():
        raise ModelLoadError(f"{path} describes {manifest.name}@{manifest.version}, not {match.group(1)}@{match.group(2)}")
    return manifest


def collect_versions(base: dict[str, ModelManifest], extra: list[ModelManifest]) -> dict[str, dict[str, ModelManifest]]:
    """Pure: model name -> version -> manifest, from the shared manifest's entries and the version files.

    A version file for a model the shared manifest lacks adds that model; one that repeats a
    version already known is refused (two files would answer as one version)."""
    versions: dict[str, dict[str, ModelManifest]] = {name: {m.version: m} for name, m in base.items()}
    for manifest in extra:
        known = versions.setdefault(manifest.name, {})
        if manifest.version in known:
            raise ModelLoadError(f"{manifest.name}@{manifest.version} is described twice "
                                 f"(manifest.json and {version_file_name(manifest.name, manifest.version)})")
        known[manifest.version] = manifest
    return versions


def signature_problems(old: ModelManifest, new: ModelManifest) -> list[str]:
    """Pure: why ``new`` cannot take ``old``'s traffic (empty: it can). Callers send the same
    inputs and read the same labels, so the input and the labels must not change."""
    problems = []
    if new.name != old.name:
        problems.append(f"it is model {new.name!r}, not {old.name!r}")
    for field in ("name", "dtype", "shape", "features"):
        was, now = getattr(old.input, field), getattr(new.input, field)
        if was != now:
            problems.append(f"input {field} {now!r} differs from version {old.version}'s {was!r}")
    if new.labels != old.labels:
        problems.append(f"labels {new.labels} differ from version {old.version}'s {old.labels}")
    if new.preprocessing != old.preprocessing:
        problems.append(f"preprocessing {new.preprocessing.model_dump()} differs from version {old.version}'s "
                        f"{old.preprocessing.model_dump()}")
    return problems
