"""Per-alpha benchmark of materialised models: accuracy, bytes, latency, speed-up over the highest alpha.

    .venv/bin/python -m benchmarks.alphas models/structured_line.safetensors [--alphas 0 0.5 1] [--json OUT]
        [--backend onnxruntime|torchscript]

For every alpha: the representation the service runs, resident and stored bytes, build time, test
accuracy of *that materialised model* on the checkpoint's dataset (when the dataset is installed) and its
top-1 agreement with the training-side model at the same alpha (the parity the int8 kernels must keep),
and median latency at batch 1 and 32 with 1 and 2 threads, measured in interleaved rounds (every variant
once per round) so that all see the same machine. Speed-ups are relative to the highest alpha measured
(1 by default); for the quantized kind, every row's is relative to an added float row (the weights of the
grid's highest alpha, 1 but in a baseline, unquantised). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import get_args

import numpy as np
import onnxruntime as ort
import torch

from benchmarks.cli import alpha_value, check_output, command, load_checkpoint, positive, run_child
from lcs.alpha import Level, spelled
from lcs.layers import Setting
from lcs.paths import write_json
from service.cache import Grid, ModelCache
from service.inputs import normaliser
from service.materialize import Compiled, build, compile_module, normalised_samples, time_in_rounds
from service.settings import BACKEND, Backend


class _CsrConv(torch.nn.Module):
    """A conv computed as CSR weight [C_out, C_in*k*k] @ unfolded input: the sparse alternative that the
    unstructured kind would use if it were faster (it is measured here, not served)."""

    def __init__(self, conv: torch.nn.Conv2d) -> None:
        super().__init__()
        self.k, self.stride = conv.kernel_size[0], conv.stride[0]
        self.padding = int(conv.padding[0])  # our convs use explicit integer padding
        self.c_out = conv.out_channels
        self.weight = conv.weight.detach().flatten(1).to_sparse_csr()
        self.bias = None if conv.bias is None else conv.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        cols = torch.nn.functional.unfold(x, self.k, padding=self.padding, stride=self.stride)  # [N, C*k*k, L]
        ho = (h + 2 * self.padding - self.k) // self.stride + 1
        wo = (w + 2 * self.padding - self.k) // self.stride + 1
        flat = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # [C*k*k, N*L]
        out = (self.weight @ flat).reshape(self.c_out, n, ho * wo).transpose(0, 1)
        out = out.reshape(n, self.c_out, ho, wo)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


def _csr_variant(plain: torch.nn.Module, density_below: float = 0.5) -> torch.nn.Module:
    """Replace every conv whose weight is mostly zeros with its CSR version (a deep copy)."""
    import copy

    net = copy.deepcopy(plain)
    for parent in net.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Conv2d) and float((child.weight != 0).float().mean()) < density_below:
                setattr(parent, name, _CsrConv(child))
    return net


def _predictions(
    net: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, scale: np.ndarray, shift: np.ndarray
) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat(
            [
                net(torch.from_numpy(images[i : i + 500].numpy() * scale + shift)).argmax(1)
                for i in range(0, len(images), 500)
            ]
        )


def _timings(variants: list[tuple[str, float, Compiled]], x32: torch.Tensor, repeats: int) -> list[dict[str, object]]:
    """Per variant: median ms at batch 1 and 32 over `repeats` rounds that each time every variant once
    (`time_in_rounds`), after an untimed call of the same variant, through the service's path
    (`Compiled.logits`): the latency of an alpha is that of a service serving it. (Timed straight after
    another variant, the int8 network paid for the switch from ONNX Runtime: 2.12x the float one at 1
    thread instead of 2.6-2.7x.) Networks on ONNX Runtime and on torch (int8, TorchScript, the CSR
    variant) get rounds of their own (`time_in_rounds`' `group`)."""
    out: list[dict[str, object]] = [{"representation": c.representation} for _, _, c in variants]
    for b in (1, 32):
        x = x32[:b].numpy()  # numpy in and out, as the service runs them (`Compiled.logits`)
        for _, _, compiled in variants:
            for _ in range(3):  # warm-up
                compiled.logits(x)
        calls = {i: functools.partial(c.logits, x) for i, (_, _, c) in enumerate(variants)}
        medians = time_in_rounds(calls, repeats, group=lambda i: variants[i][2].on_onnx_runtime)
        for i, seconds in medians.items():
            out[i][f"ms_b{b}"] = round(1000 * seconds, 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument(
        "--alphas",
        type=alpha_value,
        nargs="*",
        help="default: 0, 0.25, 0.5, 0.75, 1; each snapped down to the checkpoint's grid (below it: its lowest)",
    )
    p.add_argument("--repeats", type=positive(int), default=20)
    p.add_argument("--json", type=Path, help="default: benchmarks/results/alphas-<checkpoint>[-<backend>].json")
    p.add_argument("--backend", choices=get_args(Backend), default=BACKEND, help="what runs the float networks")
    p.add_argument("--child-threads", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    suffix = "" if args.backend == BACKEND else f"-{args.backend}"
    out = args.json or Path("benchmarks/results") / f"alphas-{args.checkpoint.stem}{suffix}.json"
    if not args.child_threads:  # the children print their timings; the parent writes the file
        check_output(out, "--json", "alphas.json")

    torch.set_flush_denormal(True)
    model, meta, raw_samples = load_checkpoint(args.checkpoint)
    grid = list(model.stat_alphas)
    wanted = args.alphas or [0.0, 0.25, 0.5, 0.75, 1.0]
    # snapped down, as the service snaps `quality`; below the grid (a baseline's is one alpha) to its lowest
    alphas = sorted({Grid(grid).down(w) for w in wanted})
    scale, shift = normaliser(meta.input)
    samples = normalised_samples(raw_samples, meta.input)
    calib = None if samples is None else samples[0]
    test = None
    try:
        from training.data import load_dataset

        if not args.child_threads:
            data = load_dataset(meta.dataset)
            test = (data.test.images, data.test.labels)
    except Exception as e:  # the dataset is optional: latency and bytes are still measured
        print(f"(no test accuracy: {e})")

    shape = (meta.input.channels, meta.input.height, meta.input.width)
    x32 = torch.randn(32, *shape)

    def make_variants() -> list[tuple[str, float, Compiled]]:
        """What a service with the current thread count serves."""
        variants = []
        for a in alphas:
            compiled = build(model, meta, a, samples=calib, channels_last=True, backend=args.backend)
            variants.append((f"{a:g}", a, compiled))
        if meta.kind == "unstructured":  # the sparse alternative at the sparsest alpha, measured for the record
            a0 = alphas[0]
            t0 = time.perf_counter()
            sparse = _csr_variant(model.export(model.at(a0)))
            c0 = variants[0][2]
            csr = Compiled(
                a0,
                c0.level,
                sparse,
                "CSR sparse convs (unfold + sparse mm), eager",
                c0.resident_bytes,
                c0.stored_bytes,
                time.perf_counter() - t0,
                False,
            )
            variants.append((f"{a0:g} csr", a0, csr))
        if meta.kind == "quantized":  # the float reference for the int8 speed-up, run as served floats are
            top = max(grid)  # 1, but in a baseline trained at one alpha
            s = model.at(top)
            t0 = time.perf_counter()
            plain = model.export(Setting(top, Level("structured", width=1.0), s.stats)).to(
                memory_format=torch.channels_last  # type: ignore[call-overload]
            )
            size = sum(q.numel() * 4 for q in plain.parameters())
            network = compile_module(plain, x32, backend=args.backend, channels_last=True)
            ref = Compiled(
                top,
                Level("quantized", bits=32),
                network.run,
                f"fp32 float reference (unquantised), {network.how}",
                network.resident_bytes,
                size,
                time.perf_counter() - t0,
                network.how == "TorchScript",
                network.reclaimable,
            )
            variants.append(("float", top, ref))
        return variants

    if args.child_threads:  # time what a service with this many threads builds, print JSON, stop
        torch.set_num_threads(args.child_threads)
        print(json.dumps(_timings(make_variants(), x32, args.repeats)))
        return
    torch.set_num_threads(1)
    rows: list[dict[str, object]] = []
    for label, a, c in make_variants():
        row: dict[str, object] = {
            "alpha": label,
            "level": c.level.value,
            "resident_bytes": c.resident_bytes,
            "stored_bytes": c.stored_bytes,
            "build_seconds": round(c.build_seconds, 4),
            # the float reference has none: it is no alpha of the checkpoint's (alpha 1's is the 8-bit model's)
            "train_time_accuracy": None
            if label == "float"
            else next((q.accuracy for q in meta.accuracy if spelled(q.alpha, [a]) is not None), None),
        }
        if test is not None:  # accuracy of the served model, and its top-1 agreement with the training side
            images, labels = test
            served = _predictions(c, images, scale, shift)
            trained = _predictions(lambda x, a=a: model(x, model.at(a)), images, scale, shift)  # type: ignore[misc]
            row["served_accuracy"] = round(100.0 * float((served == labels).float().mean()), 2)
            row["agreement"] = round(100.0 * float((served == trained).float().mean()), 2)
        rows.append(row)
    # latency in a fresh process per thread count: ONNX Runtime sizes its thread pool once per process
    for threads in (1, 2):
        cmd = [sys.executable, "-m", "benchmarks.alphas", str(args.checkpoint), "--repeats", str(args.repeats)]
        cmd += ["--backend", args.backend, "--child-threads", str(threads)]
        if args.alphas:
            cmd += ["--alphas", *map(str, args.alphas)]
        timed = run_child(cmd, f"the {threads}-thread timing process")
        for row, t in zip(rows, timed, strict=True):
            row[f"representation_t{threads}"] = t["representation"]
            row[f"ms_b1_t{threads}"], row[f"ms_b32_t{threads}"] = t["ms_b1"], t["ms_b32"]
    reference = "float" if meta.kind == "quantized" else f"{alphas[-1]:g}"  # 1, unless --alphas leaves it out
    base = next(r for r in rows if r["alpha"] == reference)
    for r in rows:
        for key in [k for k in r if k.startswith("ms_")]:
            r["speedup_" + key[3:]] = round(float(base[key]) / float(r[key]), 2)  # type: ignore[arg-type]

    # what a request pays for its alpha: a cache hit, versus a first request that builds the model
    cache = ModelCache(
        lambda a: build(model, meta, a, samples=calib, channels_last=True, backend=args.backend), Grid(alphas), 2**30
    )
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
        "agreement",
        "stored_bytes",
        "ms_b1_t1",
        "ms_b32_t1",
        "ms_b1_t2",
        "ms_b32_t2",
        "speedup_b1_t2",
        "speedup_b32_t2",
        "runs_t1/t2",
    ]
    short = {"ONNX Runtime": "ORT", "TorchScript": "TS", "eager": "eager"}
    for r in rows:  # what ran the model, per thread count
        r["runs_t1/t2"] = "/".join(short[str(r[f"representation_t{t}"]).split(", ")[-1]] for t in (1, 2))
    print(f"{args.checkpoint.name}: {meta.kind}, speed-up relative to alpha {reference}")
    print(" | ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r.get(c, '')!s:>14}" for c in cols))
    write_json(
        out,
        {
            "checkpoint": str(args.checkpoint),
            "kind": meta.kind,
            "backend": args.backend,
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "machine": platform.processor() or platform.machine(),
            "cache": cache_cost,
            "speedup_relative_to": reference,
            "rows": rows,
        },
    )
    print(
        f"cache: a hit costs {cache_cost['hit_us']} us; building alpha {alphas[-1]:g} on a miss "
        f"{cache_cost['first_request_build_ms']} ms; build time per alpha is in the build_seconds column"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    command(main)
