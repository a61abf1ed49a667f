"""benchmarks.memory: what a cached model holds, against what the cache counts for it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.service.service_support import make_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def test_traced_int8_memory_stays_with_the_process_and_onnx_runtime_memory_is_reused(tmp_path: Path) -> None:
    """The reason the cache never evicts a traced network (pytorch/pytorch#35600): if a torch release frees
    them, this fails and `Compiled.reclaimable` can be true for them too. In a process of its own, as the
    benchmark runs: its figures are growth of the process's resident memory, which a process that has run
    other tests grows less for, reusing what they freed (counted 11,648 bytes against 3.4 MB held)."""
    path, out = make_checkpoint(tmp_path, "quantized").path, tmp_path / "memory.json"
    argv = ["-m", "benchmarks.memory", str(path), "--alphas", "1", "0", "--builds", "3", "--threads", "1"]
    subprocess.run([sys.executable, *argv, "--json", str(out)], cwd=ROOT, check=True, capture_output=True)
    int8, simulated = json.loads(out.read_text())["rows"]
    assert int8["representation"].startswith("int8") and not int8["reclaimable"]
    assert simulated["representation"].endswith("ONNX Runtime") and simulated["reclaimable"]
    assert int8["rebuild_growth_bytes"] > 2**20  # every rebuild holds its memory again: measured 8.4 MB here
    assert simulated["rebuild_growth_bytes"] < int8["rebuild_growth_bytes"] / 4
    assert int8["held_bytes"] / 2 < int8["counted_bytes"] < 2 * int8["held_bytes"]  # measured as it was built
