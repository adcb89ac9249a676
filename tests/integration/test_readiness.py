"""Ready means "a request of each kind this profile serves would be handled now".

Kubernetes routes traffic on /readyz; an ingress that said ready while a stage had
no consumer sent its first callers 503 ``no_consumer``. Each profile below starts its
ingress first, then its stages one by one: /readyz (and the book's /health and the
Open Inference Protocol's /v2/health/ready) say not ready, naming the idle queues,
until every stage consumes; the first request after "ready" is served.
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import start_stack
from tests.support.images import b64
from tests.unit.test_models import SAMPLES_DIR
from toposerve.brokers.settings import Settings
from toposerve.deploy.components import build_stage_runner

SYNC_PROFILES = ["synchronous", "sync_async", "data_cache", "cascade", "edge_ai", "prep_pred"]
ASYNC_PROFILES = ["asynchronous", "horizontal_microservice"]


def request_for(profile: str) -> tuple[str, dict]:
    """A request this profile serves, and its path."""
    digit = b64(next(SAMPLES_DIR.glob("*.png")).read_bytes())
    if profile == "data_cache":
        item = next(SAMPLES_DIR.glob("*.png")).stem  # the directory source holds the samples
        return "/v1/models/digits_accurate/predict", {"item_id": item}
    if profile == "horizontal_microservice":
        return "/v1/models/iris_species/predict", {"instances": [[5.1, 3.5, 1.4, 0.2]]}
    if profile in ("asynchronous", "synchronous"):
        return "/v1/models/iris/predict", {"instances": [[5.1, 3.5, 1.4, 0.2]]}
    model = {"sync_async": "digits_fast", "cascade": "digits_fast", "edge_ai": "digits_fast",
             "prep_pred": "digits_fast"}[profile]
    return f"/v1/models/{model}/predict", {"image": digit}


@pytest.mark.parametrize("profile_name", SYNC_PROFILES + ASYNC_PROFILES)
async def test_not_ready_until_every_stage_consumes_then_the_first_request_is_served(
        settings: Settings, profile_name: str) -> None:
    async for stack in start_stack(settings, profile_name, stages=[]):
        runners = []
        try:
            stages = list(stack.profile.stages)
            for started, stage in enumerate(stages):
                ready = await stack.client.get("/readyz")
                assert ready.status_code == 503, ready.text
                body = ready.json()
                assert body["ready"] is False and body["checks"]["stages"]["ok"] is False
                assert f"{stack.profile.name}.{stage}" in body["checks"]["stages"]["detail"]
                assert (await stack.client.get("/health")).status_code == 503
                assert (await stack.client.get("/v2/health/ready")).status_code == 400
                runner = build_stage_runner(stack.profile, stage, settings)
                await runner.start()
                runners.append(runner)
                assert started < len(stages)
            ready = await stack.client.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert all(count > 0 for count in ready.json()["stage_consumers"].values())
            # "Ready" is true at once: no 503 no_consumer window after it.
            path, body = request_for(profile_name)
            response = await stack.client.post(path, json=body, params={"timeout": 20})
            assert response.status_code in (200, 202), response.text
        finally:
            for runner in runners:
                await runner.drain_and_close()
