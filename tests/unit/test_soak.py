"""The soak report's growth flags (pure)."""

from __future__ import annotations

from toposerve.deploy.soak import SoakInterval, growth_flags


def interval(at: float, rss: float, depth: int) -> SoakInterval:
    return SoakInterval(at_s=at, sent=10, completed=10, errors=0, throughput_rps=1, p50_ms=1, p99_ms=2,
                        rss_mib={"predict[0]": rss}, queue_depths={"predict": depth})


def test_steady_memory_and_queues_are_not_flagged() -> None:
    assert growth_flags([interval(i, 100 + (i % 2), 0) for i in range(8)]) == []


def test_growing_memory_and_a_growing_queue_are_flagged() -> None:
    flags = growth_flags([interval(i, 100 + 10 * i, 50 * i) for i in range(8)])
    assert any("RSS of predict[0] grew" in f for f in flags)
    assert any("queue predict kept growing" in f for f in flags)


def test_too_short_a_run_flags_nothing() -> None:
    assert growth_flags([interval(i, 100 * (i + 1), 1000 * i) for i in range(3)]) == []
