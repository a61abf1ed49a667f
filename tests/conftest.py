"""Shared fixtures: tiny real models and tiny real datasets, each made in well under a second.

No `__init__.py` anywhere under tests/: test file basenames must be unique across the tree.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from lcs import checkpoint
from lcs.alpha import Schedule
from lcs.layers import Setting
from lcs.models import SubspaceResNet, build_model
from training.data import Dataset, Split

GRID = (0.0, 0.3, 0.7, 1.0)  # statistics grid of the test models: 3/4/7/8 bits, widths 0.25..1
IMAGE = 12  # test images are IMAGE x IMAGE grayscale


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """The test machine is shared with background training: one intra-op thread, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _subnormals() -> None:
    """Every test starts with subnormal floats representable. The service, training and benchmarks turn on
    flush-to-zero for the thread that loads a model, which a test may share with the tests after it, and
    Hypothesis refuses to generate floats without subnormals (test_inputs failed after test_runtime)."""
    torch.set_flush_denormal(False)


# -- models ---------------------------------------------------------------------------------------


def _tiny(
    kind: str = "structured",
    subspace: str = "line",
    norm: str = "batch",
    stat_alphas: Sequence[float] = GRID,
    *,
    seed: int = 0,
    classes: int = 4,
) -> SubspaceResNet:
    """A tiny_resnet whose norm scales/shifts and biases are random (not 1/0), so that interpolation,
    BatchNorm folding and slicing of the affine parameters all change the numbers."""
    torch.manual_seed(seed)
    model = build_model(
        "tiny_resnet",
        in_channels=1,
        num_classes=classes,
        line=subspace == "line",
        norm=norm,
        stat_alphas=stat_alphas,
        schedule=Schedule(kind),  # type: ignore[arg-type]
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                if name.rsplit(".", 1)[1].startswith("weight"):
                    p.uniform_(0.5, 1.5)
                else:
                    p.uniform_(-0.5, 0.5)
    return model


def _settle(model: SubspaceResNet, *, seed: int = 0, batch: int = 16, calib_batches: int = 2) -> SubspaceResNet:
    """A few train-mode forwards (activation ranges) at several alphas, then BatchNorm calibration of
    every grid row, as training does. Returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for a in (0.0, 0.5, 1.0, 0.2):
            model(torch.randn(batch, 1, IMAGE, IMAGE, generator=g), Setting(a, model.schedule.level(a)))
        model.eval()
        for row, a in enumerate(model.stat_alphas):
            for n in range(calib_batches):
                x = torch.randn(batch, 1, IMAGE, IMAGE, generator=g)
                model(x, Setting(a, model.schedule.level(a), stats=row, calibrate=n))
    return model


@pytest.fixture
def tiny_model() -> Callable[..., SubspaceResNet]:
    """Factory: tiny_model(kind, subspace, norm, stat_alphas, seed=, classes=) -> untrained model."""
    return _tiny


@pytest.fixture
def settled_model() -> Callable[..., SubspaceResNet]:
    """Factory like tiny_model, but after train-mode forwards and BatchNorm calibration (eval mode)."""

    def make(*args: object, **kwargs: object) -> SubspaceResNet:
        return _settle(_tiny(*args, **kwargs))  # type: ignore[arg-type]

    return make


def _meta(model: SubspaceResNet, kind: str, **overrides: object) -> checkpoint.CheckpointMeta:
    fields: dict[str, object] = {
        "arch": checkpoint.Arch(name="tiny_resnet"),
        "kind": kind,
        "subspace": "line" if model.line else "point",
        "schedule": model.schedule.to_dict(),
        "norm": model.norm_type,
        "stat_alphas": list(model.stat_alphas),
        "input": checkpoint.InputSpec(channels=1, height=IMAGE, width=IMAGE, mean=[0.5], std=[0.25]),
        "classes": [f"c{i}" for i in range(model.fc.c_out)],
        "dataset": "folder",
        "accuracy": [
            checkpoint.AccuracyPoint(alpha=a, level=model.schedule.level(a).value, accuracy=50.0) for a in GRID
        ],
        **overrides,
    }
    return checkpoint.CheckpointMeta(**fields)  # type: ignore[arg-type]


@pytest.fixture
def make_meta() -> Callable[..., checkpoint.CheckpointMeta]:
    """Factory: make_meta(model, kind, **field_overrides) -> valid metadata describing `model`."""
    return _meta


@pytest.fixture
def saved_checkpoint(tmp_path: Path) -> tuple[Path, SubspaceResNet, checkpoint.CheckpointMeta]:
    """A settled structured line model written to tmp_path/model.safetensors."""
    model = _settle(_tiny("structured", "line", "batch"))
    meta = _meta(model, "structured")
    path = tmp_path / "model.safetensors"
    checkpoint.save(path, model, meta)
    return path, model, meta


# -- data -----------------------------------------------------------------------------------------


def _separable(n_per_class: int, seed: int) -> Split:
    """Two classes of IMAGE x IMAGE uint8 images: a bright top half (0) or a bright bottom half (1), with
    noise. The class survives random crops and horizontal flips, and BatchNorm or GroupNorm."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(2), n_per_class)
    x = rng.integers(0, 90, size=(len(labels), 1, IMAGE, IMAGE))
    half = IMAGE // 2
    x[labels == 0, :, :half] += 140
    x[labels == 1, :, half:] += 140
    order = rng.permutation(len(labels))
    return Split(torch.from_numpy(x[order].astype(np.uint8)), torch.from_numpy(labels[order].astype(np.int64)))


@pytest.fixture(scope="session")
def synthetic_data() -> Dataset:
    """In memory: 256 training and 64 test images of two separable classes."""
    return Dataset("synthetic", _separable(128, seed=1), _separable(32, seed=2), ["top", "bottom"])


def _write_folder(root: Path, data: Dataset) -> Path:
    """root/{train,test}/<class>/<i>.png, grayscale PNGs of `data` (lossless, so pixels round-trip)."""
    from PIL import Image

    for split_name, split in (("train", data.train), ("test", data.test)):
        for cls in data.classes:
            (root / split_name / cls).mkdir(parents=True, exist_ok=True)
        for i, (img, label) in enumerate(zip(split.images, split.labels, strict=True)):
            Image.fromarray(img[0].numpy()).save(root / split_name / data.classes[int(label)] / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory, synthetic_data: Dataset) -> Path:
    """`synthetic_data` as an image-folder dataset that `load_dataset("folder", ...)` reads."""
    return _write_folder(tmp_path_factory.mktemp("images"), synthetic_data)


@pytest.fixture
def write_folder() -> Callable[[Path, Dataset], Path]:
    """write_folder(root, dataset) writes root/{train,test}/<class>/<i>.png and returns root."""
    return _write_folder


# -- a real (tiny) training run, shared by the training and CLI tests --------------------------------


@dataclass(frozen=True)
class TrainedRun:
    path: Path  # the checkpoint
    log: str  # everything the run printed
    data_dir: Path  # the image folder it trained on


def tiny_train_overrides(out: Path, **extra: object) -> list[str]:
    """key=value overrides for a ~1 s run of tiny_resnet (threads=1, 3 grid alphas, 2 calibration batches)."""
    base = {
        "arch": "tiny_resnet",
        "epochs": 2,
        "batch_size": 32,
        "threads": 1,
        "stat_alphas": "[0, 0.5, 1]",
        "calib_batches": 2,
        "eval_batch_size": 64,
        "out": str(out),
    }
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


@pytest.fixture(scope="session")
def tiny_overrides() -> Callable[..., list[str]]:
    return tiny_train_overrides


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> TrainedRun:
    """training.train.train on the image folder (dataset=folder): structured LCS+L, 2 epochs, BatchNorm."""
    from training.config import load_config
    from training.train import train

    out = tmp_path_factory.mktemp("run") / "tiny.safetensors"
    cfg = load_config(None, tiny_train_overrides(out, dataset="folder", data_dir=image_folder))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        path = train(cfg, command="pytest trained_run")
    return TrainedRun(path, buf.getvalue(), image_folder)
