"""The cascade: the fast model answers when confident, else the accurate one does."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import start_stack
from tests.integration.test_load_shedding import variant
from tests.support.images import b64, sample_images
from toposerve.brokers.settings import Settings
from toposerve.deploy.profile import MODELS_DIR
from toposerve.models.preprocessing import InputLimits, image_to_features, open_image
from toposerve.models.registry import ModelRegistry


def fast_confidence(path: Path) -> float:
    registry = ModelRegistry(MODELS_DIR)
    model = registry.load("digits_fast")
    features = image_to_features(open_image(path.read_bytes(), InputLimits()), model.manifest.preprocessing)
    return float(model.run(features)[1].max())


@pytest.mark.parametrize("threshold", [0.0, 0.999, 1.0])
async def test_the_threshold_decides_which_model_answers(settings: Settings, tmp_path: Path, threshold: float) -> None:
    profile = variant(tmp_path, "cascade", f"cascade_{str(threshold).replace('.', '_')}",
                      stages={"predict_fast": {"cascade": {"threshold": threshold, "next_model": "digits_accurate"}}})
    answered = set()
    async for stack in start_stack(settings, profile):
        for path, label in sample_images():
            response = await stack.client.post("/v1/models/digits_fast/predict", json={"image": b64(path.read_bytes())})
            assert response.status_code == 200, response.text
            body = response.json()
            expected = "digits_fast" if fast_confidence(path) >= threshold else "digits_accurate"
            assert body["answered_by"] == expected, (path.name, fast_confidence(path))
            assert body["predictions"][0]["label"] == label
            answered.add(body["answered_by"])
    if threshold == 0.0:
        assert answered == {"digits_fast"}
    if threshold == 1.0:
        assert answered == {"digits_accurate"}
