"""SIGTERM: readiness turns 503 at once, accepted work is answered, nothing is dropped, the process exits in time.

What SIGTERM guarantees (service/app.py, lifespan): at once, /readyz and /v2/health/ready answer 503 and
new inference requests 503 + Retry-After, while the server keeps accepting connections, so probes and
clients get an answer rather than a refused connection. Every request received before the signal is
answered with its result, one whose body is still arriving then included. Only when none is left (or
LCS_DRAIN_SECONDS have passed; requests still queued then get 503 + Retry-After) is uvicorn's own
handler called: it closes the listener (from then on new connections are refused), closes idle keep-alive
connections and exits.

The first three tests drive the handler in process, with a stand-in for uvicorn's handler; the last runs a
real `python -m service` on 127.0.0.1 under a steady stream of requests (~6 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

import service.runtime
from service.app import create_app
from service.middleware import SERVER_BUFFERS
from service.runtime import Runtime, inference_executor
from tests.service.service_support import (
    IMAGE,
    ROOT,
    TinyCheckpoint,
    app_state,
    free_port,
    make_settings,
    paused,
    real_server,
    serve_async,
    until,
    wait_for,
)

ZEROS = [[0] * IMAGE for _ in range(IMAGE)]


@pytest.fixture
def uvicorn_handler() -> Iterator[list[float]]:
    """A stand-in for uvicorn's SIGTERM handler (installed before the lifespan, as uvicorn does); the list
    records when it was called. The real handler is restored afterwards."""
    calls: list[float] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        calls.append(time.monotonic())

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield calls
    finally:
        signal.signal(signal.SIGTERM, previous)


async def body_arriving(client: httpx.AsyncClient, st: Any, rest: asyncio.Event) -> asyncio.Task[httpx.Response]:
    """POST /predict whose body sends its first 10 bytes, then the rest once `rest` is set; returns once the
    service is reading it (past the pre-body gate)."""
    body = json.dumps({"inputs": [ZEROS]}).encode()

    async def arriving() -> AsyncIterator[bytes]:
        yield body[:10]
        await rest.wait()
        yield body[10:]

    headers = {"content-type": "application/json"}
    early = asyncio.create_task(client.post("/predict", content=arriving(), headers=headers))
    await until(lambda: st.parsing == 1, what="the body to start arriving")
    return early


def test_sigterm_refuses_new_work_at_once_and_hands_over_after_the_drain(
    structured: TinyCheckpoint, uvicorn_handler: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lcs.service")

    async def scenario() -> None:
        async with serve_async(make_settings(structured.path, max_wait_ms=0.0, drain_seconds=10.0)) as (client, st):
            with paused(st) as gate:  # hold the model: the accepted requests stay in flight
                accepted = [
                    asyncio.create_task(client.post("/predict", json={"inputs": [ZEROS], "quality": q}))
                    for q in (1.0, 0.5, 0.5, 0.0)
                ]
                await until(lambda: st.inflight == 4, what="every request to be admitted")
                os.kill(os.getpid(), signal.SIGTERM)  # the handler runs in this (the main) thread
                r = await client.get("/readyz")
                assert r.status_code == 503 and r.json() == {"status": "draining"}
                assert (await client.get("/v2/health/ready")).status_code == 503
                refused = await client.post("/predict", json={"inputs": [ZEROS]})
                assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
                assert refused.headers["connection"] == "close"  # a pooled client reconnects, to a live pod
                # a large body may still be arriving: closing would reset the upload, which can lose the answer
                large = json.dumps({"inputs": [ZEROS] * 200}).encode()
                assert len(large) > SERVER_BUFFERS
                refused = await client.post("/predict", content=large, headers={"content-type": "application/json"})
                assert refused.status_code == 503 and "connection" not in refused.headers
                assert "draining (SIGTERM): new inference requests get 503; 4 in flight" in caplog.text
                await asyncio.sleep(0.1)
                assert uvicorn_handler == []  # work is still in flight: uvicorn keeps accepting connections
                gate.set()
                answers = await asyncio.gather(*accepted)
            assert [a.status_code for a in answers] == [200] * 4
            await until(lambda: len(uvicorn_handler) == 1, what="the hand-over to uvicorn")
            assert st.inflight == 0 and st.batcher.depth == 0
            assert "drained: every accepted request answered, " in caplog.text

    asyncio.run(scenario())


def test_a_shutdown_without_sigterm_does_not_say_it_drains_for_one(
    structured: TinyCheckpoint, caplog: pytest.LogCaptureFixture
) -> None:
    """Ctrl-C, a failed warm-up's stop and a test client's exit also shut the app down: "draining (SIGTERM)" was
    said for each, with new requests "getting 503" from a server no longer listening."""

    async def scenario() -> None:
        async with serve_async(make_settings(structured.path)) as (client, _):
            assert (await client.get("/healthz")).status_code == 200

    with caplog.at_level(logging.INFO, logger="lcs.service"):
        asyncio.run(scenario())
        logging.getLogger("lcs.service").info("after the shutdown")  # the capture works
    assert "after the shutdown" in caplog.text and "draining (SIGTERM)" not in caplog.text


def test_a_request_still_arriving_at_sigterm_is_served_and_the_drain_waits_for_it(
    structured: TinyCheckpoint, uvicorn_handler: list[float]
) -> None:
    """Received before the signal (past the pre-body gate, its body still arriving or decoding): answered
    with its result, not refused as new work, and uvicorn is not handed over until it is."""

    async def scenario() -> None:
        async with serve_async(make_settings(structured.path, max_wait_ms=0.0, drain_seconds=10.0)) as (client, st):
            rest = asyncio.Event()
            early = await body_arriving(client, st, rest)
            os.kill(os.getpid(), signal.SIGTERM)
            await until(lambda: st.draining, what="the signal")
            refused = await client.post("/predict", json={"inputs": [ZEROS]})  # sent after it: new work
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            await asyncio.sleep(0.1)
            assert uvicorn_handler == []  # the early request is still arriving
            rest.set()
            answer = await early
            assert answer.status_code == 200, answer.text
            await until(lambda: len(uvicorn_handler) == 1, what="the hand-over to uvicorn")

    asyncio.run(scenario())


def test_work_still_queued_at_the_drain_deadline_gets_503_not_a_dropped_connection(
    structured: TinyCheckpoint, uvicorn_handler: list[float]
) -> None:
    async def scenario() -> None:
        async with serve_async(make_settings(structured.path, max_wait_ms=0.0, drain_seconds=0.3)) as (client, st):
            with paused(st) as gate:
                running = asyncio.create_task(client.post("/predict", json={"inputs": [ZEROS], "quality": 1.0}))
                await until(lambda: st.batcher.running == 1, what="the first batch to be taken")
                queued = asyncio.create_task(client.post("/predict", json={"inputs": [ZEROS], "quality": 0.0}))
                await until(lambda: st.batcher.depth == 1, what="the second request to queue")
                t0 = time.monotonic()
                os.kill(os.getpid(), signal.SIGTERM)
                late = await queued  # the deadline passes while the model is still held
                assert late.status_code == 503 and late.headers["retry-after"] == "1"
                assert "retry" in late.json()["detail"] and late.json()["request_id"]
                await until(lambda: len(uvicorn_handler) == 1, what="the hand-over to uvicorn")
                assert 0.25 <= uvicorn_handler[0] - t0 < 2.0
                gate.set()
                assert (await running).status_code == 200  # the batch that was running still completes
            metrics = (await client.get("/metrics")).text  # a refusal like any other (it was not counted)
            assert 'lcs_shed_total{reason="not_ready"} 1.0' in metrics

    asyncio.run(scenario())


def test_a_body_still_arriving_at_the_drain_deadline_gets_503_not_the_servers_500(
    structured: TinyCheckpoint, uvicorn_handler: list[float]
) -> None:
    """Received before the signal, its body still arriving at the deadline: it was left to uvicorn, which
    cancelled it a second after the deadline with a plain-text 500, counted nowhere."""

    async def scenario() -> None:
        async with serve_async(make_settings(structured.path, max_wait_ms=0.0, drain_seconds=0.3)) as (client, st):
            early = await body_arriving(client, st, asyncio.Event())  # never set: the rest never comes
            t0 = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)
            answer = await asyncio.wait_for(early, 5.0)
            assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
            assert answer.json()["detail"] == "the service shut down before this request's body arrived; retry"
            assert 0.25 <= time.monotonic() - t0 < 2.0
            await until(lambda: len(uvicorn_handler) == 1, what="the hand-over to uvicorn")
            assert 'lcs_shed_total{reason="not_ready"} 1.0' in (await client.get("/metrics")).text

    asyncio.run(scenario())


@pytest.mark.parametrize(("drain", "body_timeout", "busy_at", "busy"), [(0.3, 0.5, 0.28, 0.4), (0.5, 0.5, 0.49, 0.05)])
def test_a_body_timing_out_as_the_drain_deadline_passes_does_not_stop_the_hand_over(
    structured: TinyCheckpoint,
    uvicorn_handler: list[float],
    drain: float,
    body_timeout: float,
    busy_at: float,
    busy: float,
) -> None:
    """The event loop busy across the deadline (a large parse, a collection): the read's own timeout fired in
    the pass that ended the drain, which could not move it (RuntimeError), and the drain never handed over:
    the server answered 503 until it was killed. Its 408 stands, and the server shuts down."""

    async def scenario() -> None:
        settings = make_settings(
            structured.path, max_wait_ms=0.0, drain_seconds=drain, body_timeout_seconds=body_timeout
        )
        async with serve_async(settings) as (client, st):
            early = await body_arriving(client, st, asyncio.Event())  # never set: the rest never comes
            os.kill(os.getpid(), signal.SIGTERM)
            asyncio.get_running_loop().call_later(busy_at, time.sleep, busy)  # the loop held across the deadline
            answer = await asyncio.wait_for(early, 5.0)
            assert answer.status_code in (408, 503), answer.text
            await until(lambda: len(uvicorn_handler) == 1, what="the hand-over to uvicorn")

    asyncio.run(scenario())


def test_under_a_root_path_new_work_is_still_refused_before_its_body(structured: TinyCheckpoint) -> None:
    """uvicorn's --root-path puts the prefix in front of the request's path; the pre-body gate matched the
    path as sent and let new work in while draining (served 200, not counted)."""
    with TestClient(create_app(make_settings(structured.path)), root_path="/api") as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, what="ready")
        app_state(client).start_draining()
        refused = client.post("/api/predict", json={"inputs": [ZEROS]})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert 'lcs_shed_total{reason="not_ready"} 1.0' in client.get("/metrics").text


def test_sigterm_under_a_steady_stream_on_a_real_server(structured: TinyCheckpoint, tmp_path: Path) -> None:
    """8 clients send back to back; batches wait up to 1 s for company (LCS_MAX_WAIT_MS), so the signal,
    sent just after a batch was answered, finds the clients' next requests queued for up to ~0.9 s: long
    past uvicorn's 0.1 s shutdown tick, which is when a server that let uvicorn stop at once would refuse."""
    drain = 5.0
    env = {"LCS_DRAIN_SECONDS": str(drain), "LCS_MAX_WAIT_MS": "1000", "LCS_MAX_BATCH": "1024"}
    body = {"inputs": [ZEROS] * 4}
    with real_server(structured.path, tmp_path, **env) as server:
        results: list[dict[str, Any]] = []
        answered = asyncio.Event()
        signalled = asyncio.Event()

        async def stream(client: httpx.AsyncClient) -> None:
            """One client, back to back, until the signal; the request in flight then is followed through."""
            while not signalled.is_set():
                rec: dict[str, Any] = {"sent": time.monotonic()}
                try:
                    r = await client.post("/predict", json=body)
                    rec.update(status=r.status_code, retry_after=r.headers.get("retry-after"))
                    if r.status_code != 200:
                        rec["detail"] = r.json()["detail"]
                except httpx.HTTPError as e:  # a reset, a refused connection or a timeout: a dropped request
                    rec["error"] = repr(e)
                rec["done"] = time.monotonic()
                results.append(rec)
                answered.set()

        async def readyz(client: httpx.AsyncClient | None) -> int | str:
            try:
                if client is not None:
                    return (await client.get("/readyz")).status_code
                async with httpx.AsyncClient(base_url=server.base_url, timeout=5.0) as fresh:
                    return (await fresh.get("/readyz")).status_code
            except httpx.HTTPError as e:
                return repr(e)

        async def scenario() -> tuple[float, list[tuple[float, int | str, int | str, float]], httpx.Response]:
            clients = [httpx.AsyncClient(base_url=server.base_url, timeout=30.0) for _ in range(8)]
            probe = httpx.AsyncClient(base_url=server.base_url, timeout=5.0)
            assert (await probe.get("/readyz")).status_code == 200  # opens the probe's keep-alive connection
            streams = [asyncio.create_task(stream(c)) for c in clients]
            await asyncio.sleep(2.5)  # steady state: a batch about every second
            answered.clear()
            await answered.wait()  # a batch was just answered; its clients send their next requests now
            await asyncio.sleep(0.05)
            t_signal = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            signalled.set()
            async with httpx.AsyncClient(base_url=server.base_url, timeout=5.0) as fresh:
                refused = await fresh.post("/predict", json={"inputs": [ZEROS]})
            probes = []  # (seconds after the signal, on the open connection, on a new connection, finished at)
            while not all(s.done() for s in streams):
                t = time.monotonic() - t_signal
                probes.append((t, await readyz(probe), await readyz(None), time.monotonic()))
                await asyncio.sleep(0.05)
            await asyncio.gather(*streams)
            for c in [*clients, probe]:
                await c.aclose()
            return t_signal, probes, refused

        t_signal, probes, refused = asyncio.run(scenario())
        code = server.proc.wait(timeout=drain + 10)
        exited = time.monotonic() - t_signal
        log = server.log.read_text()

    in_flight = [r for r in results if r["sent"] < t_signal <= r["done"]]
    print(
        f"SIGTERM with {len(in_flight)} requests in flight: {sum(r.get('status') == 200 for r in in_flight)} got 200;"
        f" {len(probes)} readiness probes, all 503, the last {probes[-1][0]:.2f} s after the signal;"
        f" exit {exited:.2f} s after the signal (limit {drain + 2:g} s), code {code}"
    )
    # readiness: 503 from the signal until the accepted work was answered, on open and new connections alike.
    # The window ends with the last answer: a probe still running then races the listener closing as the
    # process exits, which is shutdown, not readiness. (A fresh-clone CI run failed this assertion once;
    # its output was cut before the failing probe, so that race is the inferred, not the observed, cause.)
    last_answer = max(r["done"] for r in results)
    during = [p for p in probes if p[3] < last_answer]
    assert during and all(p[1:3] == (503, 503) for p in during), (probes, log)
    assert during[-1][0] > 0.3, probes  # the drain outlasted uvicorn's shutdown tick
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    dropped = [r for r in results if "error" in r]
    assert not dropped, (dropped, log)
    # every request admitted before the signal got its result. A client whose request was still on its way
    # when the signal landed may have been refused at admission instead (503 + Retry-After); the refusal
    # for work abandoned at the drain deadline ("shut down before this request ran") must never appear
    assert len(in_flight) == 8 and any(r["status"] == 200 for r in in_flight), in_flight
    for r in results:
        assert r["status"] == 200 or (r["status"] == 503 and r["retry_after"] and "retry shortly" in r["detail"]), r
    assert exited <= drain + 2.0, (exited, log)
    assert code in (0, -signal.SIGTERM), log  # uvicorn re-raises the signal once it has shut down
    assert "Traceback" not in log, log


