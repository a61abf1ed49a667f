"""What the benchmarks' command lines share. A benchmark measures for minutes, so what a user gives it is
checked before the first measurement, and a refusal is one line naming the flag, the value and the fix."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from lcs.alpha import ALPHA_CONVENTION
from lcs.paths import WriteError, check_flag, file_problem, write_json

if TYPE_CHECKING:
    import torch

    from lcs.checkpoint import CheckpointMeta
    from lcs.models import SubspaceResNet

N = TypeVar("N", int, float)


def positive(kind: Callable[[str], N], *, zero: bool = False) -> Callable[[str], N]:
    """An argparse type: a finite number of `kind` (int or float) above 0 (at least 0 with `zero`), for
    counts, durations and rates (0 or less measured nothing, or divided by it after the run) and waits.
    argparse names the flag in the error."""
    what = "a whole number" if kind is int else "a number"
    bound = "0 or more" if zero else "above 0"

    def parse(text: str) -> N:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}; give {what} {bound}") from None
        if not (math.isfinite(value) and (value >= 0 if zero else value > 0)):
            raise argparse.ArgumentTypeError(f"{text} is not {bound}; give {what} {bound}")
        return value

    return parse


def alpha_value(text: str) -> float:
    """An argparse type: an alpha, a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; {ALPHA_CONVENTION}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1]; {ALPHA_CONVENTION}")
    return value


def check_output(path: Path, flag: str, example_name: str) -> None:
    """Refuse, before measuring rather than after, an output path where no file can be written (a directory,
    a path under a file, a folder without write access): `error: ...` and exit code 1."""
    try:
        check_flag(path, flag, example_name)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def check_checkpoint(path: Path | str) -> None:
    """Refuse, before any server starts, a --checkpoint no file can be read from (the benchmarks that hand it
    to a server: the server's refusal named LCS_CHECKPOINT, which they set): `error: ...`, exit code 1."""
    if (problem := file_problem(Path(path))) is not None:
        raise SystemExit(f"error: --checkpoint {path}: {problem}; pass --checkpoint a .safetensors checkpoint")


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


def run_child(cmd: list[str], what: str, env: dict[str, str] | None = None) -> Any:
    """Run a measuring child process (a fresh process per thread count or backend) and return the JSON its
    stdout ends with. Its stderr goes straight to the user's; a child that fails is `error: ...` naming it
    and its exit code, under its own error, and exit code 1 (it was a traceback of the parent's, with the
    child's error captured and lost)."""
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if done.returncode < 0:  # killed: no error of its own above (SIGKILL is most often the kernel's, for memory)
        name = signal.Signals(-done.returncode).name if -done.returncode in signal.valid_signals() else "a signal"
        raise SystemExit(f"error: {what} was killed by {name}")
    if done.returncode != 0:
        raise SystemExit(f"error: {what} exited with code {done.returncode}; its error is above")
    lines = done.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        last = repr(lines[-1][:80]) if lines else "nothing"
        raise SystemExit(
            f"error: {what} exited 0 but its output did not end with JSON (its last line: {last})"
        ) from None


class Stopped(SystemExit):
    """Ctrl-C or SIGTERM ending a benchmark, with the exit code a shell reports for it (128 + the signal) and
    the file its measurements so far went to (`kept_if_stopped`), if any."""

    def __init__(self, signum: int, kept: Path | None = None) -> None:
        super().__init__(128 + signum)
        self.signum, self.kept = signum, kept

    def __str__(self) -> str:
        what = "interrupted" if self.signum == signal.SIGINT else "terminated"
        return f"{what}; " + ("no results written" if self.kept is None else f"wrote what was measured to {self.kept}")


def _terminated(signum: int, frame: object) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM during the clean-up would cut it short
    raise Stopped(signum)  # unwinds like Ctrl-C, through the `finally` blocks


@contextlib.contextmanager
def kept_if_stopped(path: Path, measured: Callable[[], dict[str, Any] | None]) -> Iterator[None]:
    """Ctrl-C or SIGTERM inside the block writes `measured()` (what the run has measured so far; None if
    nothing yet) to `path` with `"interrupted": true`, once the block's own `finally` blocks have stopped
    what it started: a benchmark that measures for many minutes does not lose them to a late interrupt."""
    try:
        yield
    except (KeyboardInterrupt, Stopped) as e:
        signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
        if (partial := measured()) is None:
            raise Stopped(signum) from None
        write_json(path, {**partial, "interrupted": True})
        raise Stopped(signum, path) from None


def grid_alpha(model: SubspaceResNet, alpha: float, flag: str) -> float:
    """`alpha`, if the checkpoint has BatchNorm statistics for it (its grid: a baseline's is one alpha);
    otherwise `error: ...` naming the flag and the grid, and exit code 1."""
    try:
        return model.at(alpha).alpha
    except ValueError as e:
        raise SystemExit(f"error: {flag} {alpha:g}: {e}") from None


def command(main: Callable[[], int | None]) -> NoReturn:
    """A benchmark's `main` as a command: its exit code, and Ctrl-C as one line and exit code 130 (128 + SIGINT,
    as a shell reports it, and as `python -m training`), once its `finally` blocks have stopped what it started.
    SIGTERM (`timeout`, a cancelled job) too, with 143: by default it ends Python at once, and the servers and
    CPU burners a benchmark started ran on without it. The line says whether what was measured was kept
    (`kept_if_stopped`)."""
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        code = main()
    except WriteError as e:  # its results, at the end of the run: the table above holds what was measured
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except (KeyboardInterrupt, Stopped) as e:
        stopped = e if isinstance(e, Stopped) else Stopped(signal.SIGINT)
        print(stopped, file=sys.stderr)
        code = 128 + stopped.signum
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.exit(code)
