"""service.metrics through /metrics: names, types, labels and values after some traffic."""

from __future__ import annotations

import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from starlette.websockets import WebSocketDisconnect

from service.cache import Grid, ModelCache
from service.metrics import Metrics, latency_buckets
from tests.service.service_support import IMAGE, TinyCheckpoint, app_state, control_step, make_settings, serve

SLO = 2.0  # make_settings' slo_p99_seconds
ZEROS = [[0] * IMAGE for _ in range(IMAGE)]


@pytest.fixture(scope="module")
def scraped(structured: TinyCheckpoint) -> Iterator[dict[str, tuple[str, list[Sample]]]]:
    """{family name: (type, samples)} after 3 good predictions (4 images), 1 invalid one, 2 too large and 4
    other calls."""
    with serve(make_settings(structured.path, max_body_bytes=4096)) as c:
        assert c.post("/predict", json={"inputs": [ZEROS, ZEROS]}).status_code == 200
        assert c.post("/predict", json={"inputs": [ZEROS], "quality": 0.5}).status_code == 200
        assert c.post("/predict", json={"inputs": [ZEROS], "quality": "fastest"}).status_code == 200
        assert c.post("/predict", json={"inputs": []}).status_code == 422
        big = b"{" + b" " * 5000 + b"}"  # refused from its Content-Length, before any route runs
        assert c.post("/predict", content=big, headers={"content-type": "application/json"}).status_code == 413
        assert c.request("GET", "/healthz", content=big).status_code == 413  # the same, on a route outside the lane
        assert c.get("/healthz").status_code == 200
        assert c.get("/v2/models/some-other-model").status_code == 404
        assert c.get("/no/such/path/42").status_code == 404
        assert c.get("/openapi.json").status_code == 200
        with pytest.raises(WebSocketDisconnect), c.websocket_connect("/predict"):  # no route takes one: 403
            pass
        r = c.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        yield {f.name: (f.type, f.samples) for f in text_string_to_metric_families(r.text)}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("lcs_requests", "counter"),
        ("lcs_request_duration_seconds", "histogram"),
        ("lcs_queue_wait_seconds", "histogram"),
        ("lcs_batch_compute_seconds", "histogram"),
        ("lcs_batch_size_images", "histogram"),
        ("lcs_served_alpha", "histogram"),
        ("lcs_queue_depth_requests", "gauge"),
        ("lcs_inflight_requests", "gauge"),
        ("lcs_alpha_ceiling", "gauge"),
        ("lcs_quality_deficit_ratio", "gauge"),
        ("lcs_cache_hits", "counter"),
        ("lcs_cache_misses", "counter"),
        ("lcs_cache_evictions", "counter"),
        ("lcs_cache_bytes", "gauge"),
        ("lcs_cache_build_seconds", "counter"),
        ("lcs_build_info", "gauge"),  # an Info metric: the text format exposes it as a gauge valued 1
    ],
)
def test_expected_families_exist_with_their_types(
    scraped: dict[str, tuple[str, list[Sample]]], name: str, kind: str
) -> None:
    assert name in scraped, sorted(scraped)
    assert scraped[name][0] == kind


def test_every_family_is_prefixed_and_counters_end_in_total(scraped: dict[str, tuple[str, list[Sample]]]) -> None:
    for name, (kind, samples) in scraped.items():
        assert name.startswith("lcs_"), name
        if kind == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in samples), name


def test_requests_are_counted_by_route_template_and_status(scraped: dict[str, tuple[str, list[Sample]]]) -> None:
    samples = scraped["lcs_requests"][1]
    assert value(samples, "lcs_requests_total", endpoint="/predict", status="200") == 3
    assert value(samples, "lcs_requests_total", endpoint="/predict", status="422") == 1
    assert value(samples, "lcs_requests_total", endpoint="/predict", status="413") == 1  # not "unmatched"
    assert value(samples, "lcs_requests_total", endpoint="/healthz", status="200") == 1
    assert value(samples, "lcs_requests_total", endpoint="/healthz", status="413") == 1  # not "unmatched" either
    assert value(samples, "lcs_requests_total", endpoint="/openapi.json", status="200") == 1  # FastAPI's own page
    assert value(samples, "lcs_requests_total", endpoint="unmatched", status="404") == 1  # no route at all
    assert value(samples, "lcs_requests_total", endpoint="unmatched", status="403") == 1  # a WebSocket upgrade
    # no per-request label values: the route template, never the raw path
    assert value(samples, "lcs_requests_total", endpoint="/v2/models/{name}", status="404") == 1
    endpoints = {s.labels["endpoint"] for s in samples}
    assert not any("some-other-model" in e or "42" in e for e in endpoints), endpoints
    assert all(set(s.labels) == {"endpoint", "status"} for s in samples if s.name == "lcs_requests_total")
    assert not any(s.labels.get("endpoint") == "/metrics" for s in samples)  # scrapes are not traffic


