"""Training on several processes with torchrun (torch.distributed): gloo on CPU, NCCL on GPUs.

    torchrun --standalone --nproc_per_node 2 -m training train configs/structured_line.yaml

Data parallel with the same *global* batch as one process: every rank draws the same per-epoch
permutation, alphas and augmentation (same seeds), builds the global batch of `batch_size` images and
keeps its own contiguous shard of `batch_size / world` (a DistributedSampler that also keeps the
augmentation RNG stream identical to a single process). Gradients are averaged by
DistributedDataParallel. With norm=group a step is then the single-process step up to floating-point
summation order (tests/training/test_distributed.py measures it). Not with the default norm=batch: in
training each rank normalises by the batch statistics of its own shard, not of the global batch (what
data-parallel BatchNorm without SyncBatchNorm does); nor with kind=quantized, whose activation ranges
each rank updates from its own shard and DDP re-broadcasts from rank 0 before every forward.
Rank 0 alone prints, writes the resumable state and the checkpoint; every rank resumes from the
same state file (a shared file system across nodes). The `threads` option counts a node's torch threads:
its processes share them (`Ranks.threads_each`).

Device: cuda:LOCAL_RANK when CUDA is available and this node has a GPU for each of its processes, else
the CPU for all of them (NCCL cannot take CPU ranks); CUDA_VISIBLE_DEVICES= keeps a run on the CPU.
Without torchrun (no RANK/WORLD_SIZE in the environment) or with one process there is no process group:
`wrap` returns the model itself and `shard` the batch itself (each moved to the GPU if one was chosen),
`no_sync` does nothing.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def pick_device(local_rank: int, local_world: int) -> torch.device:
    """cuda:<local rank> when there is a GPU for every one of the `local_world` processes on this node, else
    the CPU for all of them: NCCL takes neither CPU ranks nor two ranks on one GPU."""
    if torch.cuda.is_available() and local_world <= torch.cuda.device_count():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _use(device: torch.device) -> torch.device:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:  # not torchrun's: read as unset (Ranks.from_env's process group would refuse it)
        return default


def env_world() -> int:
    """How many processes torchrun's environment says the job has, 1 without torchrun."""
    return _env_int("WORLD_SIZE", 1) if "RANK" in os.environ else 1


def env_rank() -> int:
    """This process's rank as torchrun's environment gives it, 0 without torchrun: known before the process
    group exists, and where none ever will (a refused command line)."""
    return _env_int("RANK", 0) if env_world() > 1 else 0


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    local_world: int = 1  # processes on this node

    def threads_each(self, threads: int) -> int:
        """Torch threads for each process: the node's `threads` shared by its processes, at least 1. Each
        taking all of them (torchrun sets OMP_NUM_THREADS=1, and the option overrode it), two processes on two
        cores took 25-40 s an epoch of a 3,000-image subset, against 5-6 s."""
        return max(1, threads // self.local_world)

    def describe(self) -> str:
        """Where the training steps run, for the log and the checkpoint: 'cuda:0 (NVIDIA H200)' or 'cpu'."""
        if self.device.type == "cuda":
            return f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        return str(self.device)

    @property
    def main(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Ranks:
        """Join the torchrun job described by the environment, or a single process without one."""
        world = env_world()
        if world == 1:  # no torchrun, or torchrun with one process: no process group
            return cls(device=_use(pick_device(0, 1)))
        rank, local = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))  # torchrun sets it
        device = _use(pick_device(local, local_world))
        if device.type == "cpu" and torch.cuda.is_available() and local == 0:
            warnings.warn(
                f"{local_world} processes on this node but {torch.cuda.device_count()} GPU(s): every process "
                f"trains on the CPU; start at most {torch.cuda.device_count()} per node to use the GPUs",
                stacklevel=2,
            )
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
        return cls(rank, world, device, local_world)

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world:
            raise ValueError(
                f"batch_size {batch_size} is the global batch and must divide evenly over {self.world} "
                f"processes; use a multiple of {self.world}"
            )

    def wrap(self, model: nn.Module, opt: torch.optim.Optimizer) -> nn.Module:
        """The model moved to this rank's device (with the optimiser's resumed buffers), inside
        DistributedDataParallel when there are several processes."""
        if self.device.type != "cpu":  # the model is built and resumed on the CPU
            model.to(self.device)
            for state in opt.state.values():
                for k, v in state.items():
                    if isinstance(v, torch.Tensor):
                        state[k] = v.to(self.device)
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        # every parameter takes part in every forward (line endpoints are lerped at any alpha, slices
        # keep the whole tensor in the graph), so no search for unused parameters is needed; buffers
        # (activation ranges) follow rank 0 at each forward (DDP's default)
        # channels_last leaves a 1-input-channel conv weight with strides that differ from the bucket's
        # but address the same elements; DDP's warning about it is noise here
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        return DistributedDataParallel(model, device_ids=ids)

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch [B, ...] -> [B / world, ...] on its device."""
        if self.world == 1:
            return t.to(self.device)  # the batch itself on the CPU
        n = len(t) // self.world
        return t[self.rank * n : (self.rank + 1) * n].to(self.device)

    def no_sync(self, net: nn.Module, *, last: bool) -> AbstractContextManager[object]:
        """Gradient accumulation over several backward passes of one step (the sandwich rule): only
        the last backward all-reduces; the earlier ones add up locally."""
        if isinstance(net, DistributedDataParallel) and not last:
            return net.no_sync()
        return contextlib.nullcontext()

    def sum(self, *values: float) -> list[float]:
        """Sums of per-rank numbers across ranks (progress figures), or the numbers themselves."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        """Wait until every rank gets here. Before tearing the group down: a rank that destroyed it while
        rank 0 was still writing the checkpoint was once aborted by gloo ("terminate called without an
        active exception")."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
