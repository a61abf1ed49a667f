"""HTTP benchmark on 127.0.0.1: this service (dynamic batching) against a one-request-at-a-time
FastAPI server of the same model, side by side in one run, at rising load; plus where a request's
time goes at low load.

    .venv/bin/python -m benchmarks.http [--checkpoint models/structured_line.safetensors] [--duration 5]
        [--rounds 3]

Uses wrk (Debian package `wrk`; closed loop, c connections) for throughput and p50/p99, with one
single-image JSON request body. Both servers run the alpha = 1 model (ours pinned there through the
admin API), each as it runs best on the machine: ours with the service's default LCS_THREADS (one per
usable CPU less one, which leaves its event loop a CPU), the plain server with 2 threads (`--threads`,
`--plain-threads`). The two take turns `--rounds` times: this machine's pace drifts by tens
of percent over minutes, and the plain server's best moves most, so the peak-against-peak ratio is
reported per round and as their median. At each level it also reads, from /proc (Linux), the CPU time
each server's main thread spent per request answered: for ours that is the event loop's, which sets the
throughput at saturation. Prints a table and writes benchmarks/results/http.json; Ctrl-C or SIGTERM writes
the rounds run so far, with "interrupted": true.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.cli import check_checkpoint, check_output, command, kept_if_stopped, positive
from benchmarks.openloop import HOST, free_port
from benchmarks.server import stop_server, wait_ready
from lcs.paths import write_json
from service.cgroups import inference_threads

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * UNITS[m.group(2)]


def wrk(url: str, script: Path, connections: int, duration: float) -> dict[str, Any]:
    proc = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{round(duration)}s",
            "--latency",
            "--timeout",
            "5s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    out = proc.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise SystemExit(f"unexpected wrk output:\n{out}")
    count = re.search(r"(\d+) requests in", out)
    res: dict[str, Any] = {
        "connections": connections,
        "rps": float(rps.group(1)),
        "requests": int(count.group(1)) if count else None,
    }
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.M)
        res[f"p{pct}_ms"] = round(_ms(m.group(1)), 3) if m else float("nan")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(bad.group(1)) if bad else 0
    # wrk's rate counts every answer: a refusal (429) is no throughput
    answered = res["requests"]
    res["ok_rps"] = round(res["rps"] * (answered - res["non_2xx"]) / answered, 2) if answered else res["rps"]
    errors = re.search(r"Socket errors: (.*)", out)
    res["socket_errors"] = errors.group(1) if errors else ""
    return res


def thread_cpu(pid: int) -> float | None:
    """CPU seconds (user and system) that process `pid`'s main thread has used: both servers run their event
    loop there. None where /proc cannot tell (not Linux, the process gone)."""
    try:
        stat = Path(f"/proc/{pid}/task/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces: the state first
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15


def measured(
    proc: subprocess.Popen[bytes], url: str, script: Path, connections: int, duration: float
) -> dict[str, Any]:
    """One load level of wrk against the server `proc`, with its main thread's CPU per request answered."""
    before = thread_cpu(proc.pid)
    res = wrk(url, script, connections, duration)
    after = thread_cpu(proc.pid)
    spent = None if before is None or after is None or not res.get("requests") else after - before
    res["loop_us_per_request"] = None if spent is None else round(spent / res["requests"] * 1e6, 1)
    return res


def model_seconds(c: httpx.Client) -> tuple[float, float]:
    """(sum, count) of the service's lcs_batch_compute_seconds: the model call alone, timed in the worker."""
    families = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
    samples = {s.name: s.value for s in families["lcs_batch_compute_seconds"].samples}
    return samples["lcs_batch_compute_seconds_sum"], samples["lcs_batch_compute_seconds_count"]


