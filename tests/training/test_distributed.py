"""torchrun with 2 local processes (gloo) against one process on the same global batch.

Why "within a tolerance" and not bit-for-bit: each rank computes the mean loss over its half of the
batch and DistributedDataParallel averages the two gradients, while one process averages over the whole
batch at once. The same numbers are summed in another order, so float32 rounding differs (~1e-7 per
step) and grows a little through the steps. Measured here: max |w_ddp - w_single| ~ 2.4e-7 after 16 steps.

The settings that make the two runs otherwise identical: norm=group (BatchNorm would normalise by each
rank's shard statistics in training, a genuinely different computation) and augment=false (not needed
for equality, since every rank augments the whole global batch, but it keeps the test about DDP).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lcs import checkpoint
from training.config import load_config
from training.train import train

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4  # max abs difference of any weight after 2 epochs (16 steps of a 32-image global batch)


@pytest.fixture(autouse=True)
def _cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both sides on the CPU, also on a machine with a GPU: one process would take cuda:0 while two
    processes (gloo) compute on the CPU, and the comparison would be about devices, not DDP."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def torchrun(overrides: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*cmd, "-m", "training", "train", *overrides],
        cwd=ROOT,
        env={**env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def max_diff(a: Path, b: Path) -> float:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    return max((ta[k].double() - tb[k].double()).abs().max().item() for k in ta if ta[k].is_floating_point())


def single(overrides: list[str]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        train(load_config(None, overrides), command="pytest single")
    return buf.getvalue()


@pytest.fixture
def common(image_folder: Path) -> dict[str, object]:
    return {"dataset": "folder", "data_dir": image_folder, "augment": "false", "norm": "group"}


def test_two_processes_match_one(
    tmp_path: Path, tiny_overrides: Callable[..., list[str]], common: dict[str, object]
) -> None:
    one = tmp_path / "single.safetensors"
    single(tiny_overrides(one, **common))
    two = tmp_path / "ddp.safetensors"
    run = torchrun(tiny_overrides(two, **common))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert max_diff(one, two) < TOLERANCE
    assert max_diff(one.with_name("single.state.safetensors"), two.with_name("ddp.state.safetensors")) < TOLERANCE
    assert run.stdout.count(f"wrote {two}") == 1  # rank 0 alone writes and reports
    assert run.stdout.count("epoch 2: train loss") == 1


@pytest.mark.parametrize(("threads", "local_world", "each"), [(2, 1, 2), (2, 2, 1), (1, 2, 1), (8, 3, 2), (4, 8, 1)])
def test_the_nodes_threads_are_shared_by_its_processes(threads: int, local_world: int, each: int) -> None:
    from training.distributed import Ranks

    assert Ranks(world=local_world, local_world=local_world).threads_each(threads) == each


def test_odd_global_batch_is_refused() -> None:
    from training.distributed import Ranks

    with pytest.raises(ValueError, match="multiple of 2"):
        Ranks(rank=0, world=2).check_batch(33)
    Ranks().check_batch(33)  # one process: any batch


@pytest.mark.parametrize(
    ("env", "gpus", "device", "backend"),
    [
        ({}, 0, "cpu", None),
        ({}, 1, "cuda:0", None),  # one process: trained on the CPU next to an idle GPU
        ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}, 1, "cuda:0", None),  # ditto
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, 2, "cuda:1", "nccl"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, 1, "cpu", "gloo"),  # cuda:1
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}, 1, "cpu", "gloo"),  # ...with it
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, 0, "cpu", "gloo"),
    ],
)
def test_device_choice(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], gpus: int, device: str, backend: str | None
) -> None:
    """A GPU per process on the node, or the CPU for all (a fake device count: there is no GPU here)."""
    import torch.distributed as dist

    from training.distributed import Ranks

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    chosen: list[torch.device] = []
    groups: list[tuple[str, int, int]] = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda b, rank, world_size: groups.append((b, rank, world_size)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ranks = Ranks.from_env()
    assert ranks.device == torch.device(device)
    assert chosen == ([torch.device(device)] if device.startswith("cuda") else [])
    world = int(env.get("WORLD_SIZE", "1"))
    assert groups == ([(backend, int(env["RANK"]), world)] if backend else [])
    assert (ranks.rank, ranks.world) == ((int(env["RANK"]), world) if backend else (0, 1))
    assert ranks.local_world == (int(env["LOCAL_WORLD_SIZE"]) if backend else 1)
    # more processes than GPUs: local rank 0 says why they all train on the CPU
    said = [str(w.message) for w in caught if "GPU(s)" in str(w.message)]
    assert len(said) == (1 if gpus and device == "cpu" and env.get("LOCAL_RANK") == "0" else 0)


def test_one_process_trains_on_its_device() -> None:
    """wrap and shard move the model, the resumed optimiser buffers and each batch to the chosen device, and
    leave them alone on the CPU. "meta" stands in for a GPU; the model records the move (a move to meta
    would replace its parameters, which a move to CUDA keeps)."""
    from training.distributed import Ranks

    moved: list[object] = []

    class Model(torch.nn.Linear):
        def to(self, *args: Any, **kwargs: Any) -> Model:
            moved.append(args[0])
            return self

    model = Model(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.state[model.weight]["momentum_buffer"] = torch.zeros(2, 3)
    x = torch.ones(4, 3)
    cpu = Ranks()
    assert cpu.wrap(model, opt) is model and cpu.shard(x) is x and moved == []
    meta = Ranks(device=torch.device("meta"))
    assert meta.wrap(model, opt) is model  # no DistributedDataParallel for one process
    assert moved == [torch.device("meta")] and meta.shard(x).device.type == "meta"
    assert opt.state[model.weight]["momentum_buffer"].device.type == "meta"


def test_describe_names_the_device_and_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The log line and the checkpoint say where the steps ran (a fake GPU name: there is no GPU here)."""
    from training.distributed import Ranks

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: f"Fake GPU {d.index}")
    assert Ranks().describe() == "cpu"
    assert Ranks(rank=1, world=2, device=torch.device("cuda", 1)).describe() == "cuda:1 (Fake GPU 1)"


