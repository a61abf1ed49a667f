"""scripts/train_shipped.sh, run from a copy in tmp_path with PY set to /bin/true or /bin/false (no training)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_shipped.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(tmp_path: Path, py: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "scripts").mkdir(exist_ok=True)
    shutil.copy(SCRIPT, tmp_path / "scripts" / SCRIPT.name)  # it works in the folder above its own
    return subprocess.run(
        ["bash", str(tmp_path / "scripts" / SCRIPT.name), *args],
        env={"PATH": "/usr/bin:/bin", "PY": py},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("queues", [[], ["all"], ["A"], ["B"]])
def test_a_failed_run_fails_the_script(tmp_path: Path, queues: list[str]) -> None:
    """`all` ran both queues under a bare `wait`, which returned 0 whatever they did."""
    done = _run(tmp_path, "/bin/false", *queues)
    assert done.returncode == 1, done
    expected = {"A": ["structured_line"], "B": ["quantized_line"]}.get(
        *queues or ["all"], ["structured_line", "quantized_line"]
    )
    for name in expected:  # each queue stops at its first failure and says where its log is
        assert f"train_shipped.sh: {name} failed (exit 1); see runs/{name}.log" in done.stderr


def test_every_run_succeeding_is_exit_0(tmp_path: Path) -> None:
    done = _run(tmp_path, "/bin/true")
    assert done.returncode == 0 and done.stderr == "", done


@pytest.mark.parametrize(("args", "rc"), [(["C"], 2), (["A", "B"], 2), (["--help"], 0), (["-h"], 0)])
def test_usage(tmp_path: Path, args: list[str], rc: int) -> None:
    """An unknown argument did nothing and exited 0."""
    done = _run(tmp_path, "/bin/false", *args)
    assert done.returncode == rc and "usage: scripts/train_shipped.sh [A|B|all]" in done.stdout + done.stderr
    assert not (tmp_path / "runs").exists()  # nothing ran
