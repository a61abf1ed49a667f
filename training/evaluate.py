"""After training: estimate BatchNorm statistics per alpha, measure accuracy per alpha, report and plot.

Report JSON (one per checkpoint, `models/<name>.json`):
    {"kind": ..., "subspace": "point" | "line", "fixed_alpha": null | a, "dataset": name, "split": "test",
     "points": [{"alpha": a, "level": sparsity | width | bits, "accuracy": percent on split}, ...]}
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from lcs import checkpoint
from lcs.alpha import KINDS, LEVEL_LABELS, SUBSPACES
from lcs.layers import Setting
from lcs.models import SubspaceResNet
from training.data import DATASETS, DataError, Dataset, Split, load_dataset, normalise, shape_text


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


def evaluate_checkpoint(path: Path, *, data_dir: str | None = None) -> dict[str, Any]:
    """Re-measure a checkpoint on its dataset's test split at every grid alpha."""
    torch.set_flush_denormal(True)  # denormals make fake-quantised layers 10-100x slower
    model, meta = checkpoint.load(path)
    data = trained_dataset(path, meta, data_dir)
    pts = accuracy_table(model, data.test, meta.input.mean, meta.input.std, list(model.stat_alphas))
    return report(meta, pts)


def trained_dataset(path: Path | str, meta: checkpoint.CheckpointMeta, data_dir: str | None) -> Dataset:
    """The dataset a checkpoint was trained on: `data_dir` (the commands' --data-dir), else the folder its
    metadata records, else the dataset's standard location; refused (DataError) if its images or classes are
    not the checkpoint's (a RuntimeError traceback, or, same size but other pixels, a plausible wrong accuracy)."""
    if meta.dataset not in DATASETS:  # "choose one" would offer a choice the command does not give
        raise checkpoint.CheckpointError(
            f"{path}: field 'dataset' is {meta.dataset!r}, which this build cannot read ({', '.join(DATASETS)}); "
            "the file was edited, or written by another version of lcs-serve"
        )
    data_dir = data_dir or recorded_data_dir(path, meta)
    data = load_dataset(meta.dataset, data_dir, option="--data-dir")
    where = data_dir or f"{meta.dataset}'s standard location"
    shape, trained = tuple(data.test.images.shape[1:]), (meta.input.channels, meta.input.height, meta.input.width)
    if shape != trained:
        raise DataError(
            f"{where}: test images are {shape_text(shape)}, but {path} takes {shape_text(trained)} "
            "(channels x height x width); pass --data-dir with the dataset it was trained on"
        )
    if data.classes != meta.classes:  # accuracy compares label numbers: another class list makes it wrong
        raise DataError(
            f"{where}: classes {data.classes[:12]}, but {path} was trained on {meta.classes[:12]}; pass --data-dir "
            "with the dataset it was trained on"
        )
    return data


def recorded_data_dir(path: Path | str, meta: checkpoint.CheckpointMeta) -> str | None:
    """The data_dir a checkpoint was trained with (its metadata's training.config), or None for the dataset's
    standard location. A value that is not a path (data_dir: 123 was a TypeError traceback) is refused."""
    config = meta.training.get("config", {})
    value = config.get("data_dir") if isinstance(config, dict) else None
    if value is not None and not isinstance(value, str):
        raise checkpoint.CheckpointError(
            f"{path}: field 'training.config.data_dir' is {value!r}, not a folder; pass --data-dir with the dataset"
        )
    return value


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number")


def read_report(path: Path, what: str, *, subspace: bool) -> dict[str, Any]:
    """A report JSON (this module's docstring), checked for what `plot` reads: "kind", "points" with numeric
    "level" and "accuracy", and for a subspace report (one drawn as a line) "subspace". `what` names it in
    errors ("--baseline", "report"); ValueError names the file and what is wrong."""
    fix = "give a report written by `python -m training evaluate --json`"
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot read it ({e.strerror or e}); {fix}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path}: not a text file; {fix}") from None
    try:
        rep = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{what} {path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); {fix}"
        ) from None
    if not isinstance(rep, dict):
        raise ValueError(
            f'{what} {path}: a JSON {_json_type(rep)[2:]}, not a report object {{"kind": ..., "points": [...]}}; {fix}'
        )
    problem = None
    points = rep.get("points")
    if rep.get("kind") not in KINDS:
        problem = (
            f'"kind" is {json.dumps(rep["kind"])}, not one of {list(KINDS)}' if "kind" in rep else '"kind" is missing'
        )
    elif subspace and rep.get("subspace") not in SUBSPACES:
        problem = (
            f'"subspace" is {json.dumps(rep["subspace"])}, not one of {list(SUBSPACES)}'
            if "subspace" in rep
            else '"subspace" is missing'
        )
    elif not isinstance(points, list) or not points:
        problem = '"points" is missing' if points is None else f'"points" is {_json_type(points)}, not a non-empty list'
    else:
        for i, p in enumerate(points):
            bad = not isinstance(p, dict) or [k for k in ("level", "accuracy") if not _finite_number(p.get(k))]
            if bad:
                problem = f'"points"[{i}] is {json.dumps(p)[:80]}, not {{"level": number, "accuracy": number, ...}}'
                break
    if problem:
        raise ValueError(f"{what} {path}: {problem}; {fix}")
    return rep


def _finite_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
