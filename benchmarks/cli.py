"""What the benchmarks' command lines share. A benchmark measures for minutes, so what a user gives it is
checked before the first measurement, and a refusal is one line naming the flag, the value and the fix."""

from __future__ import annotations

from pathlib import Path

from lcs.outputs import check_flag


def check_output(path: Path, flag: str, example_name: str) -> None:
    """Refuse, before measuring rather than after, an output path where no file can be written (a directory,
    a path under a file, a folder without write access): `error: ...` and exit code 1."""
    try:
        check_flag(path, flag, example_name)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
