"""A real Prometheus (the Debian binary) on 127.0.0.1 scraping a real `python -m service` every second.

Checks, in the order they happen: Prometheus scrapes the service's lcs_ series; the recording rules of
the compose stack evaluate on them; the prometheus-adapter queries behind the HPA return one series for
the pod; service.fleet reads fleet rate and p99 from this Prometheus; and the running service's own
controller gets those fleet figures (GET /controller) and exports them as lcs_signal. Traffic is a
bounded loop of small /predict requests to 127.0.0.1 only. ~10 s on a busy 2-core machine.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.fleet import PrometheusFleet
from tests.deploy.deploy_support import COMPOSE_DIR, K8S, ROOT, free_port, tiny_image, tool

WINDOW = 5  # seconds of rate(); 5 scrapes at 1 s
TIMEOUT = 60.0  # the longest any condition may take on a loaded machine


def wait_for(
    what: str, check: Callable[[], Any], procs: list[subprocess.Popen[bytes]], timeout: float = TIMEOUT
) -> Any:
    """Poll `check` until it returns something truthy; fail with the processes' output if it never does."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except (httpx.HTTPError, KeyError, IndexError, ValueError):
            value = None
        if value:
            return value
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"{what}: {getattr(p, 'name', 'a process')} exited with {p.returncode}:\n{output(p)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s\n" + "\n".join(output(p) for p in procs))
        time.sleep(0.2)


def output(p: subprocess.Popen[bytes]) -> str:
    log = getattr(p, "log_path", None)
    return Path(log).read_text(errors="replace")[-4000:] if log else ""


def start(cmd: list[str], log: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    with log.open("wb") as f:  # the child writes through its own copy of the descriptor
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, **kwargs)
    p.log_path = str(log)  # type: ignore[attr-defined]
    p.name = Path(cmd[0]).name if cmd[0] != sys.executable else " ".join(cmd[1:3])  # type: ignore[attr-defined]
    return p


def stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.fixture
def stack(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[dict[str, Any]]:
    prometheus = tool("prometheus")
    sport, pport = free_port(), free_port()
    service_url, prom_url = f"http://127.0.0.1:{sport}", f"http://127.0.0.1:{pport}"
    (endpoint,) = yaml.safe_load((K8S / "base" / "servicemonitor.yaml").read_text())["spec"]["endpoints"]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(COMPOSE_DIR / "prometheus" / "rules.yml")],
        "scrape_configs": [
            {
                "job_name": "lcs",
                # as the Prometheus operator scrapes the ServiceMonitor: its honorLabels (false unless set), and
                # the target labels it adds (the adapter rules group by namespace/pod; endpoint, the port's
                # name, clashes with the service's own endpoint label unless the service's is honoured)
                "honor_labels": endpoint.get("honorLabels", False),
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{sport}"],
                        "labels": {
                            "namespace": "test",
                            "pod": "lcs-0",
                            "service": "lcs-serve",
                            "endpoint": endpoint["port"],
                        },
                    }
                ],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LCS_")}
    env.update(
        LCS_CHECKPOINT=str(tiny_checkpoint),
        LCS_HOST="127.0.0.1",
        LCS_PORT=str(sport),
        LCS_THREADS="1",
        LCS_PROFILE_BATCHES="1",
        LCS_CHANNELS_LAST="off",
        LCS_CONTROL_INTERVAL_SECONDS="0.5",
        LCS_PROMETHEUS_URL=prom_url,
        LCS_PROMETHEUS_SELECTOR='job="lcs"',
        LCS_PROMETHEUS_WINDOW_SECONDS=str(WINDOW),
        LCS_PROMETHEUS_TIMEOUT_SECONDS="2",  # a loaded test machine; the default is 0.2
        LCS_LOG_LEVEL="warning",
    )
    svc = start([sys.executable, "-m", "service"], tmp_path / "service.log", cwd=ROOT, env=env)
    prom = start(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{pport}",
            "--log.level=warn",
        ],
        tmp_path / "prometheus.log",
    )
    procs = [svc, prom]
    stop_traffic = threading.Event()
    try:
        with httpx.Client(timeout=10) as client:
            wait_for("service ready", lambda: client.get(f"{service_url}/readyz").status_code == 200, procs)

            def traffic() -> None:  # bounded: at most 600 requests, 10 per second, until told to stop
                for _ in range(600):
                    if stop_traffic.wait(0.1):
                        return
                    client.post(f"{service_url}/predict", json={"inputs": [tiny_image()]})

            thread = threading.Thread(target=traffic, daemon=True)
            thread.start()
            yield {"service": service_url, "prometheus": prom_url, "procs": procs, "client": client}
            stop_traffic.set()
            thread.join(timeout=15)
    finally:
        stop_traffic.set()
        for p in procs:
            stop(p)


