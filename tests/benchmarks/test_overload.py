"""benchmarks.overload: the servers it (and benchmarks.load) start are stopped whatever happens."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import overload, server
from benchmarks.openloop import post
from tests.benchmarks.test_openloop import _response, _server


class FakeServer:
    """What start_server sees of `python -m service`: a process that runs until it is sent a signal."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.returncode: int | None = None
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        self.returncode = -sig

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


@pytest.mark.parametrize(
    "failure", [KeyboardInterrupt(), SystemExit("http://127.0.0.1:1/readyz not ready after 120 s")]
)
def test_a_server_that_does_not_get_ready_is_stopped_not_left_running(
    failure: BaseException, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[FakeServer] = []

    def popen(*args: object, **kwargs: object) -> FakeServer:
        started.append(FakeServer())
        return started[-1]

    def wait_ready(url: str, proc: FakeServer) -> None:
        raise failure  # Ctrl-C while it starts, or the ready timeout

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(server, "wait_ready", wait_ready)
    with pytest.raises(type(failure)):
        server.start_server("model.safetensors", 1, 0.1)
    assert [s.signals for s in started] == [[signal.SIGTERM]]


def test_a_mix_the_server_refuses_is_reported_before_its_capacity_is_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--images 65 over the service's limit of 64: both capacity runs measured refusals, then the run
    stopped saying only 'capacity measured as 0 requests/s: is the server answering 200?'."""
    stopped: list[object] = []
    measured: list[object] = []

    async def answer(port: int, req: bytes) -> tuple[int, bytes]:
        return 422, b'{"error": "invalid input", "detail": "inputs: 65 images in one request, the limit is 64"}'

    monkeypatch.setattr(overload, "start_server", lambda *a, **k: "server")
    monkeypatch.setattr(overload, "stop_server", stopped.append)
    monkeypatch.setattr(overload, "request_body", lambda base, images: b"{}")
    monkeypatch.setattr(overload, "capacity", lambda *a, **k: measured.append(a) or 0.0)
    monkeypatch.setattr(overload.openloop, "answer", answer)
    argv = ["overload", "--images", "65", "--out", str(tmp_path / "o.json"), "--checkpoint", __file__]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        overload.main()
    assert e.value.code == (
        "error: --images 65: the server refuses it (422: inputs: 65 images in one request, the limit is 64); "
        "change the mix"
    )
    assert stopped == ["server"] and measured == []


@pytest.mark.parametrize(("measured", "refused"), [(50.0, 0), (35.8, 8382)])
def test_a_capacity_measured_while_the_server_refused_work_stops_the_run(
    measured: float, refused: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def closed_loop(*args: Any, **kwargs: Any) -> tuple[float, int]:
        return measured, refused

    monkeypatch.setattr(overload.openloop, "closed_loop", closed_loop)
    if not refused:
        assert overload.capacity(1, b"", 1.0) == measured
        return
    with pytest.raises(SystemExit) as e:
        overload.capacity(1, b"", 1.0)
    assert str(e.value).startswith(
        "error: the server answered 8382 requests with a status other than 200 while its capacity was measured"
    )


def test_rss_growth_is_the_slope_after_the_first_tenth_in_mib_per_hour() -> None:
    mib = 2**20
    warm = [(t / 2, 100 * mib + (50 * mib if t < 10 else 0)) for t in range(100)]  # a spike while warming up
    assert overload.rss_growth(warm) == pytest.approx(0.0)
    leak = [(float(t), 300 * mib + t * mib // 60) for t in range(0, 600, 5)]  # 1 MiB a minute
    assert overload.rss_growth(leak) == pytest.approx(60.0, rel=0.01)
    assert math.isnan(overload.rss_growth(leak[:5]))  # too few samples to say
    short = [(t / 2, 300 * mib + t * mib) for t in range(41)]  # 37 samples after the first tenth, over 18 s
    assert math.isnan(overload.rss_growth(short))  # too short a time to say


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_ends_the_run_with_what_was_measured(sig: signal.Signals) -> None:
    """A soak cut short: sending stops, the requests in flight are answered, and the run returns them with
    `interrupted`; the signal handlers are as they were after it (a second signal acts as before)."""

    def unexpected(signum: int, frame: object) -> None:
        raise AssertionError(f"{signal.Signals(signum).name} reached Python's handler: the run did not take it")

    async def main() -> tuple[list[object], bool]:
        server, port, _ = await _server(lambda n: (0.02, _response(200)))
        asyncio.get_running_loop().call_later(0.3, os.kill, os.getpid(), sig)
        times = [i * 0.01 for i in range(500)]  # 5 s of them
        replies, skipped, rss, interrupted = await overload.overload(port, [post("/p", b"x", port)], times, os.getpid())
        server.close()
        assert skipped == 0 and rss and all(r.status == 200 for r in replies)
        return list(replies), interrupted

    kept = {s: signal.signal(s, unexpected) for s in (signal.SIGINT, signal.SIGTERM)}  # not pytest's, if it fails
    try:
        before = {s: signal.getsignal(s) for s in kept}
        replies, interrupted = asyncio.run(main())
        assert {s: signal.getsignal(s) for s in kept} == before
    finally:
        for s, handler in kept.items():
            signal.signal(s, handler)
    assert interrupted and 10 <= len(replies) <= 60, len(replies)
