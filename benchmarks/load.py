"""Load benchmark for the controller: open-loop traces against each policy, on 127.0.0.1 only.

    .venv/bin/python -m benchmarks.load [--images 16] [--duration 15] [--policies fixed:1 step aimd lcs ...]

Arrival times are fixed in advance (open loop: a slow response never slows the sender), bounded in
count and time. Traces: steady (0.6x the alpha = 1 capacity), step (0.5x -> 1.5x -> 0.5x), ramp
(0.2x -> 2x), bursty (gamma inter-arrivals, CV 2, with bursts peaking at 2.5x) and noisy (0.6x, as steady, while
a CPU-hungry neighbour process runs through the trace's second quarter, so that the second half shows
whether full quality returns within 5 s of it stopping; at 0.7x, until session 27, whether it returned
was the controller's 20 % headroom rule meeting the draw's load, not the neighbour). Capacity is measured
first, closed loop, for the request mix at alpha = 1 and alpha = 0, on servers whose admission refuses
nothing (benchmarks.overload.CAPACITY_SLO).

Service settings in the environment (`LCS_THREADS=2`, `LCS_BACKEND=torchscript`) apply to every server it
starts, except those it sets itself (checkpoint, host, port, SLO, policy, queue bound, API key).

Each trace runs on a fresh server. Per policy and trace: p50/p99 latency of answered requests, SLO
attainment (answered 200 within the SLO / sent), shed rate (429 + 503 / sent), mean served alpha, and
effective accuracy (sum over requests answered within the SLO of the accuracy measured for the alpha that
served them / sent); for noisy,
also the neighbour reaction (`neighbour_reaction`) and the load the draw offers after the stop
(`load_after_stop`). Writes benchmarks/results/load-<mix>.json and a PNG of alpha and p99 over time
per policy and trace. Ctrl-C or SIGTERM writes the JSON of the traces run so far, with "interrupted":
true (and no PNG).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import multiprocessing
import os
import random
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from benchmarks import openloop
from benchmarks.cli import check_checkpoint, check_output, command, kept_if_stopped, positive
from benchmarks.openloop import HOST, free_port
from benchmarks.overload import CAPACITY_SLO, capacity, percentile
from benchmarks.server import start_server, stop_server
from lcs.paths import write_json
from service.cgroups import usable_cpus
from service.controller import parse_policy


def _burn(stop: Any, parent: int) -> None:
    """A CPU-hungry neighbour, until `stop` is set or the benchmark (`parent`) is gone, however it ended."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the benchmark's handler (benchmarks.cli): terminate() ends it
    x = 0
    while not stop.is_set() and os.getppid() == parent:
        for i in range(100_000):
            x += i * i


# Burners are forked, whatever the default start method, so that a burner's parent is the benchmark, whose
# exit it watches (under forkserver, Python 3.14's default on Linux, the parent was the fork server and the
# burners stopped at once: the noisy trace ran without its neighbour)
_FORK = multiprocessing.get_context("fork")


def start_burners(stop: Any, n: int) -> list[multiprocessing.process.BaseProcess]:
    """`n` CPU-hungry neighbours, running until `stop` (an event of _FORK) is set or this process is gone."""
    burners: list[multiprocessing.process.BaseProcess] = [
        _FORK.Process(target=_burn, args=(stop, os.getpid()), daemon=True) for _ in range(n)
    ]
    for b in burners:
        b.start()
    return burners


TRACES = ("steady", "step", "ramp", "bursty", "noisy")
# the noisy trace's neighbour, as shares of the trace: it starts a quarter in and stops halfway, leaving half
# the trace to watch the return to full quality (with the middle third, a 12 s trace ended 4 s after the stop,
# before the 5 s the target allows: a return that needed two calm spells, 0 -> 0.65 -> 1, could not be seen)
NEIGHBOUR = (0.25, 0.5)
RETURN_WITHIN = 5.0  # seconds after the neighbour stops in which the target wants full quality back
HOLD_FOR_GOOD = 1.0  # seconds a return must hold, to the trace's end, to count as for good (four polls)