@pytest.mark.slow
def test_resume_under_torchrun_continues_a_single_process_run(
    tmp_path: Path, tiny_overrides: Callable[..., list[str]], common: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted after epoch 1 in one process, finished by 2 processes: same weights as one uninterrupted run."""
    import training.train as tt

    full = tmp_path / "full.safetensors"
    single(tiny_overrides(full, **common))

    resumed = tmp_path / "resumed.safetensors"
    save = tt._save_state

    class Interrupted(Exception):
        pass

    def save_then_stop(*args: object, **kwargs: object) -> None:
        save(*args, **kwargs)  # type: ignore[arg-type]
        raise Interrupted

    monkeypatch.setattr(tt, "_save_state", save_then_stop)
    with pytest.raises(Interrupted):
        single(tiny_overrides(resumed, **common))
    monkeypatch.undo()
    assert not resumed.exists() and resumed.with_name("resumed.state.safetensors").is_file()

    run = torchrun(tiny_overrides(resumed, **common, threads=2))  # threads may change on resuming
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "resuming" in run.stdout and "epoch 1: train loss" not in run.stdout
    assert "2 process(es), 1 CPU threads each" in run.stdout  # the node's 2 shared (each took both: 5x slower)
    assert max_diff(full, resumed) < TOLERANCE
    runs = checkpoint.read_meta(resumed).training["runs"]
    assert [(r["epochs"], r["processes"], r["threads"]) for r in runs] == [([1, 1], 1, 1), ([2, 2], 2, 1)]


@pytest.mark.parametrize(("rank", "world", "expected"), [("1", "2", 1), ("x", "2", 0), ("1", "two", 0), ("1", "1", 0)])
def test_env_rank_reads_torchruns_environment_and_nothing_else(
    rank: str, world: str, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A RANK that is no number (another tool's variable) raised ValueError inside the error handler."""
    from training.distributed import env_rank

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world)
    assert env_rank() == expected