def warm_up(url: str, body: bytes, n: int = 50) -> None:
    """`n` requests to a fresh server before its first measured level, ours and the plain one alike: the plain
    server's first answers took 16-68 ms against 1.5 ms after, and it peaks at the level measured first."""
    with httpx.Client(timeout=10) as c:
        for _ in range(n):
            c.post(url, content=body, headers={"content-type": "application/json"}).raise_for_status()


def time_breakdown(base: str, body: bytes, n: int = 300) -> dict[str, float]:
    """Sequential requests at low load: the client's latency against the bare HTTP floor (GET /healthz) and the
    model's own time. The path is the rest. The model's time is the mean of the service's
    lcs_batch_compute_seconds over these requests (one batch each): the answer's compute_ms also holds the
    batch's hand-off to the inference thread and back and the softmax, which are the path's (subtracted as
    the model, they took 0.22-0.25 ms out of it: session 34's review). The body is encoded before the clock
    starts and the answer parsed after it stops, as nothing of the kind is timed in the floor's request."""
    headers = {"content-type": "application/json"}
    with httpx.Client(base_url=base, timeout=10) as c:
        for _ in range(20):
            c.post("/predict", content=body, headers=headers)
            c.get("/healthz")
        total, queue, compute, floor = [], [], [], []
        sum0, count0 = model_seconds(c)
        for _ in range(n):
            t0 = time.perf_counter()
            r = c.post("/predict", content=body, headers=headers)
            total.append((time.perf_counter() - t0) * 1000)
            answer = r.json()
            queue.append(answer["queue_ms"])
            compute.append(answer["compute_ms"])
            t0 = time.perf_counter()
            c.get("/healthz")
            floor.append((time.perf_counter() - t0) * 1000)
        sum1, count1 = model_seconds(c)
    med = statistics.median
    res = {
        "total_p50_ms": med(total),
        "model_mean_ms": 1000 * (sum1 - sum0) / (count1 - count0),
        "compute_p50_ms": med(compute),  # the model, the hand-off and the softmax: the answer's compute_ms
        "queue_p50_ms": med(queue),
        "http_floor_p50_ms": med(floor),
    }
    res["path_p50_ms"] = res["total_p50_ms"] - res["model_mean_ms"]  # everything but the model
    res["path_over_floor_ms"] = res["path_p50_ms"] - res["http_floor_p50_ms"]
    return {k: round(v, 3) for k, v in res.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="models/structured_line.safetensors")
    p.add_argument(
        "--duration", type=positive(int), default=5, help="seconds per load level (wrk counts whole seconds)"
    )
    p.add_argument("--connections", type=positive(int), nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--max-wait-ms", type=positive(float, zero=True), default=0.0, help="LCS_MAX_WAIT_MS for our server")
    p.add_argument(
        "--threads",
        type=positive(int),
        help="LCS_THREADS for our server (default: the service's own, one per usable CPU less one for the event loop)",
    )
    p.add_argument("--plain-threads", type=positive(int), default=2, help="torch threads for the one-at-a-time server")
    p.add_argument("--rounds", type=positive(int), default=3, help="the two servers in turn, this many times")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/http.json"))
    args = p.parse_args()
    check_checkpoint(args.checkpoint)
    check_output(args.json, "--json", "http.json")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")

    image = [[(7 * r + 3 * c) % 256 for c in range(28)] for r in range(28)]
    body = {"inputs": [image]}
    wrk_script = (
        f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = \'{json.dumps(body)}\'\n'
    )
    threads = {
        "lcs-serve": args.threads or inference_threads(),  # the service's default (no torch in this process)
        "one-at-a-time": args.plain_threads,
    }
    env = {
        **os.environ,
        "LCS_CHECKPOINT": args.checkpoint,
        "LCS_HOST": HOST,  # not the caller's (the image sets 0.0.0.0): the service runs with a known admin key
        "LCS_API_KEY": "bench",
        "LCS_LOG_LEVEL": "warning",
        "LCS_MAX_WAIT_MS": f"{args.max_wait_ms:g}",
        "LCS_QUEUE_MAX": "1024",
    }

    def server(name: str, port: int) -> tuple[list[str], str, dict[str, str]]:
        """One of the two servers on `port`: (command, readiness path, environment on top of `env`)."""
        if name == "lcs-serve":
            return [sys.executable, "-m", "service"], "/readyz", {"LCS_PORT": str(port)}
        plain = ["uvicorn", "benchmarks.naive_server:app", "--port", str(port), "--log-level", "warning"]
        return [sys.executable, "-m", *plain, "--no-access-log"], "/docs", {}

    results: dict[str, Any] = {
        "checkpoint": args.checkpoint,
        "duration_s": args.duration,
        "threads": threads,
        "rounds": [],
    }
    scratch = tempfile.TemporaryDirectory(prefix="lcs-http-")  # for the wrk script
    with scratch, kept_if_stopped(args.json, lambda: results if results["rounds"] else None):  # removed however it ends
        script = Path(scratch.name) / "post.lua"
        script.write_text(wrk_script)
        for round_ in range(args.rounds):  # the servers take turns, so each round sees the machine's pace of the moment
            levels: dict[str, list[dict[str, Any]]] = {}
            for name in ("lcs-serve", "one-at-a-time"):
                port = free_port()
                cmd, ready, extra = server(name, port)
                proc = subprocess.Popen(cmd, env={**env, "LCS_THREADS": str(threads[name]), **extra})
                try:
                    base = f"http://{HOST}:{port}"
                    wait_ready(base + ready, proc)
                    if name == "lcs-serve":
                        httpx.put(
                            base + "/admin/pin", json={"alpha": 1.0}, headers={"X-API-Key": "bench"}
                        ).raise_for_status()
                        if round_ == 0:
                            results["breakdown"] = time_breakdown(base, json.dumps(body).encode())
                    warm_up(base + "/predict", json.dumps(body).encode())
                    levels[name] = [
                        measured(proc, base + "/predict", script, c, args.duration) for c in args.connections
                    ]
                finally:
                    stop_server(proc)
            peaks = {name: max(r["ok_rps"] for r in rows) for name, rows in levels.items()}
            ratio = round(peaks["lcs-serve"] / peaks["one-at-a-time"], 2)
            results["rounds"].append({"levels": levels, "peak_rps": peaks, "peak_throughput_ratio": ratio})
    print(f"threads: ours {threads['lcs-serve']}, the plain server {threads['one-at-a-time']}")
    print(
        f"{'round':>5} | {'server':>14} | {'conns':>5} | {'req/s':>8} | {'p50 ms':>8} | {'p99 ms':>8} | "
        f"{'loop us/req':>11} | non-2xx"
    )
    for i, rnd in enumerate(results["rounds"]):
        for name, rows in rnd["levels"].items():
            for r in rows:
                loop = r.get("loop_us_per_request")
                print(
                    f"{i:>5} | {name:>14} | {r['connections']:>5} | {r['rps']:>8.0f} | {r['p50_ms']:>8.2f} | "
                    f"{r['p99_ms']:>8.2f} | {'-' if loop is None else f'{loop:.0f}':>11} | {r['non_2xx']}"
                )
    ratios = [rnd["peak_throughput_ratio"] for rnd in results["rounds"]]
    results["peak_throughput_ratio"] = statistics.median(ratios)  # the figure to quote, with the spread beside it
    for i, rnd in enumerate(results["rounds"]):
        peaks = rnd["peak_rps"]
        print(f"round {i}: peak {peaks['lcs-serve']:.0f} vs {peaks['one-at-a-time']:.0f} req/s = {ratios[i]:.2f}x")
    print(f"peak throughput ratio: median {results['peak_throughput_ratio']:.2f}x over {len(ratios)} rounds")
    print("where the time goes at low load (p50, ms):", results["breakdown"])
    write_json(args.json, results)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    command(main)
