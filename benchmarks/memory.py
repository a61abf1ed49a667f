"""Memory per cached model: what the cache counts against what the process really holds.

For each alpha, after one build of it that is not measured (process-wide set-up): build it `--builds`
times and keep every copy; the growth of resident memory per copy is what a cached model holds. Then drop
them, and build and drop it `--builds` times more; the growth per cycle is what evicting a model and
building it again costs for good (zero when eviction frees it). Both are compared with
`Compiled.resident_bytes`, what the cache's bound (LCS_CACHE_BYTES) adds up, and `reclaimable`, whether
the cache may evict it. Freed heap is handed back to the system before each reading.

    .venv/bin/python -m benchmarks.memory models/quantized_line.safetensors --alphas 1 0.5
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import psutil
import torch

from benchmarks.cli import alpha_value, check_output, command, grid_alpha, load_checkpoint, positive
from lcs.paths import write_json
from service.materialize import Compiled, build, normalised_samples, release_freed_heap


def _resident() -> int:
    gc.collect()
    release_freed_heap()
    return int(psutil.Process().memory_info().rss)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--alphas", type=alpha_value, nargs="+", default=[1.0, 0.0])
    p.add_argument("--builds", type=positive(int), default=4, help="copies kept per alpha")
    p.add_argument("--threads", type=positive(int), default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    out = args.json or Path("benchmarks/results") / f"memory-{args.checkpoint.stem}.json"
    check_output(out, "--json", "memory.json")

    torch.set_num_threads(args.threads)
    model, meta, raw_samples = load_checkpoint(args.checkpoint)
    alphas = [grid_alpha(model, a, "--alphas") for a in args.alphas]  # all, before the first is measured
    stored = normalised_samples(raw_samples, meta.input)
    samples = None if stored is None else stored[0]
    batch = torch.zeros(32, meta.input.channels, meta.input.height, meta.input.width).numpy()
    rows = []
    print(f"{args.checkpoint.name}: MB per model ({args.builds} kept), and per build-and-drop ({args.builds} cycles)")
    print(f"{'alpha':>5} | {'counted':>7} | {'held':>6} | {'rebuild':>7} | reclaimable | representation")
    for alpha in alphas:

        def built(alpha: float = alpha) -> Compiled:
            compiled = build(model, meta, alpha, samples=samples, channels_last=False)
            compiled.logits(batch)
            compiled.logits(batch[:1])
            return compiled

        built()
        before = _resident()
        kept = [built() for _ in range(args.builds)]
        held = (_resident() - before) / args.builds
        compiled = kept[0]
        kept.clear()
        dropped = _resident()
        for _ in range(args.builds):
            built()
        kept_for_good = (_resident() - dropped) / args.builds
        row = {
            "alpha": alpha,
            "representation": compiled.representation,
            "counted_bytes": compiled.resident_bytes,
            "held_bytes": round(held),
            "rebuild_growth_bytes": round(kept_for_good),
            "reclaimable": compiled.reclaimable,
        }
        rows.append(row)
        del compiled
        print(
            f"{alpha:>5g} | {row['counted_bytes'] / 1e6:>7.2f} | {held / 1e6:>6.2f} | {kept_for_good / 1e6:>7.2f} | "
            f"{row['reclaimable']!s:>11} | {row['representation']}"
        )
    write_json(out, {"checkpoint": str(args.checkpoint), "builds": args.builds, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    command(main)
