"""Evaluation: BatchNorm calibration per grid alpha, accuracy per alpha, reports and plots."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lcs import checkpoint
from lcs.models import SubspaceResNet
from training.data import Dataset, normalise
from training.evaluate import accuracy, accuracy_table, calibrate, evaluate_checkpoint, plot, report

GRID = (0.0, 0.5, 1.0)


def test_calibrate_fills_every_grid_row(tiny_model: Callable[..., SubspaceResNet], synthetic_data: Dataset) -> None:
    model = tiny_model("structured", "line", "batch", GRID)
    mean, std = synthetic_data.mean_std()
    calibrate(model, synthetic_data.train.images, mean, std, batches=2, batch_size=32, seed=0)
    assert not model.training
    rm = model.blocks[1].norm2.running_mean  # [G, 16]
    assert rm.shape == (3, 16)
    assert torch.count_nonzero(rm[0, 4:]) == 0  # width 0.25 at alpha 0: only 4 channels calibrated
    assert torch.count_nonzero(rm[0, :4]) == 4 and torch.count_nonzero(rm[2]) == 16
    assert not torch.equal(rm[1, :4], rm[2, :4])  # each alpha has its own statistics
    # deterministic for a seed
    again = tiny_model("structured", "line", "batch", GRID)
    calibrate(again, synthetic_data.train.images, mean, std, batches=2, batch_size=32, seed=0)
    assert torch.equal(again.blocks[1].norm2.running_mean, rm)


def test_calibrate_is_a_no_op_for_groupnorm(tiny_model: Callable[..., SubspaceResNet], synthetic_data: Dataset) -> None:
    model = tiny_model("structured", "line", "group", GRID)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mean, std = synthetic_data.mean_std()
    calibrate(model, synthetic_data.train.images, mean, std, batches=2, batch_size=32, seed=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_accuracy_counts_correct_predictions(
    tiny_model: Callable[..., SubspaceResNet], synthetic_data: Dataset
) -> None:
    model = tiny_model("structured", "point", "group", GRID, classes=2)
    mean, std = synthetic_data.mean_std()
    split = synthetic_data.test
    with torch.no_grad():
        pred = model(normalise(split.images, mean, std), model.at(1.0)).argmax(1)
    expected = 100.0 * float((pred == split.labels).float().mean())
    # batching does not change the answer
    assert accuracy(model, split, mean, std, 1.0, batch_size=7) == pytest.approx(expected)
    assert accuracy(model, split, mean, std, 1.0, batch_size=500) == pytest.approx(expected)


def test_accuracy_table_and_report(trained_run: Any) -> None:
    model, meta = checkpoint.load(trained_run.path)
    from training.data import load_folder

    data = load_folder(trained_run.data_dir)
    table = accuracy_table(model, data.test, meta.input.mean, meta.input.std, [0.0, 1.0])
    assert [p["alpha"] for p in table] == [0.0, 1.0]
    assert [p["level"] for p in table] == [0.25, 1.0]
    assert table[0]["accuracy"] == meta.accuracy[0].accuracy and table[1]["accuracy"] == meta.accuracy[2].accuracy
    rep = report(meta, table)
    assert rep["kind"] == "structured" and rep["subspace"] == "line" and rep["points"] is table
    assert rep["dataset"] == "folder" and rep["split"] == "test" and rep["fixed_alpha"] is None


def test_evaluate_checkpoint_reloads_its_dataset(trained_run: Any) -> None:
    rep = evaluate_checkpoint(trained_run.path)  # data_dir comes from the recorded training config
    meta = checkpoint.read_meta(trained_run.path)
    assert rep["points"] == [p.model_dump() for p in meta.accuracy]
    assert evaluate_checkpoint(trained_run.path, data_dir=str(trained_run.data_dir)) == rep  # --data-dir


def test_plot_writes_a_png(tmp_path: Path) -> None:
    line = {
        "kind": "quantized",
        "subspace": "line",
        "points": [{"alpha": a, "level": 3 + 5 * a, "accuracy": 80 + a} for a in (0.0, 0.5, 1.0)],
    }
    base = {"kind": "quantized", "subspace": "point", "points": [{"alpha": 0.0, "level": 3, "accuracy": 79.0}]}
    out = tmp_path / "plots" / "q.png"
    plot({"q_line": line}, {"q_a0": base}, out, "quantized")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