def trace(kind: str, capacity: float, duration: float, seed: int) -> list[float]:
    """Arrival times in seconds from the start, precomputed: gaps of one expected arrival on average (gamma
    draws), spent at the rate in force as time passes, so that each phase offers the rate it states. A gap
    drawn whole at the rate where it began ran into a burst at the base rate: bursts offered 2.38-2.45x,
    not 2.5x (mean of 400 seeds, capacity 53-105), the long CV-2 gap at each onset the cause."""
    rng = random.Random(seed)

    def rate(t: float) -> float:
        f = t / duration
        if kind == "steady":
            return 0.6 * capacity
        if kind == "step":
            return (1.5 if 1 / 3 <= f < 2 / 3 else 0.5) * capacity
        if kind == "ramp":
            return (0.2 + 1.8 * f) * capacity
        if kind == "bursty":  # two bursts at 2.5x on a 0.6x base
            return (2.5 if (0.25 <= f < 0.35 or 0.6 <= f < 0.7) else 0.6) * capacity
        if kind == "noisy":  # the load steady shows alpha 1 carrying: what the neighbour changes is the test
            return 0.6 * capacity
        raise ValueError(kind)

    shape = 0.25 if kind == "bursty" else 1.0  # gamma shape 0.25: CV 2 (bursty); 1: Poisson
    step = duration / 10_000  # the rate is read this often (it changes only between phases, but for the ramp)
    times, t = [], 0.0
    need = rng.gammavariate(shape, 1.0 / shape)  # expected arrivals until the next one
    while t < duration:
        r, span = rate(t), min(step, duration - t)
        if need > r * span:
            need -= r * span
            t += span
            continue
        t += need / r
        if t < duration:
            times.append(t)
        need = rng.gammavariate(shape, 1.0 / shape)
    return times


def known_policy(text: str) -> str:
    """An argparse type: a policy the service takes as LCS_POLICY, refused here rather than by its server,
    after the capacity runs."""
    try:
        parse_policy(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def server_settings(environ: Mapping[str, str], policy: str) -> dict[str, str]:
    """What each server gets on top of `start_server`'s checkpoint, host, port and SLO: the caller's service
    settings (LCS_THREADS=2, LCS_BACKEND=torchscript), then the benchmark's own."""
    own = {"LCS_CHECKPOINT", "LCS_HOST", "LCS_PORT", "LCS_SLO_P99_SECONDS"}
    passed = {k: v for k, v in environ.items() if k.startswith("LCS_") and k not in own}
    return {**passed, "LCS_QUEUE_MAX": "64", "LCS_API_KEY": "bench", "LCS_POLICY": policy}


async def run_trace(
    port: int, req: bytes, arrivals: list[float], timeout: float, start: float | None = None
) -> tuple[list[dict[str, Any]], int]:
    """One open-loop trace (benchmarks.openloop) from `start` (time.perf_counter; default: at once); latency
    counts from the scheduled arrival. (rows, skipped)."""
    replies, skipped = await openloop.open_loop(port, req, arrivals, timeout=timeout, start=start)
    if skipped:
        print(f"  (the generator fell behind and skipped {skipped} arrivals)", flush=True)
    return reply_rows(replies), skipped


def reply_rows(replies: list[openloop.Reply]) -> list[dict[str, Any]]:
    """What `summarise` reads of each reply: its scheduled time, status, latency, how late the generator
    sent it (`lag`, counted in its latency) and (a 200's) alpha."""
    rows = []
    for r in replies:
        row: dict[str, Any] = {"t": r.at, "status": r.status, "latency": r.latency, "lag": round(r.sent - r.at, 5)}
        if r.status == 200:
            answer = r.json()
            row["alpha"] = answer["alpha"] if "alpha" in answer else answer["parameters"]["alpha"]  # /predict or v2
        rows.append(row)
    return rows


async def poll_controller(base: str, out: list[dict[str, Any]], stop: asyncio.Event, start: float) -> None:
    """The controller's state every 0.25 s, timed from `start` (time.perf_counter), the trace's own zero."""
    async with httpx.AsyncClient(base_url=base, timeout=1) as client:
        while not stop.is_set():
            try:
                st = (await client.get("/controller")).json()
                sig = st["signals"] or {}
                out.append(
                    {
                        "t": time.perf_counter() - start,
                        "ceiling": st["ceiling"],
                        "mode": st["mode"],
                        "reason": st["decisions"][-1]["reason"] if st["decisions"] else None,
                        "drift": st["profile_drift"],
                        "calm_ratio": st["calm_ratio"],
                        "handoff_ms": st["batch_handoff_ms"],
                        **{
                            k: sig.get(k)
                            for k in (
                                "arrival_rate",
                                "p99",
                                "cpu_other",
                                "request_cost",
                                "queue_depth",
                                "model_busy",
                                "loop_busy",
                            )
                        },
                    }
                )
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.25)


