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
