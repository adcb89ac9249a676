"""consumers/batching.py: MicroBatcher runs the rows of many requests as one call."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from toposerve.consumers.batching import INLINE_BUDGET_S, UNCALIBRATED_INLINE_ROWS, MicroBatcher, inline_rows

MARKER = -999.0  # a row holding this value makes the fake model raise


class FakeModel:
    """Stands in for ONNX: class index = int(first column), probabilities = the row itself."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls: list[tuple[str, np.ndarray]] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s
        self._lock = threading.Lock()

    def __call__(self, model: str, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            self.calls.append((model, features.copy()))
            self.threads.add(threading.current_thread().name)
        if self.delay_s:
            threading.Event().wait(self.delay_s)
        if (features == MARKER).any():
            raise ValueError(f"bad row in a batch of {len(features)}")
        return features[:, 0].astype(np.int64), features.astype(np.float32)

    def sizes(self, model: str | None = None) -> list[int]:
        return [len(f) for m, f in self.calls if model is None or m == model]


def rows(*first_values: float, width: int = 3) -> np.ndarray:
    """One row per value; the row's first column is the value, the rest identify it too."""
    return np.array([[v] + [v + 0.5] * (width - 1) for v in first_values], dtype=np.float32)


@pytest.fixture
async def make_batcher():
    made: list[MicroBatcher] = []

    def make(run, **knobs) -> MicroBatcher:
        # Off the event loop unless a test asks otherwise: these tests time and thread the runs.
        knobs.setdefault("inline_max_rows", 0)
        batcher = MicroBatcher(run, **knobs)
        made.append(batcher)
        return batcher

    yield make
    for batcher in made:
        await asyncio.wait_for(batcher.close(), 5)


async def test_concurrent_submits_within_the_delay_run_as_one_batch(make_batcher) -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=64, max_batch_delay_ms=100)
    inputs = [rows(i) for i in range(5)]
    results = await asyncio.wait_for(asyncio.gather(*(batcher.submit("iris", x) for x in inputs)), 5)
    assert model.sizes() == [5]
    for i, (labels, probabilities) in enumerate(results):
        assert labels.tolist() == [i]
        np.testing.assert_array_equal(probabilities, inputs[i])
    assert (batcher.stats.batches, batcher.stats.rows, batcher.stats.largest) == (1, 5, 5)


async def test_staggered_submits_within_the_delay_still_share_a_batch(make_batcher) -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=64, max_batch_delay_ms=200)

    async def late(value: float, after_s: float):
        await asyncio.sleep(after_s)
        return await batcher.submit("iris", rows(value))

    results = await asyncio.wait_for(asyncio.gather(late(0, 0), late(1, 0.02), late(2, 0.05)), 5)
    assert model.sizes() == [3]
    assert [labels.tolist() for labels, _ in results] == [[0], [1], [2]]


async def test_multi_row_requests_get_their_own_rows_back_in_order(make_batcher) -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=64, max_batch_delay_ms=100)
    inputs = [rows(1, 2, 3), rows(10), rows(20, 21), rows(30, 31, 32, 33)]
    results = await asyncio.wait_for(asyncio.gather(*(batcher.submit("iris", x) for x in inputs)), 5)
    assert model.sizes() == [10]
    np.testing.assert_array_equal(model.calls[0][1], np.concatenate(inputs))
    for x, (labels, probabilities) in zip(inputs, results, strict=True):
        assert labels.tolist() == x[:, 0].astype(int).tolist()
        np.testing.assert_array_equal(probabilities, x)


async def test_max_batch_size_caps_a_batch(make_batcher) -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=4, max_batch_delay_ms=100)
    inputs = [rows(i) for i in range(10)]
    results = await asyncio.wait_for(asyncio.gather(*(batcher.submit("iris", x) for x in inputs)), 5)
    assert model.sizes() == [4, 4, 2]
    assert [labels.tolist() for labels, _ in results] == [[i] for i in range(10)]
    assert batcher.stats.largest == 4


async def test_a_single_request_larger_than_the_cap_still_runs(make_batcher) -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=2, max_batch_delay_ms=0)
    labels, _ = await asyncio.wait_for(batcher.submit("iris", rows(*range(5))), 5)
    assert labels.tolist() == [0, 1, 2, 3, 4]
    assert model.sizes() == [5]


async def test_multi_row_requests_do_not_overshoot_the_cap(make_batcher) -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=4, max_batch_delay_ms=100)
    await asyncio.wait_for(asyncio.gather(*(batcher.submit("iris", rows(i, i, i)) for i in range(3))), 5)
    assert max(model.sizes()) <= 4


