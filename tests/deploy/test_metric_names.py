"""Every lcs_ metric the dashboard, the alert rules and the autoscaler read exists in the service's
real /metrics output (the app run in-process on a tiny checkpoint, after one /predict and a few control
steps), with the label values they match on; the README lists exactly the families exported."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service import fleet
from service.app import create_app
from service.controller import Signals
from service.metrics import INFERENCE_ROUTES
from service.settings import Settings
from tests.deploy.deploy_support import COMPOSE_DIR, K8S, equality_matchers, metric_names, tiny_image

DASHBOARD = COMPOSE_DIR / "grafana" / "dashboards" / "lcs.json"
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "summary": ("", "_sum", "_count", "_created"),
}


@dataclasses.dataclass(frozen=True)
class Exposition:
    names: set[str]  # every sample name a query may use (from the # TYPE lines, with suffixes)
    families: dict[str, str]  # family name -> type
    labels: dict[str, set[tuple[str, str]]]  # sample name -> (label, value) pairs seen on samples


@pytest.fixture(scope="module")
def exposition(tiny_checkpoint: Path) -> Iterator[Exposition]:
    settings = Settings(
        checkpoint=tiny_checkpoint,
        threads=1,
        profile_batches=[1],
        channels_last="off",
        control_interval_seconds=0.05,
    )
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the tiny app never became ready"
            time.sleep(0.05)
        r = client.post("/predict", json={"inputs": [tiny_image()]})
        assert r.status_code == 200, r.text
        while 'signal="cpu_other"' not in (text := client.get("/metrics").text):  # a control step ran
            assert time.monotonic() < deadline, "the control loop never exported its signals"
            time.sleep(0.05)
    names: set[str] = set()
    labels: dict[str, set[tuple[str, str]]] = {}
    families: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family.type
        names.update(family.name + s for s in SUFFIXES[family.type])
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels.items())
    yield Exposition(names=names, families=families, labels=labels)


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def rule_exprs(groups: list[dict[str, object]]) -> list[str]:
    return [str(r["expr"]) for g in groups for r in g["rules"]]  # type: ignore[attr-defined]


def sources() -> dict[str, list[str]]:
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "config.yaml").read_text())["rules"]
    k8s_rules = yaml.safe_load((K8S / "base" / "prometheusrule.yaml").read_text())["spec"]["groups"]
    return {
        "grafana dashboard": dashboard_exprs(),
        "compose rules.yml": rule_exprs(
            yaml.safe_load((COMPOSE_DIR / "prometheus" / "rules.yml").read_text())["groups"]
        ),
        "k8s PrometheusRule": rule_exprs(k8s_rules),
        # <<.Series>> is the seriesQuery's metric: both are read
        "prometheus-adapter": [r["seriesQuery"] for r in adapter] + [r["metricsQuery"] for r in adapter],
    }


def test_the_dashboard_covers_the_issue() -> None:
    """Alpha, latency against the SLO, queue depth, shedding, cache and CPU pressure all have a panel."""
    read = set().union(*(metric_names(e) for e in dashboard_exprs()))
    needed = {
        "lcs_alpha_ceiling",
        "lcs_served_alpha_sum",
        "lcs_request_duration_seconds_bucket",
        "lcs_queue_depth_requests",
        "lcs_shed_total",
        "lcs_cache_bytes",
        "lcs_cache_hits_total",
        "lcs_cache_misses_total",
        "lcs_signal",
    }
    assert needed <= read, needed - read
    assert any('signal="cpu_other"' in e for e in dashboard_exprs())
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert all(p["datasource"]["uid"] == "prometheus" for p in panels)  # the provisioned data source
    assert len({p["id"] for p in panels}) == len(panels)


@pytest.mark.parametrize("source", list(sources()))
def test_every_metric_read_exists(source: str, exposition: Exposition) -> None:
    exprs = sources()[source]
    assert exprs
    read = set().union(*(metric_names(e) for e in exprs))
    assert read, f"{source}: no lcs_ metric found in its queries"
    unknown = sorted(read - exposition.names)
    assert not unknown, f"{source} reads metrics the service does not export: {unknown}"


@pytest.mark.parametrize("source", list(sources()))
def test_every_label_value_matched_exists(source: str, exposition: Exposition) -> None:
    signal_names = {f.name for f in dataclasses.fields(Signals)} - {"now"}
    bad = []
    for metric, label, value in set().union(*(equality_matchers(e) for e in sources()[source])):
        if (label, value) in exposition.labels.get(metric, set()):
            continue
        # fleet signals are exported only with LCS_PROMETHEUS_URL set (test_prometheus_live shows them)
        if metric == "lcs_signal" and label == "signal" and value in signal_names:
            continue
        bad.append(f'{metric}{{{label}="{value}"}}')
    assert not bad, f"{source} matches label values no sample carries: {bad}"


def test_the_checker_catches_a_wrong_name(exposition: Exposition) -> None:
    """The extraction finds names inside functions and ignores quoted label values."""
    e = 'histogram_quantile(0.9, sum by (le) (rate(lcs_request_duration_seconds{endpoint="lcs_x"}[1m])))'
    assert metric_names(e) == {"lcs_request_duration_seconds"}
    assert "lcs_request_duration_seconds" not in exposition.names  # the bare histogram name is no series
    assert equality_matchers('lcs_a{x="1",y!="2",z=~"3"}') == {("lcs_a", "x", "1")}


def test_every_endpoint_regex_selects_exactly_the_inference_routes(tiny_checkpoint: Path) -> None:
    """Queries match the inference routes with a regex on the endpoint label (a route template): in the
    fleet's queries and in every deploy file, it must select those routes and no other the app declares. An
    equality matcher counts as the regex of its one route: the dashboard's latency and request panels read
    endpoint="/predict" alone, and drew nothing for OIP v2 traffic that the SLO alerts paged on."""
    routes = {r.path for r in create_app(Settings(checkpoint=tiny_checkpoint)).routes if isinstance(r, APIRoute)}
    assert set(INFERENCE_ROUTES) <= routes
    exprs = [fleet.INFERENCE, *(e for found in sources().values() for e in found)]
    regexes = {m for e in exprs for m in re.findall(r'endpoint=~"([^"]+)"', e)}
    regexes |= {re.escape(m) for e in exprs for m in re.findall(r'endpoint="([^"]+)"', e)}
    assert regexes  # the deploy files do select by endpoint
    for rx in regexes:
        assert {path for path in routes if re.fullmatch(rx, path)} == set(INFERENCE_ROUTES), rx


def readme_metrics() -> set[str]:
    """The metric names the README's Metrics section gives, `lcs_cache_{hits,misses}_total` expanded and
    label lists (`lcs_shed_total{reason}`) dropped."""
    text = (Path(__file__).parents[2] / "README.md").read_text()
    section = text[text.index("### Metrics") : text.index("## Results")]
    names = set()
    for head, alternatives, tail in re.findall(r"`(lcs_[a-z0-9_]*)(?:\{([a-z0-9_,]+)\})?([a-z0-9_]*)", section):
        if alternatives and tail:  # lcs_cache_{hits,misses}_total
            names.update(head + a + tail for a in alternatives.split(","))
        else:  # lcs_shed_total{reason}: labels
            names.add(head + tail)
    return names


def test_the_readme_lists_every_metric_and_only_real_ones(exposition: Exposition) -> None:
    listed = readme_metrics()
    unknown = sorted(n for n in listed if n not in exposition.names and n not in exposition.families)
    assert not unknown, f"the README lists metrics the service does not export: {unknown}"
    exported = {
        name + ("_total" if kind == "counter" else "")
        for name, kind in exposition.families.items()
        if not name.endswith("_created")  # creation timestamps, which the text format lists as families
    }
    assert not exported - listed, f"exported but not in the README: {sorted(exported - listed)}"
