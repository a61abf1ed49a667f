"""benchmarks.load: the noisy-neighbour reaction read from a controller timeline; the settings its servers get;
flags refused before any server starts."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks import load
from benchmarks.load import neighbour_reaction, server_settings, summarise, trace
from benchmarks.overload import CAPACITY_SLO, percentile


def test_neighbour_reaction_reports_the_drop_the_first_return_and_the_return_for_good() -> None:
    # a 12 s trace: the neighbour runs from 3 s to 6 s
    ceilings = {0.0: 1.0, 3.5: 0.0, 7.5: 1.0, 8.5: 0.5, 9.0: 1.0}
    timeline = []
    for i in range(48):  # polled every 0.25 s
        t = 0.25 * i
        timeline.append({"t": t, "ceiling": next(c for s, c in sorted(ceilings.items(), reverse=True) if t >= s)})
    reaction = neighbour_reaction(timeline, 3.0, 6.0)
    assert reaction == {
        "ceiling_below_top_at_start": False,
        "ceiling_drop_after_start_s": 0.5,
        "full_quality_first_after_stop_s": 1.5,
        "full_quality_after_stop_s": 3.0,
        "full_quality_held_s": 2.75,
    }


def test_full_quality_is_the_top_of_the_grid_not_the_highest_ceiling_seen() -> None:
    """A policy that never rose above 0.55 read as back at full quality (AIMD "back in 4.73 s")."""
    timeline = [{"t": 0.25 * i, "ceiling": 0.55 if i < 13 or i >= 30 else 0.3} for i in range(48)]
    reaction = neighbour_reaction(timeline, 3.0, 6.0)
    assert reaction["full_quality_first_after_stop_s"] is None and reaction["full_quality_after_stop_s"] is None
    assert neighbour_reaction(timeline, 3.0, 6.0, top=0.55)["full_quality_after_stop_s"] == 1.5


def test_each_phase_of_a_trace_offers_the_rate_it_states() -> None:
    """Bursts at 2.5x on a 0.6x base: a gap drawn whole at the rate where it began carried the base rate into
    each burst, which offered 2.40x at capacity 78.8 (mean of 400 seeds)."""
    capacity, duration = 78.8, 12.0
    in_burst = [0.0, 0.0]  # arrivals in bursts, outside them
    seeds = 300
    for seed in range(seeds):
        for t in trace("bursty", capacity, duration, seed):
            in_burst[0.25 * duration <= t < 0.35 * duration or 0.6 * duration <= t < 0.7 * duration] += 1
    burst = in_burst[True] / (seeds * 0.2 * duration * capacity)
    base = in_burst[False] / (seeds * 0.8 * duration * capacity)
    assert burst == pytest.approx(2.5, rel=0.02) and base == pytest.approx(0.6, rel=0.02)
    step = [trace("step", capacity, duration, seed) for seed in range(50)]
    high = sum(duration / 3 <= t < 2 * duration / 3 for s in step for t in s) / (50 * duration / 3 * capacity)
    assert high == pytest.approx(1.5, rel=0.02)
    assert all(0 < t < duration for s in step for t in s) and all(s == sorted(s) for s in step)


def test_summary_counts_every_other_answer_as_an_error_and_reports_the_generators_lag() -> None:
    rows = [{"t": 0.0, "status": 200, "latency": 0.01, "lag": 0.002, "alpha": 1.0}]
    rows += [{"t": 0.1, "status": s, "latency": 0.01, "lag": 0.0} for s in (408, 422, 429, 503, "reset")]
    summary = summarise(rows, 0.1, {1.0: 90.0})
    assert summary["errors"] == 3 and summary["shed_rate"] == round(2 / 6, 4)
    assert summary["effective_accuracy"] == 15.0 and summary["generator_lag_max_ms"] == 2.0


def test_every_summary_figure_counts_the_requests_it_says() -> None:
    """Shares are of requests sent (skipped arrivals included); latencies and mean alpha of the 200s;
    effective accuracy of the 200s within the SLO only."""
    rows = [  # ten 200s: eight in time (alpha 1 and 0), two late; two 429s; one timeout
        *({"t": i, "status": 200, "latency": 0.01 * (i + 1), "lag": 0.001, "alpha": 1.0} for i in range(4)),
        *({"t": i, "status": 200, "latency": 0.05 + 0.01 * i, "lag": 0.002, "alpha": 0.0} for i in range(4)),
        *({"t": 9, "status": 200, "latency": lat, "lag": 0.004, "alpha": 1.0} for lat in (0.2, 0.3)),
        *({"t": 9, "status": 429, "latency": 0.001, "lag": 0.0} for _ in range(2)),
        {"t": 9, "status": "timeout", "latency": 5.0, "lag": 0.0},
    ]
    s = summarise(rows, 0.1, {1.0: 90.0, 0.0: 80.0}, skipped=7)
    assert s["sent"] == 20 and s["skipped"] == 7
    assert s["slo_attainment"] == 0.4 and s["shed_rate"] == 0.1 and s["errors"] == 1
    assert s["p50_ms"] == 50.0 and s["p99_ms"] == 300.0  # nearest rank over the ten 200s
    assert s["mean_alpha"] == 0.6
    assert s["effective_accuracy"] == round((4 * 90.0 + 4 * 80.0) / 20, 2)  # the late 200s score nothing
    assert s["generator_lag_p99_ms"] == 4.0 and s["generator_lag_max_ms"] == 4.0


def test_an_alpha_without_a_measured_accuracy_stops_the_summary() -> None:
    """It was scored 0, which pulled effective accuracy down and said nothing."""
    rows = [{"t": 0.0, "status": 200, "latency": 0.01, "lag": 0.0, "alpha": a} for a in (1.0, 0.3)]
    with pytest.raises(ValueError, match=r"alphas \[0\.3\] served requests but have no measured accuracy"):
        summarise(rows, 0.1, {1.0: 90.0, 0.0: 80.0})
    assert summarise(rows[:1], 0.1, {1.0: 90.0, 0.0: 80.0})["effective_accuracy"] == 90.0


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.99) == 99.0 and percentile(values, 0.5) == 50.0
    assert percentile([10.0, 20.0], 0.5) == 10.0 and percentile([7.0], 0.99) == 7.0


def test_neighbour_reaction_without_a_return_says_none() -> None:
    timeline = [{"t": 0.25 * i, "ceiling": 1.0 if i < 14 else 0.5} for i in range(48)]
    assert neighbour_reaction(timeline, 3.0, 6.0) == {
        "ceiling_below_top_at_start": False,
        "ceiling_drop_after_start_s": 0.5,
        "full_quality_first_after_stop_s": None,
        "full_quality_after_stop_s": None,
        "full_quality_held_s": None,
    }


def test_a_return_in_the_traces_last_second_is_not_for_good() -> None:
    # back on the last polls only (as the README's run on 92e618f was: 0.3 s before the end)
    timeline = [{"t": 0.25 * i, "ceiling": 1.0 if i < 13 or i >= 46 else 0.35} for i in range(48)]
    reaction = neighbour_reaction(timeline, 3.0, 6.0)
    assert reaction["full_quality_first_after_stop_s"] == 5.5
    assert reaction["full_quality_after_stop_s"] is None and reaction["full_quality_held_s"] == 0.25


def test_a_ceiling_already_down_when_the_neighbour_starts_shows_no_reaction() -> None:
    # the trace's own load lowered it at 2 s: the first poll inside the neighbour's window is no reaction to it
    timeline = [{"t": 0.25 * i, "ceiling": 1.0 if i < 8 else 0.65} for i in range(48)]
    reaction = neighbour_reaction(timeline, 3.0, 6.0)
    assert reaction["ceiling_below_top_at_start"] is True and reaction["ceiling_drop_after_start_s"] is None


def test_the_callers_service_settings_reach_every_server_but_not_those_the_benchmark_sets() -> None:
    environ = {"LCS_THREADS": "2", "LCS_BACKEND": "torchscript", "LCS_PORT": "9000", "LCS_POLICY": "aimd", "HOME": "/"}
    assert server_settings(environ, "lcs") == {
        "LCS_THREADS": "2",
        "LCS_BACKEND": "torchscript",
        "LCS_QUEUE_MAX": "64",
        "LCS_API_KEY": "bench",
        "LCS_POLICY": "lcs",
    }


@pytest.mark.parametrize("traces", [["stedy"], ["steady", "spike"], []])
def test_an_unknown_or_missing_trace_is_refused_before_any_server_starts(
    traces: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def started(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a server started before the traces were checked")

    monkeypatch.setattr(load, "start_server", started)
    monkeypatch.setattr(sys, "argv", ["load", "--traces", *traces])
    with pytest.raises(SystemExit) as e:
        load.main()
    assert e.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert "argument --traces: " in error and (not traces or "choose from 'steady', 'step'" in error), error


@pytest.mark.parametrize("policies", [["lcss"], ["lcs", "fixed:2"], []])
def test_an_unknown_or_missing_policy_is_refused_before_any_server_starts(
    policies: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def started(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a server started before the policies were checked")

    monkeypatch.setattr(load, "start_server", started)
    monkeypatch.setattr(sys, "argv", ["load", "--policies", *policies])
    with pytest.raises(SystemExit) as e:
        load.main()
    assert e.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert "argument --policies: " in error, error
    if policies:  # the service's own words: what it takes instead
        assert "use lcs, fixed:<alpha>, step or aimd" in error or "use fixed:<alpha in [0, 1]>" in error, error


def test_its_servers_start_on_a_port_found_free_not_a_fixed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fixed port (18100) could be taken: the first server then failed to bind, or, if the process there
    answered /readyz (a server left running, a second run), the benchmark measured that server instead."""
    ports: list[int] = []

    def start_server(checkpoint: str, port: int, slo: float, **env: str) -> Any:
        ports.append(port)
        raise KeyboardInterrupt  # enough: the first server's port is what this is about

    monkeypatch.setattr(load, "free_port", lambda: 54321)
    monkeypatch.setattr(load, "start_server", start_server)
    monkeypatch.setattr(sys, "argv", ["load", "--out", str(tmp_path / "load")])
    with pytest.raises(KeyboardInterrupt):
        load.main()
    assert ports == [54321]


