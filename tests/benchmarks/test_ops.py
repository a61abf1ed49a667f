"""benchmarks.ops: the op-by-op profile covers the network the service builds, in the order it runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import ops
from lcs import checkpoint
from tests.service.service_support import make_checkpoint


def _profile(kind: str, alpha: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, Any]]:
    """(checkpoint, the JSON benchmarks.ops writes) for a tiny checkpoint of `kind` at `alpha`."""
    path, out = make_checkpoint(tmp_path, kind).path, tmp_path / "ops.json"
    argv = ["ops", str(path), "--alpha", str(alpha), "--batch", "4", "--threads", "1", "--runs", "3"]
    monkeypatch.setattr(sys, "argv", [*argv, "--json", str(out)])
    ops.main()
    return path, json.loads(out.read_text())


def _convolutions(path: Path, alpha: float) -> int:
    model, _ = checkpoint.load(path)
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.export(model.at(alpha)).modules())


def test_a_float_network_is_profiled_node_by_node_on_onnx_runtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, result = _profile("structured", 0.0, tmp_path, monkeypatch)
    assert result["representation"].endswith("ONNX Runtime")
    nodes = result["us_per_forward"]
    kinds = [name.split(" ", 1)[0] for name in nodes]
    assert kinds.count("Conv") >= _convolutions(path, 0.0) and kinds[-1] == "Gemm"  # the classifier runs last
    assert all(us > 0 for us in nodes.values())


def test_int8_is_profiled_op_instance_by_op_instance_in_graph_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, result = _profile("quantized", 1.0, tmp_path, monkeypatch)
    assert result["representation"].startswith("int8")
    names = list(result["us_per_forward"])
    assert names[0] == "aten::quantize_per_tensor #0"  # the input is quantised first
    assert names[1] == "quantized::conv2d #0"  # then the stem
    assert sum(n.startswith("quantized::conv2d") for n in names) == _convolutions(path, 1.0)
    assert names[-1] == "aten::dequantize #1"  # the logits, last
