"""``ingress.keep_sync_answers_s``: a sync profile that also stores its answers, for a while,
readable at ``GET /v1/jobs/{id}``; a direct publish with no reply_to is stored, not dropped."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.integration.conftest import Stack, start_stack
from tests.integration.test_caches import profile_variant
from tests.integration.test_direct_amqp import job_when_done, publish
from toposerve.api.config import IngressSpec
from toposerve.brokers.settings import Settings
from toposerve.deploy.profile import StoreSpec, load_profile

ROW = [6.7, 3.0, 5.2, 2.3]


@pytest.fixture
async def keeping_stack(settings: Settings, tmp_path: Path) -> AsyncIterator[Stack]:
    path = profile_variant(tmp_path, "synchronous", "keeps_answers", keep_sync_answers_s=30)
    async for stack in start_stack(settings, path):
        yield stack


async def test_a_sync_answer_is_readable_at_its_job_for_the_profiles_seconds(keeping_stack: Stack) -> None:
    response = await keeping_stack.client.post("/v1/models/iris/predict", json={"instances": [ROW]})
    assert response.status_code == 200, response.text
    answer = response.json()
    job = await job_when_done(keeping_stack, answer["id"])
    assert job["status"] == "succeeded" and job["predictions"] == answer["predictions"]
    ttl = await keeping_stack.results.client.ttl(keeping_stack.results.key(uuid.UUID(answer["id"])))
    assert 0 < ttl <= 30


async def test_a_direct_publish_without_reply_to_is_stored_not_dropped(keeping_stack: Stack) -> None:
    job_id = uuid.uuid4()
    await publish(keeping_stack, "request.iris",
                  json.dumps({"id": str(job_id), "model": "iris", "instances": [ROW]}).encode())
    job = await job_when_done(keeping_stack, job_id)
    assert job["status"] == "succeeded" and job["predictions"][0]["label"] == "virginica"


async def test_without_the_knob_sync_answers_are_not_stored(sync_stack: Stack) -> None:
    response = await sync_stack.client.post("/v1/models/iris/predict", json={"instances": [ROW]})
    assert response.status_code == 200
    await asyncio.sleep(0.5)
    assert (await sync_stack.client.get(f"/v1/jobs/{response.json()['id']}")).status_code in (404, 410)


def test_the_knob_adds_a_store_stage_and_sets_the_records_ttl(tmp_path: Path) -> None:
    profile = load_profile(profile_variant(tmp_path, "synchronous", "keeps", keep_sync_answers_s=45))
    assert isinstance(profile.stages["store"], StoreSpec)
    assert profile.stages["store"].consumes == ["prediction.*", "failure.*"]
    assert profile.ingress.result_ttl_s == 45
    assert "store" not in load_profile("synchronous").stages


def test_the_knob_is_for_sync_profiles_only() -> None:
    with pytest.raises(ValidationError, match="keep_sync_answers_s is for mode: sync"):
        IngressSpec(mode="async", keep_sync_answers_s=10)