def query(client: httpx.Client, prom: str, promql: str) -> list[dict[str, Any]]:
    body = client.get(f"{prom}/api/v1/query", params={"query": promql}).json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def adapter_query(rule: dict[str, Any]) -> str:
    """A prometheus-adapter metricsQuery with its templates filled in as the adapter does for one pod."""
    series = rule["seriesQuery"].split("{")[0]
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", 'namespace="test",pod=~"lcs-0"')
        .replace("<<.GroupBy>>", "pod")
    )


def test_prometheus_scrapes_the_service_and_the_controller_reads_the_fleet(stack: dict[str, Any]) -> None:
    client, prom, procs = stack["client"], stack["prometheus"], stack["procs"]

    # 1. Prometheus has the service's series, and the scraped target is up
    count = wait_for(
        "lcs_ series in Prometheus", lambda: query(client, prom, 'count({__name__=~"lcs_.+",job="lcs"})'), procs
    )
    assert float(count[0]["value"][1]) > 20
    assert query(client, prom, 'up{job="lcs"}')[0]["value"][1] == "1"

    # 2. enough samples for rate(): the /predict counter moves
    wait_for(
        "a /predict rate",
        lambda: (
            float(
                query(client, prom, f'sum(rate(lcs_requests_total{{endpoint="/predict"}}[{WINDOW}s]))')[0]["value"][1]
            )
            > 0
        ),
        procs,
    )

    # 3. the compose recording rules evaluate on the real series
    for record in ("lcs:alpha_ceiling:avg", "lcs:queue_depth_requests:avg", "lcs:predict_requests:rate5m"):
        wait_for(f"recording rule {record}", functools.partial(query, client, prom, record), procs)

    # 4. the HPA's metrics, as prometheus-adapter would ask for them: one series for the pod
    for rule in yaml.safe_load((K8S / "prometheus-adapter" / "config.yaml").read_text())["rules"]:
        promql = adapter_query(rule)
        result = wait_for(f"adapter metric {rule['name']['as']}", functools.partial(query, client, prom, promql), procs)
        assert [s["metric"] for s in result] == [{"pod": "lcs-0"}], rule["name"]["as"]
        assert float(result[0]["value"][1]) >= 0

    # 5. service.fleet against this Prometheus: rate per replica and p99 are numbers
    async def read() -> tuple[float | None, float | None]:
        fleet = PrometheusFleet(prom, timeout=5.0, max_age=10.0, selector='job="lcs"', window_seconds=WINDOW)
        try:
            got = await fleet.refresh()
            return got.rate, got.p99
        finally:
            await fleet.aclose()

    def figures() -> tuple[float, float] | None:
        rate, p99 = asyncio.run(read())
        return (rate, p99) if rate is not None and p99 is not None else None

    rate, p99 = wait_for("fleet figures", figures, procs)
    assert 0 < rate < 100  # ~10 requests/s from the traffic loop, one replica
    assert 0 < p99 < 10

    # 6. the running service's controller reads them itself, each control interval
    def controller_fleet() -> Any:
        s = client.get(f"{stack['service']}/controller").json()["signals"]
        return s if s["fleet_rate"] is not None and s["fleet_rate"] > 0 and s["fleet_p99"] is not None else None

    signals = wait_for("the service's controller sees fleet figures", controller_fleet, procs)
    assert signals["fleet_p99"] > 0
    metrics = client.get(f"{stack['service']}/metrics").text
    assert 'lcs_signal{signal="fleet_rate"}' in metrics and 'lcs_signal{signal="fleet_p99"}' in metrics