def test_a_shutdown_during_warm_up_stops_it_at_its_next_step(
    structured: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn had shut down, but the warm-up went on on the inference thread, which the interpreter waits
    for at exit: as a container's PID 1 (SIGTERM) or after Ctrl-C, the process profiled and self-checked to
    the end, 8.6 s after the signal in a review's run (past `docker stop`'s 10 s: SIGKILL)."""
    monkeypatch.setattr(service.runtime, "PROFILE_ROUNDS", 1_000_000)  # a profile of hours
    settings = make_settings(structured.path)
    executor = inference_executor()
    loaded = executor.submit(Runtime.load, settings).result()
    app = create_app(settings, runtime=loaded, executor=executor)

    async def run() -> None:
        async with app.router.lifespan_context(app):
            await asyncio.sleep(0.5)  # building or profiling by now

    with caplog.at_level(logging.INFO, "lcs.service"):
        asyncio.run(run())
        ended = threading.Thread(target=executor.shutdown)  # waits for the warm-up's thread
        ended.start()
        ended.join(timeout=10)
    assert not ended.is_alive() and not loaded.ready
    assert "warm-up stopped: the service is shutting down" in caplog.text


def test_ctrl_c_stops_a_real_server_with_130_and_no_traceback(structured: TinyCheckpoint, tmp_path: Path) -> None:
    """uvicorn raises SIGINT again after its shutdown; uncaught, every Ctrl-C printed a KeyboardInterrupt
    traceback and the process died of the signal."""
    # a shell's background job (CI's, say) starts with SIGINT ignored, which the server would inherit and
    # Python keep: Ctrl-C as a terminal delivers it needs the default disposition
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with real_server(structured.path, tmp_path) as server:
            server.proc.send_signal(signal.SIGINT)
            code = server.proc.wait(timeout=30)
    finally:
        signal.signal(signal.SIGINT, previous)
    log = server.log.read_text()
    assert code == 130 and "Traceback" not in log, log[-2000:]


def test_ctrl_c_while_the_checkpoint_loads_exits_130_without_a_traceback(
    structured: TinyCheckpoint, tmp_path: Path
) -> None:
    """The port is bound (and listening) before the checkpoint loads; a Ctrl-C then, while the load ran,
    printed a KeyboardInterrupt traceback and exited 1 (a review's run)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LCS_")}
    env.update(LCS_CHECKPOINT=str(structured.path), LCS_PORT=str(port), LCS_THREADS="1")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in the test above
    try:
        proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stderr=subprocess.PIPE)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            break  # bound: the load starts now
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"Traceback" not in stderr, stderr.decode()[-2000:]


def _catches(status: Path, signum: int) -> bool:
    """Whether the process whose /proc status file this is has a handler for `signum` (its SigCgt mask)."""
    caught = next(line for line in status.read_text().splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) >> (signum - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_sigterm_during_start_up_stops_the_process(structured: TinyCheckpoint, tmp_path: Path) -> None:
    """Before uvicorn's handlers (importing torch, loading, building), SIGTERM ends it with 143. A container's
    PID 1 has no default action for SIGTERM: there it was ignored, and the service went on to serve."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LCS_")}
    env.update(LCS_CHECKPOINT=str(structured.path), LCS_PORT=str(free_port()), LCS_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stderr=subprocess.PIPE)
    # Once the handler is installed (its first statement; importing torch then takes seconds): a fixed 0.3 s
    # was too short on a busy machine, and a SIGTERM before it ended the process the default way (-15)
    status = Path(f"/proc/{proc.pid}/status")
    deadline = time.monotonic() + 30
    while not _catches(status, signal.SIGTERM) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
