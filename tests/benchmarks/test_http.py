"""benchmarks.http: the two servers it compares, each started on a port found free, taking turns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks import http


class FakeServer:
    pid = 0  # no such thread: its CPU reads as unknown

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.cmd, self.env = cmd, env

    returncode = 0

    def poll(self) -> int:  # stop_server finds it exited
        return 0


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[FakeServer]:
    """The servers benchmarks.http starts, faked, with wrk faked: ours answers 200 requests/s, the plain one 100;
    ports from 54321 up."""
    free = iter(range(54321, 54330))
    servers: list[FakeServer] = []

    def popen(cmd: list[str], env: dict[str, str]) -> FakeServer:
        servers.append(FakeServer(cmd, env))
        return servers[-1]

    def wrk(url: str, script: Path, connections: int, duration: float) -> dict[str, Any]:
        assert script.is_file()
        rps = 200.0 if url.startswith(f"http://127.0.0.1:{servers[-1].env.get('LCS_PORT')}/") else 100.0
        return {"connections": connections, "rps": rps, "ok_rps": rps, "p50_ms": 1.0, "p99_ms": 2.0, "non_2xx": 0}

    def put(url: str, **kwargs: Any) -> http.httpx.Response:
        return http.httpx.Response(200, request=http.httpx.Request("PUT", url))

    monkeypatch.setattr(http, "free_port", lambda: next(free))
    monkeypatch.setattr(http.subprocess, "Popen", popen)
    monkeypatch.setattr(http.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(http, "wait_ready", lambda url, proc: None)
    monkeypatch.setattr(http.httpx, "put", put)
    monkeypatch.setattr(http, "time_breakdown", lambda base, body: {"total_p50_ms": 1.0})
    monkeypatch.setattr(http, "wrk", wrk)
    monkeypatch.setattr(http, "warm_up", lambda url, body: None)
    return servers


def test_each_server_starts_on_a_port_found_free_not_a_fixed_one(
    started: list[FakeServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fixed ports (18000, 18001) could be taken: a server already there (scripts/e2e_compose.sh publishes
    the service on 18000) answered /readyz in place of the benchmark's own, and was measured."""
    out = tmp_path / "http.json"
    monkeypatch.setattr(sys, "argv", ["http", "--rounds", "2", "--connections", "1", "--json", str(out)])
    http.main()
    ours, plain = started[0::2], started[1::2]
    assert [s.env["LCS_PORT"] for s in ours] == ["54321", "54323"]
    assert [s.cmd[s.cmd.index("--port") + 1] for s in plain] == ["54322", "54324"]
    assert json.loads(out.read_text())["peak_throughput_ratio"] == 2.0


