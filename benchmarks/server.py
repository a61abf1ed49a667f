"""The service a benchmark runs against: `python -m service` started on a free port of 127.0.0.1 (HOST), used
once it answers its readiness path, and stopped on the way out, whatever stops the benchmark."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from benchmarks.openloop import HOST


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    """Return once `url` answers 200; SystemExit if `proc` exits first or `timeout` seconds pass."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before becoming ready ({url})")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready after {timeout} s")


def start_server(checkpoint: str, port: int, slo: float, **env: str) -> subprocess.Popen[bytes]:
    """`python -m service` on `checkpoint` at HOST:`port` with the SLO `slo`, ready. The caller's `LCS_`
    settings are dropped, `env`'s added."""
    full = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LCS_")},
        "LCS_CHECKPOINT": checkpoint,
        "LCS_HOST": HOST,
        "LCS_PORT": str(port),
        "LCS_LOG_LEVEL": "warning",
        "LCS_SLO_P99_SECONDS": str(slo),
        **env,
    }
    proc = subprocess.Popen([sys.executable, "-m", "service"], env=full)
    try:
        wait_ready(f"http://{HOST}:{port}/readyz", proc)
    except BaseException:  # not ready in time, or Ctrl-C while starting: the caller never gets it to stop
        stop_server(proc)
        raise
    return proc


def stop_server(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM (the service drains), then SIGKILL if it has not exited within 30 s; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
    return proc.returncode
