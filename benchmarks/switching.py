"""What switching alphas costs: time per image serving one alpha vs random (alpha, batch size) pairs.

    .venv/bin/python -m benchmarks.switching [models/structured_line.safetensors] [--calls 3000] [--json OUT]

The dynamic batcher serves every batch at its own alpha and size. Under TorchScript each (alpha, batch
size) pair is a new conv shape, i.e. a new oneDNN primitive, and oneDNN keeps 1,024 of them by default;
ONNX Runtime (the service's default backend) builds its kernels per session instead. Runs the same
workload in a fresh process per backend and cache size (the size is read when the first conv runs),
with 1 thread. Prints a table and writes JSON (default benchmarks/results/switching.json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import get_args

from benchmarks.cli import check_output, command, load_checkpoint, positive, run_child
from lcs.paths import write_json
from service.settings import Backend


def _measure(checkpoint_path: str, calls: int, backend: Backend) -> dict[str, float]:
    import torch

    from lcs import checkpoint
    from service.materialize import build

    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    model, meta = checkpoint.load(checkpoint_path)
    alphas = list(model.stat_alphas)
    built = {a: build(model, meta, a, samples=None, channels_last=True, backend=backend) for a in alphas}
    shape = (meta.input.channels, meta.input.height, meta.input.width)
    xs = {b: torch.randn(b, *shape) for b in range(1, 33)}
    rng = random.Random(0)
    one = alphas[len(alphas) // 2]

    def per_image(pick_alpha: bool) -> float:
        images, t0 = 0, time.perf_counter()
        for _ in range(calls):
            a, b = (rng.choice(alphas) if pick_alpha else one), rng.randint(1, 32)
            built[a](xs[b])
            images += b
        return (time.perf_counter() - t0) / images * 1e6

    per_image(True)  # warm-up: every shape seen once
    return {"one_alpha_us": round(per_image(False), 1), "random_alphas_us": round(per_image(True), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", default="models/structured_line.safetensors")
    p.add_argument("--calls", type=positive(int), default=3000)
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/switching.json"))
    p.add_argument("--child", choices=get_args(Backend), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_measure(args.checkpoint, args.calls, args.child)))
        return
    check_output(args.json, "--json", "switching.json")
    load_checkpoint(Path(args.checkpoint))  # refused here, in one line, rather than by each child
    rows = {}
    # ONNX Runtime; TorchScript with oneDNN's default primitive cache and with what service.runtime sets
    for backend, capacity in (("onnxruntime", "16384"), ("torchscript", "1024"), ("torchscript", "16384")):
        env = {**os.environ, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": capacity}
        cmd = [sys.executable, "-m", "benchmarks.switching", args.checkpoint, "--calls", str(args.calls)]
        name = f"{backend}, oneDNN cache {capacity}"
        rows[name] = run_child([*cmd, "--child", backend], f"the timing process for {name}", env)
    print(f"{'backend':>34} | {'one alpha, us/image':>20} | {'random alphas, us/image':>24}")
    for name, r in rows.items():
        print(f"{name:>34} | {r['one_alpha_us']:>20} | {r['random_alphas_us']:>24}")
    result = {"checkpoint": args.checkpoint, "calls": args.calls, "by_backend": rows}
    write_json(args.json, result)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    command(main)
