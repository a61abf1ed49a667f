"""Helpers for the deploy tests: paths, required tools, PromQL metric names, a tiny checkpoint."""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path
from typing import NoReturn

import pytest
import torch

from lcs import checkpoint
from lcs.alpha import Schedule
from lcs.layers import Setting
from lcs.models import build_model

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
K8S = DEPLOY / "k8s"
IMAGE = 12  # tiny checkpoint: 12x12 grayscale, 3 classes


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str, how: str) -> NoReturn:
    """A tool the deploy checks need is absent: a failure in CI (CI=true), a skip with the reason locally."""
    message = f"{what} is not installed; {how}"
    if in_ci():
        pytest.fail(message + " (CI must run this check)")
    pytest.skip(message)


def tool(name: str, how: str = "scripts/setup installs it (apt-get install -y prometheus)") -> str:
    path = shutil.which(name)
    if path is None:
        missing(name, how)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- PromQL --------------------------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NAME = re.compile(r"\b(lcs_[a-zA-Z0-9_]+)\b")
_SELECTOR = re.compile(r"\b(lcs_[a-zA-Z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')  # equality matchers only


def metric_names(expr: str) -> set[str]:
    """The lcs_ metric names a PromQL expression reads (quoted label values left out)."""
    return set(_NAME.findall(_STRING.sub('""', expr)))


def equality_matchers(expr: str) -> set[tuple[str, str, str]]:
    """(metric, label, value) of every `lcs_x{label="value"}` matcher (not !=, =~, !~)."""
    found = set()
    for metric, body in _SELECTOR.findall(expr):
        for m in _MATCHER.finditer(body):
            if body[max(0, m.start(2) - 3) : m.start(2) - 1].rstrip().endswith(("!=", "=~", "!~")):
                continue
            found.add((metric, m.group(1), m.group(2)))
    return found


# -- a tiny checkpoint -----------------------------------------------------------------------------------


def make_checkpoint(path: Path) -> Path:
    """A settled tiny_resnet structured line subspace (3 grid alphas) saved like training saves one."""
    torch.manual_seed(0)
    grid = (0.0, 0.5, 1.0)
    model = build_model(
        "tiny_resnet",
        in_channels=1,
        num_classes=3,
        line=True,
        norm="batch",
        stat_alphas=grid,
        schedule=Schedule("structured"),
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.eval()
        for row, a in enumerate(model.stat_alphas):  # BatchNorm statistics per grid row
            model(
                torch.randn(16, 1, IMAGE, IMAGE, generator=g),
                Setting(a, model.schedule.level(a), stats=row, calibrate=0),
            )
    meta = checkpoint.CheckpointMeta(
        arch=checkpoint.Arch(name="tiny_resnet"),
        kind="structured",
        subspace="line",
        schedule=model.schedule.to_dict(),
        norm="batch",
        stat_alphas=list(grid),
        input=checkpoint.InputSpec(channels=1, height=IMAGE, width=IMAGE, mean=[0.5], std=[0.25]),
        classes=["a", "b", "c"],
        dataset="synthetic",
        accuracy=[checkpoint.AccuracyPoint(alpha=a, level=model.schedule.level(a).value, accuracy=50.0) for a in grid],
        training={"command": "tests/deploy", "train_seconds": 0.0},
    )
    checkpoint.save(path, model, meta)
    return path


def tiny_image() -> list[list[int]]:
    return [[(i * 7 + j * 13) % 256 for j in range(IMAGE)] for i in range(IMAGE)]
