"""Per-alpha benchmark of materialised models: accuracy, bytes, latency, speed-up over alpha = 1.

    .venv/bin/python -m benchmarks.alphas models/structured_line.safetensors [--alphas 0 0.5 1] [--json OUT]

For every alpha: the representation the service runs, resident and stored bytes, build time, test
accuracy of *that materialised model* on the checkpoint's dataset (when the dataset is installed),
and median latency at batch 1 and 32 with 1 and 2 threads. The quantized kind adds a float row (the
alpha = 1 weights, unquantised) as the reference for the int8 speed-up. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from lcs import checkpoint
from lcs.alpha import Level
from lcs.layers import Setting
from service.inputs import normaliser
from service.materialize import Compiled, build, time_batch


def _accuracy(
    compiled: Compiled, images: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
) -> float:
    correct = 0
    for i in range(0, len(images), 500):
        x = images[i : i + 500].float() * scale + shift
        correct += int((compiled(x).argmax(1) == labels[i : i + 500]).sum())
    return 100.0 * correct / len(images)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--alphas", type=float, nargs="*", help="default: 0, 0.25, 0.5, 0.75, 1 snapped to the grid")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", type=Path, help="default: benchmarks/results/alphas-<checkpoint>.json")
    args = p.parse_args()

    torch.set_flush_denormal(True)
    model, meta = checkpoint.load(args.checkpoint)
    grid = list(model.stat_alphas)
    wanted = args.alphas or [0.0, 0.25, 0.5, 0.75, 1.0]
    alphas = sorted({max(a for a in grid if a <= w + 1e-9) for w in wanted})
    scale, shift = normaliser(meta.input)
    samples = checkpoint.read_samples(args.checkpoint)
    calib = None if samples is None else samples[0].float() * scale + shift
    test = None
    try:
        from training.data import load_dataset

        data = load_dataset(meta.dataset)
        test = (data.test.images, data.test.labels)
    except Exception as e:  # the dataset is optional: latency and bytes are still measured
        print(f"(no test accuracy: {e})")

    shape = (meta.input.channels, meta.input.height, meta.input.width)
    x32 = torch.randn(32, *shape)
    rows = []
    variants: list[tuple[str, float, Compiled]] = []
    for a in alphas:
        compiled = build(model, meta, a, samples=calib, channels_last=True)
        variants.append((f"{a:g}", a, compiled))
    if meta.kind == "quantized":  # the float reference for the int8 speed-up
        s = model.at(1.0)
        t0 = time.perf_counter()
        plain = model.export(Setting(1.0, Level("structured", width=1.0), s.stats)).to(
            memory_format=torch.channels_last  # type: ignore[call-overload]
        )
        ref = Compiled(
            1.0,
            Level("quantized", bits=32),
            plain,
            "fp32 float reference (unquantised)",
            sum(q.numel() * 4 for q in plain.parameters()),
            sum(q.numel() * 4 for q in plain.parameters()),
            time.perf_counter() - t0,
            True,
        )
        variants.append(("float", 1.0, ref))
    for label, a, c in variants:
        row: dict[str, object] = {
            "alpha": label,
            "level": c.level.value,
            "representation": c.representation,
            "resident_bytes": c.resident_bytes,
            "stored_bytes": c.stored_bytes,
            "build_seconds": round(c.build_seconds, 4),
            "train_time_accuracy": next((q.accuracy for q in meta.accuracy if abs(q.alpha - a) < 1e-9), None),
        }
        if test is not None:
            row["served_accuracy"] = round(_accuracy(c, *test, scale, shift), 2)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for b in (1, 32):
                row[f"ms_b{b}_t{threads}"] = round(1000 * time_batch(c, x32[:b], repeats=args.repeats), 3)
        rows.append(row)
    base = next(r for r in rows if r["alpha"] == ("float" if meta.kind == "quantized" else "1"))
    for r in rows:
        for key in [k for k in r if k.startswith("ms_")]:
            r["speedup_" + key[3:]] = round(float(base[key]) / float(r[key]), 2)  # type: ignore[arg-type]

    # what a request pays for its alpha: a cache hit, versus a first request that builds the model
    from service.cache import Grid, ModelCache

    cache = ModelCache(lambda a: build(model, meta, a, samples=calib, channels_last=True), Grid(alphas), 2**30)
    t0 = time.perf_counter()
    cache.get(alphas[-1])
    miss = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(10_000):
        cache.get(alphas[-1])
    hit = (time.perf_counter() - t0) / 10_000
    cache_cost = {"hit_us": round(hit * 1e6, 2), "first_request_build_ms": round(miss * 1e3, 2)}

    cols = [
        "alpha",
        "level",
        "served_accuracy",
        "stored_bytes",
        "ms_b1_t1",
        "ms_b32_t1",
        "ms_b1_t2",
        "ms_b32_t2",
        "speedup_b1_t2",
        "speedup_b32_t2",
    ]
    print(
        f"{args.checkpoint.name}: {meta.kind}, speed-up relative to alpha "
        f"{'float' if meta.kind == 'quantized' else '1'}"
    )
    print(" | ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r.get(c, '')!s:>14}" for c in cols))
    out = args.json or Path("benchmarks/results") / f"alphas-{args.checkpoint.stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "checkpoint": str(args.checkpoint),
                "kind": meta.kind,
                "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(),
                "cache": cache_cost,
                "rows": rows,
            },
            indent=1,
        )
    )
    print(
        f"cache: a hit costs {cache_cost['hit_us']} us; building alpha {alphas[-1]:g} on a miss "
        f"{cache_cost['first_request_build_ms']} ms; build time per alpha is in the build_seconds column"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