def test_capacity_is_measured_on_servers_whose_admission_refuses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the real SLO, 8 clients of 64-image requests kept alpha 1's queue past it: admission refused them as
    late, the clients resent at once, and the refusals took the model's CPU (33.8-70.5 requests/s measured where
    2 clients measured 71.8-77.5): every trace was scaled to that figure."""
    slos: list[float] = []

    def start_server(checkpoint: str, port: int, slo: float, **env: str) -> Any:
        slos.append(slo)
        raise KeyboardInterrupt  # the first server is the capacity run's

    monkeypatch.setattr(load, "start_server", start_server)
    monkeypatch.setattr(sys, "argv", ["load", "--out", str(tmp_path / "load")])
    with pytest.raises(KeyboardInterrupt):
        load.main()
    assert slos == [CAPACITY_SLO] and CAPACITY_SLO >= 10


@pytest.mark.parametrize("given", ["run", "run.json", "run.png"])
def test_out_names_the_files_with_or_without_a_suffix(
    given: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--out run.json` wrote run.json.json and run.json.png."""
    checked: list[Path] = []

    def start_server(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt  # the names are settled before the first server starts

    monkeypatch.setattr(load, "check_output", lambda path, *a: checked.append(path))
    monkeypatch.setattr(load, "start_server", start_server)
    monkeypatch.setattr(sys, "argv", ["load", "--out", str(tmp_path / given)])
    with pytest.raises(KeyboardInterrupt):
        load.main()
    assert checked == [tmp_path / "run.json", tmp_path / "run.png"]


def test_a_mix_the_server_refuses_is_reported_before_its_capacity_is_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """65 images with the service's limit of 64: every request got 422, capacity was measured as 0 and the
    traces divided by it (ZeroDivisionError)."""
    stopped: list[object] = []
    refusal = b'{"error": "invalid input", "detail": "inputs: 65 images in one request, the limit is 64"}'

    async def answer(port: int, req: bytes) -> tuple[int, bytes]:
        return 422, refusal

    monkeypatch.setattr(load, "start_server", lambda *a, **k: "server")
    monkeypatch.setattr(load, "stop_server", stopped.append)
    monkeypatch.setattr(load.openloop, "answer", answer)
    monkeypatch.setattr(load, "capacity", lambda *a, **k: 0.0)  # what measuring it gave
    monkeypatch.setattr(sys, "argv", ["load", "--images", "65", "--format", "json", "--out", str(tmp_path / "l")])
    with pytest.raises(SystemExit) as e:
        load.main()
    assert e.value.code == (
        "error: --images 65 --format json: the server refuses it (422: inputs: 65 images in one request, the "
        "limit is 64); change the mix"
    )
    assert stopped == ["server"]


def test_a_cpu_burner_stops_when_the_benchmark_is_gone_even_if_it_never_said_so() -> None:
    """Killed outright (SIGKILL, an OOM kill), the benchmark never sets the burners' stop event: they ran on,
    at 100 % of every core, until someone found them."""
    stop = multiprocessing.Event()

    def still_burning(*_: object) -> None:
        raise AssertionError("the burner ran on for 5 s after its parent was gone")

    before = signal.signal(signal.SIGALRM, still_burning)  # a burner that ignored its parent hung the test
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    try:
        load._burn(stop, parent=os.getppid() + 1)  # not its parent: returns at once, though `stop` is not set
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, before)


