"""The telemetry spool: durable, bounded, crash-tolerant, shared safely between processes."""

from __future__ import annotations

import multiprocessing
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from toposerve.brokers.telemetry_messages import N_LATENCY_BUCKETS, LatencyStats, Telemetry
from toposerve.producers.edge_spool import Spool, carry_dropped


def report(predictions: int = 1, model: str = "digits_fast") -> Telemetry:
    buckets = [0] * N_LATENCY_BUCKETS
    buckets[0] = predictions
    now = datetime.now(UTC)
    return Telemetry(id=uuid.uuid4(), model=model, client_id="edge-1", model_version="1", window_start=now,
                     window_end=now, predictions=predictions, labels={"3": predictions} if predictions else {},
                     latency_ms=LatencyStats(count=predictions, sum_ms=0.5 * predictions,
                                             max_ms=0.5 if predictions else 0, buckets=buckets))


def test_append_pending_remove(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "digits_fast")
    first, second, third = (spool.append(report()) for _ in range(3))
    assert [r.id for r in spool.pending()] == [first.id, second.id, third.id]
    # Only what the broker confirmed goes; the rest stays, in order.
    assert spool.remove({first.id, third.id, uuid.uuid4()}) == 2
    assert [r.id for r in spool.pending()] == [second.id]
    # A new Spool object (a restarted client) sees the same reports.
    assert [r.id for r in Spool(tmp_path, "digits_fast").pending()] == [second.id]


def test_a_full_spool_drops_the_oldest_and_says_so(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "digits_fast", max_reports=3)
    olds = [spool.append(report(predictions=2)) for _ in range(3)]
    newest = spool.append(report(predictions=1))
    pending = spool.pending()
    assert [r.id for r in pending] == [olds[1].id, olds[2].id, newest.id]
    assert newest.dropped_reports == 1 and newest.dropped_predictions == 2
    assert pending[-1].dropped_reports == 1  # what is on disk carries it too
    # Dropping a report that itself carried drops carries those as well.
    spool.append(report())
    spool.append(report())
    last = spool.append(report())  # displaces `newest`, which carried one drop already
    assert last.dropped_reports == 2
    total = sum(r.dropped_reports for r in spool.pending())
    assert spool.stats().dropped_total == 4 and total == 4
    assert spool.stats().pending == 3


def test_carry_dropped_is_transitive() -> None:
    older = carry_dropped(report(predictions=5), [report(predictions=2)])
    assert (older.dropped_reports, older.dropped_predictions) == (1, 2)
    newest = carry_dropped(report(), [older])
    assert (newest.dropped_reports, newest.dropped_predictions) == (2, 7)


def test_a_line_cut_by_a_crash_is_skipped_and_the_next_append_is_whole(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "digits_fast")
    kept = spool.append(report())
    with spool.path.open("ab") as handle:  # a crash in the middle of an append
        handle.write(report().model_dump_json().encode()[:40])
    after = spool.append(report())
    assert [r.id for r in spool.pending()] == [kept.id, after.id]
    assert spool.remove({kept.id}) == 1
    assert [r.id for r in spool.pending()] == [after.id]
    assert spool.path.read_bytes().count(b"\n") == 1  # the broken line went with the rewrite


def test_a_report_of_another_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not belong"):
        Spool(tmp_path, "digits_fast").append(report(model="iris"))
    with pytest.raises(ValueError, match="not a model name"):
        Spool(tmp_path, "../x")


def _append_many(directory: str, count: int) -> None:
    spool = Spool(Path(directory), "digits_fast", max_reports=10_000)
    for _ in range(count):
        spool.append(report())


def test_processes_appending_at_once_lose_nothing(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_many, args=(str(tmp_path), 25)) for _ in range(4)]
    for worker in workers:
        worker.start()
    spool = Spool(tmp_path, "digits_fast", max_reports=10_000)
    removed = 0
    while any(w.is_alive() for w in workers):  # a drain racing the appends
        removed += spool.remove({r.id for r in spool.pending()[:5]})
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0
    assert removed + len(spool.pending()) == 100
