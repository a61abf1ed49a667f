"""service.app: every endpoint's success and error paths, in process (TestClient or httpx over ASGI)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import logging
import re
import threading
import time
import typing
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service import docs
from service.cgroups import usable_cpus
from service.controller import Signals
from service.lane import ApiError, split_binary
from service.profile import LatencyProfile
from service.runtime import Runtime
from service.schemas import PRESETS, Preset
from service.state import IDLE_MODEL_SECONDS
from tests.service.service_support import (
    ACCURACY,
    CLASSES,
    GRID,
    IMAGE,
    TinyCheckpoint,
    app_state,
    control_step,
    image_list,
    make_checkpoint,
    make_settings,
    normalise,
    one_running_one_queued,
    paused,
    random_images,
    serve,
    serve_async,
    until,
    wait_for,
)

NAME = "tiny_structured"  # the checkpoint's file stem


def reference(ck: TinyCheckpoint, images: torch.Tensor, alpha: float) -> torch.Tensor:
    """Probabilities [N, classes] from the training-side model at alpha, for uint8 images [N, 1, H, W]."""
    with torch.no_grad():
        return torch.softmax(ck.model(normalise(images), ck.model.at(alpha)), dim=1)


def assert_matches(predictions: list[dict[str, Any]], expected: torch.Tensor) -> None:
    assert len(predictions) == len(expected)
    for pred, ref in zip(predictions, expected, strict=True):
        order = ref.argsort(descending=True).tolist()
        assert [t["index"] for t in pred["top"]] == order[: len(pred["top"])]
        assert pred["index"] == order[0] and pred["label"] == CLASSES[order[0]]
        for t in pred["top"]:
            assert t["probability"] == pytest.approx(float(ref[t["index"]]), abs=1e-4)
            assert t["label"] == CLASSES[t["index"]]


def b64(image: Image.Image, fmt: str) -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def post_raw(client: TestClient, body: str, path: str = "/predict") -> httpx.Response:
    return client.post(path, content=body.encode(), headers={"content-type": "application/json"})


@pytest.fixture(scope="module")
def client(structured: TinyCheckpoint) -> Iterator[TestClient]:
    """One warmed-up app for the tests that do not change its state (no API key: admin is off)."""
    with serve(make_settings(structured.path, max_inputs=4)) as c:
        yield c


IMAGES = random_images(4, seed=42)


# -- /predict: success ------------------------------------------------------------------------------


def test_predict_arrays_match_the_training_model(client: TestClient, structured: TinyCheckpoint) -> None:
    r = client.post("/predict", json={"inputs": [image_list(x) for x in IMAGES[:3]]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert_matches(body["predictions"], reference(structured, IMAGES[:3], 1.0))
    assert body["model"] == NAME and body["kind"] == "structured"
    assert body["alpha"] == 1.0 and body["level"] == 1.0 and body["level_name"] == "width"
    assert body["accuracy"] == ACCURACY[1.0]
    assert 1 <= body["batch_images"] <= 8
    assert body["queue_ms"] >= 0 and body["compute_ms"] > 0
    assert body["request_id"] == r.headers["x-request-id"]
    assert all(len(p["top"]) == 3 for p in body["predictions"])  # the top_k setting's default


def test_predict_accepts_hw_chw_and_hwc_arrays(client: TestClient) -> None:
    x = IMAGES[0, 0]
    shapes = [x.tolist(), x[None].tolist(), x[:, :, None].tolist()]
    r = client.post("/predict", json={"inputs": shapes})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert preds[0] == preds[1] == preds[2]


def test_predict_png_gives_the_same_answer_as_the_array(client: TestClient, structured: TinyCheckpoint) -> None:
    png = b64(Image.fromarray(IMAGES[1, 0].numpy(), "L"), "PNG")
    r = client.post("/predict", json={"inputs": [png, "data:image/png;base64," + png]})
    assert r.status_code == 200, r.text
    assert_matches(r.json()["predictions"], reference(structured, IMAGES[[1, 1]], 1.0))


def test_predict_jpeg(client: TestClient, structured: TinyCheckpoint) -> None:
    flat = np.full((IMAGE, IMAGE), 128, dtype=np.uint8)  # a flat image survives JPEG (almost) unchanged
    r = client.post("/predict", json={"inputs": [b64(Image.fromarray(flat, "L"), "JPEG")]})
    assert r.status_code == 200, r.text
    expected = reference(structured, torch.from_numpy(flat)[None, None], 1.0)
    top = r.json()["predictions"][0]
    assert top["index"] == int(expected.argmax())
    assert top["probability"] == pytest.approx(float(expected.max()), abs=0.02)


def test_predict_colour_png_is_converted(client: TestClient, structured: TinyCheckpoint) -> None:
    rgb = Image.fromarray(np.repeat(IMAGES[2, 0].numpy()[:, :, None], 3, axis=2), "RGB")  # grey in RGB
    r = client.post("/predict", json={"inputs": [b64(rgb, "PNG")]})
    assert r.status_code == 200, r.text
    assert_matches(r.json()["predictions"], reference(structured, IMAGES[[2]], 1.0))


@pytest.mark.parametrize(
    ("quality", "alpha"),
    [("best", 1.0), ("high", 0.5), ("balanced", 0.5), ("fast", 0.0), ("fastest", 0.0), (0.7, 0.5), (0.0, 0.0)],
)
def test_quality_presets_and_numbers_snap_down_to_the_grid(
    client: TestClient, structured: TinyCheckpoint, quality: str | float, alpha: float
) -> None:
    r = client.post("/predict", json={"inputs": [image_list(IMAGES[3])], "quality": quality})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["alpha"] == alpha
    assert body["level"] == pytest.approx(0.25 + 0.75 * alpha)
    assert body["accuracy"] == ACCURACY[alpha]
    assert_matches(body["predictions"], reference(structured, IMAGES[[3]], alpha))


@pytest.mark.parametrize(("top_k", "expected"), [(1, 1), (2, 2), (4, 4), (1000, 4)])
def test_top_k(client: TestClient, top_k: int, expected: int) -> None:
    r = client.post("/predict", json={"inputs": [image_list(IMAGES[0])], "top_k": top_k})
    assert r.status_code == 200, r.text
    top = r.json()["predictions"][0]["top"]
    assert len(top) == expected
    probs = [t["probability"] for t in top]
    assert probs == sorted(probs, reverse=True)
    if expected == len(CLASSES):
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)


def test_min_quality_that_can_be_met_is_served(client: TestClient) -> None:
    r = client.post("/predict", json={"inputs": [image_list(IMAGES[0])], "quality": 1.0, "min_quality": 0.3})
    assert r.status_code == 200 and r.json()["alpha"] == 1.0


@pytest.mark.parametrize(("quality", "min_quality"), [(0.7 - 0.2, 0.5), (0.5, 0.5000000000000001)])
def test_quality_and_min_quality_that_are_one_alpha_spelt_two_ways_are_served(
    client: TestClient, quality: float, min_quality: float
) -> None:
    """Each snaps to grid alpha 0.5; compared raw, they were refused: "min_quality (0.5) is above quality (0.5)"."""
    r = client.post("/predict", json={"inputs": [ZEROS], "quality": quality, "min_quality": min_quality})
    assert r.status_code == 200 and r.json()["alpha"] == 0.5, r.text


def _model_is_the_cost(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> Callable[[float], float]:
    """A made-up profile where the model is the cost (the tiny model's own is dwarfed by request handling,
    where the controller keeps alpha): 10 ms + 1 s x alpha an image, and nothing learned by earlier tests
    (the client is shared) about how the machine runs against its profile. Returns it, as alpha -> seconds."""
    runtime = app_state(client).runtime
    made_up = LatencyProfile()
    for a in runtime.grid.alphas:
        made_up.add(a, 1, 0.010 + a)
    c = runtime.controller
    for name, fresh in (
        ("profile", made_up),
        ("calm_ratio", {}),
        ("drift", 1.0),
        ("handoff", 0.0),
        ("last_signals", None),
    ):
        monkeypatch.setattr(c, name, fresh)
    return lambda a: 0.010 + a


@pytest.mark.parametrize(("min_quality", "alpha"), [(None, 0.0), (0.5, 0.5), (1.0, 1.0)])
def test_a_tight_deadline_lowers_alpha_but_never_below_the_floor(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, min_quality: float | None, alpha: float
) -> None:
    # three times the floor's time: the floor fits, the next grid alpha up (0.25 s more) does not
    cost = _model_is_the_cost(client, monkeypatch)
    deadline_ms = 3000 * cost(min_quality or 0.0)
    body: dict[str, Any] = {"inputs": [image_list(IMAGES[0])], "deadline_ms": deadline_ms, "min_quality": min_quality}
    r = client.post("/predict", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["alpha"] == alpha


@pytest.mark.parametrize(("min_quality", "lower"), [(None, False), (0.5, True)])
def test_a_deadline_the_floor_cannot_meet_even_on_an_idle_machine_is_422(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, min_quality: float | None, lower: bool
) -> None:
    """Waiting would not help: the client is told to raise its deadline_ms (or lower min_quality, where
    the cheapest alpha would be in time), not to retry (429)."""
    cost = _model_is_the_cost(client, monkeypatch)
    deadline_ms = 500 * cost(min_quality or 0.0)  # half the floor's time on the profile
    body: dict[str, Any] = {"inputs": [image_list(IMAGES[0])], "deadline_ms": deadline_ms, "min_quality": min_quality}
    r = client.post("/predict", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "on an idle machine" in detail and "raise deadline_ms" in detail
    assert ("or lower min_quality (0.5)" in detail) is lower


def test_load_and_the_time_spent_reading_a_request_never_make_its_deadline_a_422(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 422 compares the profile alone with the whole budget: another process taking the CPU, the
    measured request-handling cost or time already spent parsing may make a request late (a 429 when a
    queue makes it so), but never 'impossible'. (It compared the predicted wait, slowdown and loop cost
    included, with what was left of the budget, and refused 7 of 40 idle requests at twice their time.)"""
    cost = _model_is_the_cost(client, monkeypatch)
    c = app_state(client).runtime.controller
    monkeypatch.setattr(c, "drift", 5.0)  # the machine running five times slower than its profile
    monkeypatch.setattr(c, "last_signals", Signals(now=0.0, cpu_other=0.9, request_cost=0.05))
    body: dict[str, Any] = {"inputs": [image_list(IMAGES[0])], "deadline_ms": 1100 * cost(0.0)}
    r = client.post("/predict", json=body)
    assert r.status_code == 200, r.text


def _made_up_profile(rt: Runtime, built: dict[float, Any], probe: torch.Tensor) -> None:
    """Runtime._measure_profile's stand-in: 1 + 10 x alpha ms an image, whatever the tiny models' timings, so
    that the model is the cost and what warm-up derives from the profile (the cache's keep) is known."""
    for a in built:
        for b in rt.settings.profile_batches:
            rt.profile.add(a, b, b * (0.001 + 0.010 * a))