async def test_a_failing_request_fails_alone_and_its_neighbours_get_results(make_batcher) -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=64, max_batch_delay_ms=100)
    inputs = [rows(1), rows(2, MARKER), rows(3, 4)]
    results = await asyncio.wait_for(
        asyncio.gather(*(batcher.submit("iris", x) for x in inputs), return_exceptions=True), 5
    )
    assert isinstance(results[1], ValueError)
    assert "bad row" in str(results[1])
    assert results[0][0].tolist() == [1]
    assert results[2][0].tolist() == [3, 4]
    np.testing.assert_array_equal(results[2][1], inputs[2])
    # One batch that failed, then each request on its own.
    assert model.sizes() == [5, 1, 2, 2]


async def test_a_failing_lone_request_gets_its_exception(make_batcher) -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_delay_ms=0)
    with pytest.raises(ValueError, match="bad row"):
        await asyncio.wait_for(batcher.submit("iris", rows(MARKER)), 5)
    # The loop survives and serves the next request.
    labels, _ = await asyncio.wait_for(batcher.submit("iris", rows(7)), 5)
    assert labels.tolist() == [7]


async def test_requests_that_cannot_be_concatenated_are_run_one_by_one(make_batcher) -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_delay_ms=100)
    narrow, wide = rows(1, width=3), rows(2, width=5)
    results = await asyncio.wait_for(asyncio.gather(batcher.submit("iris", narrow), batcher.submit("iris", wide)), 5)
    assert [labels.tolist() for labels, _ in results] == [[1], [2]]
    assert model.sizes() == [1, 1]


async def test_two_models_batch_separately(make_batcher) -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=64, max_batch_delay_ms=100)
    submits = [batcher.submit("iris", rows(1)), batcher.submit("digits_fast", rows(100, width=64)),
               batcher.submit("iris", rows(2)), batcher.submit("digits_fast", rows(101, width=64)),
               batcher.submit("iris", rows(3))]
    results = await asyncio.wait_for(asyncio.gather(*submits), 5)
    assert [labels.tolist() for labels, _ in results] == [[1], [100], [2], [101], [3]]
    assert sorted(m for m, _ in model.calls) == ["digits_fast", "iris"]
    assert model.sizes("iris") == [3] and model.sizes("digits_fast") == [2]
    for name, features in model.calls:
        assert features.shape[1] == (64 if name == "digits_fast" else 3)


async def test_batches_run_off_the_event_loop_thread(make_batcher) -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_delay_ms=0)
    await asyncio.wait_for(batcher.submit("iris", rows(1)), 5)
    assert threading.current_thread().name not in model.threads
    assert all(name.startswith("onnx") for name in model.threads)


async def test_requests_pile_up_while_a_batch_runs(make_batcher) -> None:
    # Delay 0: the first request runs alone; the ones that arrive meanwhile form the next batch.
    model = FakeModel(delay_s=0.2)
    batcher = make_batcher(model, max_batch_size=64, max_batch_delay_ms=0)
    first = asyncio.create_task(batcher.submit("iris", rows(0)))
    await asyncio.sleep(0.05)
    later = [asyncio.create_task(batcher.submit("iris", rows(i))) for i in range(1, 6)]
    results = await asyncio.wait_for(asyncio.gather(first, *later), 5)
    assert model.sizes() == [1, 5]
    assert [labels.tolist() for labels, _ in results] == [[i] for i in range(6)]


async def test_close_ends_the_loops_cleanly() -> None:
    model = FakeModel()
    batcher = MicroBatcher(model, max_batch_delay_ms=0, inline_max_rows=0)
    await asyncio.wait_for(batcher.submit("iris", rows(1)), 5)
    await asyncio.wait_for(batcher.submit("digits_fast", rows(2)), 5)
    loops = list(batcher._loops.values())
    assert loops and not any(task.done() for task in loops)
    await asyncio.wait_for(batcher.close(), 5)
    assert all(task.done() for task in loops)
    # The worker thread is gone too.
    workers = list(batcher._executor._threads)
    assert workers and not any(thread.is_alive() for thread in workers)


async def test_close_without_any_submit() -> None:
    await asyncio.wait_for(MicroBatcher(FakeModel()).close(), 5)


