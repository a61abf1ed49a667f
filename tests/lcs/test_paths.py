"""lcs.paths.write_json: the JSON files commands write (training's reports, the benchmarks' results)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lcs.paths import WriteError, file_problem, write_json


def test_results_files_are_json_a_strict_reader_accepts(tmp_path: Path) -> None:
    """A percentile of no answers, or the RSS growth of a run too short to tell, was written as NaN: no JSON
    (JavaScript's JSON.parse refused the file)."""
    out = tmp_path / "new" / "run.json"
    write_json(out, {"p99_ms": float("nan"), "rows": [1.5, float("inf"), (float("-inf"), 2)], "n": 3})
    text = out.read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is no JSON")) == {
        "p99_ms": None,
        "rows": [1.5, None, [None, 2]],
        "n": 3,
    }
    assert text.endswith("}\n")


def test_a_path_pathlib_cannot_look_at_is_a_problem_named_not_a_traceback(tmp_path: Path) -> None:
    """Python 3.11's is_dir() and exists() answer False only where the file is missing: a name too long (or a
    folder on the way this process may not enter, EACCES, which root cannot be shown here) raised OSError
    out of the settings' validator, and `python -m service` printed a traceback, not its one-line error."""
    problem = file_problem(tmp_path / ("x" * 300 + ".safetensors"))
    assert problem is not None and problem.startswith("cannot be looked at (File name too long, as uid ")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_results_file_that_cannot_be_written_is_named() -> None:
    """A full disk: the write's OSError named no file (`[Errno 28] No space left on device`), so `evaluate
    --json` on a full disk said only that, after minutes of measuring."""
    with pytest.raises(WriteError, match=r"^/dev/full: cannot write it \(No space left on device\)$"):
        write_json(Path("/dev/full"), {"accuracy": 0.9})
