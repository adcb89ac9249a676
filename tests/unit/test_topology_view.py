"""The operator's view without servers: the graph of each profile, stage reports, rates, percentiles and flags."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from toposerve.api.topology_graph import queue_node_id, stage_node_id, topology_graph
from toposerve.api.topology_live import (
    QueueFigures,
    Sample,
    StageTotals,
    growing,
    histogram_delta,
    live_view,
    management_api,
    quantile,
    totals_by_stage,
)
from toposerve.api.ui_routes import page
from toposerve.brokers import Settings
from toposerve.brokers.stage_reports import HistogramCounts, StageReport
from toposerve.consumers import StageMetricSet
from toposerve.consumers.stage_report import report_of
from toposerve.deploy.components import ingress_config
from toposerve.deploy.profile import available_profiles, load_profile

NS = "t"


def graph_of(name: str):
    profile = load_profile(name)
    return profile, topology_graph(ingress_config(profile, Settings(namespace=NS)), NS)


@pytest.mark.parametrize("name", available_profiles())
def test_every_queue_and_stage_of_a_profile_is_a_node_bound_by_its_keys(name: str) -> None:
    profile, graph = graph_of(name)
    ids = {node.id for node in graph.nodes}
    for spec in profile.queue_specs(NS):
        assert queue_node_id(spec.name) in ids
        binding = [e for e in graph.edges if e.target == queue_node_id(spec.name) and e.kind == "binding"]
        assert len(binding) == 1 and binding[0].keys == spec.binding_keys
    for stage, spec in profile.stages.items():
        node = next(n for n in graph.nodes if n.id == stage_node_id(stage))
        assert node.replicas == spec.replicas
    # Every edge joins two nodes that exist, and nodes do not overlap.
    assert all(e.source in ids and e.target in ids for e in graph.edges)
    assert len({(n.x, n.y) for n in graph.nodes}) == len(graph.nodes)


def test_the_prediction_cache_and_a_group_join_are_drawn() -> None:
    _, cached = graph_of("prediction_cache")
    assert "store:prediction cache" in {n.id for n in cached.nodes}
    _, group = graph_of("horizontal_microservice")
    assert {"store:joins", "stage:aggregate", "stage:predict_setosa"} <= {n.id for n in group.nodes}


def test_a_stage_report_holds_what_its_registry_counted() -> None:
    metrics = StageMetricSet(CollectorRegistry()).for_stage("predict")
    for _ in range(3):
        metrics.handled.inc()
    metrics.failed.inc()
    metrics.processing_seconds.observe(0.004)
    metrics.batch_size.observe(8)
    report = report_of(metrics.registry, "p", "predict", "0", in_flight=2, at=1.0)
    assert report.outcomes["handled"] == 3 and report.outcomes["failed"] == 1
    assert report.processing.count == 1 and report.batch_size.sum == 8 and report.in_flight == 2
    assert float("inf") not in report.processing.bounds
    assert StageReport.model_validate_json(report.model_dump_json()) == report  # what Redis carries


def test_quantiles_interpolate_within_a_bucket_and_deltas_survive_restarts() -> None:
    histogram = HistogramCounts(bounds=[0.001, 0.01, 0.1], cumulative=[0, 50, 100], count=100, sum=2.0)
    assert quantile(histogram, 0.5) == pytest.approx(0.01)
    assert quantile(histogram, 0.99) == pytest.approx(0.01 + 0.09 * 0.98)
    assert quantile(HistogramCounts(), 0.5) is None
    later = HistogramCounts(bounds=histogram.bounds, cumulative=[10, 60, 120], count=120, sum=2.5)
    assert histogram_delta(later, histogram).cumulative == [10, 10, 20]
    restarted = HistogramCounts(bounds=histogram.bounds, cumulative=[1, 1, 1], count=1, sum=0.0)
    assert histogram_delta(restarted, histogram) == restarted


def test_reports_of_replicas_are_summed_per_stage() -> None:
    histogram = HistogramCounts(bounds=[0.01], cumulative=[1], count=1, sum=0.005)
    reports = [StageReport(profile="p", stage="predict", replica=str(i), at=0, outcomes={"handled": 5},
                           processing=histogram) for i in range(2)]
    totals = totals_by_stage(reports)["predict"]
    assert totals.replicas == 2 and totals.outcomes["handled"] == 10 and totals.processing.count == 2


def test_growing_needs_a_steady_rise() -> None:
    assert growing([0, 10, 20, 30])
    assert not growing([0, 10, 5, 30]) and not growing([0, 1, 2, 3]) and not growing([10, 20, 30])


def _sample(at: float, depth: int, consumers: int, handled: float, failed: float = 0.0, dead: int = 0) -> Sample:
    _, graph = graph_of("asynchronous")
    queues = {n.label: QueueFigures(depth=0, consumers=1) for n in graph.nodes if n.kind == "queue"}
    queues[f"{NS}.asynchronous.predict"] = QueueFigures(depth=depth, consumers=consumers)
    queues[f"{NS}.dead"] = QueueFigures(depth=dead, consumers=0)
    histogram = HistogramCounts(bounds=[0.001, 0.01], cumulative=[handled / 2, handled], count=handled,
                                sum=handled * 0.002)
    stages = {name: StageTotals(outcomes={"handled": handled, "failed": failed}, processing=histogram, replicas=1)
              for name in ("preprocess", "predict", "store")}
    return Sample(at=at, queues=queues, stages=stages, requests=handled)


def test_the_live_view_has_rates_percentiles_and_no_flags_when_healthy() -> None:
    _, graph = graph_of("asynchronous")
    view = live_view(graph, [_sample(0, 0, 1, 0), _sample(4, 0, 1, 40)], "amqp", None, None, NS)
    predict = view.stages["predict"]
    assert view.window_s == 4 and predict.out_per_s == 10 and predict.in_per_s == 10
    assert view.ingress.requests_per_s == 10
    assert predict.p50_ms == pytest.approx(1.0) and predict.p99_ms is not None
    assert predict.flags == [] and view.flagged == []


def test_a_stage_without_consumer_a_growing_queue_and_failures_are_flagged() -> None:
    _, graph = graph_of("asynchronous")
    samples = [_sample(t, depth=t * 10, consumers=0, handled=t, failed=t, dead=t) for t in range(5)]
    view = live_view(graph, samples, "amqp", None, None, NS)
    flags = view.stages["predict"].flags
    assert {"no_consumer", "growing_queue", "rising_failures"} <= set(flags)
    assert {stage_node_id("predict"), queue_node_id(f"{NS}.asynchronous.predict"), f"dead:{NS}.dead"} <= set(
        view.flagged)


def test_the_management_url_gives_base_login_and_the_amqp_vhost() -> None:
    url, auth, vhost = management_api("http://ops:s%40cret@rabbit:15672/", "amqp://u:p@rabbit:5672/prod")
    assert url == "http://rabbit:15672" and vhost == "prod" and auth is not None
    assert management_api("http://rabbit:15672", "amqp://u:p@rabbit:5672/")[2] == "/"


def test_the_page_escapes_what_it_is_given() -> None:
    html = page("<script>", "async", "ns", 1000)
    assert "<script>" not in html.split("<body")[1].split("<script src")[0]
    assert "&lt;script&gt;" in html and 'data-poll-ms="1000"' in html


def test_toposerve_ui_prints_the_page_of_an_ingress_that_answers_and_says_when_none_does() -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from click.testing import CliRunner

    from toposerve.deploy.cli import main
    from toposerve.deploy.local_services import free_port

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self.send_response(200 if self.path == "/ui" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        shown = CliRunner().invoke(main, ["ui", "--url", url])
        assert shown.exit_code == 0 and shown.output.strip() == f"{url}/ui"
    finally:
        server.shutdown()
    missing = CliRunner().invoke(main, ["ui", "--url", f"http://127.0.0.1:{free_port()}"])
    assert missing.exit_code == 1 and "no ingress answers" in missing.output and "toposerve up" in missing.output


async def test_queue_figures_from_the_management_api_are_read_for_the_profiles_queues_only() -> None:
    import httpx

    from toposerve.api.topology_live import queues_by_management

    seen = {}

    def answer(request: httpx.Request) -> httpx.Response:
        seen["path"], seen["auth"] = request.url.raw_path.decode(), request.headers.get("authorization")
        return httpx.Response(200, json=[
            {"name": "t.p.predict", "messages_ready": 7, "messages_unacknowledged": 3, "consumers": 2,
             "message_stats": {"publish_details": {"rate": 12.5}, "deliver_get_details": {"rate": 11.0}}},
            {"name": "other.queue", "messages_ready": 1, "consumers": 0}])

    url, auth, vhost = management_api("http://ops:pw@rabbit:15672", "amqp://u:p@rabbit:5672/prod")
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        found = await queues_by_management(client, url, auth, vhost, ["t.p.predict", "t.p.store"])
    assert seen["path"].startswith("/api/queues/prod?") and seen["auth"].startswith("Basic ")
    assert found == {"t.p.predict": QueueFigures(depth=7, consumers=2, unacked=3, publish_per_s=12.5,
                                                 deliver_per_s=11.0)}
