"""After training: estimate BatchNorm statistics per alpha, measure accuracy per alpha, report and plot.

Report JSON (one per checkpoint, `models/<name>.json`):
    {"kind": ..., "subspace": "point" | "line", "fixed_alpha": null | a, "dataset": name, "split": "test",
     "points": [{"alpha": a, "level": sparsity | width | bits, "accuracy": percent on split}, ...]}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lcs import checkpoint
from lcs.alpha import LEVEL_LABELS
from lcs.layers import Setting
from lcs.models import SubspaceResNet
from training.data import Split, normalise


@torch.no_grad()
def calibrate(
    model: SubspaceResNet,
    images: torch.Tensor,
    mean: list[float],
    std: list[float],
    *,
    batches: int,
    batch_size: int,
    seed: int,
) -> None:
    """Estimate BatchNorm running statistics for every grid alpha from `batches` training batches."""
    if model.norm_type != "batch":
        return
    model.eval()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(images), generator=g)[: batches * batch_size]
    xs = [normalise(images[idx[i : i + batch_size]], mean, std) for i in range(0, len(idx), batch_size)]
    for row, alpha in enumerate(model.stat_alphas):
        level = model.schedule.level(alpha)
        for n, x in enumerate(xs):
            model(x, Setting(alpha, level, stats=row, calibrate=n))


@torch.no_grad()
def accuracy(
    model: SubspaceResNet, split: Split, mean: list[float], std: list[float], alpha: float, batch_size: int = 500
) -> float:
    """Top-1 accuracy in percent at alpha (eval mode, the grid's BatchNorm statistics)."""
    model.eval()
    s = model.at(alpha)
    correct = 0
    for i in range(0, len(split), batch_size):
        x = normalise(split.images[i : i + batch_size], mean, std)
        correct += int((model(x, s).argmax(1) == split.labels[i : i + batch_size]).sum())
    return 100.0 * correct / max(1, len(split))


def accuracy_table(
    model: SubspaceResNet, split: Split, mean: list[float], std: list[float], alphas: list[float], batch_size: int = 500
) -> list[dict[str, float]]:
    return [
        {
            "alpha": a,
            "level": model.schedule.level(a).value,
            "accuracy": round(accuracy(model, split, mean, std, a, batch_size), 2),
        }
        for a in alphas
    ]


def report(meta: checkpoint.CheckpointMeta, points: list[dict[str, float]]) -> dict[str, Any]:
    return {
        "kind": meta.kind,
        "subspace": meta.subspace,
        "fixed_alpha": meta.fixed_alpha,
        "dataset": meta.dataset,
        "split": meta.split,
        "points": points,
    }


def plot(reports: dict[str, dict[str, Any]], baselines: dict[str, dict[str, Any]], out: Path, title: str) -> None:
    """Accuracy against compression level: one line per subspace report, one marker per baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    kind = next(iter(reports.values()))["kind"] if reports else next(iter(baselines.values()))["kind"]
    for name, r in reports.items():
        pts = sorted(r["points"], key=lambda p: p["level"])
        ax.plot(
            [p["level"] for p in pts],
            [p["accuracy"] for p in pts],
            marker="o",
            ms=3,
            label=f"{name} (LCS+{'L' if r['subspace'] == 'line' else 'P'})",
        )
    for name, b in baselines.items():
        if b["kind"] != kind:  # e.g. the uncompressed network on a quantisation plot: a reference line
            for p in b["points"]:
                ax.axhline(p["accuracy"], ls="--", lw=1, color="grey", label=f"{name} (uncompressed, trained alone)")
            continue
        for p in b["points"]:
            ax.scatter([p["level"]], [p["accuracy"]], marker="*", s=120, zorder=3, label=f"{name} (trained alone)")
    ax.set_xlabel(LEVEL_LABELS[kind])
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def evaluate_checkpoint(
    path: Path, *, data_dir: str | None = None, alphas: list[float] | None = None
) -> dict[str, Any]:
    """Re-measure a checkpoint on its dataset's test split at every grid alpha."""
    from training.data import load_dataset

    torch.set_flush_denormal(True)  # denormals make fake-quantised layers 10-100x slower
    model, meta = checkpoint.load(path)
    data = load_dataset(meta.dataset, data_dir or meta.training.get("config", {}).get("data_dir"))
    pts = accuracy_table(model, data.test, meta.input.mean, meta.input.std, alphas or list(model.stat_alphas))
    return report(meta, pts)


def write_json(obj: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(obj, indent=1) + "\n")