def test_a_cpu_burner_leaves_sigterm_to_its_default_so_terminate_ends_it_quietly() -> None:
    """multiprocessing terminates leftover burners with SIGTERM as the benchmark exits; a burner forked from it
    would otherwise run the benchmark's handler (benchmarks.cli): one "terminated" line per burner."""
    before = signal.signal(signal.SIGTERM, lambda *a: None)  # what a forked burner inherits
    try:
        stop = multiprocessing.Event()
        stop.set()
        load._burn(stop, parent=os.getppid())
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


def test_the_trace_the_poller_and_the_neighbour_share_one_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The poller took its zero before building its client, the neighbour slept from after that, and the trace
    started 0.1 s after the poller: the burners ran 51-87 ms later than the reaction was timed from."""
    zeros: dict[str, float] = {}
    forked: list[float] = []

    async def poll(base: str, out: list[dict[str, Any]], stop: Any, start: float) -> None:
        zeros["poller"] = start

    async def run_trace(port: int, req: bytes, arrivals: list[float], timeout: float, start: float) -> Any:
        zeros["trace"] = start
        await asyncio.sleep(start + 0.4 - time.perf_counter())  # a 0.4 s trace
        return [], 0

    def burners(stop: Any, n: int) -> list[Any]:
        assert n == 3  # the CPUs this process may use, not the node's
        forked.append(time.perf_counter())
        time.sleep(0.02)  # forking takes time: the neighbour's start is when it is done
        return []

    monkeypatch.setattr(load, "poll_controller", poll)
    monkeypatch.setattr(load, "run_trace", run_trace)
    monkeypatch.setattr(load, "start_burners", burners)
    monkeypatch.setattr(load, "usable_cpus", lambda: 3)
    _, _, _, when = asyncio.run(load.drive("http://x", 1, b"", [], True, 0.4))
    zero = zeros["trace"]
    assert zeros["poller"] == zero
    # NEIGHBOUR's start, a quarter of 0.4 s in (within 40 ms, as a busy machine wakes late: the bug was 51-87 ms)
    assert abs(forked[0] - zero - 0.1) < 0.04
    assert 0.11 <= when["neighbour_started_s"] < 0.165 and abs(when["neighbour_stopped_s"] - 0.2) < 0.04


def test_the_load_generator_imports_no_torch() -> None:
    """The generator shares the machine with the server it measures: it checks --policies with the service's
    parse_policy, whose module (and the grid's) must not pull in torch or ONNX Runtime (1.3 s and some
    hundred MB in the sending process; service.cache imported the model type at run time for annotations)."""
    probe = "import sys, benchmarks.load; print(sorted(m for m in ('torch', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_burners_run_whatever_the_default_start_method() -> None:
    """Under forkserver (Python 3.14's default on Linux) a burner's parent was the fork server, not the
    benchmark, so its check that the benchmark still ran ended it at once: the noisy trace had no neighbour."""
    default = multiprocessing.get_start_method()
    multiprocessing.set_start_method("forkserver", force=True)
    try:
        stop = load._FORK.Event()
        burners = load.start_burners(stop, 1)
        time.sleep(0.3)
        alive = [b.is_alive() for b in burners]
        stop.set()
        for b in burners:
            b.join(5)
    finally:
        multiprocessing.set_start_method(default, force=True)
    assert alive == [True]


def test_stopped_after_some_traces_it_writes_them_marked_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C during the second trace of the first policy: the first trace's results are written (a full run
    measures for twenty minutes), the server is stopped first, and no PNG is drawn."""
    stopped: list[object] = []
    ran: list[str] = []

    class Model:
        def json(self) -> dict[str, Any]:
            return {"accuracy": [{"alpha": 1.0, "accuracy": 91.0}], "grid": [0.0, 1.0]}

    def run(coro: Any) -> Any:
        coro.close()  # not driven: no server
        ran.append("trace")
        if len(ran) == 2:
            raise KeyboardInterrupt
        return [{"t": 0.0, "status": 200, "latency": 0.01, "alpha": 1.0}], 0, [], {}

    monkeypatch.setattr(load, "start_server", lambda *a, **k: "server")
    monkeypatch.setattr(load, "stop_server", stopped.append)
    monkeypatch.setattr(load.openloop, "check_accepted", lambda *a: None)
    monkeypatch.setattr(load, "capacity", lambda *a, **k: 10.0)
    monkeypatch.setattr(load.httpx, "get", lambda url: Model())
    monkeypatch.setattr(load.openloop, "run", run)
    monkeypatch.setattr(load.time, "sleep", lambda s: None)
    out = tmp_path / "load"
    argv = ["load", "--traces", "steady", "step", "--policies", "fixed:1", "lcs", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        load.main()
    assert e.value.code == 130 and stopped == ["server"] * 4  # two capacity runs, then fixed:1's two traces'
    written = json.loads(Path(f"{out}.json").read_text())
    assert written["interrupted"] is True and list(written["policies"]) == ["fixed:1"]
    assert list(written["policies"]["fixed:1"]["traces"]) == ["steady"]
    assert written["policies"]["fixed:1"]["traces"]["steady"]["summary"]["slo_attainment"] == 1.0
    assert not Path(f"{out}.png").exists()


def test_each_trace_runs_on_a_fresh_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each policy ran its traces in turn on one server: AIMD, which climbs back 0.05 a step, began bursty at a
    ceiling of 0.15 after ramp (session 38's run), where every other policy began it at its start."""
    events: list[str] = []

    class Model:
        def json(self) -> dict[str, Any]:
            return {"accuracy": [{"alpha": 1.0, "accuracy": 91.0}], "grid": [0.0, 1.0]}

    def start_server(checkpoint: str, port: int, slo: float, **env: str) -> str:
        events.append(f"start {env['LCS_POLICY']}")
        return env["LCS_POLICY"]

    def run(coro: Any) -> Any:
        coro.close()  # not driven: no server
        events.append("trace")
        return [{"t": 0.0, "status": 200, "latency": 0.01, "alpha": 1.0}], 0, [], {}

    monkeypatch.setattr(load, "start_server", start_server)
    monkeypatch.setattr(load, "stop_server", lambda proc: events.append(f"stop {proc}"))
    monkeypatch.setattr(load.openloop, "check_accepted", lambda *a: None)
    monkeypatch.setattr(load, "capacity", lambda *a, **k: 10.0)
    monkeypatch.setattr(load.httpx, "get", lambda url: Model())
    monkeypatch.setattr(load.openloop, "run", run)
    monkeypatch.setattr(load, "plot", lambda *a: None)
    argv = ["load", "--traces", "ramp", "bursty", "--policies", "aimd", "lcs", "--out", str(tmp_path / "load")]
    monkeypatch.setattr(sys, "argv", argv)
    load.main()
    traces = events[4:]  # after the two capacity servers
    assert traces == [
        f"{what} {policy}" if what != "trace" else "trace"
        for policy in ("aimd", "lcs")
        for _ in range(2)
        for what in ("start", "trace", "stop")
    ]


def test_the_load_after_the_stop_is_read_from_the_draw_on_average_and_in_its_busiest_second() -> None:
    # a 12 s trace scaled to 100 req/s: the neighbour stops at 6 s; the five seconds after it hold 60 arrivals
    # a second, except 6.5-7.5 s, which holds 90; arrivals before the stop or after 11 s do not count
    arrivals = [i / 1000 for i in range(0, 6000, 5)]  # 200/s before the stop
    arrivals += [6 + k / 60 for k in range(300) if not 6.5 <= 6 + k / 60 < 7.5]
    arrivals += [6.5 + k / 90 for k in range(90)]
    arrivals += [11 + k / 500 for k in range(500)]  # 500/s in the last second
    assert load.load_after_stop(arrivals, 100.0, 6.0, 12.0) == {"load_after_stop": 0.66, "peak_1s_load_after_stop": 0.9}


def test_the_busiest_second_after_the_stop_may_be_its_last() -> None:
    # one arrival at the stop, then 400 in 10.5-10.9 s: no 1 s window starting at one of those ends by 11 s
    arrivals = [6.0] + [10.5 + k / 1000 for k in range(400)]
    assert load.load_after_stop(arrivals, 100.0, 6.0, 12.0) == {
        "load_after_stop": 0.802,
        "peak_1s_load_after_stop": 4.0,
    }
