"""Micro-batching: rows of many messages for one model run as one ONNX call.

Each model has a queue and one loop. The loop takes the first waiting request,
then keeps collecting until ``max_batch_size`` rows or ``max_batch_delay_ms`` has
passed, runs the batch on a worker thread, and hands each request its rows.
While a batch runs, new requests pile up, so under load batches grow by
themselves even with a delay of 0 (as Triton's dynamic batcher does).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from toposerve.brokers import stop_task

log = logging.getLogger(__name__)

RunBatch = Callable[[str, np.ndarray], tuple[np.ndarray, np.ndarray]]

# A run this short holds the event loop for less than the hop to the worker thread costs.
INLINE_BUDGET_S = 0.0002
UNCALIBRATED_INLINE_ROWS = 8


def inline_rows(one_row_s: float, full_batch_s: float, max_rows: int, budget_s: float) -> int:
    """Pure: the most rows whose run fits ``budget_s``, by a straight line through the two
    measured runs (1 row, ``max_rows`` rows); 0 when even one row does not fit."""
    if one_row_s > budget_s:
        return 0
    if max_rows <= 1 or full_batch_s <= budget_s:
        return max_rows
    per_row = (full_batch_s - one_row_s) / (max_rows - 1)
    return min(max_rows, 1 + int((budget_s - one_row_s) / per_row))


@dataclass
class _Pending:
    features: np.ndarray
    future: asyncio.Future = field(repr=False)


@dataclass
class BatchStats:
    batches: int = 0
    rows: int = 0
    largest: int = 0


class MicroBatcher:
    def __init__(
        self, run_batch: RunBatch, max_batch_size: int = 64, max_batch_delay_ms: float = 2.0,
        inline_max_rows: int | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        # A batch whose run costs less than the hop to the worker thread (~0.3 ms here: a
        # wake-up, the GIL handed over and back) runs on the event loop itself. How many rows
        # that is depends on the model (iris: all 64 in 8 us; digits_accurate: 4 of them), so
        # it is measured per model (``calibrate``); an uncalibrated model inlines up to
        # UNCALIBRATED_INLINE_ROWS. ``inline_max_rows`` caps both (0: always the thread).
        self.inline_max_rows = max_batch_size if inline_max_rows is None else inline_max_rows
        self.inline_rows: dict[str, int] = {}
        self.max_batch_delay_s = max_batch_delay_ms / 1000
        self.stats = BatchStats()
        # Called with the rows of each ONNX run (a Prometheus histogram's ``observe``).
        self.observe_batch: Callable[[int], None] | None = None
        self._queues: dict[str, asyncio.Queue[_Pending]] = {}
        # A request that did not fit the last batch opens the next one.
        self._carry: dict[str, _Pending] = {}
        self._closed = False
        self._loops: dict[str, asyncio.Task] = {}
        self._running: set[str] = set()  # models whose batch loop is between taking and answering a batch
        self._ran_this_turn: set[str] = set()  # models a request ran inline for in this turn of the loop
        # One thread: batches for one process run one after another, which is what
        # lets the next batch fill up while this one runs.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx")

    def calibrate(self, model: str, one_row_s: float, full_batch_s: float) -> int:
        """Record what ``model`` costs (one row, ``max_batch_size`` rows); returns its inline rows."""
        self.inline_rows[model] = inline_rows(one_row_s, full_batch_s, self.max_batch_size, INLINE_BUDGET_S)
        return self.inline_rows[model]

    def runs_inline(self, model: str, rows: int) -> bool:
        return rows <= min(self.inline_max_rows, self.inline_rows.get(model, UNCALIBRATED_INLINE_ROWS))

    async def submit(self, model: str, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class indices and probabilities for ``features`` (its rows), once its batch has run."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        queue = self._queues.get(model)
        if queue is None:
            queue = self._queues[model] = asyncio.Queue()
            self._loops[model] = asyncio.create_task(self._loop(model, queue), name=f"batcher-{model}")
        if self.max_batch_delay_s == 0 and queue.empty() and model not in self._running \
                and model not in self._carry and model not in self._ran_this_turn \
                and self.runs_inline(model, len(features)):
            # No delay to wait out, nothing to batch with, and the run is cheap: run it now, in
            # the caller's turn of the event loop (no hand-over to the batch loop and back: a
            # quarter of a millisecond at one caller). Once per turn: the other requests of a
            # burst (deliveries arrive many per turn) queue up and run as one batch.
            self._ran_this_turn.add(model)
            asyncio.get_running_loop().call_soon(self._ran_this_turn.discard, model)
            result = self.run_batch(model, features)
            self._count(features)
            return result
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await queue.put(_Pending(features, future))
        return await future

    async def close(self) -> None:
        self._closed = True
        await asyncio.gather(*(stop_task(task) for task in self._loops.values()))
        # Nobody will run what is still waiting: tell its callers instead of leaving them hanging.
        closed = RuntimeError("the batcher closed before this request ran")
        for pending in self._carry.values():
            _set_exception(pending, closed)
        for queue in self._queues.values():
            while not queue.empty():
                _set_exception(queue.get_nowait(), closed)
        self._executor.shutdown(wait=True)

    async def _collect(self, model: str, queue: asyncio.Queue[_Pending]) -> list[_Pending]:
        carried = self._carry.pop(model, None)
        batch = [carried if carried is not None else await queue.get()]
        rows = len(batch[0].features)
        loop = asyncio.get_running_loop()
        until = loop.time() + self.max_batch_delay_s
        while rows < self.max_batch_size:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = until - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    break
            if rows + len(item.features) > self.max_batch_size:
                self._carry[model] = item  # never overshoot the cap; it starts the next batch
                break
            batch.append(item)
            rows += len(item.features)
        return batch

    async def _loop(self, model: str, queue: asyncio.Queue[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect(model, queue)
            self._running.add(model)
            try:
                await self._run(model, batch, loop)
            finally:
                self._running.discard(model)

    async def _run(self, model: str, batch: list[_Pending], loop: asyncio.AbstractEventLoop) -> None:
        try:
            features = batch[0].features if len(batch) == 1 else np.concatenate([p.features for p in batch])
            if self.runs_inline(model, len(features)):
                labels, probabilities = self.run_batch(model, features)
            else:
                labels, probabilities = await loop.run_in_executor(self._executor, self.run_batch, model, features)
        except Exception as exc:
            if len(batch) == 1:
                _set_exception(batch[0], exc)
                return
            # One bad request must not fail its neighbours: run each on its own.
            for pending in batch:
                try:
                    result = await loop.run_in_executor(self._executor, self.run_batch, model, pending.features)
                except Exception as single_exc:
                    _set_exception(pending, single_exc)
                else:
                    _set_result(pending, result)
            return
        self._count(features)
        start = 0
        for pending in batch:
            end = start + len(pending.features)
            _set_result(pending, (labels[start:end], probabilities[start:end]))
            start = end

    def _count(self, features: np.ndarray) -> None:
        self.stats.batches += 1
        self.stats.rows += len(features)
        self.stats.largest = max(self.stats.largest, len(features))
        if self.observe_batch is not None:
            self.observe_batch(len(features))


def _set_result(pending: _Pending, result: tuple[np.ndarray, np.ndarray]) -> None:
    if not pending.future.done():
        pending.future.set_result(result)


def _set_exception(pending: _Pending, exc: BaseException) -> None:
    if not pending.future.done():
        pending.future.set_exception(exc)