async def drive(
    base: str, port: int, req: bytes, arrivals: list[float], noisy: bool, duration: float
) -> tuple[list[dict[str, Any]], int, list[dict[str, Any]], dict[str, float]]:
    """Run one trace while polling the controller; a CPU-hungry neighbour runs through NEIGHBOUR if `noisy`.
    (rows, arrivals skipped, controller timeline, when the neighbour started and stopped: {} if none). One zero
    for every clock, the trace's, taken 0.5 s ahead: the poller's own, taken before its client was built, and
    the neighbour's sleeps, begun after it, put the burners' start 51-87 ms late on the poller's clock, which
    was 0.1 s off the trace's (session 34's review)."""
    zero = time.perf_counter() + 0.5
    timeline: list[dict[str, Any]] = []
    stop_poll = asyncio.Event()
    poller = asyncio.create_task(poll_controller(base, timeline, stop_poll, zero))
    stop_burn = _FORK.Event()
    burners: list[multiprocessing.process.BaseProcess] = []
    when: dict[str, float] = {}

    async def neighbour() -> None:
        start, stop = (duration * f for f in NEIGHBOUR)
        await asyncio.sleep(zero + start - time.perf_counter())
        # one per CPU this process may use, as the service counts them (os.cpu_count is the node's: a container
        # granted 2 CPUs of a 64-core node would start 64)
        burners.extend(start_burners(stop_burn, usable_cpus()))
        when["neighbour_started_s"] = round(time.perf_counter() - zero, 3)  # every burner forked
        await asyncio.sleep(zero + stop - time.perf_counter())
        stop_burn.set()
        when["neighbour_stopped_s"] = round(time.perf_counter() - zero, 3)

    nb = asyncio.create_task(neighbour()) if noisy else None
    rows, skipped = await run_trace(port, req, arrivals, timeout=5.0, start=zero)
    if nb is not None:
        await nb
    stop_poll.set()
    await poller
    for b in burners:
        b.join(5)
    return rows, skipped, timeline, when


def summarise(
    rows: list[dict[str, Any]], slo: float, accuracy: dict[float, float], skipped: int = 0
) -> dict[str, float]:
    """Shares of the requests sent: the replies, and the arrivals the generator fell behind and `skipped`
    (none so far in the recorded runs; counting them out would have raised every share). Errors: every
    answer but 200, 429 and 503 (a 408 or 422 too), and no answer at all. The generator's lag (from the
    scheduled arrival to the send), which every latency includes, as p99 and most (rows recorded before
    it was kept have none)."""
    sent = len(rows) + skipped
    ok = [r for r in rows if r["status"] == 200]
    lat = [r["latency"] for r in ok]
    within = [r for r in ok if r["latency"] <= slo]
    lags = [r["lag"] for r in rows if "lag" in r]
    unmeasured = sorted({r["alpha"] for r in within} - accuracy.keys())
    if unmeasured:  # scored as 0 they would pull effective accuracy down unseen
        raise ValueError(
            f"alphas {unmeasured} served requests but have no measured accuracy among {sorted(accuracy)}: "
            "serve the checkpoint's own grid (unset LCS_ALPHA_GRID)"
        )

    def pct(p: float, values: list[float] = lat) -> float:
        return round(1000 * percentile(values, p), 2)  # NaN where there are none

    return {
        "sent": sent,
        "skipped": skipped,
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "slo_attainment": round(len(within) / max(1, sent), 4),
        "shed_rate": round(sum(r["status"] in (429, 503) for r in rows) / max(1, sent), 4),
        "errors": sum(r["status"] not in (200, 429, 503) for r in rows),
        "mean_alpha": round(sum(r["alpha"] for r in ok) / len(ok), 3) if ok else float("nan"),
        "effective_accuracy": round(sum(accuracy[r["alpha"]] for r in within) / max(1, sent), 2),
        "generator_lag_p99_ms": pct(0.99, lags),
        "generator_lag_max_ms": round(1000 * max(lags), 2) if lags else float("nan"),
    }


