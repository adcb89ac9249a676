"""Edge telemetry without services: the message, what a report adds, the summary, windows, topic matching."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from toposerve.api.edge_routes import etag_matches, serves_edge, strong_etag
from toposerve.brokers.telemetry_messages import (
    LATENCY_BUCKETS_MS,
    N_LATENCY_BUCKETS,
    LatencyStats,
    Telemetry,
    latency_bucket,
)
from toposerve.brokers.telemetry_store import histogram_quantile, report_delta, summarize
from toposerve.brokers.topic import topic_matches
from toposerve.brokers.topology import QueueSpec
from toposerve.consumers.telemetry import check_report
from toposerve.models.preprocessing import InputError
from toposerve.producers.edge_telemetry import TelemetryWindow

START = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def report(**changes) -> Telemetry:
    buckets = [0] * N_LATENCY_BUCKETS
    buckets[latency_bucket(3.0)] = 3
    fields = dict(id=uuid.uuid4(), model="digits_fast", client_id="edge-1", model_version="1",
                  window_start=START, window_end=START + timedelta(minutes=1), predictions=3, errors=1,
                  labels={"3": 2, "7": 1}, latency_ms=LatencyStats(count=3, sum_ms=9.0, max_ms=3.5, buckets=buckets))
    fields.update(changes)
    return Telemetry(**fields)


def test_a_report_must_add_up() -> None:
    assert report().kind == "telemetry"
    with pytest.raises(ValidationError, match="labels add up to 3, but predictions is 4"):
        report(predictions=4)
    with pytest.raises(ValidationError, match="window_end is before window_start"):
        report(window_end=START - timedelta(seconds=1))
    with pytest.raises(ValidationError, match="buckets add up to 0, but count is 3"):
        LatencyStats(count=3, sum_ms=1, max_ms=1)
    with pytest.raises(ValidationError, match=f"buckets must have {N_LATENCY_BUCKETS} counts"):
        LatencyStats(count=0, buckets=[0])
    with pytest.raises(ValidationError, match="client_id"):
        report(client_id="../etc")


def test_latency_buckets_are_inclusive_upper_bounds() -> None:
    assert latency_bucket(0.2) == 0 and latency_bucket(1.0) == 0 and latency_bucket(1.01) == 1
    assert latency_bucket(LATENCY_BUCKETS_MS[-1] + 1) == len(LATENCY_BUCKETS_MS)


def test_histogram_quantiles_interpolate_and_never_pass_the_max() -> None:
    buckets = [0] * N_LATENCY_BUCKETS
    buckets[3] = 100  # all in (5, 10]
    assert histogram_quantile(0.5, buckets, max_ms=8.0) == pytest.approx(6.5)
    assert histogram_quantile(0.99, buckets, max_ms=8.0) <= 8.0
    assert histogram_quantile(0.5, [0] * N_LATENCY_BUCKETS, max_ms=0) is None
    slow = [0] * N_LATENCY_BUCKETS
    slow[-1] = 1
    assert histogram_quantile(0.5, slow, max_ms=9000.0) == pytest.approx(
        LATENCY_BUCKETS_MS[-1] + (9000.0 - LATENCY_BUCKETS_MS[-1]) / 2)


def test_report_delta_and_summary_agree() -> None:
    one = report()
    delta = report_delta(one)
    assert delta.incr["reports"] == 1 and delta.incr["predictions"] == 3 and delta.incr["errors"] == 1
    assert delta.incr["label:3"] == 2 and delta.incr["version:1"] == 3
    assert "dropped_reports" not in delta.incr  # zero counts are left out
    # The hash after this one report, as the Lua script leaves it:
    fields = {name: str(n) for name, n in delta.incr.items()}
    fields.update({name: repr(v) for name, v in {**delta.incrfloat, **delta.max, **delta.min}.items()})
    fields["client:edge-1:version"] = "1"
    summary = summarize("digits_fast", fields, ttl_s=100)
    assert summary.reports == 1 and summary.predictions == 3 and summary.errors == 1
    assert summary.labels == {"3": 2, "7": 1} and summary.versions == {"1": 3}
    assert summary.latency_ms.count == 3 and summary.latency_ms.mean_ms == 3.0 and summary.latency_ms.max_ms == 3.5
    assert summary.latency_ms.p50_ms is not None and summary.latency_ms.p50_ms <= 3.5
    assert summary.window_start == START and summary.window_end == START + timedelta(minutes=1)
    client = summary.clients["edge-1"]
    assert client.predictions == 3 and client.reports == 1 and client.model_version == "1"
    assert client.last_seen == START + timedelta(minutes=1)
    assert summary.expires_in_s == 100


def test_an_empty_aggregate_summarizes_to_zeros() -> None:
    summary = summarize("digits_fast", {}, ttl_s=-2)  # -2: Redis' "no such key"
    assert summary.reports == 0 and summary.labels == {} and summary.latency_ms.p50_ms is None
    assert summary.expires_in_s is None


def test_reports_are_checked_against_the_model() -> None:
    manifest = SimpleNamespace(labels=[str(i) for i in range(10)])
    check_report(report(), {"digits_fast": manifest})  # type: ignore[dict-item]
    with pytest.raises(InputError, match="not served here"):
        check_report(report(model="iris"), {"digits_fast": manifest})  # type: ignore[dict-item]
    with pytest.raises(InputError, match=r"labels \['cat'\]"):
        check_report(report(labels={"cat": 3}), {"digits_fast": manifest})  # type: ignore[dict-item]


def test_window_makes_a_consistent_report() -> None:
    window = TelemetryWindow("digits_fast", "1", "a" * 64, started=START)
    assert window.empty
    window.record(["3"], 2.0)
    window.record(["3", "5"], 700.0)
    window.record_error()
    made = window.to_report("edge-1", ended=START + timedelta(seconds=5))
    assert made.predictions == 3 and made.errors == 1 and made.labels == {"3": 2, "5": 1}
    assert made.latency_ms.count == 3 and made.latency_ms.max_ms == 700.0 and made.latency_ms.sum_ms == 1402.0
    assert made.model_sha256 == "a" * 64


@pytest.mark.parametrize(("pattern", "key", "matches"), [
    ("telemetry.*", "telemetry.digits_fast", True),
    ("telemetry.digits_fast", "telemetry.digits_fast", True),
    ("telemetry.iris", "telemetry.digits_fast", False),
    ("#", "telemetry.digits_fast", True),
    ("telemetry.#", "telemetry", True),
    ("*.digits_fast", "telemetry.digits_fast", True),
    ("request.*", "telemetry.digits_fast", False),
    ("*", "telemetry.digits_fast", False),
    ("#.fast", "telemetry.digits_fast", False),
])
def test_topic_matching(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches


def test_edge_routes_answer_only_where_telemetry_is_consumed() -> None:
    def ingress(*keys: str) -> SimpleNamespace:
        return SimpleNamespace(config=SimpleNamespace(queues=[QueueSpec(name="q", binding_keys=list(keys))]))

    assert serves_edge(ingress("telemetry.*"), "digits_fast")  # type: ignore[arg-type]
    assert not serves_edge(ingress("request.*", "failure.*"), "digits_fast")  # type: ignore[arg-type]


def test_if_none_match() -> None:
    etag = strong_etag("ab" * 32)
    assert etag_matches(etag, etag) and etag_matches(f'"x", W/{etag}', etag) and etag_matches("*", etag)
    assert not etag_matches(None, etag) and not etag_matches('"other"', etag) and not etag_matches("", etag)
