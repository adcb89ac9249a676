"""Many jobs in one message: the ingress's coalescer, the message's rules, the predict stage's
answers per job, and the reply split. Fast checks of our own logic; the integration test
(tests/integration/test_coalescing.py) shows it on a real RabbitMQ."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from toposerve.api.coalescing import FeatureCoalescer, _Waiting
from toposerve.brokers import (
    Failure,
    FailureCode,
    Features,
    JobSlice,
    Outcomes,
    Prediction,
    RowPrediction,
    decode_reply,
    utc_now,
)
from toposerve.consumers import PredictStage
from toposerve.models import InputError, ModelRegistry, decode_tensor, encode_tensor

MODELS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "models"
SETOSA, VIRGINICA = [5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]
TRACE = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"


def job(rows: int = 1, *, deadline_s: float | None = 10.0, traceparent: str | None = None) -> JobSlice:
    now = utc_now()
    return JobSlice(id=uuid.uuid4(), rows=rows, created_at=now,
                    deadline=None if deadline_s is None else now + timedelta(seconds=deadline_s),
                    traceparent=traceparent, timings={"preprocess_ms": 0.1})


def rows(*values: list[float]) -> np.ndarray:
    return np.array(values, dtype=np.float32)


class GatedPublish:
    """A publish that waits until released, recording each message it was given."""

    def __init__(self) -> None:
        self.messages: list[Features] = []
        self.release = asyncio.Event()
        self.fail_with: BaseException | None = None

    async def __call__(self, message: Features, ttl_s: float, traceparent: str | None) -> None:
        self.messages.append(message)
        await self.release.wait()
        if self.fail_with is not None:
            raise self.fail_with


# --------------------------------------------------------------------------- the coalescer


async def test_requests_that_arrive_while_a_publish_is_in_flight_travel_as_one_message() -> None:
    publish = GatedPublish()
    coalescer = FeatureCoalescer("iris", publish, max_jobs=64, max_rows=100)
    alone = job()
    first = asyncio.create_task(coalescer.submit(alone, rows(SETOSA)))
    await asyncio.sleep(0.01)
    assert len(publish.messages) == 1  # at once: nothing else waited
    assert publish.messages[0].jobs is None and publish.messages[0].id == alone.id  # a request's own message
    assert publish.messages[0].timings == alone.timings and publish.messages[0].deadline == alone.deadline
    later = [job(rows=2) for _ in range(5)]
    waiting = [asyncio.create_task(coalescer.submit(j, rows(SETOSA, VIRGINICA))) for j in later]
    await asyncio.sleep(0.01)
    assert len(publish.messages) == 1  # they wait for the publish in flight
    publish.release.set()
    await asyncio.gather(first, *waiting)
    assert len(publish.messages) == 2
    second = publish.messages[1]
    assert [j.id for j in second.jobs or []] == [j.id for j in later]
    assert second.tensor.shape == [10, 4]
    assert decode_tensor(second.tensor).tolist()[2:4] == rows(SETOSA, VIRGINICA).tolist()
    assert second.deadline == max(j.deadline for j in later)
    assert (coalescer.messages, coalescer.jobs) == (2, 6)


async def test_a_message_holds_at_most_max_jobs_and_max_rows() -> None:
    publish = GatedPublish()
    coalescer = FeatureCoalescer("iris", publish, max_jobs=3, max_rows=5)
    publish.release.set()
    jobs = [job()] + [job(rows=2) for _ in range(4)] + [job() for _ in range(4)]
    tasks = [asyncio.create_task(coalescer.submit(j, np.repeat(rows(SETOSA), j.rows, axis=0))) for j in jobs]
    await asyncio.gather(*tasks)
    assert all(len(m.jobs or []) <= 3 and m.tensor.shape[0] <= 5 for m in publish.messages)
    published = [j.id for m in publish.messages for j in m.jobs or []] + [m.id for m in publish.messages if m.jobs is None]
    assert sorted(published) == sorted(j.id for j in jobs)
    assert [m.tensor.shape[0] for m in publish.messages] == [5, 5, 3]  # 13 rows, in order, 5 at most


async def test_a_caller_whose_deadline_passed_while_it_waited_is_not_published() -> None:
    publish = GatedPublish()
    coalescer = FeatureCoalescer("iris", publish, max_jobs=64, max_rows=100)
    first = asyncio.create_task(coalescer.submit(job(), rows(SETOSA)))
    await asyncio.sleep(0.01)
    expired = asyncio.create_task(coalescer.submit(job(deadline_s=0.01), rows(SETOSA)))
    alive = job()
    kept = asyncio.create_task(coalescer.submit(alive, rows(VIRGINICA)))
    await asyncio.sleep(0.05)
    publish.release.set()
    with pytest.raises(TimeoutError):
        await expired
    await asyncio.gather(first, kept)
    assert publish.messages[1].id == alive.id and len(publish.messages) == 2


async def test_a_refused_publish_reaches_every_caller_of_its_message() -> None:
    publish = GatedPublish()
    coalescer = FeatureCoalescer("iris", publish, max_jobs=64, max_rows=100)
    publish.fail_with = RuntimeError("broker said no")
    tasks = [asyncio.create_task(coalescer.submit(job(), rows(SETOSA))) for _ in range(4)]
    await asyncio.sleep(0)
    publish.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and str(r) == "broker said no" for r in results)
    # and the coalescer still works afterwards
    publish.fail_with = None
    await coalescer.submit(job(), rows(SETOSA))


async def test_a_caller_that_leaves_does_not_cancel_the_others_publish() -> None:
    publish = GatedPublish()
    coalescer = FeatureCoalescer("iris", publish, max_jobs=64, max_rows=100)
    leaving = asyncio.create_task(coalescer.submit(job(), rows(SETOSA)))
    staying = asyncio.create_task(coalescer.submit(job(), rows(VIRGINICA)))
    await asyncio.sleep(0)
    leaving.cancel()
    publish.release.set()
    await staying
    assert len(publish.messages) == 1 and len(publish.messages[0].jobs or []) == 2  # both went


async def test_the_message_carries_the_first_jobs_trace_and_a_ttl_to_the_latest_deadline() -> None:
    coalescer = FeatureCoalescer("iris", GatedPublish(), max_jobs=64, max_rows=100)

    def waiting(deadline_s: float | None, **kw: object) -> _Waiting:
        return _Waiting(job(deadline_s=deadline_s, **kw), rows(SETOSA), asyncio.get_running_loop().create_future())

    jobs = [waiting(1, traceparent=TRACE), waiting(5)]
    message, ttl_s, trace = coalescer.message_of(jobs)
    assert trace == TRACE and 4 < ttl_s <= 5
    no_deadline = [waiting(None), waiting(5)]
    message, ttl_s, _ = coalescer.message_of(no_deadline)
    assert message.deadline is None and ttl_s == 0.0  # one job may wait for ever: no TTL on the message


async def test_closing_cancels_the_callers_still_waiting() -> None:
    publish = GatedPublish()
    coalescer = FeatureCoalescer("iris", publish, max_jobs=64, max_rows=100)
    tasks = [asyncio.create_task(coalescer.submit(job(), rows(SETOSA))) for _ in range(2)]
    await asyncio.sleep(0.01)
    queued = asyncio.create_task(coalescer.submit(job(), rows(SETOSA)))
    await asyncio.sleep(0.01)
    await coalescer.close()
    results = await asyncio.gather(*tasks, queued, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)


# --------------------------------------------------------------------------- the message


def features_with(jobs: list[JobSlice], array: np.ndarray) -> Features:
    return Features(id=uuid.uuid4(), model="iris", tensor=encode_tensor(array), jobs=jobs)


def test_the_jobs_rows_must_add_up_to_the_tensors_rows() -> None:
    with pytest.raises(ValidationError, match="add up to 3; the tensor has 2"):
        features_with([job(rows=2), job()], rows(SETOSA, VIRGINICA))


def test_a_job_id_may_appear_once() -> None:
    twice = job()
    with pytest.raises(ValidationError, match="appears twice"):
        features_with([twice, twice], rows(SETOSA, VIRGINICA))


@pytest.mark.parametrize("bad", [{"rows": 0}, {"traceparent": "not-a-trace"}])
def test_a_bad_job_slice_is_refused(bad: dict) -> None:
    with pytest.raises(ValidationError):
        JobSlice(id=uuid.uuid4(), created_at=utc_now(), **{"rows": 1, **bad})


def test_an_outcomes_reply_splits_into_its_answers() -> None:
    answer = Prediction(id=uuid.uuid4(), model="iris", model_version="1",
                        rows=[RowPrediction(label="setosa", class_index=0, probabilities=[1.0, 0.0, 0.0])])
    failure = Failure(id=uuid.uuid4(), model="iris", stage="predict", code=FailureCode.INVALID_MESSAGE, message="x")
    body = Outcomes(id=uuid.uuid4(), model="iris", items=[answer, failure]).model_dump_json().encode()
    assert [a.id for a in decode_reply(body)] == [answer.id, failure.id]
    assert [a.id for a in decode_reply(answer.model_dump_json().encode())] == [answer.id]
    with pytest.raises(ValidationError):
        decode_reply(b'{"kind": "outcomes", "id": "' + str(uuid.uuid4()).encode() + b'", "model": "iris", "items": []}')


# --------------------------------------------------------------------------- the predict stage


@pytest.fixture
async def predict() -> PredictStage:
    stage = PredictStage("predict", ModelRegistry(MODELS_DIR), ["iris"], max_batch_delay_ms=0, max_rows=10)
    await stage.start()
    yield stage
    await stage.stop()


async def test_each_job_gets_its_own_answer_with_its_own_rows_id_and_trace(predict: PredictStage) -> None:
    jobs = [job(rows=2, traceparent=TRACE), job()]
    outputs = await predict.handle(features_with(jobs, rows(SETOSA, VIRGINICA, VIRGINICA)))
    assert [o.body.id for o in outputs] == [j.id for j in jobs]
    assert [[r.label for r in o.body.rows] for o in outputs] == [["setosa", "virginica"], ["virginica"]]
    assert [o.traceparent for o in outputs] == [TRACE, None]
    assert all(o.routing_key == "prediction.iris" and o.final for o in outputs)
    assert outputs[0].body.timings == {"preprocess_ms": 0.1}  # the job's own, not the message's
    assert outputs[0].body.created_at == jobs[0].created_at and outputs[0].body.deadline == jobs[0].deadline


async def test_a_job_with_bad_rows_or_a_passed_deadline_fails_alone(predict: PredictStage) -> None:
    bad, late, good = job(), job(deadline_s=-1), job()
    array = rows([float("nan")] * 4, SETOSA, VIRGINICA)
    outputs = await predict.handle(features_with([bad, late, good], array))
    by_id = {o.body.id: o.body for o in outputs}
    assert isinstance(by_id[bad.id], Failure) and by_id[bad.id].code == FailureCode.INVALID_MESSAGE
    assert "NaN" in by_id[bad.id].message
    assert isinstance(by_id[late.id], Failure) and by_id[late.id].code == FailureCode.DEADLINE_EXCEEDED
    assert isinstance(by_id[good.id], Prediction) and by_id[good.id].rows[0].label == "virginica"


async def test_a_message_over_the_row_limit_fails_every_job(predict: PredictStage) -> None:
    jobs = [job(rows=6), job(rows=6)]
    with pytest.raises(InputError, match="12 rows, more than the limit of 10"):
        await predict.handle(features_with(jobs, np.repeat(rows(SETOSA), 12, axis=0)))
    failures = predict.failures(features_with(jobs, np.repeat(rows(SETOSA), 12, axis=0)),
                                FailureCode.TOO_LARGE, "too many")
    assert [f.body.id for f in failures] == [j.id for j in jobs]
    assert all(f.routing_key == "failure.iris" for f in failures)
