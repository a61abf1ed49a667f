"""A load rise onto alphas dropped under memory pressure: what rebuilding them costs requests.

    .venv/bin/python -m benchmarks.rebuild [--checkpoint models/structured_line.safetensors] [--factor 1.5]

1. Starts `python -m service` on a free 127.0.0.1 port pinned at alpha = 1 (LCS_POLICY=fixed:1) and
   measures its capacity closed loop for `--images`-image requests (raw bytes to the OIP v2 path, as the
   load benchmark's mix: the model, not parsing, is the cost), then stops it. `--capacity` scales the
   load below to a given capacity instead, to compare two versions at the same offered load.
2. Starts it again with LCS_MEMORY_LOW=1, so that every control step reads memory as short: once the
   models are built it keeps only those asked for in the last 10 s (service.state.IDLE_MODEL_SECONDS) and
   the ones the cache always keeps. Sends light load (0.25x capacity for 2 s: alpha 1 is the last asked
   for), waits `--idle` seconds (the rest of the grid is dropped), and records which alphas are built.
3. Sends Poisson arrivals at `--factor` x capacity for `--duration` s, open loop (benchmarks.openloop),
   so the controller wants alphas that are no longer built. `--cycles N` repeats 2 and 3 on the same
   server N times (models dropped and built again each time: the resident memory before each rise shows
   whether that cycle leaks), reporting each cycle and all of them together.

Reports, from each request's scheduled arrival: the share answered within the SLO, p50/p99/max latency,
mean alpha served, effective accuracy (the accuracy of the alpha that served each request answered within
the SLO, summed, over requests sent), the worst latency in the first second of the rise, and the alphas
built before and after it. Prints a table and writes benchmarks/results/rebuild.json; Ctrl-C or SIGTERM
writes the cycles run so far, with "interrupted": true.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks import openloop
from benchmarks.cli import check_checkpoint, check_output, command, kept_if_stopped, positive
from benchmarks.load import reply_rows
from benchmarks.load import summarise as load_summary
from benchmarks.openloop import HOST, free_port
from benchmarks.overload import CAPACITY_SLO, arrivals, capacity
from benchmarks.server import start_server, stop_server
from lcs.paths import write_json


def built(base: str) -> list[float]:
    return list(httpx.get(base + "/model", timeout=10).json()["cached_alphas"])


def summarise(
    replies: list[openloop.Reply], slo: float, accuracy: dict[float, float], skipped: int = 0
) -> dict[str, Any]:
    """The load benchmark's figures (`load.summarise`: SLO attainment and effective accuracy over requests
    sent, `skipped` arrivals included, latency from the scheduled arrival), and the worst latency overall and
    in the rise's first second."""
    rows = reply_rows(replies)
    answered = [r for r in rows if r["status"] == 200]
    return {
        **load_summary(rows, slo, accuracy, skipped),
        "max_ms": round(max((1000 * r["latency"] for r in answered), default=math.nan), 1),
        "first_second_max_ms": round(max((1000 * r["latency"] for r in answered if r["t"] < 1.0), default=math.nan), 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="models/structured_line.safetensors")
    p.add_argument("--images", type=positive(int), default=64, help="images per request")
    p.add_argument("--factor", type=positive(float), default=1.5, help="the rise's load as a multiple of capacity")
    p.add_argument("--duration", type=positive(float), default=10.0, help="seconds of the rise")
    p.add_argument("--idle", type=positive(float), default=12.5, help="seconds idle before it (drops after 10)")
    p.add_argument("--capacity-seconds", type=positive(float), default=4.0)
    p.add_argument(
        "--capacity",
        type=positive(float),
        help="scale the load to this alpha = 1 capacity (req/s) instead of the one measured, to compare two "
        "versions at the same offered load (still measured and reported)",
    )
    p.add_argument("--slo", type=positive(float), default=0.1, help="p99 latency objective, s")
    p.add_argument("--cycles", type=positive(int), default=1, help="idle-then-rise cycles on one server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/rebuild.json"))
    args = p.parse_args()
    check_checkpoint(args.checkpoint)
    check_output(args.out, "--out", "rebuild.json")

    port = free_port()
    base = f"http://{HOST}:{port}"
    proc = start_server(args.checkpoint, port, CAPACITY_SLO, LCS_POLICY="fixed:1")
    try:
        info = httpx.get(base + "/model", timeout=10).json()
        req = openloop.image_request(args.images, "binary", port, info["name"])
        openloop.check_accepted(port, req, f"--images {args.images}")
        cap = capacity(port, req, args.capacity_seconds)
    finally:
        stop_server(proc)
    if cap <= 0:
        raise SystemExit("capacity measured as 0 requests/s: is the server answering 200?")
    accuracy = {p["alpha"]: p["accuracy"] for p in info["accuracy"]}
    print(f"capacity {cap:.1f} requests/s at alpha 1 ({args.images} images each)", flush=True)
    measured, cap = cap, args.capacity or cap

    cycles: list[dict[str, Any]] = []
    replies: list[openloop.Reply] = []
    skipped = 0

    def report() -> dict[str, Any]:
        return {
            "checkpoint": args.checkpoint,
            "images": args.images,
            "capacity": round(measured, 1),
            "scaled_to": round(cap, 1),
            "factor": args.factor,
            "duration": args.duration,
            "slo": args.slo,
            "seed": args.seed,
            "built_before": cycles[0]["built_before"],
            "built_after": cycles[-1]["built_after"],
            **summarise(replies, args.slo, accuracy, skipped),
            "cycles": cycles,
        }

    proc = start_server(args.checkpoint, port, args.slo, LCS_MEMORY_LOW="1")
    with kept_if_stopped(args.out, lambda: report() if cycles else None):
        try:
            server = psutil.Process(proc.pid)
            for cycle in range(args.cycles):
                seed = args.seed + 2 * cycle
                openloop.run(openloop.open_loop(port, req, arrivals(0.25 * cap, 2.0, seed)))
                time.sleep(args.idle)
                before, rss = built(base), server.memory_info().rss
                print(
                    f"cycle {cycle + 1}: built after {args.idle:g} s idle: {before} ({rss / 2**20:.1f} MiB resident); "
                    f"rising to {args.factor:g}x for {args.duration:g} s",
                    flush=True,
                )
                got, missed = openloop.run(
                    openloop.open_loop(port, req, arrivals(args.factor * cap, args.duration, seed + 1))
                )
                replies += got
                skipped += missed
                cycles.append(
                    {
                        "built_before": before,
                        "built_after": built(base),
                        "rss_mib_before": round(rss / 2**20, 1),
                        **summarise(got, args.slo, accuracy, missed),
                    }
                )
        finally:
            stop_server(proc)
    result = report()
    print(
        "| figure | value |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in result.items() if k != "cycles")
    )
    if len(cycles) > 1:
        keys = ["rss_mib_before", "slo_attainment", "p99_ms", "first_second_max_ms", "effective_accuracy"]
        print(f"\n| cycle | {' | '.join(keys)} | built before -> after |\n|{' --- |' * (len(keys) + 2)}")
        for i, c in enumerate(cycles, 1):
            print(
                f"| {i} | {' | '.join(str(c[k]) for k in keys)} | {len(c['built_before'])} -> {len(c['built_after'])} |"
            )
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    command(main)
