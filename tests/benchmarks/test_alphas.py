"""benchmarks.alphas: which networks share timing rounds."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch

from benchmarks import alphas
from lcs.alpha import Level
from service.materialize import Compiled


def variant(name: str, representation: str) -> tuple[str, float, Compiled]:
    compiled = Compiled(1.0, Level("quantized", bits=8), lambda x: x, representation, 0, 0, 0.0, False)
    return name, 1.0, compiled


def test_networks_on_torch_and_on_onnx_runtime_never_share_timing_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    rounds: list[set[int]] = []

    def fake_rounds(calls: Mapping[int, Callable[[], object]], repeats: int) -> dict[int, float]:
        rounds.append(set(calls))
        return {k: 0.001 for k in calls}

    monkeypatch.setattr(alphas, "time_in_rounds", fake_rounds)
    monkeypatch.setattr(alphas, "time_batch", lambda *a, **k: 0.0)
    variants = [
        variant("0", "fp32 simulating 3-bit weights and activations, ONNX Runtime"),
        variant("1", "int8 (FX static quantisation, x86 kernels), TorchScript"),
        variant("float", "fp32 float reference (unquantised), ONNX Runtime"),
        variant("0 csr", "CSR sparse convs (unfold + sparse mm), eager"),
    ]
    rows: list[dict[str, Any]] = alphas._timings(variants, torch.zeros(32, 1, 2, 2), repeats=3)
    assert rounds == [{0, 2}, {1, 3}] * 2  # batch 1, then batch 32
    assert all(r["ms_b1"] == r["ms_b32"] == 1.0 for r in rows)
