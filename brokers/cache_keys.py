"""Cache keys: pure functions, so every process derives the same key from the same input.

A prediction is keyed by model, model version and a hash of the *canonical* input:
the float32 features the model actually sees (decoded pixels for images, rows for
tabular input). Two encodings of the same picture therefore share a key, and a
new model version never serves an old version's answer.
"""

from __future__ import annotations

import hashlib

import numpy as np


def features_digest(features: np.ndarray) -> str:
    canonical = np.ascontiguousarray(features, dtype=np.dtype("<f4"))
    digest = hashlib.sha256()
    digest.update(f"{canonical.dtype.str}:{canonical.shape}".encode())
    digest.update(canonical.tobytes())
    return digest.hexdigest()


def prediction_key(namespace: str, model: str, version: str, features: np.ndarray) -> str:
    return f"{namespace}:pred:{model}:{version}:{features_digest(features)}"


def feature_key(namespace: str, model: str, version: str, item_id: str) -> str:
    # Item ids are validated before they get here (toposerve.models.items.check_item_id).
    return f"{namespace}:features:{model}:{version}:{item_id}"
