"""Prometheus configuration checked by promtool (Debian's `prometheus` package): the compose scrape
config, the rules (syntax and unit tests of the alerts), and the PrometheusRule copy for Kubernetes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.deploy.deploy_support import COMPOSE_DIR, K8S, tool

PROM = COMPOSE_DIR / "prometheus"


def promtool(*args: str, cwd: Path = PROM) -> str:
    run = subprocess.run([tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, f"promtool {' '.join(args)}:\n{run.stdout}\n{run.stderr}"
    return run.stdout + run.stderr


def test_compose_prometheus_config_is_valid() -> None:
    out = promtool("check", "config", "prometheus.yml")  # also checks the rule files it names
    assert "SUCCESS" in out


def test_compose_scrapes_the_service() -> None:
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs["lcs"]["static_configs"][0]["targets"] == ["lcs:8000"]  # compose service lcs, its port
    assert jobs["lcs"].get("metrics_path", "/metrics") == "/metrics"
    assert cfg["rule_files"] == ["rules.yml"]


def test_rules_are_valid_and_cover_the_issue() -> None:
    assert "SUCCESS: 17 rules found" in promtool("check", "rules", "rules.yml")
    groups = yaml.safe_load((PROM / "rules.yml").read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    alerts = {r["alert"]: r["expr"] for r in rules if "alert" in r}
    recorded = {r["record"] for r in rules if "record" in r}
    assert {"LcsSloBurnFast", "LcsSloBurnSlow", "LcsAlphaCeilingLow", "LcsShedding"} <= set(alerts)
    assert {"lcs:slo_violations:ratio_rate5m", "lcs:served_alpha_shortfall:mean5m", "lcs:shed:rate5m"} <= recorded
    assert all("for" in r for r in rules if "alert" in r)  # no alert fires on a single evaluation


def test_alerts_fire_when_they_should() -> None:
    """promtool test rules: low alpha and shedding fire while latency holds; half the requests over
    the SLO bucket burns the budget (deploy/compose/prometheus/rules_test.yml)."""
    assert "SUCCESS" in promtool("test", "rules", "rules_test.yml")


def test_kubernetes_prometheusrule_matches_compose_rules(tmp_path: Path) -> None:
    """Generated, byte for byte: a hand edit that parses the same (a comment) is caught too."""
    compose = yaml.safe_load((PROM / "rules.yml").read_text())
    k8s = yaml.safe_load((K8S / "base" / "prometheusrule.yaml").read_text())
    assert k8s["spec"]["groups"] == compose["groups"], "run python3 deploy/k8s/sync_rules.py"
    sync = [sys.executable, str(K8S / "sync_rules.py"), "--check"]
    assert subprocess.run(sync, capture_output=True).returncode == 0, "run python3 deploy/k8s/sync_rules.py"
    extracted = tmp_path / "k8s-rules.yml"
    extracted.write_text(yaml.safe_dump({"groups": k8s["spec"]["groups"]}))
    assert "SUCCESS" in promtool("check", "rules", str(extracted), cwd=tmp_path)
