"""benchmarks.alphas: which networks share timing rounds; which alphas it measures, and against which."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import alphas
from lcs import checkpoint
from lcs.alpha import Level
from lcs.models import SubspaceResNet
from service.materialize import Compiled, OnnxModule
from tests.service.service_support import make_checkpoint


def variant(name: str, on_ort: bool) -> tuple[str, float, Compiled]:
    module = OnnxModule.__new__(OnnxModule) if on_ort else (lambda x: x)  # never run: timing is faked
    return name, 1.0, Compiled(1.0, Level("quantized", bits=8), module, name, 0, 0, 0.0, False)


def test_networks_on_torch_and_on_onnx_runtime_are_timed_in_rounds_of_their_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    groups: list[list[Hashable]] = []

    def fake_rounds(
        calls: Mapping[int, Callable[[], object]], repeats: int, *, group: Callable[[int], Hashable]
    ) -> dict[int, float]:
        groups.append([group(k) for k in calls])
        return {k: 0.001 for k in calls}

    monkeypatch.setattr(alphas, "time_in_rounds", fake_rounds)
    monkeypatch.setattr(Compiled, "logits", lambda self, x: x)  # the warm-up calls
    variants = [variant("3-bit", True), variant("int8", False), variant("float", True), variant("csr", False)]
    rows: list[dict[str, Any]] = alphas._timings(variants, torch.zeros(32, 1, 2, 2), repeats=3)
    assert groups == [[True, False, True, False]] * 2  # batch 1, then batch 32
    assert all(r["ms_b1"] == r["ms_b32"] == 1.0 for r in rows)


def _run(argv: list[str], rows: int, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """benchmarks.alphas' JSON for `argv`, with its timing children faked: `rows` variants, 1 ms and 2 ms
    at every alpha but the first (0.5 ms and 1 ms)."""

    def child(cmd: list[str], what: str) -> list[dict[str, Any]]:
        timed = [{"representation": "x, ONNX Runtime", "ms_b1": 1.0, "ms_b32": 2.0} for _ in range(rows)]
        timed[0] = {**timed[0], "ms_b1": 0.5, "ms_b32": 1.0}
        return timed

    monkeypatch.setattr(alphas, "run_child", child)
    monkeypatch.setattr(sys, "argv", ["alphas", *argv])
    alphas.main()
    return dict(json.loads(Path(argv[argv.index("--json") + 1]).read_text()))


def test_without_alpha_1_the_speed_ups_are_relative_to_the_highest_alpha_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--alphas 0 0.5` measured everything, then failed (StopIteration) looking for the alpha 1 row."""
    ckpt = make_checkpoint(tmp_path, "structured").path
    result = _run(
        [str(ckpt), "--alphas", "0", "0.5", "--repeats", "1", "--json", str(tmp_path / "a.json")], 2, monkeypatch
    )
    assert [r["alpha"] for r in result["rows"]] == ["0", "0.5"] and result["speedup_relative_to"] == "0.5"
    assert [r["speedup_b32_t2"] for r in result["rows"]] == [2.0, 1.0]


def test_a_baseline_trained_at_one_alpha_is_measured_at_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    settled_model: Callable[..., SubspaceResNet],
    make_meta: Callable[..., checkpoint.CheckpointMeta],
) -> None:
    """A baseline's grid is its one alpha (models/baselines/quantized_a0.5: [0.5]): the default alphas below it
    failed (`max()` of nothing), and the float reference asked for alpha 1's statistics."""
    model = settled_model("quantized", "point", "batch", [0.5])
    level = model.schedule.level(0.5).value
    meta = make_meta(model, "quantized", accuracy=[checkpoint.AccuracyPoint(alpha=0.5, level=level, accuracy=50.0)])
    ckpt = tmp_path / "quantized_a0.5.safetensors"
    checkpoint.save(ckpt, model, meta)
    result = _run([str(ckpt), "--repeats", "1", "--json", str(tmp_path / "a.json")], 2, monkeypatch)
    assert [r["alpha"] for r in result["rows"]] == ["0.5", "float"] and result["speedup_relative_to"] == "float"
    assert [r["level"] for r in result["rows"]] == [6, 32]  # 6 bits at alpha 0.5; the float reference
