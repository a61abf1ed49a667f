"""benchmarks.http: the two servers it compares, each started on a port found free, taking turns."""

from __future__ import annotations

import json
import os
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

    def terminate(self) -> None:
        pass

    def wait(self, timeout: float | None = None) -> int:
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
        return {"connections": connections, "rps": rps, "p50_ms": 1.0, "p99_ms": 2.0, "non_2xx": 0}

    def put(url: str, **kwargs: Any) -> http.httpx.Response:
        return http.httpx.Response(200, request=http.httpx.Request("PUT", url))

    monkeypatch.setattr(http, "free_port", lambda: next(free))
    monkeypatch.setattr(http.subprocess, "Popen", popen)
    monkeypatch.setattr(http.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(http, "_wait_ready", lambda url, proc: None)
    monkeypatch.setattr(http.httpx, "put", put)
    monkeypatch.setattr(http, "time_breakdown", lambda base, body: {"total_p50_ms": 1.0})
    monkeypatch.setattr(http, "wrk", wrk)
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
        "socket_errors": "",
    }


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
