"""producers/client.py against real stacks: predict (direct reply-to) and submit, async and
sync flavours, with the client account where the bus has accounts."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from tests.conftest import FreshServices
from tests.integration.conftest import Stack, start_stack
from toposerve.brokers import Failure, Prediction, Settings
from toposerve.deploy.accounts import AccountsFile
from toposerve.producers import ClientError, InferenceClient, SyncInferenceClient

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]


async def test_predict_waits_for_the_answer_and_many_run_at_once(async_stack: Stack) -> None:
    async with InferenceClient(async_stack.settings) as client:
        answer = await client.predict("iris", instances=ROWS, timeout_s=15)
        assert isinstance(answer, Prediction) and [r.label for r in answer.rows] == ["setosa", "virginica"]
        # Concurrent requests share one subscriber; each answer reaches its own caller.
        answers = await asyncio.gather(*(client.predict("iris", instances=[row], timeout_s=20)
                                         for row in ROWS * 25))
        assert [a.rows[0].label for a in answers] == ["setosa", "virginica"] * 25


async def test_bad_input_is_a_failure_and_an_unserved_model_an_error(async_stack: Stack) -> None:
    async with InferenceClient(async_stack.settings) as client:
        failure = await client.predict("iris", instances=[[1.0, 2.0]], timeout_s=15)
        assert isinstance(failure, Failure) and failure.code == "invalid_input" and "4" in failure.message
        unknown = await client.predict("nope", instances=ROWS, timeout_s=15)  # preprocess takes request.*
        assert isinstance(unknown, Failure) and unknown.code == "unknown_model"
        with pytest.raises(ClientError, match="no answer to job .* within 0.001 s"):
            await client.predict("iris", instances=ROWS, timeout_s=0.001)
        with pytest.raises(ValueError, match="instances"):
            client.request("iris")  # no input at all: refused before anything is published


async def test_submit_then_poll_through_the_ingress(async_stack: Stack) -> None:
    async with InferenceClient(async_stack.settings) as client:
        job_id = await client.submit("iris", instances=ROWS)
        for _ in range(200):
            record = await async_stack.results.get(job_id)
            if record is not None and record.status.value == "succeeded":
                break
            await asyncio.sleep(0.05)
        assert record is not None and [p.label for p in record.predictions] == ["setosa", "virginica"]
        with pytest.raises(ClientError, match="ingress"):
            await client.poll(job_id)


async def test_a_sync_profile_answers_the_client_too(sync_stack: Stack) -> None:
    async with InferenceClient(sync_stack.settings) as client:
        answer = await client.predict("iris", instances=ROWS[:1], timeout_s=15)
    assert isinstance(answer, Prediction) and answer.rows[0].label == "setosa"


def test_the_sync_flavour(settings: Settings) -> None:
    async def run() -> None:
        async for _ in start_stack(settings, "asynchronous"):
            await asyncio.to_thread(use_sync_client, settings)

    asyncio.run(run())


def use_sync_client(settings: Settings) -> None:
    with SyncInferenceClient(settings) as client:
        answer = client.predict("iris", instances=ROWS, timeout_s=15)
        assert isinstance(answer, Prediction) and answer.rows[1].label == "virginica"
        assert isinstance(client.submit("iris", instances=ROWS), uuid.UUID)


@pytest.fixture
async def accounts_stack(fault_settings: Settings) -> AsyncIterator[Stack]:
    async for stack in start_stack(fault_settings, "asynchronous"):
        yield stack


async def test_the_client_account_can_predict(accounts_stack: Stack, fresh_services: FreshServices) -> None:
    """With the bus's accounts: the client role publishes requests and gets answers, nothing else."""
    login = AccountsFile.load(fresh_services.accounts_file).roles["client"]
    settings = accounts_stack.settings.model_copy(update={"amqp_url": login.amqp_url, "accounts_file": None})
    async with InferenceClient(settings) as client:
        answer = await client.predict("iris", instances=ROWS, timeout_s=15)
        assert isinstance(answer, Prediction) and answer.rows[0].label == "setosa"