async def test_a_cancelled_caller_does_not_break_the_batch(make_batcher) -> None:
    model = FakeModel(delay_s=0.1)
    batcher = make_batcher(model, max_batch_delay_ms=50)
    doomed = asyncio.create_task(batcher.submit("iris", rows(1)))
    kept = asyncio.create_task(batcher.submit("iris", rows(2)))
    await asyncio.sleep(0.08)  # both collected, batch running
    doomed.cancel()
    labels, _ = await asyncio.wait_for(kept, 5)
    assert labels.tolist() == [2]
    with pytest.raises(asyncio.CancelledError):
        await doomed
    labels, _ = await asyncio.wait_for(batcher.submit("iris", rows(3)), 5)
    assert labels.tolist() == [3]


async def test_small_batches_run_inline_and_large_ones_on_the_worker_thread(make_batcher) -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_delay_ms=0, inline_max_rows=2)
    await asyncio.wait_for(batcher.submit("iris", rows(1, 2)), 5)
    assert model.threads == {threading.current_thread().name}
    await asyncio.wait_for(batcher.submit("iris", rows(1, 2, 3)), 5)
    assert len(model.threads) == 2 and any(name.startswith("onnx") for name in model.threads)


def test_inline_rows_follow_the_measured_cost_of_the_model() -> None:
    budget = INLINE_BUDGET_S
    # iris-like: 64 rows in 8 us, every batch fits the budget
    assert inline_rows(5e-6, 8e-6, 64, budget) == 64
    # digits_accurate-like: 127 us for one row, 1141 us for 64: 16 us per further row, 5 fit 200 us
    assert inline_rows(127e-6, 1141e-6, 64, budget) == 5
    # a model slower than the budget on one row never runs on the event loop
    assert inline_rows(250e-6, 3e-3, 64, budget) == 0
    assert inline_rows(1e-6, 1e-6, 1, budget) == 1


async def test_a_calibrated_model_inlines_its_cheap_batches_and_threads_its_dear_ones(make_batcher) -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_delay_ms=0, inline_max_rows=None, max_batch_size=64)
    assert batcher.calibrate("cheap", 5e-6, 8e-6) == 64
    assert batcher.calibrate("dear", 127e-6, 1141e-6) == 5
    assert batcher.runs_inline("cheap", 64) and batcher.runs_inline("dear", 5)
    assert not batcher.runs_inline("dear", 6)
    assert batcher.runs_inline("uncalibrated", UNCALIBRATED_INLINE_ROWS)
    assert not batcher.runs_inline("uncalibrated", UNCALIBRATED_INLINE_ROWS + 1)
    await asyncio.wait_for(batcher.submit("cheap", rows(*range(20))), 5)
    assert model.threads == {threading.current_thread().name}
    await asyncio.wait_for(batcher.submit("dear", rows(*range(6))), 5)
    assert any(name.startswith("onnx") for name in model.threads)
    batcher.inline_max_rows = 0  # the cap holds over a calibration: always the thread
    assert not batcher.runs_inline("cheap", 1)


async def test_a_lone_cheap_request_runs_in_its_callers_turn_without_the_batch_loop(make_batcher) -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_delay_ms=0, inline_max_rows=None)
    batcher.calibrate("iris", 5e-6, 8e-6)
    task = asyncio.ensure_future(batcher.submit("iris", rows(1)))
    await asyncio.sleep(0)  # one turn of the loop: the task's first step ran the model
    assert task.done() and task.result()[0].tolist() == [1]
    assert batcher.stats.batches == 1 and batcher.stats.rows == 1
    delayed = make_batcher(FakeModel(), max_batch_delay_ms=5, inline_max_rows=None)
    delayed.calibrate("iris", 5e-6, 8e-6)
    waiting = asyncio.ensure_future(delayed.submit("iris", rows(1)))
    await asyncio.sleep(0)
    assert not waiting.done()  # a delay is the profile's to wait out, for companions to join
    assert (await asyncio.wait_for(waiting, 5))[0].tolist() == [1]


async def test_a_burst_of_cheap_requests_in_one_turn_runs_as_one_batch_after_the_first(make_batcher) -> None:
    """The inline shortcut is taken once per turn of the loop: the rest of a burst (deliveries
    arrive many per turn) queue up and run together, as batching promises."""
    model = FakeModel()
    batcher = make_batcher(model, max_batch_delay_ms=0, inline_max_rows=None)
    batcher.calibrate("iris", 5e-6, 8e-6)
    results = await asyncio.wait_for(asyncio.gather(*(batcher.submit("iris", rows(i)) for i in range(10))), 5)
    assert [labels.tolist() for labels, _ in results] == [[i] for i in range(10)]
    assert model.sizes("iris") == [1, 9]  # the first alone, at once; the other nine as one batch