def neighbour_reaction(timeline: list[dict[str, Any]], start: float, stop: float, top: float = 1.0) -> dict[str, Any]:
    """For the noisy trace (a neighbour running from `start` to `stop`, on the timeline's clock): seconds from
    its start until the ceiling first dropped (None if it was already below full quality when the neighbour
    started: the trace's own load had lowered it, and no reaction can be read), and from its stop until the
    ceiling was first back at full quality, and back for good: from there to the end of the trace, at least
    HOLD_FOR_GOOD (None: it never was, or too late in the trace to tell; `full_quality_held_s` says how long
    it held). A later drop is the trace's own load, 0.6x capacity as Poisson arrivals, which
    `load_after_stop` reports, and is in the timeline. Resolution: the 0.25 s controller poll. Full quality:
    `top`, the grid's highest alpha (it was the highest ceiling in the timeline, so a policy that never rose
    above 0.55 read as back at full quality)."""
    before = [p for p in timeline if p["t"] < start]
    below = bool(before) and before[-1]["ceiling"] < top
    drop = None
    if not below:
        drop = next((p["t"] - start for p in timeline if start <= p["t"] < stop and p["ceiling"] < top), None)
    after = [p for p in timeline if p["t"] >= stop]
    first = next((p["t"] - stop for p in after if p["ceiling"] >= top), None)
    back = held = None
    for i, p in enumerate(after):
        if all(q["ceiling"] >= top for q in after[i:]):
            back, held = p["t"] - stop, after[-1]["t"] - p["t"]
            break
    return {
        "ceiling_below_top_at_start": below,
        "ceiling_drop_after_start_s": None if drop is None else round(drop, 2),
        "full_quality_first_after_stop_s": None if first is None else round(first, 2),
        "full_quality_after_stop_s": None if back is None or held is None or held < HOLD_FOR_GOOD else round(back, 2),
        "full_quality_held_s": None if held is None else round(held, 2),
    }


def load_after_stop(arrivals: list[float], capacity: float, stop: float, duration: float) -> dict[str, float]:
    """For the noisy trace: the load its arrivals offer in the RETURN_WITHIN seconds after the neighbour stops
    (at `stop`), as a share of the alpha = 1 capacity the trace is scaled to, on average and in the busiest
    1 s. The trace is Poisson at 0.6x, so a draw offers more or less than that, and the model's pace moves
    with the machine's after the capacity is measured: where the load keeps the model about as busy at alpha 1 as the
    controller's utilisation target (0.8), alpha 1 has no headroom left for the SLO and the ceiling rightly
    stays below it. That is the draw's doing, and the timeline's `model_busy` tells which it was."""
    end = min(duration, stop + RETURN_WITHIN)
    times = sorted(t for t in arrivals if stop <= t < end)
    width = min(1.0, end - stop)
    # a window shifted right to its first arrival loses none, and one that would then pass `end` is inside the last
    starts = [t for t in times if t + width <= end] + [end - width]
    busiest = max(bisect.bisect_left(times, s + width) - bisect.bisect_left(times, s) for s in starts)
    return {
        "load_after_stop": round(len(times) / max(1e-9, end - stop) / capacity, 3),
        "peak_1s_load_after_stop": round(busiest / width / capacity, 3),
    }