def test_ours_runs_the_services_default_threads_and_the_plain_server_two(
    started: list[FakeServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each server as it runs best: ours leaves its event loop a CPU (LCS_THREADS=2 on 2 CPUs starved the
    loop: 1,470-1,657 requests/s against 1,678-1,910 at its default 1); the caller's LCS_THREADS is not
    passed on to either."""
    monkeypatch.setenv("LCS_THREADS", "7")
    monkeypatch.setattr("service.cgroups.usable_cpus", lambda: 4)  # the default: one per CPU less one
    out = tmp_path / "http.json"
    monkeypatch.setattr(sys, "argv", ["http", "--rounds", "1", "--connections", "1", "--json", str(out)])
    http.main()
    ours, plain = started
    assert ours.env["LCS_THREADS"] == "3" and plain.env["LCS_THREADS"] == "2"
    assert json.loads(out.read_text())["threads"] == {"lcs-serve": 3, "one-at-a-time": 2}
    flags = ["--threads", "1", "--plain-threads", "4"]
    monkeypatch.setattr(sys, "argv", ["http", "--rounds", "1", *flags, "--connections", "1", "--json", str(out)])
    http.main()
    assert [s.env["LCS_THREADS"] for s in started[2:]] == ["1", "4"]


def test_the_benchmark_imports_no_torch() -> None:
    """It shares the machine with the servers it measures: the service's default thread count is read without
    its settings module, which loads torch (237 against 32 MiB resident in the benchmark's process)."""
    probe = "import sys, benchmarks.http; print(sorted(m for m in ('torch', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_wrk_script_is_removed_after_the_run(
    started: list[FakeServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each run left a folder holding post.lua in the temporary directory."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(http.tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(sys, "argv", ["http", "--rounds", "1", "--json", str(tmp_path / "http.json")])
    http.main()  # the fake wrk saw the script
    assert list(scratch.iterdir()) == []


def test_stopped_in_its_second_round_it_writes_the_first_marked_interrupted(
    started: list[FakeServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "http.json"
    fake_wrk = http.wrk

    def wrk(url: str, script: Path, connections: int, duration: float) -> dict[str, Any]:
        if len(started) == 3:  # the second round's first server
            raise KeyboardInterrupt
        return fake_wrk(url, script, connections, duration)

    monkeypatch.setattr(http, "wrk", wrk)
    monkeypatch.setattr(sys, "argv", ["http", "--rounds", "3", "--connections", "1", "--json", str(out)])
    with pytest.raises(SystemExit) as e:
        http.main()
    written = json.loads(out.read_text())
    assert e.value.code == 130 and written["interrupted"] is True
    assert [r["peak_throughput_ratio"] for r in written["rounds"]] == [2.0]


WRK_OUTPUT = """Running 5s test @ http://127.0.0.1:8000/predict
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    10.12ms    2.01ms  31.40ms   80.12%
    Req/Sec     1.60k    95.21     1.77k    70.00%
  Latency Distribution
     50%    9.55ms
     75%   10.80ms
     90%   12.31ms
     99%   16.62ms
  8019 requests in 5.00s, 4.43MB read
Requests/sec:   1603.80
Transfer/sec:      0.89MB
"""


def test_wrk_output_is_read_with_its_request_count(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def run(cmd: list[str], **kwargs: Any) -> http.subprocess.CompletedProcess[str]:
        return http.subprocess.CompletedProcess(cmd, 0, WRK_OUTPUT, "")

    monkeypatch.setattr(http.subprocess, "run", run)
    res = http.wrk("http://127.0.0.1:8000/predict", tmp_path / "post.lua", 16, 5)
    assert res == {
        "connections": 16,
        "rps": 1603.8,
        "requests": 8019,
        "p50_ms": 9.55,
        "p99_ms": 16.62,
        "non_2xx": 0,
        "ok_rps": 1603.8,
        "socket_errors": "",
    }


def test_refusals_are_no_throughput(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """wrk's Requests/sec counts every answer, 429s too: a server refusing everything read 39,418 requests/s."""
    refused = WRK_OUTPUT.replace("Requests/sec:", "  Non-2xx or 3xx responses: 2019\nRequests/sec:")

    def run(cmd: list[str], **kwargs: Any) -> http.subprocess.CompletedProcess[str]:
        return http.subprocess.CompletedProcess(cmd, 0, refused, "")

    monkeypatch.setattr(http.subprocess, "run", run)
    res = http.wrk("http://127.0.0.1:8000/predict", tmp_path / "post.lua", 16, 5)
    assert (res["rps"], res["non_2xx"], res["ok_rps"]) == (1603.8, 2019, 1200.0)


def test_the_service_listens_on_the_loopback_whatever_the_callers_host(
    started: list[FakeServer], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With LCS_HOST=0.0.0.0 (the image's) in the caller's environment, the service listened on every interface
    with the benchmark's admin key."""
    monkeypatch.setenv("LCS_HOST", "0.0.0.0")
    monkeypatch.setattr(
        sys, "argv", ["http", "--rounds", "1", "--connections", "1", "--json", str(tmp_path / "h.json")]
    )
    http.main()
    ours = [s for s in started if "LCS_PORT" in s.env]
    assert ours and all(s.env["LCS_HOST"] == "127.0.0.1" for s in ours)


def test_the_request_path_is_the_latency_less_the_models_own_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The answer's compute_ms holds the model, the batch's hand-off between threads and the softmax; the path
    subtracted all of it as the model's. The model's own time is the service's lcs_batch_compute_seconds. The
    body goes pre-encoded (httpx encoding 784 values took 0.06 ms inside the clock)."""
    seen: list[bytes] = []
    batches = [0]

    def handler(request: http.httpx.Request) -> http.httpx.Response:
        if request.url.path == "/predict":
            seen.append(request.content)
            batches[0] += 1
            return http.httpx.Response(200, json={"queue_ms": 0.05, "compute_ms": 0.5})
        if request.url.path == "/metrics":
            n = batches[0]
            text = (
                "# HELP lcs_batch_compute_seconds Model seconds per batch.\n"
                "# TYPE lcs_batch_compute_seconds histogram\n"
                f'lcs_batch_compute_seconds_bucket{{le="+Inf"}} {n}\n'
                f"lcs_batch_compute_seconds_count {n}\nlcs_batch_compute_seconds_sum {n * 0.0003}\n"
            )
            return http.httpx.Response(200, text=text)
        return http.httpx.Response(200, json={"status": "ok"})

    real = http.httpx.Client
    monkeypatch.setattr(http.httpx, "Client", lambda **kw: real(transport=http.httpx.MockTransport(handler), **kw))
    body = json.dumps({"inputs": [[[0] * 28] * 28]}).encode()
    res = http.time_breakdown("http://127.0.0.1:1", body, n=30)
    assert res["model_mean_ms"] == 0.3 and res["compute_p50_ms"] == 0.5
    assert res["path_p50_ms"] == pytest.approx(res["total_p50_ms"] - 0.3, abs=0.0015)
    assert set(seen) == {body} and len(seen) == 50  # 20 to warm up, then 30


def test_the_plain_server_runs_the_backend_the_service_is_told() -> None:
    """LCS_BACKEND reached the service alone: the plain server built its network on ONNX Runtime whatever."""
    code = "import benchmarks.naive_server as n; print(n._compiled.representation)"
    env = {**os.environ, "LCS_BACKEND": "torchscript"}
    out = http.subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "TorchScript" in out.stdout and "ONNX Runtime" not in out.stdout


def test_each_level_reports_the_main_threads_cpu_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """The event loop's CPU per request sets the saturated throughput: 2.5 s over 5,000 requests is 500 us."""
    readings = iter([10.0, 12.5])
    monkeypatch.setattr(http, "thread_cpu", lambda pid: next(readings))
    monkeypatch.setattr(http, "wrk", lambda *args: {"rps": 1000.0, "requests": 5000})
    res = http.measured(FakeServer([], {}), "http://127.0.0.1:1/predict", Path("post.lua"), 16, 5)  # type: ignore[arg-type]
    assert res["loop_us_per_request"] == 500.0


def test_the_cpu_per_request_is_unknown_where_proc_cannot_tell(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "wrk", lambda *args: {"rps": 1000.0, "requests": 5000})
    res = http.measured(FakeServer([], {}), "http://127.0.0.1:1/predict", Path("post.lua"), 16, 5)  # type: ignore[arg-type]
    assert http.thread_cpu(0) is None and res["loop_us_per_request"] is None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc")
def test_thread_cpu_counts_the_main_threads_cpu_time() -> None:
    assert threading.current_thread() is threading.main_thread()
    before = http.thread_cpu(os.getpid())
    end = time.thread_time() + 0.2
    while time.thread_time() < end:  # 0.2 s of this thread's CPU
        pass
    after = http.thread_cpu(os.getpid())
    assert before is not None and after is not None and 0.1 <= after - before <= 5


def test_each_server_is_warmed_up_before_its_first_measured_level(
    started: list[FakeServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plain server peaks at the level measured first, and a fresh one's first answers took 16-68 ms
    against 1.5 after; ours peaks at the last, warm: the comparison favoured ours."""
    events: list[str] = []
    fake_wrk = http.wrk

    def wrk(url: str, script: Path, connections: int, duration: float) -> dict[str, Any]:
        events.append(f"measure {url}")
        return fake_wrk(url, script, connections, duration)

    monkeypatch.setattr(http, "wrk", wrk)
    monkeypatch.setattr(http, "warm_up", lambda url, body: events.append(f"warm {url}"))
    argv = ["http", "--rounds", "2", "--connections", "1", "4", "--json", str(tmp_path / "http.json")]
    monkeypatch.setattr(sys, "argv", argv)
    http.main()
    urls = [f"http://127.0.0.1:{port}/predict" for port in range(54321, 54325)]  # one per server per round
    assert events == [e for url in urls for e in (f"warm {url}", f"measure {url}", f"measure {url}")]
