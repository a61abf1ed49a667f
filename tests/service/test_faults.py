"""Faults the service survives: a monitoring system that is down or hangs, and memory pressure on the cache.

Tested elsewhere, referenced here:

- checkpoint missing, truncated, corrupt, foreign or of a newer format version: refused with the file, the
  problem and the fix (tests/lcs/test_checkpoint.py);
- pickle-bearing checkpoints (a torch.save zip; a raw pickle whose payload would write a file): refused and
  no code run, the payload's file is never written (tests/lcs/test_checkpoint.py
  `test_malicious_pickle_is_refused_without_running_code`, `test_torch_save_pickle`); at start-up of
  `python -m service`, exit code 2 before binding a port (tests/service/test_startup.py);
- Prometheus down, slow or answering garbage, for the fleet source alone: None values, never raises, a
  refresh is never awaited by its caller (tests/deploy/test_fleet.py);
- an exception inside inference: 500 with the request id, no internals leaked, the next request is served
  (tests/service/test_app.py `test_model_failure_is_a_500_and_the_service_keeps_serving`);
- an exception in the batcher outside the model: that batch fails, the loop keeps serving
  (tests/service/test_batcher.py).

Added here, at the level of the whole app: Prometheus refusing connections or accepting and never answering
while control steps run every 50 ms (the request path never waits for it), and a cache bound too small for
the alphas in use (entries are evicted; resident bytes stay under the bound whenever two models are held).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service import materialize
from service.materialize import build
from tests.service.service_support import (
    GRID,
    IMAGE,
    TinyCheckpoint,
    free_port,
    make_settings,
    one_running_one_queued,
    paused,
    serve,
    serve_async,
)

ZEROS = [[0] * IMAGE for _ in range(IMAGE)]


@contextlib.contextmanager
def prometheus(kind: str) -> Iterator[str]:
    """A Prometheus URL that refuses connections, or one whose server accepts and never answers."""
    if kind == "refused":
        yield f"http://127.0.0.1:{free_port()}"  # nothing listens there
        return
    with socket.socket() as sock:  # the kernel completes the handshake (backlog); nobody reads or answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("kind", ["refused", "hangs"])
def test_prometheus_down_or_hanging_never_stalls_the_request_path(structured: TinyCheckpoint, kind: str) -> None:
    timeout = 2.0  # a hanging Prometheus holds each refresh this long: a request that waited would show it

    async def scenario(url: str) -> None:
        settings = make_settings(
            structured.path,
            prometheus_url=url,
            prometheus_timeout_seconds=timeout,
            control_interval_seconds=0.05,
        )
        async with serve_async(settings) as (client, st):
            t0 = time.monotonic()
            latencies = []
            # a second of requests, and at least 20 (a machine that stalls may fit fewer in the second)
            while time.monotonic() - t0 < 1.0 or len(latencies) < 20:
                start = time.monotonic()
                r = await client.post("/predict", json={"inputs": [ZEROS]})
                latencies.append(time.monotonic() - start)
                assert r.status_code == 200, r.text
            c = st.runtime.controller
            assert c.last_signals is not None and c.last_signals.now > t0 + 0.5  # control steps kept running
            assert c.last_signals.fleet_rate is None  # no fleet figures: local signals only
            assert st.fleet is not None
            if kind == "refused":
                assert not st.fleet.up  # refreshes were tried and failed
            else:
                assert st.fleet._task is not None and not st.fleet._task.done()  # still waiting on Prometheus
            assert max(latencies) < 0.5 * timeout, sorted(latencies)[-5:]

    with prometheus(kind) as url:
        asyncio.run(scenario(url))


@pytest.mark.parametrize(("timeout", "warned"), [(0.4, False), (0.5, True), (2.0, True)])
def test_a_prometheus_timeout_not_below_the_control_interval_is_warned_of(
    structured: TinyCheckpoint, caplog: pytest.LogCaptureFixture, timeout: float, warned: bool
) -> None:
    """A figure serves for 1.5 control intervals after the refresh that read it: answers slower than the
    interval steer the controller late, which nothing said."""
    settings = make_settings(
        structured.path,
        prometheus_url=f"http://127.0.0.1:{free_port()}",
        prometheus_timeout_seconds=timeout,
        control_interval_seconds=0.5,
    )
    with caplog.at_level(logging.WARNING, logger="lcs.service"), serve(settings) as c:
        assert c.get("/readyz").status_code == 200
    said = [r.getMessage() for r in caplog.records if "LCS_PROMETHEUS_TIMEOUT_SECONDS" in r.getMessage()]
    assert len(said) == int(warned), said
    if warned:
        assert f"={timeout:g} is not below LCS_CONTROL_INTERVAL_SECONDS=0.5" in said[0]


def _cache_figures(text: str) -> dict[str, float]:
    families = text_string_to_metric_families(text)
    return {s.name: s.value for f in families if f.name.startswith("lcs_cache_") for s in f.samples}


@pytest.mark.parametrize("room", ["two models", "no model"])
def test_cache_memory_pressure_evicts_instead_of_growing(
    structured: TinyCheckpoint, room: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(materialize, "_padding_pays", lambda *args: False)  # sizes that do not depend on timing
    model, meta = structured.model, structured.meta
    size = {a: build(model, meta, a, samples=None, channels_last=False).resident_bytes for a in GRID}
    bound = size[1.0] + size[0.5] if room == "two models" else 1  # never all three grid alphas
    # 30 requests, 21 distinct quality values, that visit the three grid alphas in turn: LRU misses every time
    qualities = [min(1.0, GRID[i % 3] + 0.04 * (i // 3)) for i in range(30)]
    with serve(make_settings(structured.path, cache_bytes=bound)) as c:
        before = _cache_figures(c.get("/metrics").text)
        assert before["lcs_cache_max_bytes"] == bound
        served = set()
        for q in qualities:
            r = c.post("/predict", json={"inputs": [ZEROS], "quality": q})
            assert r.status_code == 200, r.text
            served.add(r.json()["alpha"])
            m = _cache_figures(c.get("/metrics").text)
            assert m["lcs_cache_entries"] <= 2  # at most the fastest (kept) and the newest
            if room == "two models":
                assert m["lcs_cache_bytes"] <= m["lcs_cache_max_bytes"]
        after = _cache_figures(c.get("/metrics").text)
    assert served == set(GRID)
    assert after["lcs_cache_evictions_total"] > before["lcs_cache_evictions_total"] + 10
    assert after["lcs_cache_builds_total"] > len(GRID) + 10  # evicted alphas were rebuilt when asked again
    # one batch per request, each one lookup: a miss where it rebuilt (such a batch counted a miss and a hit)
    hits, misses, builds = (
        after[f"lcs_cache_{k}_total"] - before[f"lcs_cache_{k}_total"] for k in ("hits", "misses", "builds")
    )
    assert hits + misses == len(qualities) and misses == builds


def test_a_full_queue_refuses_before_reading_the_body(structured: TinyCheckpoint) -> None:
    """Under overload the refusal must be cheap: a body that would take parsing to reject is never read."""

    async def scenario() -> None:
        async with serve_async(make_settings(structured.path, queue_max=1, max_wait_ms=0.0)) as (client, st):
            with paused(st) as gate:
                body = {"inputs": [ZEROS]}
                first, second = await one_running_one_queued(client, st, body)
                garbage = {"content": b"{not json at all", "headers": {"content-type": "application/json"}}
                for path in ("/predict", "/v2/models/tiny_structured/infer"):
                    r = await client.post(path, **garbage)  # type: ignore[arg-type]
                    assert r.status_code == 429, r.text  # not 422: the body was never parsed
                    assert int(r.headers["retry-after"]) >= 1 and r.json()["request_id"] == r.headers["x-request-id"]
                gate.set()
                assert [r.status_code for r in await asyncio.gather(first, second)] == [200, 200]
            assert (await client.post("/predict", **garbage)).status_code == 422  # room again: parsed  # type: ignore[arg-type]
            metrics = (await client.get("/metrics")).text
            assert 'lcs_requests_total{endpoint="/predict",status="429"} 1.0' in metrics
            assert 'lcs_requests_total{endpoint="/v2/models/{name}/infer",status="429"} 1.0' in metrics
            assert 'lcs_shed_total{reason="queue_full"} 2.0' in metrics

    asyncio.run(scenario())


def test_a_control_step_that_keeps_failing_is_logged_once_then_once_a_minute_and_its_end_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A signal read that kept raising wrote its traceback every step: 1,440 lines a minute at 0.5 s."""
    from types import SimpleNamespace

    from service import app

    steps: list[int] = []

    async def step(now: float) -> None:
        steps.append(1)
        if len(steps) <= 5:
            raise OSError("no such file: /proc/meminfo")
        if len(steps) == 7:
            raise asyncio.CancelledError  # end the loop

    st = SimpleNamespace(settings=SimpleNamespace(control_interval_seconds=30.0), control_step=step, fleet=None)
    real_sleep = asyncio.sleep
    monkeypatch.setattr(app.asyncio, "sleep", lambda seconds: real_sleep(0))  # two steps a "minute"
    with caplog.at_level(logging.INFO, logger="lcs.service"), contextlib.suppress(asyncio.CancelledError):
        asyncio.run(app._control_loop(st))  # type: ignore[arg-type]
    said = [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert said == [
        ("ERROR", "control step failed; keeping the last ceiling", True),
        ("WARNING", "control steps still failing (2 in a row, OSError: no such file: /proc/meminfo)", False),
        ("WARNING", "control steps still failing (4 in a row, OSError: no such file: /proc/meminfo)", False),
        ("INFO", "control steps work again after 5 failed", False),
    ]