@pytest.mark.parametrize("available", [0.05, 0.5])
def test_memory_pressure_drops_the_cached_models_not_asked_for_lately(
    structured: TinyCheckpoint, available: float, caplog: pytest.LogCaptureFixture
) -> None:
    """Under LCS_MEMORY_LOW (default 10 % available) a control step drops the idle prebuilt models, keeps the
    one last asked for, and says so; with memory to spare it drops nothing."""
    with serve(make_settings(structured.path)) as c:
        st = app_state(c)
        assert st.runtime.cache.cached() == list(GRID)  # all prebuilt
        st.probe.memory_available = lambda: available  # type: ignore[method-assign]
        assert c.post("/predict", json={"inputs": [ZEROS], "quality": 0.5}).json()["alpha"] == 0.5
        st.runtime.ready = False  # warming up: what it builds stays, idle or not
        control_step(c, time.monotonic() + IDLE_MODEL_SECONDS + 1.0)
        assert st.runtime.cache.cached() == list(GRID)
        st.runtime.ready = True
        drop_idle, threads = st.runtime.cache.drop_idle, []

        def recorded(since: float) -> tuple[int, int]:
            threads.append(threading.current_thread())
            return drop_idle(since)

        st.runtime.cache.drop_idle = recorded  # type: ignore[method-assign]
        with caplog.at_level(logging.WARNING, "lcs.service"):
            control_step(c, time.monotonic() + IDLE_MODEL_SECONDS + 1.0)  # every model idle by then
        if available > st.settings.memory_low:
            assert st.runtime.cache.cached() == list(GRID) and not caplog.records and not threads
            return
        # dropped off the event loop: freeing the sessions and trimming the heap took 12-34 ms there
        assert c.portal is not None and threads == [threads[0]] != [c.portal.call(threading.current_thread)]
        kept = sorted({0.5} | st.runtime.cache.keep)  # the last asked for, and the fastest
        assert st.runtime.cache.cached() == kept
        dropped = len(GRID) - len(kept)
        assert f"lcs_cache_evictions_total {dropped}.0" in c.get("/metrics").text
        assert f"dropped {dropped} cached model{'s' if dropped > 1 else ''} not asked for in 10 s" in caplog.text
        # built again when asked for: a single image's batch keeps its alpha (it is not the lever), so it builds
        assert c.post("/predict", json={"inputs": [ZEROS]}).json()["alpha"] == 1.0


def test_a_low_memory_spell_says_its_drops_once_a_minute_and_its_end_once(
    structured: TinyCheckpoint, caplog: pytest.LogCaptureFixture
) -> None:
    """A client moving between alphas every 2 s under low memory had a warning every 2 s, and the spell's
    end went unsaid."""
    with serve(make_settings(structured.path)) as c:
        st = app_state(c)
        st.probe.memory_available = lambda: 0.05  # type: ignore[method-assign]
        now = time.monotonic() + IDLE_MODEL_SECONDS + 1.0
        with caplog.at_level(logging.INFO, "lcs.service"):
            for k in range(10):  # 20 s of steps 2 s apart, a new alpha asked for before each
                c.post("/predict", json={"inputs": [ZEROS], "quality": [0.0, 0.5, 1.0][k % 3]})
                control_step(c, now + 2.0 * k + IDLE_MODEL_SECONDS)
            st.probe.memory_available = lambda: 0.5  # type: ignore[method-assign]
            control_step(c, now + 20.0 + IDLE_MODEL_SECONDS)
            control_step(c, now + 21.0 + IDLE_MODEL_SECONDS)
            # a second spell within the minute: its drop waits for the minute, and its end says it
            st.probe.memory_available = lambda: 0.05  # type: ignore[method-assign]
            for q in (0.5, 1.0):  # 0.5 then idle, the newest kept
                c.post("/predict", json={"inputs": [ZEROS], "quality": q})
            control_step(c, now + 30.0 + 2 * IDLE_MODEL_SECONDS)
            st.probe.memory_available = lambda: 0.5  # type: ignore[method-assign]
            control_step(c, now + 31.0 + 2 * IDLE_MODEL_SECONDS)
        said = [r.getMessage() for r in caplog.records if "memory" in r.getMessage()]
        assert len(said) == 3, said
        assert said[0].startswith("memory low (5 % available, under LCS_MEMORY_LOW 10 %): dropped")
        # the counts depend on which models a batch had built again meanwhile: their form is what is checked
        back = r"memory back: 50 % available, at or over LCS_MEMORY_LOW 10 % \(\d+ more models? dropped since the last"
        assert re.match(back, said[1]) and re.match(back, said[2]), said
        assert st._relief_unsaid == (0, 0)  # not counted into a later spell's line


def test_memory_relief_does_not_wait_behind_images_being_decoded(structured: TinyCheckpoint) -> None:
    """It ran on the decoder pool, where it queued behind every image waiting to be decoded: under PNG load
    and memory pressure, control steps came 1.3-4 s apart instead of every 0.5 s (a review's run)."""
    with serve(make_settings(structured.path)) as c:
        st = app_state(c)
        st.probe.memory_available = lambda: 0.05  # type: ignore[method-assign]
        gate = threading.Event()
        busy = [st.decoder.submit(gate.wait, 10.0) for _ in range(usable_cpus())]  # every decoding thread
        try:
            t0 = time.monotonic()
            control_step(c, time.monotonic() + IDLE_MODEL_SECONDS + 1.0)
            took = time.monotonic() - t0
        finally:
            gate.set()
        assert all(f.result() for f in busy) and took < 5.0, took
        assert st.runtime.cache.cached() == sorted(st.runtime.cache.keep)  # and it did drop them