def test_latency_histogram_has_a_bucket_at_the_slo(scraped: dict[str, tuple[str, list[Sample]]]) -> None:
    samples = scraped["lcs_request_duration_seconds"][1]
    edges = {float(s.labels["le"]) for s in samples if s.name.endswith("_bucket")}
    assert SLO in edges
    assert SLO not in latency_buckets(0.1)  # i.e. the edge is there because of the setting
    # by status: the fleet p99 (service.fleet) reads the answered ones, as this replica's own p99 does
    counts = {
        s.labels["status"]: s.value for s in samples if s.name.endswith("_count") and s.labels["endpoint"] == "/predict"
    }
    assert counts == {"200": 3, "422": 1, "413": 1}
    inf = value(samples, "lcs_request_duration_seconds_bucket", endpoint="/predict", status="200", le="+Inf")
    assert inf == 3


def test_served_alpha_histogram(scraped: dict[str, tuple[str, list[Sample]]]) -> None:
    samples = scraped["lcs_served_alpha"][1]
    assert value(samples, "lcs_served_alpha_count") == 3  # one observation per request
    assert value(samples, "lcs_served_alpha_sum") == pytest.approx(1.0 + 0.5 + 0.0)
    assert value(samples, "lcs_served_alpha_bucket", le="0.5") == 2
    assert all(set(s.labels) <= {"le"} for s in samples)  # alpha is a value, never a label
    buckets = [float(s.labels["le"]) for s in samples if s.name == "lcs_served_alpha_bucket"]
    assert buckets == [*(round(i / 20, 2) for i in range(21)), float("inf")]  # every 0.05, GRID among them


def test_served_alpha_buckets_include_a_grid_off_the_twentieths() -> None:
    grid = [0.33, 1.0]
    metrics = Metrics(0.1, grid, ModelCache(lambda a: pytest.fail("nothing is built"), Grid(grid), 1))
    metrics.alpha.observe(0.33)
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    edges = [float(s.labels["le"]) for s in families["lcs_served_alpha"].samples if s.name.endswith("_bucket")]
    assert 0.33 in edges and 0.3 in edges and 0.35 in edges


def test_batch_histograms(scraped: dict[str, tuple[str, list[Sample]]]) -> None:
    sizes = scraped["lcs_batch_size_images"][1]
    assert value(sizes, "lcs_batch_size_images_sum") == 4  # every image went through exactly one batch
    batches = value(sizes, "lcs_batch_size_images_count")
    assert 1 <= batches <= 3
    compute = scraped["lcs_batch_compute_seconds"][1]
    assert value(compute, "lcs_batch_compute_seconds_count") == batches
    assert value(compute, "lcs_batch_compute_seconds_sum") > 0
    assert value(scraped["lcs_queue_wait_seconds"][1], "lcs_queue_wait_seconds_count") == 3


def test_gauges_after_traffic(scraped: dict[str, tuple[str, list[Sample]]]) -> None:
    assert value(scraped["lcs_inflight_requests"][1], "lcs_inflight_requests") == 0
    assert value(scraped["lcs_queue_depth_requests"][1], "lcs_queue_depth_requests") == 0


def test_cache_figures(scraped: dict[str, tuple[str, list[Sample]]]) -> None:
    misses = value(scraped["lcs_cache_misses"][1], "lcs_cache_misses_total")
    hits = value(scraped["lcs_cache_hits"][1], "lcs_cache_hits_total")
    batches = value(scraped["lcs_batch_size_images"][1], "lcs_batch_size_images_count")
    assert misses == 0  # the three grid alphas were built at start-up, whose lookups are not counted
    assert hits == batches  # one lookup per batch
    assert value(scraped["lcs_cache_evictions"][1], "lcs_cache_evictions_total") == 0
    assert value(scraped["lcs_cache_bytes"][1], "lcs_cache_bytes") > 0
    assert value(scraped["lcs_cache_builds"][1], "lcs_cache_builds_total") == 3
    assert value(scraped["lcs_cache_build_seconds"][1], "lcs_cache_build_seconds_total") > 0


def test_every_signal_is_exported_after_a_control_step(structured: TinyCheckpoint) -> None:
    with serve(make_settings(structured.path)) as c:
        st = app_state(c)
        control_step(c, time.monotonic())
        families = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
    exported = {sample.labels["signal"] for sample in families["lcs_signal"].samples}
    observed = {k for k, v in st.runtime.controller.state()["signals"].items() if v is not None and k != "now"}
    assert "on_battery" in observed  # a boolean, exported as 0 or 1
    assert exported == observed


