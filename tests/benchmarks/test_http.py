"""benchmarks.http: the two servers it compares, each started on a port found free, taking turns."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import http


class FakeServer:
    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.cmd, self.env = cmd, env

    def terminate(self) -> None:
        pass

    def wait(self, timeout: float | None = None) -> int:
        return 0


def test_each_server_starts_on_a_port_found_free_not_a_fixed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fixed ports (18000, 18001) could be taken: a server already there (scripts/e2e_compose.sh publishes
    the service on 18000) answered /readyz in place of the benchmark's own, and was measured."""
    free = iter(range(54321, 54330))
    started: list[FakeServer] = []

    def popen(cmd: list[str], env: dict[str, str]) -> FakeServer:
        started.append(FakeServer(cmd, env))
        return started[-1]

    def wrk(url: str, script: Path, connections: int, duration: float) -> dict[str, Any]:
        rps = 200.0 if url.startswith(f"http://127.0.0.1:{started[-1].env.get('LCS_PORT')}/") else 100.0
        return {"connections": connections, "rps": rps, "p50_ms": 1.0, "p99_ms": 2.0, "non_2xx": 0}

    monkeypatch.setattr(http, "free_port", lambda: next(free))
    monkeypatch.setattr(http.subprocess, "Popen", popen)
    monkeypatch.setattr(http.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(http, "_wait_ready", lambda url, proc: None)
    monkeypatch.setattr(
        http.httpx, "put", lambda *a, **k: http.httpx.Response(200, request=http.httpx.Request("PUT", a[0]))
    )
    monkeypatch.setattr(http, "time_breakdown", lambda base, body: {"total_p50_ms": 1.0})
    monkeypatch.setattr(http, "wrk", wrk)
    out = tmp_path / "http.json"
    monkeypatch.setattr(sys, "argv", ["http", "--rounds", "2", "--connections", "1", "--json", str(out)])
    http.main()
    ours, plain = started[0::2], started[1::2]
    assert [s.env["LCS_PORT"] for s in ours] == ["54321", "54323"]
    assert [s.cmd[s.cmd.index("--port") + 1] for s in plain] == ["54322", "54324"]
    assert json.loads(out.read_text())["peak_throughput_ratio"] == 2.0
