"""service.runtime: loading validates checkpoint and settings together; warm-up builds, profiles, self-checks."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from service import materialize, runtime
from service.controller import Signals
from service.materialize import Compiled
from service.runtime import PROFILE_ROUNDS, Runtime, WarmUpStopped, softmax
from tests.service.service_support import ACCURACY, GRID, TinyCheckpoint, make_settings, normalise, random_images


def test_load_reads_the_grid_samples_and_accuracy(structured: TinyCheckpoint) -> None:
    rt = Runtime.load(make_settings(structured.path))
    assert rt.grid.alphas == list(GRID)
    assert rt.name == "tiny_structured"
    assert rt.accuracy == {p.alpha: p.accuracy for p in structured.meta.accuracy}
    assert rt.samples is not None and rt.sample_labels is not None
    assert torch.allclose(rt.samples, normalise(structured.samples), atol=1e-6)  # normalised like training
    assert not rt.ready and rt.cache.cached() == []  # nothing is built before warm-up


def test_a_warm_up_told_to_stop_builds_nothing_more(structured: TinyCheckpoint) -> None:
    """Runtime.stopping (set by the app's lifespan on shutdown) is checked before each build, each profile
    round and each alpha's self-check: here, before the first build."""
    rt = Runtime.load(make_settings(structured.path))
    rt.stopping.set()
    with pytest.raises(WarmUpStopped):
        rt.warm_up()
    assert rt.cache.cached() == [] and not rt.ready


def test_time_in_rounds_asks_before_each_round_and_stops_when_told() -> None:
    runs: list[str] = []
    asked = 0

    def each_round() -> None:
        nonlocal asked
        asked += 1
        if asked == 3:
            raise WarmUpStopped

    calls = {"a": lambda: runs.append("a"), "b": lambda: runs.append("b")}
    with pytest.raises(WarmUpStopped):
        materialize.time_in_rounds(calls, 7, each_round=each_round)
    assert runs == ["a", "a", "b", "b"] * 2  # two rounds, each call twice (the second timed)


def test_warm_up_builds_profiles_and_self_checks(structured: TinyCheckpoint) -> None:
    rt = Runtime.load(make_settings(structured.path, profile_batches=[1, 2]))
    rt.warm_up()
    assert rt.ready
    assert rt.cache.cached() == list(GRID)
    assert set(rt.profile.seconds) == set(GRID)
    assert all(set(row) == {1, 2} and all(t > 0 for t in row.values()) for row in rt.profile.seconds.values())
    assert set(rt.self_check) == {"0", "0.5", "1"}
    assert all(0.0 <= v <= 100.0 for v in rt.self_check.values())


def test_the_self_check_runs_in_the_batches_the_service_runs(
    structured: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All the sample images at once (256 in the shipped checkpoints) made start-up's memory peak: 474-481 MiB
    resident at most, 383 once ready; in batches of LCS_MAX_BATCH, 384 at most and 376 ready."""
    sizes: list[int] = []
    logits = Compiled.logits

    def spy(self: Compiled, x: np.ndarray) -> np.ndarray:
        sizes.append(len(x))
        return logits(self, x)

    monkeypatch.setattr(Compiled, "logits", spy)
    rt = Runtime.load(make_settings(structured.path, max_batch=8, profile_batches=[1]))
    rt.warm_up()
    checked = [n for n in sizes if n > 1]  # the profile's calls are of batch 1
    assert len(structured.samples) == 64 and checked == [8] * 8 * len(GRID)
    assert set(rt.self_check) == {"0", "0.5", "1"}


def test_a_checkpoint_with_no_sample_images_starts(structured: TinyCheckpoint, tmp_path: Path) -> None:
    """lcs.checkpoint accepts 0 sample images; the self-check in batches concatenated no batch at all and
    start-up failed with numpy's "need at least one array to concatenate" (all at once, it had started)."""
    from lcs import checkpoint

    model, meta, _ = checkpoint.load_with_samples(structured.path)
    empty = (
        torch.zeros(0, 1, meta.input.height, meta.input.width, dtype=torch.uint8),
        torch.zeros(0, dtype=torch.int64),
    )
    path = tmp_path / "no_samples.safetensors"
    checkpoint.save(path, model, meta, samples=empty)
    rt = Runtime.load(make_settings(path, profile_batches=[1]))
    assert rt.samples is None  # as with none stored: int8 is not calibrated on nothing
    rt.warm_up()
    assert rt.ready and rt.self_check == {}


def test_the_profile_is_timed_in_rounds_so_a_drifting_machine_keeps_the_alphas_in_order(
    structured: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fake clock: alpha 1 costs 5 ms and alpha 0.5 6 ms (as ONNX Runtime's padded widths can), while the
    machine's pace halves from 2x over the measurement. Timed one alpha after another, alpha 1 (first)
    would look 1.7x slower than 0.5; timed in rounds, each sees the same pace and the order holds."""
    rt = Runtime.load(make_settings(structured.path, profile_batches=[1]))
    clock = {"now": 0.0, "calls": 0}
    total_calls = 2 * 2 * PROFILE_ROUNDS  # alphas x (untimed + timed) x rounds

    def model(cost: float) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            pace = 2.0 - clock["calls"] / total_calls  # 2x slow at the start, 1x at the end
            clock["now"] += cost * pace
            clock["calls"] += 1
            return x

        return run

    costs = {1.0: 0.005, 0.5: 0.006}
    monkeypatch.setattr("service.materialize.time.perf_counter", lambda: clock["now"])
    built = {a: Compiled(a, rt.model.at(a).level, model(cost), "fake", 0, 0, 0.0, False) for a, cost in costs.items()}
    rt._measure_profile(built, torch.zeros(1, 1, 8, 8))
    t1, t05 = rt.profile.predict(1.0, 1), rt.profile.predict(0.5, 1)
    assert t1 is not None and t05 is not None and t1 < t05
    assert t05 / t1 == pytest.approx(1.2, rel=0.05)


def test_prebuild_subset_and_a_narrower_grid(structured: TinyCheckpoint) -> None:
    rt = Runtime.load(make_settings(structured.path, alpha_grid=[0.0, 0.5, 1.0], prebuild=[0.50000001]))
    rt.warm_up()
    assert rt.grid.alphas == [0.0, 0.5, 1.0]
    # as the grid spells it (off the grid: tests/service/test_startup.py), and the top of the grid, always
    assert rt.cache.cached() == [0.5, 1.0]
    assert set(rt.profile.seconds) == {0.5, 1.0}
    assert rt.controller.grid.alphas == [0.0, 0.5, 1.0]
    # idle, the ceiling stays at the top: with 1 unprofiled, the first interval lowered it to 0.5 for good
    for t in range(20):
        rt.controller.update(Signals(now=float(t)))
    assert rt.controller.ceiling == 1.0 and rt.controller.mode == "full"


@pytest.mark.parametrize("room", [10**9, 1])
def test_start_up_warns_when_the_models_it_keeps_exceed_the_cache_bound(
    tiny_checkpoints: Callable[[str], TinyCheckpoint], caplog: pytest.LogCaptureFixture, room: int
) -> None:
    """The int8 alpha cannot be freed (a traced network), so it stays beside the newest model and the fastest,
    over the bound."""
    rt = Runtime.load(make_settings(tiny_checkpoints("quantized").path, cache_bytes=room, profile_batches=[1]))
    rt.warm_up()
    assert rt.cache.keep == {rt.controller.fastest()}
    if room > 1:
        assert rt.cache.cached() == list(GRID)
    else:  # the int8 alpha, the fastest and the newest
        assert set(rt.cache.cached()) >= {1.0} | rt.cache.keep and not rt.cache.peek(1.0).reclaimable
    warned = "over LCS_CACHE_BYTES" in caplog.text
    assert warned == (room == 1)


def test_start_up_builds_each_alpha_once_counts_no_lookups_and_warns_on_what_it_keeps(
    structured: TinyCheckpoint, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bound that holds alpha 1's network alone: prebuilding from the top down evicts each model for the next,
    and the fastest (named here: which profiles fastest on a tiny model is timing) is built again and kept. The
    self-check runs on the models start-up built: it asked the cache for every alpha again, rebuilding those the
    bound had evicted after the warning's check had passed (the cache left over the bound, no warning), and
    counted those lookups as hits and misses, which are the batches' figures."""
    monkeypatch.setattr(materialize, "_padding_pays", lambda *args: False)  # sizes that do not depend on timing
    one = materialize.build(structured.model, structured.meta, 1.0, samples=None, channels_last=False)
    rt = Runtime.load(make_settings(structured.path, cache_bytes=one.resident_bytes, profile_batches=[1]))
    monkeypatch.setattr(rt.controller, "fastest", lambda: 1.0)
    rt.warm_up()
    assert set(rt.self_check) == {"0", "0.5", "1"}
    assert rt.cache.cached() == [1.0] and rt.cache.bytes <= rt.cache.max_bytes
    assert "over LCS_CACHE_BYTES" not in caplog.text
    stats = rt.cache.stats
    assert (stats.builds, stats.hits, stats.misses) == (len(GRID) + 1, 0, 0)  # alpha 1 built again, once


def test_the_models_start_up_built_and_the_bound_evicted_are_freed_before_the_heap_is_trimmed(
    structured: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The self-check's loop variable kept the last model it checked alive through the trim."""
    made: list[weakref.ref[Compiled]] = []
    alive: list[list[float]] = []
    build = runtime.build

    def tracked(*args: Any, **kwargs: Any) -> Compiled:
        made.append(weakref.ref(compiled := build(*args, **kwargs)))
        return compiled

    def trim() -> None:
        gc.collect()
        cached = {id(rt.cache.peek(a)) for a in rt.cache.cached()}
        alive.append([c.alpha for ref in made if (c := ref()) is not None and id(c) not in cached])

    monkeypatch.setattr(runtime, "build", tracked)
    monkeypatch.setattr(runtime, "release_freed_heap", trim)
    rt = Runtime.load(make_settings(structured.path, cache_bytes=1, profile_batches=[1]))
    monkeypatch.setattr(rt.controller, "fastest", lambda: 1.0)
    rt.warm_up()
    assert rt.cache.cached() == [1.0] and alive == [[]]


def test_the_fastest_model_is_kept_and_built_again_if_prebuilding_evicted_it(
    structured: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a bound no model fits, prebuilding the grid (from the top down) leaves only the last built; the
    fastest is built again and kept from then on, whatever the bound. (Which alpha profiles fastest on a
    tiny model is timing, so the test names it.)"""
    rt = Runtime.load(make_settings(structured.path, cache_bytes=1, profile_batches=[1]))
    monkeypatch.setattr(rt.controller, "fastest", lambda: 1.0)
    rt.warm_up()
    assert rt.cache.keep == {1.0}
    assert rt.cache.cached() == [1.0]  # the fastest, built again: now the newest too
    rt.cache.get(0.5)
    assert rt.cache.cached() == [0.5, 1.0]


@pytest.mark.parametrize("padded_speed", [0.5, 0.99])
def test_an_alpha_built_again_runs_padded_or_not_as_its_first_build_measured(
    structured: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch, padded_speed: float
) -> None:
    """Building again after a drop repeats the start-up build's decision, without building and timing both
    networks (most of a padded alpha's build time), and so runs the network the profile timed."""
    timed: list[float] = []

    def timing(calls: object, rounds: int) -> dict[str, float]:
        timed.append(padded_speed)
        return {"plain": 1.0, "padded": padded_speed}

    monkeypatch.setattr(materialize, "time_in_rounds", timing)
    rt = Runtime.load(make_settings(structured.path, prebuild=[0.5], profile_batches=[1]))
    first = rt.cache.get(0.5)  # width 0.625: not a multiple of 16
    assert timed == [padded_speed] and first.padded == (padded_speed < 0.95)
    rt.cache.get(1.0)
    rt.cache.drop_idle(float("inf"))  # 0.5 dropped, as memory pressure would
    assert rt.cache.cached() == [1.0]
    before = len(timed)
    again = rt.cache.get(0.5)
    assert len(timed) == before  # not timed again
    assert again.padded == first.padded and again.representation == first.representation


def test_grid_alphas_take_the_checkpoints_spelling(structured: TinyCheckpoint) -> None:
    rt = Runtime.load(make_settings(structured.path, alpha_grid=[0.50000001, 1.0], prebuild=[0.5]))
    assert rt.grid.alphas == [0.5, 1.0]
    assert rt.accuracy[rt.grid.down(0.7)] == ACCURACY[0.5]  # found: the response reports it


def test_an_accuracy_table_spelling_an_alpha_its_own_way_is_still_found(
    structured: TinyCheckpoint, tmp_path: Path
) -> None:
    """The grid takes stat_alphas' spelling; the accuracy was keyed by the table's, and not found (null in
    every answer at that alpha, and its self-check skipped)."""
    from lcs import checkpoint

    model, meta, samples = checkpoint.load_with_samples(structured.path)
    table = [p.model_copy(update={"alpha": 0.5000001}) if p.alpha == 0.5 else p for p in meta.accuracy]
    path = tmp_path / "spelt.safetensors"
    checkpoint.save(path, model, meta.model_copy(update={"accuracy": table}), samples=samples)
    rt = Runtime.load(make_settings(path))
    assert rt.grid.alphas == list(GRID) and rt.accuracy[0.5] == ACCURACY[0.5]


def test_a_grid_alpha_without_batchnorm_statistics_is_refused(structured: TinyCheckpoint) -> None:
    with pytest.raises(ValueError, match=r"LCS_ALPHA_GRID=0.25,1: alphas \[0.25\] have no BatchNorm statistics"):
        Runtime.load(make_settings(structured.path, alpha_grid=[0.25, 1.0]))


def test_torchscript_channels_last_auto_is_decided_by_measurement(structured: TinyCheckpoint) -> None:
    settings = {"prebuild": [1.0], "profile_batches": [1], "backend": "torchscript"}
    rt = Runtime.load(make_settings(structured.path, channels_last="auto", **settings))
    rt.warm_up()
    assert isinstance(rt.channels_last, bool)
    assert rt.cache.get(1.0).channels_last == rt.channels_last
    assert rt.cache.get(1.0).representation.endswith("TorchScript")
    rt_on = Runtime.load(make_settings(structured.path, channels_last="on", **settings))
    rt_on.warm_up()
    assert rt_on.channels_last and rt_on.cache.get(1.0).channels_last


def test_onnx_runtime_needs_no_layout_probe(structured: TinyCheckpoint) -> None:
    from unittest import mock

    from service import runtime as runtime_module

    rt = Runtime.load(make_settings(structured.path, channels_last="auto", prebuild=[1.0], profile_batches=[1]))
    assert rt.settings.backend == "onnxruntime"
    with mock.patch.object(runtime_module, "build", wraps=runtime_module.build) as spy:
        rt.warm_up()
    assert spy.call_count == 1  # ONNX Runtime picks its own layout
    assert rt.cache.get(1.0).representation.endswith("ONNX Runtime")


def test_logits_at_the_grid_alpha_and_their_softmax(structured: TinyCheckpoint) -> None:
    rt = Runtime.load(make_settings(structured.path))
    x = normalise(random_images(5, seed=3))
    logits = rt.logits(0.5, x.numpy())
    assert isinstance(logits, np.ndarray) and logits.shape == (5, 4)
    with torch.no_grad():
        ref = structured.model(x, structured.model.at(0.5))
    np.testing.assert_allclose(logits, ref.numpy(), atol=1e-4)
    probs = softmax(logits)
    np.testing.assert_allclose(probs.sum(1), np.ones(5), atol=1e-5)
    np.testing.assert_allclose(probs, torch.softmax(ref, 1).numpy(), atol=1e-5)
    assert rt.level(0.5) == 0.625


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_nan_or_an_infinity_spoils_only_its_own_row(bad: float) -> None:
    """The softmax runs once per batch: a row the model answered NaN (or +inf) for must not spoil the
    others, each request's answer checking only its own."""
    with np.errstate(invalid="ignore"):
        probs = softmax(np.array([[0.0, 1.0], [bad, 1.0], [2.0, 2.0]], np.float32))
    assert np.isnan(probs[1]).all() and np.isfinite(probs[[0, 2]]).all()
    np.testing.assert_allclose(probs[2], [0.5, 0.5])


def test_a_logit_of_minus_infinity_is_a_probability_of_zero() -> None:
    np.testing.assert_array_equal(softmax(np.array([[-np.inf, 0.0]], np.float32)), [[0.0, 1.0]])


def test_describe(structured: TinyCheckpoint) -> None:
    rt = Runtime.load(make_settings(structured.path, model_name="fashion"))
    d = rt.describe()
    assert d["name"] == "fashion" and d["kind"] == "structured" and d["level_name"] == "width"
    assert d["grid"] == list(GRID) and d["ready"] is False
    assert d["backend"] == "onnxruntime" and d["representations"] == {}
    rt.cache.get(0.5)
    ((alpha, representation),) = rt.describe()["representations"].items()  # padded or not, as it measured
    assert alpha == "0.5" and representation.startswith("sliced fp32, width 0.625, ")
    assert representation.endswith("ONNX Runtime")
    memory = rt.describe()["memory"]["0.5"]
    stored = rt.cache.peek(0.5).stored_bytes  # type: ignore[union-attr]
    assert memory == {"resident_bytes": rt.cache.bytes, "evictable": True, "stored_bytes": stored}
    assert stored > 0  # the sliced network's fp32 weights (structured: no packed form)
    rt.cache.keep = frozenset({0.5})  # as warm_up keeps the fastest: never evicted, so not shown as evictable
    assert rt.describe()["memory"]["0.5"]["evictable"] is False


def test_describe_reports_when_the_model_was_loaded_not_the_current_time(structured: TinyCheckpoint) -> None:
    import time

    before = time.time()
    rt = Runtime.load(make_settings(structured.path))
    first = rt.describe()["loaded_at"]
    time.sleep(0.01)
    assert before <= first == rt.describe()["loaded_at"]  # type: ignore[operator]


def test_the_layout_probe_on_a_quantized_model_builds_int8_only_in_the_cache(
    tiny_checkpoints: Callable[[str], TinyCheckpoint],
) -> None:
    from unittest import mock

    from service import runtime as runtime_module

    quantized = tiny_checkpoints("quantized")
    rt = Runtime.load(
        make_settings(quantized.path, channels_last="auto", backend="torchscript", prebuild=[1.0], profile_batches=[1])
    )
    with mock.patch.object(runtime_module, "build", wraps=runtime_module.build) as spy:
        rt.warm_up()
    int8_builds = [c for c in spy.call_args_list if c.kwargs.get("int8", True) and c.kwargs["samples"] is not None]
    assert len(int8_builds) == 1  # the cache's build of alpha 1; the probe compares fp32 layouts
    assert "int8" in rt.cache.get(1.0).representation


def test_the_model_description_is_one_view_of_the_cache(
    structured: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET /model's cached alphas, memory and representations come from one look at the cache: read in
    three, a build on the inference thread evicting between them made them disagree (328 in 353,333 calls)."""
    rt = Runtime.load(make_settings(structured.path, profile_batches=[1]))
    rt.warm_up()
    cached, look = rt.cache.cached(), rt.cache.peek
    assert len(cached) >= 2

    def evicted_meanwhile(alpha: float, **kwargs: Any) -> Compiled | None:
        if alpha == cached[-1]:  # as a build on another thread would, evicting one already looked at
            with rt.cache._lock:
                rt.cache._entries.pop(cached[0])
        return look(alpha, **kwargs)

    monkeypatch.setattr(rt.cache, "peek", evicted_meanwhile)
    described = rt.describe()
    assert described["cached_alphas"] == [float(a) for a in described["memory"]]  # type: ignore[union-attr]
    assert described["memory"].keys() == described["representations"].keys()  # type: ignore[union-attr]
