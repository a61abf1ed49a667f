"""What the benchmarks' command lines share. A benchmark measures for minutes, so what a user gives it is
checked before the first measurement, and a refusal is one line naming the flag, the value and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lcs.outputs import check_flag

if TYPE_CHECKING:
    import torch

    from lcs.checkpoint import CheckpointMeta
    from lcs.models import SubspaceResNet


def check_output(path: Path, flag: str, example_name: str) -> None:
    """Refuse, before measuring rather than after, an output path where no file can be written (a directory,
    a path under a file, a folder without write access): `error: ...` and exit code 1."""
    try:
        check_flag(path, flag, example_name)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def load_checkpoint(
    path: Path,
) -> tuple[SubspaceResNet, CheckpointMeta, tuple[torch.Tensor, torch.Tensor] | None]:
    """`checkpoint.load_with_samples`, a file it refuses (missing, a directory, corrupt, foreign, ...) as
    `error: ...` (the file, the problem and the fix) and exit code 1. (Imports torch: the load generators,
    which hand the checkpoint to a server, do not call it.)"""
    from lcs.checkpoint import CheckpointError, load_with_samples

    try:
        return load_with_samples(path)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
