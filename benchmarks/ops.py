"""Where one forward's time goes, op by op, in the network the service builds for an alpha.

    .venv/bin/python -m benchmarks.ops models/structured_line.safetensors --alpha 0 [--batch 32]
        [--threads 2] [--runs 300] [--json OUT]

Networks on ONNX Runtime are profiled by its own profiler, in a second session over the same graph (the
service's sessions cannot switch profiling on); networks on torch (int8, TorchScript) by torch.profiler.
Each node is listed once, in the order it first ran, with its microseconds per forward (mean over
`--runs` forwards after 50 untimed ones) and its share of the total. The profilers' own overhead makes
the forward slower than in `benchmarks.alphas`; the shares are what this is for. Prints a table, writes
JSON (default benchmarks/results/ops-<checkpoint>-<alpha>-b<batch>-t<threads>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from benchmarks.cli import alpha_value, check_output, command, grid_alpha, load_checkpoint, positive
from lcs.paths import write_json
from service.materialize import Compiled, OnnxModule, build, normalised_samples, onnx_threads


def _onnx_nodes(model_bytes: bytes, x: np.ndarray, runs: int) -> dict[str, float]:
    """ONNX Runtime's kernel time per node of the graph `model_bytes` over the last `runs` forwards,
    microseconds per forward."""
    onnx_threads()  # sized from torch's thread count, as in the service
    opts = OnnxModule.session_options()  # as the service's sessions, with the profiler on
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = os.path.join(tmp, "ops")
        session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        for _ in range(50 + runs):
            session.run(["y"], {"x": x})
        events = json.loads(Path(session.end_profiling()).read_text())
    durations: dict[str, list[float]] = defaultdict(list)  # per node, one entry per forward, in order
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            durations[f"{e['args'].get('op_name', '?')} {e['name'].removesuffix('_kernel_time')}"].append(e["dur"])
    return {k: float(np.mean(v[-runs:])) for k, v in durations.items()}


def _torch_nodes(compiled: Compiled, x: np.ndarray, runs: int) -> dict[str, float]:
    """torch.profiler's time per op instance (the n-th call of an op in a forward, children included),
    microseconds per forward. Only ops called by the forward itself, not the ops inside them."""
    from torch.profiler import profile

    batch = torch.from_numpy(x)
    for _ in range(50):
        compiled(batch)
    with profile() as prof:
        for _ in range(runs):
            compiled(batch)
    ops = ("aten::", "quantized::")
    per_op: dict[str, list[tuple[float, float]]] = defaultdict(list)  # (start, microseconds) per call
    for e in prof.events():
        parent = e.cpu_parent
        if e.name.startswith(ops) and (parent is None or not parent.name.startswith(ops)):
            per_op[e.name].append((e.time_range.start, e.cpu_time_total))
    rows = []  # (start in the first forward, name, mean microseconds)
    for name, calls in per_op.items():
        if len(calls) % runs == 0:  # else it does not run the same number of times in every forward
            per_forward = np.array(calls).reshape(runs, -1, 2)
            for i in range(per_forward.shape[1]):
                rows.append((per_forward[0, i, 0], f"{name} #{i}", float(per_forward[:, i, 1].mean())))
    return {name: us for _, name, us in sorted(rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--alpha", type=alpha_value, required=True)
    p.add_argument("--batch", type=positive(int), default=32)
    p.add_argument("--threads", type=positive(int), default=2)
    p.add_argument("--runs", type=positive(int), default=300)
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    model, meta, raw_samples = load_checkpoint(args.checkpoint)
    alpha = grid_alpha(model, args.alpha, "--alpha")
    out = args.json or Path("benchmarks/results") / (
        f"ops-{args.checkpoint.stem}-{alpha:g}-b{args.batch}-t{args.threads}.json"
    )
    check_output(out, "--json", "ops.json")  # before the profile; the default names the alpha on the grid
    samples = normalised_samples(raw_samples, meta.input)
    calib = None if samples is None else samples[0]
    compiled = build(model, meta, alpha, samples=calib, channels_last=True)
    x = np.random.default_rng(0).standard_normal(
        (args.batch, meta.input.channels, meta.input.height, meta.input.width), dtype=np.float32
    )
    if isinstance(compiled.module, OnnxModule):
        nodes = _onnx_nodes(compiled.module.model_bytes, x, args.runs)  # the graph the service runs
    else:
        nodes = _torch_nodes(compiled, x, args.runs)
    total = sum(nodes.values())
    print(f"{args.checkpoint.name} alpha {alpha:g}: {compiled.representation}")
    print(f"batch {args.batch}, {args.threads} threads, mean of {args.runs} forwards")
    print(f"{'us/forward':>10} | {'share':>6} | node")
    for name, us in nodes.items():
        print(f"{us:>10.1f} | {100 * us / total:>5.1f}% | {name}")
    print(f"{total:>10.1f} | 100.0% | all nodes")
    write_json(
        out,
        {
            "checkpoint": str(args.checkpoint),
            "alpha": alpha,
            "representation": compiled.representation,
            "batch": args.batch,
            "threads": args.threads,
            "runs": args.runs,
            "us_per_forward": {k: round(v, 2) for k, v in nodes.items()},
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    command(main)