def plot(all_runs: dict[str, dict[str, Any]], out: Path, slo: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = list(next(iter(all_runs.values()))["traces"])
    fig, axes = plt.subplots(2, len(traces), figsize=(4 * len(traces), 6), dpi=100, squeeze=False)
    for j, tr in enumerate(traces):
        for policy, run in all_runs.items():
            rows = run["traces"][tr]["requests"]
            ax = axes[0][j]
            ok = [r for r in rows if r["status"] == 200]
            win = 1.0
            ts = [k * win for k in range(int(max((r["t"] for r in rows), default=0) / win) + 1)]
            alpha = [
                sum(r["alpha"] for r in ok if t <= r["t"] < t + win) / max(1, sum(t <= r["t"] < t + win for r in ok))
                for t in ts
            ]
            ax.plot(ts, alpha, label=policy)
            p99 = []
            for t in ts:
                p99.append(1000 * percentile([r["latency"] for r in ok if t <= r["t"] < t + win], 0.99))
            axes[1][j].plot(ts, p99, label=policy)
        axes[0][j].set_title(tr)
        axes[0][j].set_ylabel("mean served alpha")
        axes[1][j].set_ylabel("p99 latency (ms), 1 s windows")
        axes[1][j].axhline(1000 * slo, color="red", ls="--", lw=1)
        axes[1][j].set_yscale("log")
        axes[1][j].set_xlabel("time (s)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="models/structured_line.safetensors")
    p.add_argument("--images", type=positive(int), default=16, help="images per request (the mix)")
    p.add_argument(
        "--format",
        choices=["png", "json", "binary"],
        default="png",
        help="inputs as base64 PNGs or raw JSON arrays to /predict, or raw bytes to the OIP v2 path (binary "
        "tensor extension: no parsing, so model compute dominates)",
    )
    p.add_argument("--duration", type=positive(float), default=15.0, help="seconds per trace")
    p.add_argument("--traces", nargs="+", choices=TRACES, default=list(TRACES))
    p.add_argument(
        "--policies", type=known_policy, nargs="+", default=["fixed:1", "fixed:0.5", "fixed:0", "step", "aimd", "lcs"]
    )
    p.add_argument("--slo", type=positive(float), default=0.1, help="p99 latency objective, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--capacity",
        type=positive(float),
        help="scale the traces to this alpha = 1 capacity (req/s) instead of the one measured, to compare "
        "two versions at the same offered load (both capacities are still measured and reported)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="where to write, without a suffix (.json and .png are added; a path ending in either is read as "
        "without it); default: benchmarks/results/load-<images><format>",
    )
    args = p.parse_args()
    check_checkpoint(args.checkpoint)
    out = args.out or Path("benchmarks/results") / f"load-{args.images}{args.format}"
    if out.suffix in (".json", ".png"):  # `--out x.json` wrote x.json.json and x.json.png
        out = out.with_suffix("")
    for suffix in (".json", ".png"):
        check_output(Path(f"{out}{suffix}"), "--out", "load")
    out.parent.mkdir(parents=True, exist_ok=True)

    port = free_port()
    req = openloop.image_request(args.images, args.format, port, Path(args.checkpoint).stem)
    base = f"http://{HOST}:{port}"

    def start(policy: str, slo: float = args.slo) -> subprocess.Popen[bytes]:
        return start_server(args.checkpoint, port, slo, **server_settings(os.environ, policy))

    result: dict[str, Any] = {
        "checkpoint": args.checkpoint,
        "images_per_request": args.images,
        "format": args.format,
        "slo_s": args.slo,
        "duration_s": args.duration,
        "capacity_rps": {},
        "policies": {},
    }
    for a in ("1", "0"):
        proc = start(f"fixed:{a}", CAPACITY_SLO)
        try:
            openloop.check_accepted(port, req, f"--images {args.images} --format {args.format}")
            result["capacity_rps"][a] = round(capacity(port, req, 4.0, warmup=2.0), 1)
            model = httpx.get(base + "/model").json()
            accuracy = {q["alpha"]: q["accuracy"] for q in model["accuracy"]}
            top = max(model["grid"])
        finally:
            stop_server(proc)
    cap1 = args.capacity or result["capacity_rps"]["1"]
    result["traces_scaled_to_rps"] = cap1
    print(
        f"mix: {args.images} {args.format} images/request; capacity {result['capacity_rps']['1']} req/s at "
        f"alpha 1, {result['capacity_rps']['0']} req/s at alpha 0; traces scaled to {cap1} req/s",
        flush=True,
    )

    def measured() -> dict[str, Any] | None:  # the traces run so far, if any
        return result if any(run["traces"] for run in result["policies"].values()) else None

    with kept_if_stopped(Path(f"{out}.json"), measured):
        for policy in args.policies:
            runs: dict[str, Any] = {}
            result["policies"][policy] = {"traces": runs}
            for k, tr in enumerate(args.traces):
                # a fresh server for each trace: none starts where the trace before left its policy (AIMD, 0.05
                # a step back up, began bursty at a ceiling of 0.15 after ramp in session 38's run)
                proc = start(policy)
                try:
                    arrivals = trace(tr, cap1, args.duration, args.seed + k)
                    rows, skipped, timeline, when = openloop.run(
                        drive(base, port, req, arrivals, tr == "noisy", args.duration)
                    )
                    summary = summarise(rows, args.slo, accuracy, skipped)
                    if when:
                        summary.update(when)  # type: ignore[arg-type]
                        started, stopped = when["neighbour_started_s"], when["neighbour_stopped_s"]
                        summary.update(neighbour_reaction(timeline, started, stopped, top))  # type: ignore[arg-type]
                        summary.update(load_after_stop(arrivals, cap1, stopped, args.duration))
                    runs[tr] = {"summary": summary, "requests": rows, "controller": timeline}
                    print(f"{policy:>10} {tr:>7}: {summary}", flush=True)
                finally:
                    stop_server(proc)

    print(
        f"\n{'policy':>10} | {'trace':>7} | {'p50 ms':>8} | {'p99 ms':>8} | {'SLO att.':>8} | {'shed':>6} | "
        f"{'alpha':>5} | {'eff. acc':>8}"
    )
    for policy, run in result["policies"].items():
        for tr, r in run["traces"].items():
            s = r["summary"]
            print(
                f"{policy:>10} | {tr:>7} | {s['p50_ms']:>8} | {s['p99_ms']:>8} | {s['slo_attainment']:>8} | "
                f"{s['shed_rate']:>6} | {s['mean_alpha']:>5} | {s['effective_accuracy']:>8}"
            )
    write_json(Path(f"{out}.json"), result, indent=None)
    plot(result["policies"], Path(f"{out}.png"), args.slo)
    print(f"wrote {out}.json and {out}.png")


if __name__ == "__main__":
    command(main)