def test_build_info(scraped: dict[str, tuple[str, list[Sample]]]) -> None:
    (sample,) = scraped["lcs_build_info"][1]
    assert sample.name == "lcs_build_info" and sample.value == 1
    assert sample.labels["model"] == "tiny_structured"
    assert sample.labels["kind"] == "structured" and sample.labels["subspace"] == "line"
    assert {"version", "torch"} <= set(sample.labels)
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    assert sample.labels["version"] == project["version"]  # the installed package's, not a copy


def test_latency_buckets_keep_the_slo_sorted_and_unique() -> None:
    assert latency_buckets(0.1).count(0.1) == 1
    b = latency_buckets(0.2)
    assert 0.2 in b and b == sorted(b)


def test_two_apps_do_not_share_counters(
    structured: TinyCheckpoint, scraped: dict[str, tuple[str, list[Sample]]]
) -> None:
    assert value(scraped["lcs_requests"][1], "lcs_requests_total", endpoint="/predict", status="200") == 3
    with serve(make_settings(structured.path)) as c:  # a second app in the same process starts from zero
        families = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
        endpoints = {s.labels["endpoint"] for s in families["lcs_requests"].samples}
        assert endpoints == {"/readyz"}  # only the readiness polls of serve()


def ceiling_moves(client: TestClient) -> dict[str, float]:
    """lcs_alpha_ceiling_changes_total by reason, as scraped."""
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    family = families.get("lcs_alpha_ceiling_changes")
    samples = family.samples if family is not None else []
    return {s.labels["reason"]: s.value for s in samples if s.name == "lcs_alpha_ceiling_changes_total"}


def test_an_operators_pin_is_counted_as_a_ceiling_move(structured: TinyCheckpoint) -> None:
    """A pin moves the ceiling as a control step does: lcs_alpha_ceiling_changes_total{reason="pinned"} counts
    it (it counted only the control steps' moves, so a pin from 1 to 0 left no trace on the dashboard)."""
    key = {"x-api-key": "k"}
    with serve(make_settings(structured.path, api_key="k")) as c:
        assert c.put("/admin/pin", json={"alpha": 0.5}, headers=key).status_code == 200
        assert ceiling_moves(c) == {"pinned": 1}
        assert c.put("/admin/pin", json={"alpha": 0.5}, headers=key).status_code == 200  # no move: not counted
        assert c.put("/admin/pin", json={"alpha": 0.0}, headers=key).status_code == 200
        assert c.delete("/admin/pin", headers=key).status_code == 200  # the ceiling stays until a control step
        assert ceiling_moves(c) == {"pinned": 2}
        st = app_state(c)
        assert st.runtime.controller.ceiling == 0.0
        assert "lcs_alpha_ceiling 0.0" in c.get("/metrics").text


def test_a_signal_that_becomes_unknown_leaves_the_metrics(structured: TinyCheckpoint) -> None:
    """/controller shows p99 as null once its 2 s window holds under 20 requests (and the fleet figures once
    Prometheus stops answering); lcs_signal drops the series then, rather than keep the last value for good."""
    with serve(make_settings(structured.path)) as c:
        st = app_state(c)
        now = time.monotonic()
        for _ in range(20):
            st.requests.finished(0.05, now)
        control_step(c, now)
        assert 'lcs_signal{signal="p99"} 0.05' in c.get("/metrics").text
        control_step(c, now + 3.0)  # the window has emptied
        assert c.get("/controller").json()["signals"]["p99"] is None
        assert 'signal="p99"' not in c.get("/metrics").text
        # and only a series there is is removed: prometheus-client before 0.22 raises KeyError for another
        # (the fleet figures, never known without Prometheus, were removed every control step)
        removed: list[str] = []
        st.metrics.signal.remove = removed.append  # type: ignore[method-assign]
        control_step(c, now + 3.5)
        assert removed == []


def test_lcs_ready_says_what_readiness_answers_without_a_probe(structured: TinyCheckpoint) -> None:
    """lcs_ready was set only when /readyz was called: after SIGTERM a scrape before the next probe read 1
    while /readyz answered 503 (draining). It is read from the same state as the readiness endpoints."""

    def ready(client: TestClient) -> float:
        families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
        return value(families["lcs_ready"].samples, "lcs_ready")

    with serve(make_settings(structured.path)) as c:
        assert ready(c) == 1
        app_state(c).start_draining()  # what SIGTERM does first; no probe has run since
        assert ready(c) == 0
        assert c.get("/readyz").status_code == 503
