"""benchmarks.alphas: which networks share timing rounds."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import pytest
import torch

from benchmarks import alphas
from lcs.alpha import Level
from service.materialize import Compiled, OnnxModule


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
