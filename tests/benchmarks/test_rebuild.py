"""benchmarks.rebuild: its figures from the replies of a run (the load benchmark's, and its own worst latencies)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from benchmarks import rebuild
from benchmarks.openloop import Reply
from benchmarks.rebuild import summarise


def reply(at: float, latency: float, status: int | str = 200, alpha: float = 1.0) -> Reply:
    body = json.dumps({"parameters": {"alpha": alpha}}).encode() if status == 200 else b""
    return Reply(at, at, at + latency, status, None, body)


def test_summary_counts_within_the_slo_from_the_schedule_and_weighs_accuracy_over_requests_sent() -> None:
    replies = [
        reply(0.1, 0.020, alpha=1.0),
        reply(0.5, 0.150, alpha=0.0),  # late: answered, not within the SLO
        reply(1.2, 0.030, alpha=0.0),
        reply(1.5, 0.010, status=429),  # refused: sent, never within
        reply(2.0, 10.0, status="timeout"),
    ]
    s = summarise(replies, 0.1, {0.0: 80.0, 1.0: 90.0})
    assert (s["sent"], s["shed_rate"], s["errors"]) == (5, 0.2, 1)  # the 429; the timeout
    assert s["slo_attainment"] == 0.4  # 2 of 5
    assert s["effective_accuracy"] == pytest.approx((90.0 + 80.0) / 5)
    assert s["first_second_max_ms"] == 150.0 and s["max_ms"] == 150.0
    assert s["mean_alpha"] == pytest.approx(1 / 3, abs=1e-3)


def test_arrivals_the_generator_skipped_count_as_sent() -> None:
    # left out, they raised every share: 2 answered in time of 5 arrivals read as 1.0
    s = summarise([reply(0.1, 0.020, alpha=1.0), reply(0.2, 0.020, alpha=1.0)], 0.1, {1.0: 90.0}, skipped=3)
    assert (s["sent"], s["skipped"], s["slo_attainment"], s["effective_accuracy"]) == (5, 3, 0.4, 36.0)


def test_summary_of_a_run_with_nothing_answered() -> None:
    s = summarise([reply(0.1, 0.0, status="reset")], 0.1, {})
    assert s["slo_attainment"] == 0.0 and s["errors"] == 1 and math.isnan(s["p50_ms"])
    assert math.isnan(s["max_ms"]) and math.isnan(s["first_second_max_ms"])
    assert math.isnan(s["mean_alpha"])  # no alpha served, not alpha 0


def test_stopped_in_its_second_cycle_it_writes_the_first_marked_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stopped: list[object] = []
    loads: list[str] = []
    info = {"name": "m", "accuracy": [{"alpha": 1.0, "accuracy": 91.0}], "cached_alphas": [0.0, 1.0]}

    def run(coro: Any) -> Any:
        coro.close()  # not driven: no server
        loads.append("load")
        if len(loads) == 4:  # the second cycle's rise
            raise KeyboardInterrupt
        return [reply(0.1, 0.02)], 0

    monkeypatch.setattr(rebuild, "start_server", lambda *a, **k: SimpleNamespace(pid=1))
    monkeypatch.setattr(rebuild, "stop_server", stopped.append)
    monkeypatch.setattr(rebuild.httpx, "get", lambda url, timeout: SimpleNamespace(json=lambda: info))
    monkeypatch.setattr(rebuild.openloop, "check_accepted", lambda *a: None)
    monkeypatch.setattr(rebuild, "capacity", lambda *a: 10.0)
    monkeypatch.setattr(
        rebuild.psutil, "Process", lambda pid: SimpleNamespace(memory_info=lambda: SimpleNamespace(rss=2**20))
    )
    monkeypatch.setattr(rebuild.openloop, "run", run)
    monkeypatch.setattr(rebuild.time, "sleep", lambda s: None)
    out = tmp_path / "rebuild.json"
    monkeypatch.setattr(sys, "argv", ["rebuild", "--cycles", "3", "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        rebuild.main()
    written = json.loads(out.read_text())
    assert e.value.code == 130 and len(stopped) == 2  # the capacity server, then the measured one
    assert written["interrupted"] is True and len(written["cycles"]) == 1
    assert written["slo_attainment"] == 1.0 and written["effective_accuracy"] == 91.0
