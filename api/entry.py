"""Where a request enters the topology, and which stages it then passes through.

By default the ingress publishes an ``InferenceRequest`` to ``request.<model>`` and
the preprocess stage turns it into ``Features``. For tabular rows that step is the
pure ``rows_to_features`` the ingress already runs to validate the body, so a
profile may let the ingress publish the ``Features`` itself
(``ingress.preprocess_tabular_in_ingress``): one broker hop and one stage fewer on
the path of a waiting caller. Pure functions, so the rules are tested without a broker.
"""

from __future__ import annotations

import time

import numpy as np

from toposerve.brokers import Features, InferenceRequest, QueueSpec
from toposerve.models import InputLimits, ModelManifest, derived_features, rows_to_features

# The message kinds a request travels through before its answer, in order. Entering
# at one kind skips the stages that only consume the kinds before it.
PIPELINE_KINDS = ("request", "features")


def features_message(request: InferenceRequest, features: np.ndarray, preprocess_ms: float) -> Features:
    """``request`` as the preprocess stage would have published it: same id, deadline, timings so far."""
    # Measured where the work was done (here), under the key the stage would use,
    # so a caller's per-stage timings stay comparable whichever path was taken.
    return derived_features(request, features, {**request.timings, "preprocess_ms": preprocess_ms})


def preprocess_rows(request: InferenceRequest, manifest: ModelManifest,
                    limits: InputLimits) -> tuple[Features, np.ndarray]:
    """The preprocess stage's work on tabular rows, done in the ingress: the message and its tensor.

    The tensor comes back too: it is the canonical input a prediction-cache key hashes.
    Raises ``InputError`` like the stage (the ingress validated the rows already).
    """
    assert request.instances is not None
    started = time.perf_counter()
    features = rows_to_features(request.instances, manifest, limits)
    preprocess_ms = round((time.perf_counter() - started) * 1000, 3)
    return features_message(request, features, preprocess_ms), features


def queues_on_path(queues: list[QueueSpec], answer_queues: list[str], entry_kind: str) -> list[str]:
    """The answer queues a message of ``entry_kind`` still passes through.

    A queue is skipped only when every one of its binding keys names a kind before
    the entry (``request.*`` for features published by the ingress); a wildcard
    first word may match anything, so such a queue stays required.
    """
    if entry_kind not in PIPELINE_KINDS:
        return list(answer_queues)
    skipped = set(PIPELINE_KINDS[:PIPELINE_KINDS.index(entry_kind)])
    bindings = {queue.name: queue.binding_keys for queue in queues}
    return [name for name in answer_queues
            if not (bindings.get(name) and all(key.split(".", 1)[0] in skipped for key in bindings[name]))]