def test_memory_pressure_keeps_the_fastest_prebuilt_model_when_prebuild_is_short_of_the_grid(
    structured: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LCS_PREBUILD=0.5,1: alpha 0 is neither built nor profiled, and the frontier counts it as fast. The model
    a load rise falls back on is 0.5, the fastest of those built and profiled: warm-up tells the cache to keep
    it, and it stays (a made-up start-up profile, 1 + 10 x alpha ms an image, so that it is the faster
    whatever the tiny models' timings)."""
    monkeypatch.setattr(Runtime, "_measure_profile", _made_up_profile)
    with serve(make_settings(structured.path, prebuild=[0.5, 1.0])) as c:
        st = app_state(c)
        assert st.runtime.cache.cached() == [0.5, 1.0] and st.runtime.controller.frontier() == list(GRID)
        assert st.runtime.cache.keep == {0.5}
        st.probe.memory_available = lambda: 0.05  # type: ignore[method-assign]
        assert c.post("/predict", json={"inputs": [ZEROS]}).json()["alpha"] == 1.0
        control_step(c, time.monotonic() + IDLE_MODEL_SECONDS + 1.0)
        assert st.runtime.cache.cached() == [0.5, 1.0]


@pytest.mark.parametrize("build_seconds", [0.001, 60.0])
def test_a_dropped_alpha_is_built_in_a_batch_that_has_time_else_once_the_queue_is_empty(
    structured: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch, build_seconds: float
) -> None:
    """Memory pressure dropped alpha 1, and the model is the cost (a made-up profile, 1 + 10 x alpha ms an
    image): a request for it whose deadline affords the build gets alpha 1 at once; otherwise it is served
    at the best built alpha, and alpha 1 is built after it, for the next request."""
    monkeypatch.setattr(Runtime, "_measure_profile", _made_up_profile)
    with serve(make_settings(structured.path)) as c:
        st = app_state(c)
        assert st.runtime.cache.keep == {0.0}
        monkeypatch.setattr(st.batcher, "settle", 0.0)  # the ceiling's 4 h to rise, in these settings
        st.probe.memory_available = lambda: 0.05  # type: ignore[method-assign]
        assert c.post("/predict", json={"inputs": [ZEROS], "quality": 0.5}).json()["alpha"] == 0.5
        control_step(c, time.monotonic() + IDLE_MODEL_SECONDS + 1.0)
        assert 1.0 not in st.runtime.cache.cached() and 0.5 in st.runtime.cache.cached()
        built = st.runtime.cache.wait
        monkeypatch.setattr(st.runtime.cache, "wait", lambda a: build_seconds if built(a) else 0.0)
        r = c.post("/predict", json={"inputs": [ZEROS]})  # the SLO's 2 s to answer in
        assert r.status_code == 200 and r.json()["alpha"] == (1.0 if build_seconds < 0.1 else 0.5)
        wait_for(lambda: 1.0 in st.runtime.cache.cached(), what="alpha 1 built again")
        assert c.post("/predict", json={"inputs": [ZEROS]}).json()["alpha"] == 1.0


def test_a_generous_deadline_keeps_full_quality(client: TestClient) -> None:
    r = client.post("/predict", json={"inputs": [image_list(IMAGES[0])], "deadline_ms": 60_000})
    assert r.status_code == 200 and r.json()["alpha"] == 1.0


def test_request_id_is_echoed(client: TestClient) -> None:
    r = client.post("/predict", json={"inputs": [image_list(IMAGES[0])]}, headers={"x-request-id": "abc-123"})
    assert r.json()["request_id"] == "abc-123" == r.headers["x-request-id"]


# -- /predict: errors -------------------------------------------------------------------------------

ZEROS = [[0] * IMAGE for _ in range(IMAGE)]


def _with(row: int, col: int, value: object) -> list[list[object]]:
    img: list[list[object]] = [list(r) for r in ZEROS]
    img[row][col] = value
    return img


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"inputs": [[[0] * 5] * 5]}, "inputs[0]: shape [5, 5] does not match"),
        ({"inputs": [ZEROS, [[0] * IMAGE] * 3]}, "inputs[1]: shape [3, 12]"),
        ({"inputs": [_with(2, 3, 256)]}, "inputs[0]: pixel values must be in 0-255"),
        ({"inputs": [ZEROS, _with(0, 0, -0.5)]}, "inputs[1]: pixel values must be in 0-255"),
        ({"inputs": [[[0, 1], [2]]]}, "inputs[0]: not a rectangular array"),
        ({"inputs": ["%%% not base64 %%%"]}, "inputs[0]: not valid base64"),
        ({"inputs": [base64.b64encode(b"GIF? no, just text").decode()]}, "inputs[0]: not a readable PNG or JPEG"),
        ({"inputs": [ZEROS] * 5}, "5 images in one request, the limit is 4"),
        ({"inputs": []}, "non-empty list"),
        ({"inputs": [ZEROS], "quality": "ultra"}, "quality"),
        ({"inputs": [ZEROS], "quality": 1.5}, "quality"),
        ({"inputs": [ZEROS], "quality": 0.5, "min_quality": 1.0}, "min_quality (1) is above quality (0.5)"),
        ({"inputs": [ZEROS], "quality": "fast", "min_quality": "balanced"}, "min_quality (0.5) is above quality"),
        ({"inputs": [ZEROS], "quality": 0.9, "min_quality": 0.6}, "no served alpha lies between"),
        ({"inputs": [ZEROS], "deadline_ms": 0}, "deadline_ms"),
        ({"inputs": [ZEROS], "top_k": 0}, "top_k"),
        ({"inputs": [ZEROS], "colour": "red"}, "colour"),
        ({}, "inputs"),
        ({"inputs": "not a list"}, "inputs"),
    ],
)
def test_predict_invalid_requests_get_422_with_an_actionable_detail(
    client: TestClient, body: dict[str, Any], detail: str
) -> None:
    r = client.post("/predict", json=body)
    assert r.status_code == 422, r.text
    payload = r.json()
    assert detail in payload["detail"]
    assert payload["error"] in ("invalid input", "invalid request")
    assert payload["request_id"] == r.headers["x-request-id"]


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_pixels_are_refused(client: TestClient, token: str) -> None:
    # json.dumps would refuse; Python's json.loads (used by the server) accepts these tokens
    rows = [", ".join(["0"] * IMAGE)] * IMAGE
    rows[4] = ", ".join(["0"] * 5 + [token] + ["0"] * (IMAGE - 6))
    image = "[" + ", ".join(f"[{r}]" for r in rows) + "]"
    r = post_raw(client, '{"inputs": [' + ", ".join([json.dumps(ZEROS), image]) + "]}")
    assert r.status_code == 422, r.text
    assert "inputs[1]: contains NaN, Infinity" in r.json()["detail"]


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32", "utf-32-be"])
def test_a_boolean_pixel_is_refused_in_every_encoding_json_reads(client: TestClient, encoding: str) -> None:
    """decode trusts numpy's type check only where the body's bytes spell neither true nor false; in UTF-16
    and UTF-32 they spell neither, and a true was served as a pixel of 1 (found by the review of 6344158)."""
    image = [[0] * IMAGE for _ in range(IMAGE)]
    image[3][4] = True
    raw = json.dumps({"inputs": [image]}).encode(encoding)
    r = client.post("/predict", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == "inputs[0]: pixel values must be JSON numbers (0-255), got true/false"
    for data in ([image], [v for row in image for v in row]):  # OIP v2 data, nested and flat
        tensor = {"name": "input", "shape": [1, IMAGE, IMAGE], "datatype": "FP32", "data": data}
        raw = json.dumps({"inputs": [tensor]}).encode(encoding)
        r = client.post(f"/v2/models/{NAME}/infer", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["detail"] == "inputs[0].data: pixel values must be JSON numbers (0-255), got true/false"


def test_nan_quality_is_refused(client: TestClient) -> None:
    r = post_raw(client, '{"inputs": [' + json.dumps(ZEROS) + '], "quality": NaN}')
    assert r.status_code == 422


def test_malformed_json_is_a_422(client: TestClient) -> None:
    r = post_raw(client, '{"inputs": [[[0, 1]')
    assert r.status_code == 422
    assert "json" in r.json()["detail"].lower()


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded"])
def test_predict_needs_json(client: TestClient, ctype: str) -> None:
    r = client.post("/predict", content=json.dumps({"inputs": [ZEROS]}).encode(), headers={"content-type": ctype})
    assert r.status_code == 415, r.text
    assert "send application/json" in r.json()["detail"]


@pytest.mark.parametrize("v2", [False, True])
def test_a_body_with_no_content_type_is_read_as_json(client: TestClient, v2: bool) -> None:
    """As FastAPI reads one; tritonclient sends no content type with JSON tensors (each was a 415)."""
    path, body = (f"/v2/models/{NAME}/infer", v2_body(IMAGES[:1])) if v2 else ("/predict", {"inputs": [ZEROS]})
    r = client.post(path, content=json.dumps(body).encode())
    assert "content-type" not in r.request.headers
    assert r.status_code == 200, r.text


def test_json_content_type_with_charset_is_accepted(client: TestClient) -> None:
    r = client.post(
        "/predict",
        content=json.dumps({"inputs": [ZEROS]}).encode(),
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert r.status_code == 200, r.text


def test_get_on_predict_is_405(client: TestClient) -> None:
    assert client.get("/predict").status_code == 405


# -- body size --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_body_client(structured: TinyCheckpoint) -> Iterator[TestClient]:
    with serve(make_settings(structured.path, max_body_bytes=2048)) as c:
        yield c


def test_body_under_the_limit_is_served(small_body_client: TestClient) -> None:
    body = json.dumps({"inputs": [ZEROS]})
    assert len(body) < 2048
    assert small_body_client.post("/predict", json={"inputs": [ZEROS]}).status_code == 200


def test_body_over_the_limit_is_413(small_body_client: TestClient) -> None:
    body = json.dumps({"inputs": [ZEROS] * 8}).encode()
    assert len(body) > 2048
    r = small_body_client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert "2048 bytes" in r.json()["detail"]


def test_streamed_body_over_the_limit_is_413(small_body_client: TestClient) -> None:
    """Without Content-Length (chunked), the limit is enforced while the body streams in."""
    body = json.dumps({"inputs": [ZEROS] * 8}).encode()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 512):
            yield body[i : i + 512]

    r = small_body_client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert "2048 bytes" in r.json()["detail"]
    # and the app still answers afterwards
    assert small_body_client.post("/predict", json={"inputs": [ZEROS]}).status_code == 200


# -- liveness, readiness, metadata --------------------------------------------------------------------


def test_health_endpoints(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").json() == {"status": "ready"}
    assert client.get("/v2/health/live").json() == {"live": True}
    r = client.get("/v2/health/ready")
    assert r.status_code == 200 and r.json() == {"ready": True}


def test_model_describes_the_checkpoint(client: TestClient, structured: TinyCheckpoint) -> None:
    m = client.get("/model").json()
    assert m["name"] == NAME and m["kind"] == "structured" and m["subspace"] == "line"
    assert m["level_name"] == "width"
    assert m["grid"] == list(GRID)
    assert m["classes"] == CLASSES
    assert m["input"] == {"channels": 1, "height": IMAGE, "width": IMAGE, "mean": [0.5], "std": [0.25]}
    assert [(p["alpha"], p["accuracy"]) for p in m["accuracy"]] == list(ACCURACY.items())
    assert [p["level"] for p in m["accuracy"]] == [0.25, 0.625, 1.0]
    assert m["alpha_convention"].startswith("alpha in [0, 1]; 1 = least compressed")
    assert m["ready"] is True
    assert sorted(m["cached_alphas"]) == list(GRID)  # the whole grid is prebuilt by default
    assert set(m["profile_ms"]) == {"0", "0.5", "1"}
    assert all(set(row) == {"1", "4"} and all(v > 0 for v in row.values()) for row in m["profile_ms"].values())
    assert set(m["self_check_accuracy"]) == {"0", "0.5", "1"}
    assert m["training"]["command"] == "tests/service/conftest.py"


def test_controller_state(client: TestClient) -> None:
    c = client.get("/controller").json()
    assert c["mode"] == "full" and c["ceiling"] == 1.0 and c["pinned"] is None
    assert isinstance(c["decisions"], list)


def test_unknown_path_is_404(client: TestClient) -> None:
    assert client.get("/nope").status_code == 404


# -- Open Inference Protocol v2 -------------------------------------------------------------------


def v2_body(images: torch.Tensor, **parameters: Any) -> dict[str, Any]:
    return {
        "id": "req-1",
        "inputs": [
            {"name": "input", "shape": list(images.shape), "datatype": "UINT8", "data": images.flatten().tolist()}
        ],
        **({"parameters": parameters} if parameters else {}),
    }


def test_v2_model_metadata(client: TestClient) -> None:
    m = client.get(f"/v2/models/{NAME}").json()
    assert m["name"] == NAME
    assert m["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, IMAGE, IMAGE]}]
    assert m["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(CLASSES)]}]
    assert m["parameters"]["grid"] == list(GRID)
    assert m["parameters"]["backend"] == "onnxruntime"
    assert [p["accuracy"] for p in m["parameters"]["accuracy"]] == list(ACCURACY.values())
    r = client.get(f"/v2/models/{NAME}/ready")
    assert r.status_code == 200 and r.json() == {"name": NAME, "ready": True}


@pytest.mark.parametrize("path", ["/v2/models/other", "/v2/models/other/ready"])
def test_v2_unknown_model_is_404(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 404
    assert NAME in r.json()["detail"]


def test_error_messages_quote_a_clients_long_strings_cut_short(client: TestClient) -> None:
    r = client.get("/v2/models/" + "m" * 20_000)
    assert r.status_code == 404 and r.json()["detail"].startswith("model 'mmm") and len(r.json()["detail"]) < 200
    body = v2_body(IMAGES[:1])
    body["inputs"][0]["datatype"] = "X" * 100_000
    r = client.post(f"/v2/models/{NAME}/infer", json=body)
    assert r.status_code == 422 and "XXX'... is not supported" in r.json()["detail"] and len(r.text) < 400


def test_both_inference_routes_report_the_batchers_account_of_a_request(
    structured: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """queue_ms and compute_ms are the batcher's seconds for this request, in ms (a queue_ms of 0 passed
    every other test), and the queue-wait histogram sees the same wait."""
    from service.batcher import Result

    def submit(job: Any) -> asyncio.Future[Result]:
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(Result(np.zeros((len(job.x), len(CLASSES)), np.float32), 0.5, 0.0123, 0.0045, 3))
        return fut

    with serve(make_settings(structured.path)) as c:
        monkeypatch.setattr(app_state(c).batcher, "submit", submit)
        waited = app_state(c).metrics.queue_wait.collect()[0]
        before = next(s.value for s in waited.samples if s.name.endswith("_sum"))
        served = c.post("/predict", json={"inputs": [ZEROS]}).json()
        v2 = c.post(f"/v2/models/{NAME}/infer", json=v2_body(IMAGES[:1])).json()["parameters"]
        waited = app_state(c).metrics.queue_wait.collect()[0]
        after = next(s.value for s in waited.samples if s.name.endswith("_sum"))
    for body in (served, v2):
        assert (body["alpha"], body["queue_ms"], body["compute_ms"], body["batch_images"]) == (0.5, 12.3, 4.5, 3)
    assert after - before == pytest.approx(2 * 0.0123)


@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")  # inf - inf, numpy's word
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_model_answering_non_finite_numbers_is_a_500_that_says_so_for_the_requests_it_spoils(
    structured: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch, value: float
) -> None:
    """Answers are rendered by orjson, which writes NaN as null where json.dumps refused it (a bare 500
    "internal error"): a model's non-finite output is refused before, by name, on both routes, and only
    for the requests whose own rows it spoils (the softmax runs once per batch)."""

    def run(alpha: float, x: np.ndarray) -> np.ndarray:  # a logit of `value` for images whose first pixel is lit
        out = np.zeros((len(x), len(CLASSES)), np.float32)
        out[x[:, 0, 0, 0] > 0, 0] = value
        return out

    lit = [row[:] for row in ZEROS]
    lit[0][0] = 255
    v2 = {
        "inputs": [
            {"name": "input", "shape": [1, IMAGE, IMAGE], "datatype": "UINT8", "data": [v for row in lit for v in row]}
        ]
    }
    with serve(make_settings(structured.path)) as c:
        monkeypatch.setattr(app_state(c).batcher, "_run", run)
        spoilt = [
            c.post("/predict", json={"inputs": [ZEROS, lit]}),
            c.post(f"/v2/models/{NAME}/infer", json=v2),
            c.post(f"/v2/models/{NAME}/infer", json={**v2, "parameters": {"binary_data_output": True}}),
        ]
        fine = c.post("/predict", json={"inputs": [ZEROS]})
    for r in spoilt:
        assert r.status_code == 500, r.text
        assert "the model gave non-finite outputs at alpha 1; the checkpoint is broken there" in r.json()["detail"]
    assert fine.status_code == 200, fine.text


@pytest.mark.parametrize("binary", [True, False])
def test_v2_an_id_with_a_lone_surrogate_is_refused_as_the_answer_could_not_echo_it(
    client: TestClient, binary: bool
) -> None:
    """json.loads reads the escape "\\ud800"; UTF-8 cannot carry it: the JSON answer was a 500, and with
    the binary extension orjson's header is one too (found by the review of 6344158)."""
    body = json.dumps({**v2_body(IMAGES[:1]), "parameters": {"binary_data_output": binary}})
    r = post_raw(client, body.replace('"id": "req-1"', '"id": "x\\ud800"'), f"/v2/models/{NAME}/infer")
    assert r.status_code == 422, r.text
    assert "body.id: holds a lone surrogate (an unpaired \\ud800-\\udfff escape)" in r.json()["detail"]
    ok = post_raw(
        client, body.replace('"id": "req-1"', '"id": "caf\\u00e9 \\ud83d\\ude00"'), f"/v2/models/{NAME}/infer"
    )
    assert ok.status_code == 200, ok.text  # a surrogate pair is a character: echoed


def test_v2_infer_uint8(client: TestClient, structured: TinyCheckpoint) -> None:
    r = client.post(f"/v2/models/{NAME}/infer", json=v2_body(IMAGES[:2], quality=0.5))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == NAME and body["id"] == "req-1"
    assert body["parameters"]["alpha"] == 0.5 and body["parameters"]["accuracy"] == ACCURACY[0.5]
    served = client.post("/predict", json={"inputs": [ZEROS]}).json()  # the same account of how it was served
    assert body["parameters"].keys() == served.keys() - {"predictions", "model", "request_id"}
    out = body["outputs"][0]
    assert out["name"] == "probabilities" and out["shape"] == [2, len(CLASSES)]
    got = torch.tensor(out["data"]).view(2, len(CLASSES))
    assert torch.allclose(got, reference(structured, IMAGES[:2], 0.5), atol=1e-5)


@pytest.mark.parametrize("shape", [[1, IMAGE * IMAGE], [1, IMAGE, IMAGE], [1, IMAGE, IMAGE, 1]])
def test_v2_infer_fp32_with_other_layouts(client: TestClient, structured: TinyCheckpoint, shape: list[int]) -> None:
    body = v2_body(IMAGES[:1])
    body["inputs"][0].update(datatype="FP32", shape=shape)
    r = client.post(f"/v2/models/{NAME}/infer", json=body)
    assert r.status_code == 200, r.text
    got = torch.tensor(r.json()["outputs"][0]["data"]).view(1, -1)
    assert torch.allclose(got, reference(structured, IMAGES[:1], 1.0), atol=1e-5)


def binary_body(images: torch.Tensor, dtype: str = "UINT8", **parameters: Any) -> tuple[bytes, dict[str, str]]:
    """The OIP v2 binary tensor extension: JSON header, then the raw values; (body, headers)."""
    raw = images.numpy().astype({"UINT8": "u1", "FP32": "<f4"}[dtype]).tobytes()
    body = v2_body(images, **parameters)
    tensor = body["inputs"][0]
    del tensor["data"]
    tensor.update(datatype=dtype, parameters={"binary_data_size": len(raw)})
    head = json.dumps(body).encode()
    return head + raw, {"content-type": "application/octet-stream", "inference-header-content-length": str(len(head))}


@pytest.mark.parametrize("dtype", ["UINT8", "FP32"])
def test_v2_infer_binary_extension_gives_the_same_answer(
    client: TestClient, structured: TinyCheckpoint, dtype: str
) -> None:
    content, headers = binary_body(IMAGES[:2], dtype, quality=0.5)
    r = client.post(f"/v2/models/{NAME}/infer", content=content, headers=headers)
    assert r.status_code == 200, r.text
    got = torch.tensor(r.json()["outputs"][0]["data"]).view(2, -1)
    assert torch.allclose(got, reference(structured, IMAGES[:2], 0.5), atol=1e-5)


@pytest.mark.parametrize(
    ("mutate", "detail"),
    [
        (lambda body, h: (body, {**h, "inference-header-content-length": "x1"}), "is not the length"),
        (lambda body, h: (body, {**h, "inference-header-content-length": str(len(body) + 1)}), "is not the length"),
        (lambda body, h: (body[:-1], h), "binary_data_size must be the"),
        (lambda body, h: (body + b"\0", h), "binary_data_size must be the"),
        (lambda body, h: (body, {**h, "inference-header-content-length": "5"}), "invalid request"),
        # 5,000 digits: over int()'s limit, it was a 500 with a traceback logged per request
        (lambda body, h: (body, {**h, "inference-header-content-length": "9" * 5000}), "is not the length"),
    ],
)
def test_v2_infer_bad_binary_requests_are_422(client: TestClient, mutate: Any, detail: str) -> None:
    content, headers = mutate(*binary_body(IMAGES[:1]))
    r = client.post(f"/v2/models/{NAME}/infer", content=content, headers=headers)
    assert r.status_code == 422, r.text
    assert detail in r.text


@pytest.mark.parametrize("length", ["\xb2", "\u0663", "1\u00b9"])  # ², Arabic-Indic 3, 1¹: isdigit() says yes
def test_a_binary_length_of_non_ascii_digits_is_422_not_500(length: str) -> None:
    with pytest.raises(ApiError) as e:
        split_binary(b'{"inputs": []}', length)
    assert e.value.status == 422 and "is not the length" in e.value.detail


def test_v2_infer_binary_needs_the_bytes_and_not_data_too(client: TestClient) -> None:
    body = v2_body(IMAGES[:1])
    del body["inputs"][0]["data"]
    r = client.post(f"/v2/models/{NAME}/infer", json=body)
    assert r.status_code == 422 and "has no data" in r.json()["detail"]
    content, headers = binary_body(IMAGES[:1])
    head = json.loads(content[: int(headers["inference-header-content-length"])])
    head["inputs"][0]["data"] = [0] * (IMAGE * IMAGE)
    raw = json.dumps(head).encode()
    r = client.post(
        f"/v2/models/{NAME}/infer",
        content=raw + b"\0" * (IMAGE * IMAGE),
        headers={**headers, "inference-header-content-length": str(len(raw))},
    )
    assert r.status_code == 422 and "not both" in r.json()["detail"]


def test_v2_infer_data_in_json_with_the_binary_header_spanning_the_whole_body(client: TestClient) -> None:
    raw = json.dumps(v2_body(IMAGES[:1])).encode()
    headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(len(raw))}
    r = client.post(f"/v2/models/{NAME}/infer", content=raw, headers=headers)
    assert r.status_code == 200, r.text


def test_v2_infer_asking_for_an_output_it_does_not_have_is_422(client: TestClient) -> None:
    body = {**v2_body(IMAGES[:1]), "outputs": [{"name": "logits"}]}
    r = client.post(f"/v2/models/{NAME}/infer", json=body)
    assert r.status_code == 422 and "'probabilities'" in r.json()["detail"]
    body["outputs"] = [{"name": "probabilities"}]
    assert client.post(f"/v2/models/{NAME}/infer", json=body).status_code == 200
    body["outputs"] = [{"name": "x" * 100_000}]  # echoed whole, it was a 100 kB answer
    r = client.post(f"/v2/models/{NAME}/infer", json=body)
    assert r.status_code == 422 and len(r.text) < 400


@pytest.mark.parametrize(
    ("outputs", "parameters", "binary"),
    [
        (None, {}, False),
        (None, {"binary_data_output": True}, True),
        ([{"name": "probabilities", "parameters": {"binary_data": True}}], {}, True),
        ([{"name": "probabilities", "parameters": {"binary_data": False}}], {"binary_data_output": True}, False),
        ([{"name": "probabilities"}], {"binary_data_output": True}, True),
    ],
)
def test_v2_infer_answers_with_binary_data_where_asked(
    client: TestClient, structured: TinyCheckpoint, outputs: list[Any] | None, parameters: dict[str, Any], binary: bool
) -> None:
    """The binary tensor extension both ways: an output's binary_data, else the request's binary_data_output.
    /v2 lists the extension, and the answer was JSON whatever a client asked."""
    body = v2_body(IMAGES[:2], quality=0.5, **parameters)
    if outputs is not None:
        body["outputs"] = outputs
    r = client.post(f"/v2/models/{NAME}/infer", json=body)
    assert r.status_code == 200, r.text
    if binary:
        length = int(r.headers["inference-header-content-length"])
        head = json.loads(r.content[:length])
        output = head["outputs"][0]
        assert "data" not in output and output["parameters"] == {"binary_data_size": len(r.content) - length}
        assert r.headers["content-type"] == "application/octet-stream"
        got = torch.from_numpy(np.frombuffer(r.content[length:], "<f4").copy())
    else:
        assert "inference-header-content-length" not in r.headers
        head = r.json()
        output = head["outputs"][0]
        got = torch.tensor(output["data"])
    assert head["id"] == "req-1" and head["parameters"]["alpha"] == 0.5
    assert output["name"] == "probabilities" and output["datatype"] == "FP32"
    assert torch.allclose(got.view(output["shape"]), reference(structured, IMAGES[:2], 0.5), atol=1e-5)


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        (
            {"parameters": {"binary_data_output": 1}},
            "body.parameters.binary_data_output: Input should be a valid boolean",
        ),
        (
            {"outputs": [{"name": "probabilities", "parameters": {"binary_data": "yes"}}]},
            "body.outputs.0.parameters.binary_data",
        ),
        ({"outputs": [{"parameters": {"binary_data": True}}]}, "body.outputs.0.name: Field required"),
    ],
)
def test_v2_infer_output_requests_are_checked(client: TestClient, change: dict[str, Any], detail: str) -> None:
    r = client.post(f"/v2/models/{NAME}/infer", json={**v2_body(IMAGES[:1]), **change})
    assert r.status_code == 422 and detail in r.json()["detail"], r.text


def classified(count: int, binary: bool | None = None, **parameters: Any) -> dict[str, Any]:
    """A v2 body for IMAGES[:2] whose output asks for classification (the extension) of `count` classes."""
    asked: dict[str, Any] = {"classification": count}
    if binary is not None:
        asked["binary_data"] = binary
    return {**v2_body(IMAGES[:2], **parameters), "outputs": [{"name": "probabilities", "parameters": asked}]}


def answer_of(r: httpx.Response) -> tuple[dict[str, Any], list[str]]:
    """A v2 answer's JSON and its one output's values: JSON data, or BYTES binary data after the JSON (each
    value a 4-byte little-endian length, then its bytes), decoded here as a client does."""
    length = r.headers.get("inference-header-content-length")
    if length is None:
        head = r.json()
        return head, head["outputs"][0]["data"]
    head, raw = json.loads(r.content[: int(length)]), r.content[int(length) :]
    assert head["outputs"][0]["parameters"] == {"binary_data_size": len(raw)}
    values, at = [], 0
    while at < len(raw):
        n = int.from_bytes(raw[at : at + 4], "little")
        values.append(raw[at + 4 : at + 4 + n].decode())
        at += 4 + n
    return head, values


def assert_top_classes(values: list[str], expected: torch.Tensor, k: int) -> None:
    """Each image's top k classes, most probable first, as "<probability>:<index>:<label>"."""
    assert len(values) == len(expected) * k
    for row, ref in zip(np.reshape(values, (len(expected), k)), expected, strict=True):
        parts = [v.split(":") for v in row]
        assert [int(i) for _, i, _ in parts] == ref.argsort(descending=True).tolist()[:k]
        for p, i, label in parts:
            assert label == CLASSES[int(i)] and re.fullmatch(r"\d\.\d{6}", p)  # printf's %f, as Triton's
            assert float(p) == pytest.approx(float(ref[int(i)]), abs=1e-6)


def test_v2_infer_classification_as_json(client: TestClient, structured: TinyCheckpoint) -> None:
    """The classification extension (tritonclient's class_count): the output is BYTES [N, k], the top classes
    by name, and the top one is /predict's answer. It was refused with a 422."""
    assert "classification" in client.get("/v2").json()["extensions"]
    r = client.post(f"/v2/models/{NAME}/infer", json=classified(3, binary=False, quality=0.5))
    assert r.status_code == 200, r.text
    head, values = answer_of(r)
    assert r.headers["content-type"] == "application/json" and "inference-header-content-length" not in r.headers
    output = head["outputs"][0]
    assert output["name"] == "probabilities" and output["datatype"] == "BYTES" and output["shape"] == [2, 3]
    assert_top_classes(values, reference(structured, IMAGES[:2], 0.5), 3)
    served = client.post("/predict", json={"inputs": [image_list(x) for x in IMAGES[:2]], "quality": 0.5}).json()
    assert [v.split(":", 1)[1] for v in values[::3]] == [f"{p['index']}:{p['label']}" for p in served["predictions"]]


@pytest.mark.parametrize(("binary", "parameters"), [(True, {}), (None, {"binary_data_output": True})])
def test_v2_infer_classification_as_binary_data(
    client: TestClient, structured: TinyCheckpoint, binary: bool | None, parameters: dict[str, Any]
) -> None:
    """Asked as binary data (the output's binary_data, else the request's binary_data_output), the strings come
    after the JSON as the binary extension lays out BYTES, each its length then its bytes; the same strings as
    JSON."""
    r = client.post(f"/v2/models/{NAME}/infer", json=classified(2, binary, quality=0.5, **parameters))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    head, values = answer_of(r)
    output = head["outputs"][0]
    assert output["datatype"] == "BYTES" and output["shape"] == [2, 2] and "data" not in output
    assert_top_classes(values, reference(structured, IMAGES[:2], 0.5), 2)
    json_values = answer_of(client.post(f"/v2/models/{NAME}/infer", json=classified(2, False, quality=0.5)))[1]
    assert values == json_values


@pytest.mark.parametrize("binary", [False, True])
def test_v2_infer_classification_of_more_classes_than_the_model_has_gives_them_all(
    client: TestClient, structured: TinyCheckpoint, binary: bool
) -> None:
    """As Triton: the count is clamped to the number of classes, shape [N, classes]."""
    r = client.post(f"/v2/models/{NAME}/infer", json=classified(1000, binary, quality=0.5))
    assert r.status_code == 200, r.text
    head, values = answer_of(r)
    assert head["outputs"][0]["shape"] == [2, len(CLASSES)]
    assert_top_classes(values, reference(structured, IMAGES[:2], 0.5), len(CLASSES))


def test_v2_infer_classification_writes_probabilities_as_triton_and_ties_in_class_order(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probability as Triton writes it (C++ std::to_string: six decimals), the label the checkpoint's;
    equal probabilities keep class order, as /predict's top does."""
    from service.batcher import Result

    probs = np.array([[0.1, 0.5, 0.25, 0.15], [0.25, 0.25, 0.4, 0.1]], np.float32)  # a batch's, finished

    def submit(job: Any) -> asyncio.Future[Result]:
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(Result(probs[: len(job.x)], 1.0, 0.0, 0.001, len(job.x)))
        return fut

    monkeypatch.setattr(app_state(client).batcher, "submit", submit)
    r = client.post(f"/v2/models/{NAME}/infer", json=classified(3, binary=False))
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [
        "0.500000:1:one",
        "0.250000:2:two",
        "0.150000:3:three",
        "0.400000:2:two",
        "0.250000:0:zero",
        "0.250000:1:one",
    ]


@pytest.mark.parametrize("count", [0, -1, True, 2.5, 3.0, "3", [3]])
def test_v2_infer_a_classification_that_is_not_a_count_is_422_saying_what_to_send(
    client: TestClient, count: Any
) -> None:
    """A whole JSON number, at least 1 (true, 3.0 and "3" too: Triton reads it as an unsigned integer). It was
    refused whatever its value, as not supported."""
    r = client.post(f"/v2/models/{NAME}/infer", json=classified(count))
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith("body.outputs.0.parameters.classification: ") and "send a whole JSON number" in detail


@pytest.mark.parametrize("first", ["plain", "classification"])
def test_v2_infer_an_output_asked_twice_is_answered_once_as_first_asked(
    client: TestClient, structured: TinyCheckpoint, first: str
) -> None:
    """Triton answers an output named twice once, as its first entry asks: it cannot be had both as
    probabilities and as classes in one request. Here, with classification, it was a 422 either way."""
    plain = {"name": "probabilities", "parameters": {"binary_data": False}}
    classes = {"name": "probabilities", "parameters": {"classification": 2, "binary_data": False}}
    body = {**v2_body(IMAGES[:2], quality=0.5), "outputs": [plain, classes] if first == "plain" else [classes, plain]}
    r = client.post(f"/v2/models/{NAME}/infer", json=body)
    assert r.status_code == 200, r.text
    (output,) = r.json()["outputs"]
    expected = reference(structured, IMAGES[:2], 0.5)
    if first == "plain":
        assert output["datatype"] == "FP32" and output["shape"] == [2, len(CLASSES)]
        assert torch.allclose(torch.tensor(output["data"]).view(2, -1), expected, atol=1e-5)
    else:
        assert output["datatype"] == "BYTES" and output["shape"] == [2, 2]
        assert_top_classes(output["data"], expected, 2)


def test_lists_a_client_fills_with_the_wrong_thing_stop_at_the_first(client: TestClient) -> None:
    """Every bad item made errors (two per /predict input): 1.5 MiB of numbers held the event loop 10 s and
    peaked at 2.7 GiB. A v2 shape is at most 8 numbers (400 huge ones multiplied took 13 s)."""
    r = post_raw(client, json.dumps({"inputs": [1] * 1500}))  # 200,000 are now refused unparsed, by count
    assert r.status_code == 422 and len(r.text) < 1000 and "inputs.0" in r.json()["detail"]
    body = v2_body(IMAGES[:1])
    body["inputs"][0]["shape"] = [1] * 9
    r = client.post(f"/v2/models/{NAME}/infer", json=body)
    assert r.status_code == 422 and "at most 8" in r.json()["detail"]


def test_a_body_whose_last_key_repeats_one_of_many_is_named(client: TestClient) -> None:
    keys = ", ".join(f'"k{i}": 0' for i in range(255))
    r = post_raw(client, "{" + keys + ', "k254": 1}')
    assert r.status_code == 422 and "duplicate key 'k254'" in r.json()["detail"]


@pytest.mark.parametrize("count", [257, 1500])
def test_an_object_of_more_keys_than_any_request_needs_is_refused_before_validation(
    client: TestClient, count: int
) -> None:
    """Each unknown key became a validation error: 200,000 of them (2.3 MB) held the event loop 1.1 s, and
    their duplicate search, counting each key, 37 s for 420 kB before it was one pass."""
    keys = ", ".join(f'"k{i}": 0' for i in range(count))
    r = post_raw(client, "{" + keys + "}")
    assert r.status_code == 422
    assert r.json()["detail"] == f"body: invalid JSON (an object of {count} keys, over the 256 allowed)"


def test_a_json_body_of_more_numbers_than_the_most_images_hold_is_refused_unparsed(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """json.loads holds the GIL: 8 MiB of numbers held the event loop ~300 ms, to be refused after as too many
    images. Counted before the parse now; a few too many images still get the precise answer."""
    import service.lane

    cap = 4 * IMAGE * IMAGE  # the client serves LCS_MAX_INPUTS=4 images of IMAGE x IMAGE, one channel
    assert post_raw(client, json.dumps({"inputs": [ZEROS] * 5})).json()["detail"].startswith("inputs: 5 images")
    monkeypatch.setattr(service.lane, "parse_json", lambda raw: pytest.fail("parsed"))
    r = post_raw(client, json.dumps({"inputs": [[0] * (cap + 1026)]}))
    assert r.status_code == 422
    assert r.json()["detail"] == f"body: more values than 4 images of {IMAGE * IMAGE} values hold; send fewer images"
    r = post_raw(client, "{" + ", ".join(f'"k{i}": 0' for i in range(200_000)) + "}")  # keys count too
    assert r.json()["detail"].startswith("body: more values than 4 images")


def test_v2_versioned_paths_serve_version_1_only(client: TestClient, structured: TinyCheckpoint) -> None:
    # OIP v2 clients may name the version (/versions/1/...): the same answers as the unversioned paths
    versioned = f"/v2/models/{NAME}/versions/1"
    assert client.get(versioned).json() == client.get(f"/v2/models/{NAME}").json()
    assert client.get(versioned).json()["versions"] == ["1"]
    assert client.get(versioned + "/ready").json() == {"name": NAME, "ready": True}
    r = client.post(versioned + "/infer", json=v2_body(IMAGES[:2], quality=0.5))
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == "1" and r.json()["parameters"]["alpha"] == 0.5
    got = torch.tensor(r.json()["outputs"][0]["data"]).view(2, len(CLASSES))
    assert torch.allclose(got, reference(structured, IMAGES[:2], 0.5), atol=1e-5)
    content, headers = binary_body(IMAGES[:1], "UINT8")
    assert client.post(versioned + "/infer", content=content, headers=headers).status_code == 200  # binary too
    # another version is a 404 naming the one there is, before the body is read
    for method, path in [("GET", ""), ("GET", "/ready"), ("POST", "/infer")]:
        r = client.request(
            method, f"/v2/models/{NAME}/versions/2{path}", content=b"{", headers={"content-type": "application/json"}
        )
        assert r.status_code == 404, (method, path)
        assert "has no version '2'; its one version is '1'" in r.json()["detail"]
    r = client.post("/v2/models/other/versions/1/infer", json=v2_body(IMAGES[:1]))
    assert r.status_code == 404 and NAME in r.json()["detail"]


def test_v2_server_metadata(client: TestClient) -> None:
    r = client.get("/v2")
    assert r.status_code == 200
    assert r.json()["name"] == "lcs-serve" and "binary_tensor_data" in r.json()["extensions"]


def test_v2_infer_unknown_model_is_404(client: TestClient) -> None:
    r = client.post("/v2/models/other/infer", json=v2_body(IMAGES[:1]))
    assert r.status_code == 404
    # before the body is read: the name is what is wrong, whatever the body holds
    r = client.post("/v2/models/other/infer", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 404 and NAME in r.json()["detail"]
    assert r.json()["error"] == f"not found: {r.json()['detail']}"


def test_only_the_v2_paths_put_the_detail_in_error(client: TestClient) -> None:
    r = client.post("/predict", json={"inputs": [[[0] * 3]]})
    assert r.status_code == 422 and r.json()["error"] == "invalid input"


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        ({"data": [0] * (IMAGE * IMAGE - 1)}, "does not hold whole"),
        ({"shape": [2, 1, IMAGE, IMAGE]}, "does not hold whole"),
        ({"shape": [1, 10**30]}, "does not hold whole"),
        ({"shape": []}, "does not hold whole"),
        ({"datatype": "BYTES"}, "datatype 'BYTES' is not supported"),
        ({"data": [300] * (IMAGE * IMAGE)}, "0-255"),
        ({"data": ["x"] * (IMAGE * IMAGE)}, "pixel values must be JSON numbers (0-255), got strings"),
        (
            {"data": [[0]] * (IMAGE * IMAGE)},
            f"data: nested as [{IMAGE * IMAGE}, 1], not as its shape [1, 1, {IMAGE}, {IMAGE}]",
        ),
        ({"data": [[[[0] * IMAGE] * IMAGE]], "shape": [1, IMAGE * IMAGE]}, f"nested as [1, 1, {IMAGE}, {IMAGE}], not"),
        ({"data": [[[[0] * IMAGE] * (IMAGE - 1) + [[0] * 3]]]}, "not nested as its shape"),
        ({"data": [[[["0"] * IMAGE] * IMAGE]]}, "must be JSON numbers (0-255), got strings"),
        ({"data": [10**400] * (IMAGE * IMAGE)}, "a number too large to read"),
        ({"shape": [5, IMAGE * IMAGE], "data": [0] * (5 * IMAGE * IMAGE)}, "the limit is 4"),
        ({"shape": [1, -1, -IMAGE, IMAGE]}, "every dimension must be a positive number"),  # the product matches
        ({"shape": [1, IMAGE, 1, IMAGE]}, f"lay the images out as [N, 1, {IMAGE}, {IMAGE}] (N, C, H, W)"),
        ({"data": [2.5] * (IMAGE * IMAGE)}, "UINT8 values must be whole numbers"),
        ({"datatype": "FP16"}, "use one of UINT8, FP32, FP64, INT32, INT64"),
        ({"name": "x"}, "inputs[0].name 'x' is not an input of this model; its one input is 'input'"),
    ],
)
def test_v2_infer_bad_tensors_are_422(client: TestClient, change: dict[str, Any], detail: str) -> None:
    body = v2_body(IMAGES[:1])
    body["inputs"][0].update(change)
    r = client.post(f"/v2/models/{NAME}/infer", json=body)
    assert r.status_code == 422, r.text
    assert detail in r.json()["detail"]
    # labelled as /predict labels what is wrong with its images; the detail follows, as the protocol's
    # {"error": message} (its clients show that field alone)
    assert r.json()["error"] == f"invalid input: {r.json()['detail']}"


@pytest.mark.parametrize(
    ("parameters", "detail"),
    [
        ({"quality": "ultra"}, "body.parameters.quality: unknown preset 'ultra'; use a number in [0, 1]"),
        ({"quality": [1]}, "body.parameters.quality: [1] is not a number in [0, 1] or one of ['best'"),
        ({"quality": 7}, "body.parameters.quality: 7 is not a number in [0, 1]"),
        ({"quality": "0.5"}, "body.parameters.quality: unknown preset '0.5'; send a number as a JSON number, not"),
        ({"quality": True}, "body.parameters.quality: true is not a number"),
        ({"min_quality": -1}, "body.parameters.min_quality: -1 is not a number in [0, 1]"),
        ({"deadline_ms": "soon"}, "body.parameters.deadline_ms: Input should be a valid number"),
        ({"deadline_ms": -5}, "body.parameters.deadline_ms: Input should be greater than 0"),
        ({"quality": 0.5, "min_quality": 1.0}, "min_quality (1) is above quality (0.5); lower min_quality"),
    ],
)
def test_v2_infer_bad_parameters_are_422(client: TestClient, parameters: dict[str, Any], detail: str) -> None:
    r = client.post(f"/v2/models/{NAME}/infer", json=v2_body(IMAGES[:1], **parameters))
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(detail), r.json()["detail"]  # one line per field, naming the fix


def test_v2_parameters_take_the_hint_as_predict_does_and_ignore_others(client: TestClient) -> None:
    body = v2_body(IMAGES[:1], quality="fast", deadline_ms=500, binary_data_output=False)  # a Triton client's
    r = client.post(f"/v2/models/{NAME}/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["alpha"] == 0.0  # "fast" is 0.25, snapped down to the grid
    r = client.post(f"/v2/models/{NAME}/infer", json=v2_body(IMAGES[:1], deadline_ms=True))
    assert r.status_code == 422 and r.json()["detail"].startswith("body.parameters.deadline_ms:")


def test_the_quality_presets_are_one_list() -> None:
    assert tuple(PRESETS) == typing.get_args(Preset)


@pytest.mark.parametrize("path", ["/predict", f"/v2/models/{NAME}/infer"])
def test_a_compressed_body_is_415_not_invalid_json(client: TestClient, path: str) -> None:
    body = gzip.compress(json.dumps({"inputs": [ZEROS]}).encode())
    r = client.post(path, content=body, headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 415 and "content encoding 'gzip' is not supported" in r.json()["detail"]


def test_v2_infer_needs_json(client: TestClient) -> None:
    r = client.post(
        f"/v2/models/{NAME}/infer", content=json.dumps(v2_body(IMAGES[:1])), headers={"content-type": "text/plain"}
    )
    assert r.status_code == 415
    # a binary body without the extension's length header: that header is what is missing
    r = client.post(f"/v2/models/{NAME}/infer", content=b"{}", headers={"content-type": "application/octet-stream"})
    assert r.status_code == 415 and "needs the inference-header-content-length header" in r.json()["detail"]


def test_v2_infer_needs_exactly_one_input(client: TestClient) -> None:
    body = v2_body(IMAGES[:1])
    body["inputs"] = body["inputs"] * 2
    assert client.post(f"/v2/models/{NAME}/infer", json=body).status_code == 422


# -- before ready, and draining ------------------------------------------------------------------


def test_everything_that_needs_the_model_is_503_before_warm_up(structured: TinyCheckpoint) -> None:
    with serve(make_settings(structured.path, model_name="fashion"), ready=False, warm_up=False) as c:
        r = c.post("/predict", json={"inputs": [ZEROS]})
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert "retry shortly" in r.json()["detail"]
        r = c.post("/v2/models/fashion/infer", json=v2_body(IMAGES[:1]))
        assert r.status_code == 503 and "retry-after" in r.headers
        assert c.get("/readyz").status_code == 503 and c.get("/readyz").json() == {"status": "starting"}
        assert c.get("/v2/health/ready").status_code == 503
        r = c.get("/v2/models/fashion/ready")
        assert r.status_code == 503 and r.json() == {"name": "fashion", "ready": False}
        # liveness and metadata do not wait for warm-up
        assert c.get("/healthz").status_code == 200
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/model").json()["ready"] is False
        assert c.get("/v2/models/fashion").status_code == 200
        assert c.get(f"/v2/models/{NAME}").status_code == 404  # LCS_MODEL_NAME renames the model
        # input errors are still reported as such
        assert c.post("/predict", json={"inputs": []}).status_code == 422


def test_a_failed_self_check_keeps_the_app_unready_and_says_why(structured: TinyCheckpoint) -> None:
    with serve(make_settings(structured.path, self_check_margin=15.0), ready=False) as c:
        wait_for(lambda: app_state(c).failure is not None, what="the warm-up to fail")
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "failed"
        assert "start-up self-check failed" in r.json()["detail"]
        assert c.post("/predict", json={"inputs": [ZEROS]}).status_code == 503


def test_probes_answer_head_too(client: TestClient) -> None:
    for path in ("/healthz", "/readyz"):
        r = client.head(path)
        assert r.status_code == 200 and r.content == b"", path


def test_draining_turns_readiness_off_and_refuses_new_work(structured: TinyCheckpoint) -> None:
    with serve(make_settings(structured.path)) as c:
        app_state(c).start_draining()
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json() == {"status": "draining"}
        assert c.get("/v2/health/ready").status_code == 503
        r = c.get(f"/v2/models/{NAME}/ready")
        assert r.status_code == 503 and r.json() == {"name": NAME, "ready": False}
        r = c.post("/predict", json={"inputs": [ZEROS]})
        assert r.status_code == 503 and "retry-after" in r.headers
        assert c.get("/healthz").status_code == 200  # still alive while it drains


# -- admin: the pinned-alpha override ------------------------------------------------------------


def test_admin_is_off_without_an_api_key(client: TestClient) -> None:
    for method in ("PUT", "DELETE"):
        r = client.request(method, "/admin/pin", json={"alpha": 0.5}, headers={"x-api-key": "anything"})
        assert r.status_code == 404
        assert "LCS_API_KEY" in r.json()["detail"]
    r = client.put("/admin/pin", content=b"{", headers={"content-type": "application/json"})  # off before the body
    assert r.status_code == 404


def test_pin_needs_the_right_key_and_pins_what_predict_serves(structured: TinyCheckpoint) -> None:
    with serve(make_settings(structured.path, api_key="s3cret")) as c:
        r = c.put("/admin/pin", json={"alpha": 0.5})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.put("/admin/pin", json={"alpha": 0.5}, headers={"authorization": "Basic czNjcmV0"}).status_code == 401
        assert c.put("/admin/pin", json={"alpha": 0.5}, headers={"x-api-key": "wrong"}).status_code == 403
        assert c.put("/admin/pin", json={"alpha": 0.5}, headers={"authorization": "Bearer wrong"}).status_code == 403
        assert c.delete("/admin/pin", headers={"x-api-key": "s3cret-but-longer"}).status_code == 403
        assert c.get("/controller").json()["pinned"] is None  # nothing changed so far
        assert c.put("/admin/pin", json={"alpha": 2.0}, headers={"x-api-key": "s3cret"}).status_code == 422
        # the key is checked before the body is read: a malformed body without the key is a 401, not a 422
        assert c.put("/admin/pin", content=b"{", headers={"content-type": "application/json"}).status_code == 401
        r = c.put("/admin/pin", content=b"{", headers={"content-type": "application/json", "x-api-key": "s3cret"})
        assert r.status_code == 422 and r.json()["detail"].startswith("body: invalid JSON")
        r = c.put("/admin/pin", json={"alpha": 0.5, "force": True}, headers={"x-api-key": "s3cret"})
        assert r.status_code == 422 and "body.force" in r.json()["detail"]

        r = c.put("/admin/pin", json={"alpha": 0.7}, headers={"x-api-key": "s3cret"})
        assert r.status_code == 200, r.text
        assert r.json()["pinned"] == 0.5 and r.json()["ceiling"] == 0.5 and r.json()["mode"] == "pinned"
        served = c.post("/predict", json={"inputs": [ZEROS]}).json()
        assert served["alpha"] == 0.5 and served["level"] == 0.625
        assert c.post("/predict", json={"inputs": [ZEROS], "quality": 0.0}).json()["alpha"] == 0.0  # a ceiling
        v2 = c.post(f"/v2/models/{NAME}/infer", json=v2_body(IMAGES[:1])).json()
        assert v2["parameters"]["alpha"] == 0.5
        # a floor above the pinned ceiling is refused at once, not served late
        r = c.post("/predict", json={"inputs": [ZEROS], "min_quality": 1.0})
        assert r.status_code == 429
        assert r.json()["detail"].startswith("an operator has pinned alpha at <= 0.5, below min_quality 1")

        r = c.put(
            "/admin/pin", content=b'{"alpha": 0.5}', headers={"x-api-key": "s3cret", "content-type": "text/plain"}
        )
        assert r.status_code == 415 and "send application/json" in r.json()["detail"]
        r = c.put(
            "/admin/pin",
            content=gzip.compress(b'{"alpha": 0.5}'),
            headers={"x-api-key": "s3cret", "content-type": "application/json", "content-encoding": "gzip"},
        )
        assert r.status_code == 415 and "content encoding 'gzip' is not supported" in r.json()["detail"]
        r = c.put(
            "/admin/pin", content=b'{"alpha": NaN}', headers={"x-api-key": "s3cret", "content-type": "application/json"}
        )
        assert r.status_code == 422 and r.json()["detail"] == "body.alpha: Input should be a finite number"
        r = c.delete("/admin/pin", headers={"authorization": "bearer s3cret"})  # the scheme is case-insensitive
        assert r.status_code == 200
        assert r.json()["pinned"] is None and r.json()["mode"] == "recovering"
        assert [d["reason"] for d in r.json()["decisions"]] == ["pinned", "pin released"]


def test_an_operators_pin_and_its_release_are_logged_once_each(
    structured: TinyCheckpoint, caplog: pytest.LogCaptureFixture
) -> None:
    """A pin changed what every request was served at, and the log said nothing of it."""
    key = {"x-api-key": "s3cret"}
    with (
        caplog.at_level(logging.INFO, logger="lcs.service"),
        serve(make_settings(structured.path, api_key=key["x-api-key"])) as c,
    ):
        caplog.clear()
        assert c.put("/admin/pin", json={"alpha": 0.7}, headers=key).status_code == 200
        assert c.delete("/admin/pin", headers=key).status_code == 200
        assert c.delete("/admin/pin", headers=key).status_code == 200  # nothing pinned: nothing to say
    said = [r.getMessage() for r in caplog.records if "pin" in r.getMessage()]
    assert said == [
        "alpha pinned at 0.5 by an operator (PUT /admin/pin)",
        "the pin at 0.5 released by an operator: the controller sets the ceiling again",
    ]
    assert "s3cret" not in caplog.text


def test_wrong_admin_keys_are_logged_once_a_minute_without_the_key(
    structured: TinyCheckpoint, caplog: pytest.LogCaptureFixture
) -> None:
    """2,000 wrong keys left no line in the log; one line each would let a guesser flood it."""
    with (
        caplog.at_level(logging.INFO, logger="lcs.service"),
        serve(make_settings(structured.path, api_key="s3cret")) as c,
    ):
        for guess in ("guess-1", "guess-2", "guess-3"):
            assert c.put("/admin/pin", json={"alpha": 0.5}, headers={"x-api-key": guess}).status_code == 403
        st = app_state(c)
        st.wrong_key("192.0.2.7", time.monotonic() + 61.0)  # a minute on
    said = [r.getMessage() for r in caplog.records if "wrong API key" in r.getMessage()]
    assert said == [
        "admin endpoint: a wrong API key from testclient",
        "admin endpoint: a wrong API key from 192.0.2.7 (3 since the last such line)",
    ]
    assert "guess-" not in caplog.text and "s3cret" not in caplog.text


def test_a_pin_below_a_queued_requests_min_quality_refuses_it_when_its_batch_forms(structured: TinyCheckpoint) -> None:
    """A request queued with min_quality 1 before an operator pinned alpha 0 ran at 1 once the pin was
    acknowledged, and so did a request with no floor batched with it: the pin binds every batch formed after
    it, and the queued one hears what it would have heard on arrival."""

    async def scenario() -> None:
        async with serve_async(make_settings(structured.path, api_key="k", max_wait_ms=0.0)) as (client, st):
            with paused(st) as gate:
                running = asyncio.create_task(client.post("/predict", json={"inputs": [ZEROS], "quality": 0.0}))
                await until(lambda: st.batcher.running == 1, what="the first batch to be taken")
                floored = asyncio.create_task(client.post("/predict", json={"inputs": [ZEROS], "min_quality": 1.0}))
                await until(lambda: st.batcher.depth == 1, what="the floored request to queue")
                assert (await client.put("/admin/pin", json={"alpha": 0.0}, headers={"x-api-key": "k"})).is_success
                free = asyncio.create_task(client.post("/predict", json={"inputs": [ZEROS]}))
                await until(lambda: st.batcher.depth == 2, what="a request without a floor to queue behind it")
                gate.set()
                assert (await running).status_code == 200
                refused, served = await floored, await free
            assert refused.status_code == 429 and refused.json()["error"] == "min_quality unavailable"
            assert refused.json()["detail"].startswith("an operator has pinned alpha at <= 0, below min_quality 1")
            assert "retry-after" not in refused.headers  # a pin holds until someone acts
            assert served.status_code == 200 and served.json()["alpha"] == 0.0
            assert 'lcs_shed_total{reason="min_quality_capped"} 1.0' in (await client.get("/metrics")).text

    asyncio.run(scenario())


def test_the_pin_body_is_documented(client: TestClient) -> None:
    """PUT /admin/pin reads its own body (after the key check), so its schema is declared by hand."""
    body = client.get("/openapi.json").json()["paths"]["/admin/pin"]["put"]["requestBody"]
    assert body["required"] is True
    schema = body["content"]["application/json"]["schema"]
    assert schema["required"] == ["alpha"] and schema["additionalProperties"] is False
    assert schema["properties"]["alpha"] == {"maximum": 1.0, "minimum": 0.0, "title": "Alpha", "type": "number"}


def test_pin_to_the_lowest_alpha_refuses_min_quality(structured: TinyCheckpoint) -> None:
    with serve(make_settings(structured.path, api_key="k")) as c:
        assert c.put("/admin/pin", json={"alpha": 0.0}, headers={"x-api-key": "k"}).status_code == 200
        r = c.post("/predict", json={"inputs": [ZEROS], "min_quality": "balanced"})
        assert r.status_code == 429 and r.json()["error"] == "min_quality unavailable"  # not load: the pin
        assert "an operator has pinned alpha" in r.json()["detail"]
        assert c.post("/predict", json={"inputs": [ZEROS], "min_quality": 0.0}).json()["alpha"] == 0.0


@pytest.mark.parametrize(
    ("mode", "detail", "retry", "reason"),
    [
        (
            "degraded",
            "under current load the service serves alpha <= 0, below min_quality 1; retry later or lower",
            True,
            "min_quality",
        ),
        (
            "shedding",
            "under current load the service serves alpha <= 0, below min_quality 1; retry later or lower",
            True,
            "min_quality",
        ),
        (
            "pinned",
            "pinned alpha at <= 0, below min_quality 1; retry once the pin is released",
            False,
            "min_quality_capped",
        ),
        (
            "battery",
            "on low battery the service serves alpha <= 0, below min_quality 1; retry once the battery",
            False,
            "min_quality_capped",
        ),
    ],
)
def test_a_min_quality_refusal_says_what_caps_the_ceiling(
    structured: TinyCheckpoint, mode: str, detail: str, retry: bool, reason: str
) -> None:
    """Load passes, so its refusal gives a time to retry after and counts as shedding (which pages); a pin or
    the battery cap holds until someone acts, so its refusal gives no time and counts apart."""
    with serve(make_settings(structured.path)) as c:
        controller = app_state(c).runtime.controller
        controller.ceiling, controller.mode = 0.0, mode
        if mode == "battery":  # as the controller leaves it while the cap binds: the cap is the ceiling
            controller.battery_limit = 0.0
        r = c.post("/predict", json={"inputs": [ZEROS], "min_quality": 1.0})
        assert r.status_code == 429 and r.json()["error"] == "min_quality unavailable"
        assert detail in r.json()["detail"]
        assert ("retry-after" in r.headers) is retry
        assert f'lcs_shed_total{{reason="{reason}"}} 1.0' in c.get("/metrics").text


@pytest.mark.parametrize(("held_by", "after"), [("pin", "an operator's pin"), ("battery", "the low-battery cap")])
def test_a_min_quality_refusal_while_the_ceiling_returns_after_a_pin_or_the_cap_is_not_load_s(
    structured: TinyCheckpoint, held_by: str, after: str
) -> None:
    """A pin released, or the battery charging, on an idle service: the ceiling comes back within a calm spell,
    and a refusal meanwhile was load's ("under current load", counted as min_quality, which pages). A retry
    soon is served, so Retry-After stays."""
    with serve(make_settings(structured.path)) as c:
        controller = app_state(c).runtime.controller
        controller.ceiling, controller.mode, controller.held_by = 0.5, "recovering", held_by
        r = c.post("/predict", json={"inputs": [ZEROS], "min_quality": 1.0})
        assert r.status_code == 429 and r.json()["error"] == "min_quality unavailable"
        detail = f"returning to full quality after {after}, the service serves alpha <= 0.5, below min_quality 1"
        assert r.json()["detail"].startswith(detail) and "retry-after" in r.headers
        assert 'lcs_shed_total{reason="min_quality_capped"} 1.0' in c.get("/metrics").text
        controller.held_by = "load"  # coming back after load: load's refusal, as before
        r = c.post("/predict", json={"inputs": [ZEROS], "min_quality": 1.0})
        assert r.status_code == 429 and "under current load" in r.json()["detail"] and "retry-after" in r.headers


def test_a_floor_above_the_battery_cap_is_the_battery_s_refusal_while_load_holds_the_ceiling_lower(
    structured: TinyCheckpoint,
) -> None:
    """On low battery, load may push the ceiling under the cap, and the mode then says "degraded": a floor above
    the cap was refused as load's (Retry-After, reason min_quality, which pages), though it stays refused
    once the load passes. A floor between the ceiling and the cap is load's."""
    with serve(make_settings(structured.path)) as c:
        controller = app_state(c).runtime.controller
        controller.ceiling, controller.mode, controller.battery_limit = 0.0, "degraded", 0.5
        r = c.post("/predict", json={"inputs": [ZEROS], "min_quality": 1.0})
        assert r.status_code == 429 and "retry-after" not in r.headers
        assert "on low battery the service serves alpha <= 0.5, below min_quality 1" in r.json()["detail"]
        r = c.post("/predict", json={"inputs": [ZEROS], "min_quality": 0.5})
        assert r.status_code == 429 and "retry-after" in r.headers
        assert "under current load the service serves alpha <= 0, below min_quality 0.5" in r.json()["detail"]
        metrics = c.get("/metrics").text
        assert 'lcs_shed_total{reason="min_quality_capped"} 1.0' in metrics
        assert 'lcs_shed_total{reason="min_quality"} 1.0' in metrics


def test_the_battery_cap_is_logged_when_it_binds_and_when_it_is_lifted(
    structured: TinyCheckpoint, caplog: pytest.LogCaptureFixture
) -> None:
    """The cap engaging and releasing wrote nothing: an operator could not tell why quality fell."""
    with serve(make_settings(structured.path)) as c:
        st = app_state(c)
        now = time.monotonic()
        with caplog.at_level(logging.INFO, "lcs.service"):
            st.probe.battery = lambda: (10.0, True)  # type: ignore[method-assign]
            control_step(c, now + 1.0)
            # the largest alpha within the 0.5 cap that profiled faster than those above it (0.5 on most runs)
            capped = st.runtime.controller.battery_limit
            control_step(c, now + 1.5)  # still capped: nothing more to say
            st.probe.battery = lambda: (10.0, False)  # type: ignore[method-assign]
            control_step(c, now + 2.0)
        said = [r.getMessage() for r in caplog.records if "battery" in r.getMessage()]
        assert said == [
            f"on battery at 10 %, under LCS_BATTERY_LOW_PERCENT 20: alpha capped at {capped:g} (LCS_BATTERY_ALPHA_CAP)",
            "the battery cap is lifted (charging, back over LCS_BATTERY_LOW_PERCENT, or unreadable)",
        ]


def test_the_openapi_schema_does_not_promise_retry_after_where_a_pin_refuses_without_one(
    structured: TinyCheckpoint,
) -> None:
    """A min_quality refusal under a pin has no Retry-After; the schema declared it required on every 429, so
    the service broke its own contract (schemathesis' response_headers_conformance, tests/service/test_fuzz.py,
    fails on that answer). 503 keeps it required."""
    with serve(make_settings(structured.path, api_key="k")) as c:
        spec = c.get("/openapi.json").json()["paths"]
        for path in ("/predict", "/v2/models/{name}/infer"):
            headers = {code: spec[path]["post"]["responses"][code]["headers"]["Retry-After"] for code in ("429", "503")}
            assert headers["429"]["required"] is False and headers["503"]["required"] is True
        assert c.put("/admin/pin", json={"alpha": 0.5}, headers={"X-API-Key": "k"}).status_code == 200
        r = c.post("/predict", json={"inputs": [ZEROS], "min_quality": 1.0})
        assert r.status_code == 429 and "retry-after" not in r.headers


# -- concurrency: batching and overload, in one event loop ------------------------------------------


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(structured: TinyCheckpoint) -> None:
    images = random_images(20, seed=7)
    targets = [1.0 if i % 3 else 0.5 for i in range(len(images))]
    expected = {a: reference(structured, images, a) for a in (0.5, 1.0)}

    async def scenario() -> list[dict[str, Any]]:
        async with serve_async(make_settings(structured.path, max_batch=8, max_wait_ms=0.0)) as (client, st):
            with paused(st) as gate:  # hold the model so that the requests queue up
                tasks = [
                    asyncio.create_task(
                        client.post("/predict", json={"inputs": [image_list(x)], "quality": q, "top_k": 4})
                    )
                    for x, q in zip(images, targets, strict=True)
                ]
                # all admitted: queued, or in the batch the held model thread will run first
                await until(lambda: st.inflight == len(images), what="every request to be admitted")
                gate.set()
                responses = await asyncio.gather(*tasks)
            batches = st.metrics.batch_size.collect()[0].samples  # lcs_batch_size_images: one count per batch
            assert next(b.value for b in batches if b.name.endswith("_count")) >= 3  # 13 at 1 need two of <= 8
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        return [r.json() for r in responses]

    bodies = asyncio.run(scenario())
    for i, body in enumerate(bodies):
        assert body["alpha"] == targets[i]  # a mixed batch would have served some at the other alpha
        assert_matches(body["predictions"], expected[targets[i]][i : i + 1])
        assert body["batch_images"] <= 8
    assert max(b["batch_images"] for b in bodies) > 1  # they were batched


def test_full_queue_answers_429_with_retry_after(structured: TinyCheckpoint) -> None:
    async def scenario() -> None:
        settings = make_settings(structured.path, queue_max=1, max_wait_ms=0.0)
        async with serve_async(settings) as (client, st):
            with paused(st) as gate:
                body = {"inputs": [ZEROS]}
                first, second = await one_running_one_queued(client, st, body)
                refused = await client.post("/predict", json=body)
                assert refused.status_code == 429
                assert int(refused.headers["retry-after"]) >= 1
                assert "queue is full (1 request)" in refused.json()["detail"]
                assert st.inflight == 2
                gate.set()
                done = await asyncio.gather(first, second)
            assert [r.status_code for r in done] == [200, 200]
            assert (await client.post("/predict", json=body)).status_code == 200  # room again
            metrics = (await client.get("/metrics")).text
            assert 'lcs_shed_total{reason="queue_full"} 1.0' in metrics
            assert st.inflight == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("cache_bytes", [1, 2**30])
def test_the_ready_line_names_the_alphas_built_and_those_the_cache_kept(
    structured: TinyCheckpoint, cache_bytes: int, caplog: pytest.LogCaptureFixture
) -> None:
    """It named those still cached alone: with a small LCS_CACHE_BYTES, fewer than start-up built and profiled.
    It names the checkpoint file, the backend and the threads too (it named none of them)."""
    settings = make_settings(structured.path, cache_bytes=cache_bytes)
    with caplog.at_level(logging.INFO, logger="lcs.service"), serve(settings) as c:
        cached = app_state(c).runtime.cache.cached()
    ready = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ready: ")]
    threads = f"{settings.threads} thread{'s' if settings.threads > 1 else ''}"
    served = f"ready: tiny_structured ({structured.path}; {settings.backend}, {threads}), alphas {list(GRID)}"
    assert ready[0].startswith(f"{served} built and profiled, "), ready
    if cache_bytes > 1:
        assert ready[0].endswith(", all cached")
    else:
        assert len(cached) < len(GRID) and ready[0].endswith(f", {cached} cached (LCS_CACHE_BYTES)")


def test_model_failure_is_a_500_and_the_service_keeps_serving(structured: TinyCheckpoint) -> None:
    with serve(make_settings(structured.path)) as c:
        rt = app_state(c).runtime
        real = rt.cache.get

        def broken(alpha: float, *, counted: bool = True) -> Any:
            if alpha == 0.0:
                raise RuntimeError("kernel exploded")
            return real(alpha, counted=counted)

        rt.cache.get = broken  # type: ignore[method-assign]
        r = c.post("/predict", json={"inputs": [ZEROS], "quality": 0.0})
        assert r.status_code == 500
        assert r.json()["error"] == "internal error" and r.json()["request_id"] == r.headers["x-request-id"]
        assert "kernel exploded" not in r.text  # internals stay in the log
        assert c.post("/predict", json={"inputs": [ZEROS]}).status_code == 200


def test_all_torch_work_runs_on_the_inference_thread(
    structured: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading, warm-up and every batch run on the one `lcs-infer` thread, and a request's decoded,
    normalised input reaches it as numpy: torch work on the event loop would give that thread an OpenMP
    pool of its own, and two pools on two cores halved the int8 network's speed (runtime.inference_executor)."""
    from service.runtime import Runtime

    seen: dict[str, set[str]] = {"load": set(), "warm_up": set(), "logits": set()}
    inputs: list[type] = []
    load, warm_up, logits = Runtime.load.__func__, Runtime.warm_up, Runtime.logits  # type: ignore[attr-defined]

    def record(name: str) -> None:
        seen[name].add(threading.current_thread().name)

    def spy_load(cls: type[Runtime], settings: Any) -> Runtime:
        record("load")
        return load(cls, settings)  # type: ignore[no-any-return]

    def spy_warm_up(self: Runtime) -> None:
        record("warm_up")
        warm_up(self)

    def spy_logits(self: Runtime, alpha: float, x: Any) -> Any:
        record("logits")
        inputs.append(type(x))
        return logits(self, alpha, x)

    monkeypatch.setattr(Runtime, "load", classmethod(spy_load))
    monkeypatch.setattr(Runtime, "warm_up", spy_warm_up)
    monkeypatch.setattr(Runtime, "logits", spy_logits)
    with serve(make_settings(structured.path)) as c:
        r = c.post("/predict", json={"inputs": [image_list(structured.samples[i]) for i in range(3)]})
        assert r.status_code == 200
    assert all(names and all(n.startswith("lcs-infer") for n in names) for names in seen.values()), seen
    assert inputs and set(inputs) == {np.ndarray}


def test_images_decode_on_a_pool_of_one_thread_per_usable_cpu(
    structured: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images decoded on asyncio's default pool, min(32, the node's CPUs + 4) threads: 24 concurrent
    requests of one 4096x4096 16-bit PNG each peaked at 1,277 MiB on 2 CPUs, against 746 with a thread per
    CPU the process may use (a pod's quota counts, not the node's CPUs)."""
    import service.app
    import service.state

    threads: set[str] = set()
    decode = service.app.decode

    def spy(*args: Any, **kwargs: Any) -> Any:
        threads.add(threading.current_thread().name)
        return decode(*args, **kwargs)

    monkeypatch.setattr(service.app, "decode", spy)
    monkeypatch.setattr(service.state, "usable_cpus", lambda: 3)
    image = Image.fromarray(IMAGES[1, 0].numpy(), "L")
    with serve(make_settings(structured.path)) as c:
        assert c.post("/predict", json={"inputs": [b64(image, "PNG")]}).status_code == 200
        assert c.post("/predict", json={"inputs": [ZEROS]}).status_code == 200
        assert c.app.state.lcs.decoder._max_workers == 3  # type: ignore[attr-defined]
    assert len(threads) == 2 and any(n.startswith("lcs-decode") for n in threads), threads  # arrays: the loop


@pytest.mark.parametrize(
    ("page", "assets"), [("/docs", ["swagger-ui-bundle.js", "swagger-ui.css"]), ("/redoc", ["redoc.standalone.js"])]
)
def test_the_documentation_pages_load_nothing_from_outside(client: TestClient, page: str, assets: list[str]) -> None:
    """FastAPI's own pages load Swagger UI and ReDoc from a CDN: blank on a machine without internet access."""
    r = client.get(page)
    assert r.status_code == 200 and "/openapi.json" in r.text
    remote = [u for u in re.findall(r"""(?:src|href)=["']([^"']+)""", r.text) if "://" in u]
    assert remote == [], remote
    for name in assets:
        assert f"/docs/assets/{name}" in r.text
        served = client.get(f"/docs/assets/{name}")
        assert served.status_code == 200 and len(served.content) > 100_000
    assert client.head(page).status_code == 200  # as load balancers and uptime checks probe (FastAPI's: 405)
    missing = client.get("/docs/assets/app.py")  # only the pages' own files, by name
    assert missing.status_code == 404 and "no documentation asset" in missing.json()["detail"]
    assert client.get("/docs/assets/..%2F..%2Fpyproject.toml").status_code == 404


def test_the_root_leads_to_the_api_page(client: TestClient) -> None:
    """A browser opened at the service's address got {"error": "not found"}."""
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/docs"
    assert client.head("/", follow_redirects=False).status_code == 307
    assert "Swagger UI" in client.get("/").text


@pytest.mark.parametrize("name", ["two words", "caf\u00e9", "v~2", "lcs+l", "50%"])
def test_a_model_name_that_needs_percent_encoding_is_addressable(structured: TinyCheckpoint, name: str) -> None:
    """Such names were served before the name rule and were refused by its first version (found in review)."""
    with serve(make_settings(structured.path, model_name=name)) as c:
        quoted = urllib.parse.quote(name, safe="")
        assert c.get(f"/v2/models/{quoted}/ready").status_code == 200
        r = c.post(f"/v2/models/{quoted}/infer", json=v2_body(IMAGES[:1]))
        assert r.status_code == 200 and r.json()["model_name"] == name, r.text


def test_after_sigterm_an_inference_body_is_not_read(structured: TinyCheckpoint) -> None:
    """It was read and parsed only to be refused, and while it was being read the drain counted it as work
    to wait for: a drain could end 'timed out' on requests that had arrived after SIGTERM."""
    with serve(make_settings(structured.path)) as c:
        st = app_state(c)
        st.start_draining()
        r = c.post("/predict", content=b"not json", headers={"content-type": "application/json"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text  # not the 422 a read would give
        assert st.parsing == 0


def test_without_the_packaged_files_the_documentation_pages_fall_back_to_the_cdn(
    structured: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A fastapi-offline release that moved its files would have answered 500 for each of them."""
    monkeypatch.setattr(docs, "ASSETS", tmp_path)  # holds none of them
    with serve(make_settings(structured.path)) as c:
        page = c.get("/docs")
        assert page.status_code == 200 and "cdn.jsdelivr.net" in page.text
        assert c.get("/docs/assets/swagger-ui.css").status_code == 404
    assert "the API pages load their scripts from a CDN instead" in caplog.text


def test_v2_data_may_be_nested_as_its_shape(client: TestClient) -> None:
    """The protocol allows a tensor's data flat or nested as its shape (KServe's and Triton's clients send
    either); nested data was refused."""
    flat = v2_body(IMAGES[:2])
    nested = v2_body(IMAGES[:2])
    nested["inputs"][0]["data"] = IMAGES[:2].tolist()  # [2, 1, H, W], as the shape says
    a, b = (client.post(f"/v2/models/{NAME}/infer", json=body) for body in (flat, nested))
    assert a.status_code == 200 and b.status_code == 200, b.text
    assert a.json()["outputs"][0]["data"] == b.json()["outputs"][0]["data"]


def test_v2_reads_channels_last_images_and_refuses_other_layouts(tmp_path: Path) -> None:
    """numpy's and PIL's [N, H, W, C] is transposed as /predict transposes [H, W, C]; it was reshaped row-major
    to [N, C, H, W] and answered 200 for scrambled pixels. A layout of the right size that is neither is 422."""
    ck = make_checkpoint(tmp_path, "structured", channels=3)
    images = random_images(2, seed=5, channels=3)  # [2, 3, H, W]
    hwc = images.permute(0, 2, 3, 1)
    name = ck.path.stem

    def v2(data: torch.Tensor, shape: list[int] | None = None) -> httpx.Response:
        tensor = {
            "name": "input",
            "shape": shape or list(data.shape),
            "datatype": "UINT8",
            "data": data.flatten().tolist(),
        }
        return c.post(f"/v2/models/{name}/infer", json={"inputs": [tensor]})

    with serve(make_settings(ck.path)) as c:
        expected = reference(ck, images, 1.0)
        for r in (v2(images), v2(hwc), v2(images, [2, 3 * IMAGE * IMAGE])):
            assert r.status_code == 200, r.text
            assert torch.allclose(torch.tensor(r.json()["outputs"][0]["data"]).view(2, -1), expected, atol=1e-5)
        r = c.post("/predict", json={"inputs": hwc.tolist()})  # /predict's [H, W, C], the same answer
        assert_matches(r.json()["predictions"], expected)
        r = v2(images, [2, IMAGE, 3, IMAGE])
        assert r.status_code == 422 and f"lay the images out as [N, 3, {IMAGE}, {IMAGE}]" in r.json()["detail"]
        r = v2(images, [2, IMAGE, IMAGE * 3])  # [N, H, W] is one channel's layout only
        assert r.status_code == 422 and f"[N, {IMAGE}, {IMAGE}, 3] (N, H, W, C) or flat" in r.json()["detail"]
