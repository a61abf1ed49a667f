"""Helpers for the service tests: tiny real checkpoints (one per compression kind) and in-process apps.

Almost everything runs in this process: TestClient (which runs the lifespan) or httpx over ASGITransport
with the lifespan entered by hand. The exception is `real_server`, for the slow tests that need a real
uvicorn on 127.0.0.1 (signals, HTTP framing). The only waiting is bounded polling for conditions that
another thread or process makes true (the warm-up task, the batcher picking up work, a server starting).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lcs import checkpoint
from lcs.alpha import Schedule
from lcs.checkpoint import CheckpointMeta
from lcs.layers import Setting
from lcs.models import SubspaceResNet, build_model
from service.app import State, create_app
from service.settings import Settings

IMAGE = 12  # test images are IMAGE x IMAGE grayscale
CLASSES = ["zero", "one", "two", "three"]
GRID = (0.0, 0.5, 1.0)  # statistics grid: widths 0.25/0.625/1, sparsity 97.5/48.75/0 %, 3/6/8 bits
MEAN, STD = 0.5, 0.25
ACCURACY = {0.0: 61.5, 0.5: 74.25, 1.0: 88.0}  # made-up "measured" accuracy per alpha, distinct on purpose
# The tiny models are untrained, so their sample images score ~10 % against these made-up accuracies: the
# start-up self-check (LCS_SELF_CHECK_MARGIN) is off for them unless a test turns it on.
SELF_CHECK_OFF = 100.0


@dataclass(frozen=True)
class TinyCheckpoint:
    path: Path
    model: SubspaceResNet  # the training-side model that was saved (eval mode)
    meta: CheckpointMeta
    samples: torch.Tensor  # uint8 [N, C, IMAGE, IMAGE], as stored in the checkpoint

    @property
    def kind(self) -> str:
        return self.meta.kind


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8/float pixels 0-255 -> the model's input space, as the service does."""
    return (images.float() / 255.0 - MEAN) / STD


def random_images(n: int, seed: int, channels: int = 1) -> torch.Tensor:
    """uint8 [n, channels, IMAGE, IMAGE] noise images."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, IMAGE, IMAGE), generator=g, dtype=torch.uint8)


def make_checkpoint(directory: Path, kind: str, *, seed: int = 0, channels: int = 1) -> TinyCheckpoint:
    """A tiny_resnet line subspace of `kind` for `channels`-channel images, settled like training leaves it,
    saved with samples (as tiny_{kind}.safetensors; tiny_{kind}_3ch.safetensors for 3 channels)."""
    torch.manual_seed(seed)
    model = build_model(
        "tiny_resnet",
        in_channels=channels,
        num_classes=len(CLASSES),
        line=True,
        norm="batch",
        stat_alphas=GRID,
        schedule=Schedule(kind),  # type: ignore[arg-type]
    )
    with torch.no_grad():  # norm scales/shifts and biases away from 1/0, so folding and slicing them matters
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5) if name.rsplit(".", 1)[1].startswith("weight") else p.uniform_(-0.5, 0.5)
    batches = [normalise(random_images(32, seed=seed * 100 + i, channels=channels)) for i in range(4)]
    with torch.no_grad():
        model.train()  # activation ranges (ActRange) are only recorded in train mode
        for a, x in zip((0.0, 0.5, 1.0, 0.2), batches, strict=True):
            model(x, Setting(a, model.schedule.level(a)))
        model.eval()
        for row, a in enumerate(model.stat_alphas):  # BatchNorm statistics per grid row, as training does
            for n in range(2):
                model(batches[n], Setting(a, model.schedule.level(a), stats=row, calibrate=n))
    meta = CheckpointMeta(
        arch=checkpoint.Arch(name="tiny_resnet"),
        kind=kind,  # type: ignore[arg-type]
        subspace="line",
        schedule=model.schedule.to_dict(),
        norm="batch",
        stat_alphas=list(model.stat_alphas),
        input=checkpoint.InputSpec(
            channels=channels, height=IMAGE, width=IMAGE, mean=[MEAN] * channels, std=[STD] * channels
        ),
        classes=CLASSES,
        dataset="synthetic",
        accuracy=[
            checkpoint.AccuracyPoint(alpha=a, level=model.schedule.level(a).value, accuracy=ACCURACY[a]) for a in GRID
        ],
        training={"command": "tests/service/conftest.py", "train_seconds": 0.0},
    )
    samples = random_images(64, seed=seed + 7, channels=channels)
    labels = torch.arange(64) % len(CLASSES)
    path = directory / f"tiny_{kind}{'' if channels == 1 else f'_{channels}ch'}.safetensors"
    checkpoint.save(path, model, meta, samples=(samples, labels))
    return TinyCheckpoint(path, model, meta, samples)


def make_settings(path: Path, **overrides: Any) -> Settings:
    """Small, quiet settings: the controller loop never fires during a test (its interval is an hour),
    so the ceiling moves only when a test moves it."""
    base: dict[str, Any] = {
        "checkpoint": path,
        "threads": 1,
        "profile_batches": [1, 4],
        "max_batch": 8,
        "max_wait_ms": 1.0,
        "channels_last": "off",
        "control_interval_seconds": 3600.0,
        "drain_seconds": 2.0,
        # not one of the default bucket edges, so the SLO bucket is visible; seconds, so that a machine that
        # stalls for a tenth of one does not refuse (predicted late) a request a test expects admitted
        "slo_p99_seconds": 2.0,
        "self_check_margin": SELF_CHECK_OFF,
    }
    return Settings(**{**base, **overrides})


def post_scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """An ASGI HTTP scope for a POST to `path` with JSON content, for calling an app without a client."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"lcs.test"), (b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }


def wait_for(condition: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll until `condition()` holds (another thread makes it true), failing after `timeout` s."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


@contextlib.contextmanager
def serve(settings: Settings, *, ready: bool = True, **app_kwargs: Any) -> Iterator[TestClient]:
    """A TestClient over create_app(settings) with its lifespan running; waits for /readyz if `ready`."""
    with TestClient(create_app(settings, **app_kwargs)) as client:
        if ready:
            wait_for(lambda: client.get("/readyz").status_code == 200, what="/readyz")
        yield client


def app_state(client: TestClient | FastAPI) -> State:
    app = client.app if isinstance(client, TestClient) else client
    return app.state.lcs  # type: ignore[union-attr,no-any-return]


def control_step(client: TestClient, now: float) -> None:
    """One control step at `now`, on the app's own event loop, as its control loop runs them."""
    assert client.portal is not None, "inside `with serve(...)`"
    client.portal.call(app_state(client).control_step, now)


@contextlib.asynccontextmanager
async def serve_async(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, State]]:
    """httpx.AsyncClient over ASGITransport, in the current event loop, with the app's lifespan entered
    by hand (ASGITransport does not run it); waits until ready."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://lcs.test") as client:
            end = time.monotonic() + 15.0
            while (await client.get("/readyz")).status_code != 200:
                assert time.monotonic() < end, "warm-up did not finish"
                await asyncio.sleep(0.005)
            yield client, app.state.lcs


@contextlib.contextmanager
def paused(state: State) -> Iterator[threading.Event]:
    """Occupy the app's single inference thread until the block ends (or the event is set), so that
    requests pile up in the queue deterministically."""
    gate = threading.Event()
    state.executor.submit(gate.wait, 30.0)
    try:
        yield gate
    finally:
        gate.set()


async def one_running_one_queued(
    client: httpx.AsyncClient, state: State, body: dict[str, Any]
) -> tuple[asyncio.Task[httpx.Response], asyncio.Task[httpx.Response]]:
    """With the model `paused`: post `body` twice and return once the first is taken for computing and the
    second waits in the queue (a full queue when LCS_QUEUE_MAX is 1)."""
    first = asyncio.create_task(client.post("/predict", json=body))
    await until(lambda: state.batcher.running == 1, what="the first request to be taken")
    second = asyncio.create_task(client.post("/predict", json=body))
    await until(lambda: state.batcher.depth == 1, what="the second request to queue")
    return first, second


async def until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Yield to the event loop until `condition()` holds, failing after `timeout` s."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


def image_list(x: torch.Tensor) -> list[list[float]]:
    """One [IMAGE, IMAGE] image tensor -> nested list for a JSON body."""
    return x.reshape(IMAGE, IMAGE).tolist()


ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RealServer:
    proc: subprocess.Popen[bytes]
    base_url: str
    log: Path  # the server's stdout and stderr

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])


@contextlib.contextmanager
def real_server(checkpoint: Path, log_dir: Path, timeout: float = 120.0, **env: str) -> Iterator[RealServer]:
    """`python -m service` on a free 127.0.0.1 port with quiet test settings plus `env` (LCS_* names);
    yields once /readyz answers 200 and kills the process on the way out if it is still running."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("LCS_")}
    base["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), base.get("PYTHONPATH", "")] if p)
    defaults = {
        "LCS_CHECKPOINT": str(checkpoint),
        "LCS_HOST": "127.0.0.1",
        "LCS_PORT": str(port),
        "LCS_THREADS": "1",
        "LCS_PROFILE_BATCHES": "1 4",
        "LCS_CHANNELS_LAST": "off",
        "LCS_LOG_LEVEL": "info",
        "LCS_SELF_CHECK_MARGIN": str(SELF_CHECK_OFF),
    }
    log = log_dir / f"server-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=ROOT, env={**base, **defaults, **env}, stdout=out, stderr=out
        )
    server = RealServer(proc, f"http://127.0.0.1:{port}", log)
    try:
        end = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(server.base_url + "/readyz", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise AssertionError(f"server not ready after {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
