"""The paths a command names, checked before its work (no torch here: the load generators use it too): a
file to read (`file_problem`: a checkpoint), and where a command writes its files (`check_writable`):
training (checkpoint, report, plot) and the benchmarks (their results) run for minutes, and a path found
unwritable only at the end costs the run. And how their JSON files are written (`write_json`)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


class WriteError(OSError):
    """A file a command writes could not be written (a full disk); the message names the file and the cause."""


def check_writable(path: Path, *, option: str, shown: str, example: str) -> None:
    """Refuse, with ValueError, a place where no file can be written, before the work that produces the file
    rather than after it: a directory (`example` suggests a file), a path under a regular file, a folder
    where no file can be created. `shown` is how the option was given ("--json out.json", "out=m.safetensors")."""
    if path.is_dir():
        raise ValueError(f"{shown}: {path} is a directory; name a file, e.g. {example}")
    folder = next(p for p in path.absolute().parents if p.exists())  # its folder, or what will hold it
    if not folder.is_dir():
        raise ValueError(f"{shown}: {folder} is a file, not a directory; choose another place for {option}")
    try:  # what writing will do (after creating any missing folders): create a file
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".lcs-out-", suffix=".probe"):
            pass
    except OSError as e:
        raise ValueError(
            f"{shown}: cannot create files in {folder} ({e.strerror or e}); choose a writable place for {option}"
        ) from None


def check_flag(path: Path, flag: str, example_name: str, *, suffix: str = "") -> None:
    """`check_writable` for an output flag given as `flag path`; a directory gets the example of
    `example_name` inside it. `suffix`: the file's format, which the writer reads from its name (matplotlib
    writes `plot.xyz` as an error after the work, and `plot` as `plot.png`)."""
    if suffix and path.suffix.lower() != suffix:
        raise ValueError(f"{flag} {path}: the file written is {suffix[1:].upper()}; name it {path.stem}{suffix}")
    check_writable(path, option=flag, shown=f"{flag} {path}", example=f"{flag} {path / example_name}")


def check_distinct(outputs: list[tuple[str, Path]], inputs: list[tuple[str, Path]]) -> None:
    """Refuse, with ValueError, an output that is a file the command reads, or another of its outputs:
    writing it would destroy its input, or one output would replace the other. Pairs: (how it was given,
    path)."""
    read = {path.resolve(): shown for shown, path in inputs}
    written: dict[Path, str] = {}
    for shown, path in outputs:
        key = path.resolve()
        if key in read:
            raise ValueError(f"{shown}: that file is {read[key]}, which this command reads; write to another file")
        if key in written:
            raise ValueError(f"{shown}: that file is also {written[key]}; give each output its own file")
        written[key] = shown


def file_problem(path: Path) -> str | None:
    """Why `path` is not a file a checkpoint can be read from ("no such file", "a directory, ..."), or None."""
    try:
        if path.is_dir():
            inside = sorted(p.name for p in path.glob("*.safetensors"))
            holds = f" (it holds {', '.join(inside[:3])}{', ...' if len(inside) > 3 else ''})" if inside else ""
            return f"a directory, not a checkpoint file{holds}"
        if not path.exists():
            return "no such file"
        if not path.is_file():
            return "not a regular file"
    except OSError as e:  # pathlib answers False only for a missing file: a folder on the way this process may
        # not enter (EACCES) or a name too long raise, and came out as a traceback
        return f"cannot be looked at ({e.strerror or e}, as uid {os.getuid()})"
    return None


def write_json(path: Path, obj: Any, *, indent: int | None = 1) -> None:
    """Write `obj` to the JSON file `path` (a report, a benchmark's results), creating its folder: a NaN or an
    infinity (the percentile of no answers, a growth rate a run too short cannot tell) as null, where json.dumps
    writes NaN, which is no JSON (JavaScript's JSON.parse refuses the file)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    text = json.dumps(clean(obj), indent=indent, allow_nan=False) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as e:  # a write's OSError names no file: `[Errno 28] No space left on device`
        raise WriteError(f"{path}: cannot write it ({e.strerror or e})") from None
