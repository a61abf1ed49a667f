"""The LCS training loop, top to bottom in execution order.

    data -> subspace model -> for each step: sample alpha(s), compress at alpha, loss, backprop
         -> BatchNorm statistics per grid alpha -> test accuracy per grid alpha -> checkpoint

Resumable: the model, optimiser buffers and RNG are saved every epoch beside the checkpoint, as
`<out's stem>.state.safetensors` (`TrainConfig.state_path`; safetensors, no pickle); re-running the
same command continues from the last finished epoch (options that leave the training steps alone,
config.RESUME_MAY_CHANGE, may differ).

Several processes: `torchrun --nproc_per_node N -m training train ...` trains data-parallel on the same
global batch (training/distributed.py); rank 0 prints and writes every file.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from tqdm import tqdm

from lcs import checkpoint
from lcs.layers import Setting
from lcs.models import SubspaceResNet
from lcs.paths import WriteError, check_writable
from training.config import TrainConfig
from training.data import (
    DataError,
    Dataset,
    Split,
    check_dataset,
    hold_out,
    load_dataset,
    reads_file,
    training_batch,
)
from training.distributed import Ranks
from training.evaluate import accuracy, accuracy_table, calibrate, recorded_data_dir, trained_dataset


def sample_alphas(cfg: TrainConfig, rng: random.Random) -> list[float]:
    """The alphas one step trains: the baseline's fixed alpha, the structured sandwich, or one sample
    biased to the ends (a share `end_bias` of samples at exactly 0 or 1, the rest uniform)."""
    if cfg.fixed_alpha is not None:
        return [cfg.fixed_alpha]
    if cfg.kind == "structured" and cfg.sandwich:
        return [0.0, 1.0, rng.random(), rng.random()]
    u = rng.random()
    if u < cfg.end_bias:
        return [0.0 if u < cfg.end_bias / 2 else 1.0]
    return [rng.random()]


def compression_alpha(alpha: float, progress: float, warmup_fraction: float) -> float:
    """Gradual schedule: over the first `warmup_fraction` of training the compression applied at alpha
    is phased in from none (alpha' = 1) to the full level (alpha' = alpha)."""
    ramp = 1.0 if warmup_fraction == 0 else min(1.0, progress / warmup_fraction)
    if ramp == 1.0:  # exactly alpha: 1 - (1 - a) can round below a level boundary (e.g. a = 1/6 -> 3 bits, not 4)
        return alpha
    return 1.0 - ramp * (1.0 - alpha)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up for `warmup` steps, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def warmup_steps(steps_per_epoch: int, total: int) -> int:
    """One epoch of warm-up, but at most half of all steps: with epochs=1 a whole epoch of warm-up left no
    steps to decay over, and the run ended at the peak learning rate. Two or more epochs: one epoch."""
    return min(steps_per_epoch, total // 2)


def sample_images(split: Split, seed: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random subset of training images that travels in the checkpoint (calibration, self-test)."""
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n]
    return split.images[idx].clone(), split.labels[idx].clone()


def check_out(cfg: TrainConfig) -> None:
    """Refuse a checkpoint location that cannot be written before training rather than after it (the
    whole run was lost): a directory, a path under a regular file, a place where no file can be created,
    an existing file that is not a regular one (writing renames over it: out=/dev/null replaced /dev/null), a
    file the dataset is read from, or would be (out= naming one of its images replaced it with the checkpoint)."""
    out = Path(cfg.out)
    for path in (out, cfg.state_path) if out.name else (out,):  # "." has no name, hence no state path
        check_writable(path, option="out", shown=f"out={cfg.out}", example=f"out={out / 'model.safetensors'}")
        if path.exists() and not path.is_file():
            raise ValueError(f"out={cfg.out}: {path} exists and is not a regular file; choose another place for out")
        if reads_file(cfg.dataset, cfg.data_dir, path):  # not any file under its folder: a rerun finds its own
            raise ValueError(
                f"out={cfg.out}: {path} is a file of the {cfg.dataset} dataset this run reads; choose another place "
                "for out"
            )


class SaveError(WriteError):
    """A file training writes could not be written; the message also says how to resume."""


def saved_epoch(cfg: TrainConfig) -> int | None:
    """The epochs done according to the state file on disk (what a rerun resumes from); None if none can be read."""
    try:
        with safe_open(str(cfg.state_path), framework="pt") as f:
            return int(f.metadata()["epoch"])
    except (SafetensorError, OSError, KeyError, TypeError, ValueError):
        return None


def resume_point(cfg: TrainConfig) -> str:
    """What a rerun of the same command starts from, in words."""
    done = saved_epoch(cfg)
    return "no epoch finished yet" if done is None else f"state saved after epoch {done}"


def _cause(e: Exception) -> str:
    """An OSError's strerror, or the OS message inside safetensors' SafetensorError (safetensors 0.4:
    'Error while serializing: I/O error: No space left on device (os error 28)'; older: '... message: "No
    space left on device" })'), else the error's text."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    text = str(e)
    found = re.search(r'message: "([^"]+)"', text) or re.search(r"I/O error: (.+?) \(os error \d+\)", text)
    return found.group(1) if found else text


@contextlib.contextmanager
def _writing(path: Path, cfg: TrainConfig) -> Iterator[None]:
    """Turn a failed write (safetensors' SafetensorError or an OSError: a full disk) into SaveError. The
    files are written to a temporary name and then renamed, so the state of the last finished epoch
    survives, and the same command resumes from it."""
    try:
        yield
    except (SafetensorError, OSError) as e:
        cause = _cause(e)
        fix = "free space" if "space" in cause.lower() else "fix that"
        raise SaveError(
            f"{path}: cannot write it ({cause}); {fix} and rerun the same command to resume ({resume_point(cfg)})"
        ) from None


def _save_state(
    cfg: TrainConfig,
    model: SubspaceResNet,
    opt: torch.optim.SGD,
    epoch: int,
    rng: random.Random,
    elapsed: float,
    runs: list[dict[str, object]],
) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"optim.{i}"] = buf.cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "epoch": str(epoch),
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
        "python_rng": json.dumps(rng.getstate()[1]),
        "elapsed": str(elapsed),
        "runs": json.dumps(runs),
    }
    with _writing(cfg.state_path, cfg):
        cfg.state_path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_tensors(cfg.state_path, tensors, meta)  # after a failure, no half-written file


def _load_state(
    cfg: TrainConfig, model: SubspaceResNet, opt: torch.optim.SGD, rng: random.Random
) -> tuple[int, float, list[dict[str, object]]]:
    """Resume from the state file if there is one: returns (epochs done, seconds spent so far, where they ran:
    `_run`'s records; a state saved before they were kept gives one record of its epochs alone)."""
    path = cfg.state_path
    if not path.is_file():
        return 0, 0.0, []
    if not os.access(path, os.R_OK):  # safetensors reports it as missing, and it is not damaged: keep it
        raise ValueError(f"{path}: not readable by this process (uid {os.getuid()}); make it readable to resume")
    damaged = (
        f"{path}: not a readable training state ({{}}); it is damaged (cut short by a full disk or a copy?): "
        "delete it to start over"
    )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        saved, epoch, elapsed = json.loads(meta["config"]), int(meta["epoch"]), float(meta.get("elapsed", 0))
        if not isinstance(saved, dict) or epoch < 0 or not 0 <= elapsed < math.inf:
            raise ValueError(f"config a {type(saved).__name__}, epoch {epoch}, elapsed {elapsed}")
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as e:  # TypeError: no metadata at all
        raise ValueError(damaged.format(e)) from None
    conflicts = cfg.resume_conflicts(saved)
    if conflicts:
        raise ValueError(
            f"{path}: saved by a run with other training options ({'; '.join(conflicts)}); rerun with the "
            "state's values to resume, or delete it to start over"
        )
    try:
        tensors = load_file(str(path))
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        for i, p in enumerate(model.parameters()):
            if (buffer := tensors.get(f"optim.{i}")) is not None:
                if buffer.shape != p.shape:  # else SGD's traceback at the first step
                    raise ValueError(f"optim.{i} is shaped {list(buffer.shape)}, its weight {list(p.shape)}")
                opt.state[p]["momentum_buffer"] = buffer
        torch.set_rng_state(tensors["rng.torch"])
        rng.setstate((3, tuple(json.loads(meta["python_rng"])), None))
        if broken := [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]:
            raise ValueError(f"{broken[0]} holds NaN or Inf")
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(damaged.format(e)) from None
    return epoch, elapsed, _saved_runs(meta.get("runs"), epoch)


def _saved_runs(text: str | None, epoch: int) -> list[dict[str, object]]:
    """The state's `_run` records; where it has none that read as such (a state saved before they were kept,
    or a damaged entry: the weights may be sound, and it records nothing they depend on), one record of its
    epochs alone."""
    try:
        runs = json.loads(text) if text is not None else None
    except ValueError:
        runs = None
    if isinstance(runs, list) and all(
        isinstance(r, dict) and isinstance(r.get("epochs"), list) and len(r["epochs"]) == 2 for r in runs
    ):
        return runs
    return [{"epochs": [1, epoch]}] if epoch else []


def _run(ranks: Ranks, threads: int, first: int, last: int) -> dict[str, object]:
    """Where epochs `first`..`last` (1-based) ran, for the state and the checkpoint's `training.runs`: a run
    resumed with another process count or device is trained by several."""
    return {"epochs": [first, last], "device": ranks.describe(), "processes": ranks.world, "threads": threads}


def train(cfg: TrainConfig, *, command: str, data: Dataset | None = None) -> Path:
    """Train, calibrate, evaluate and write the checkpoint `cfg.out`; returns its path. `command` is recorded
    in the checkpoint as the command that trained it. Under torchrun, every rank calls this; rank 0 writes
    the files."""
    ranks = Ranks.from_env()  # one process (rank 0 of 1) unless started by torchrun
    try:
        out = _train(cfg, ranks, data=data, command=command)
        ranks.barrier()  # the others wait while rank 0 writes, so no rank tears the group down under another
        return out
    finally:
        ranks.close()


def _train(cfg: TrainConfig, ranks: Ranks, *, data: Dataset | None, command: str) -> Path:
    ranks.check_batch(cfg.batch_size)
    check_out(cfg)
    threads = ranks.threads_each(cfg.threads)
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # denormal activations made fake-quantised layers 10-100x slower here
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    data = load_dataset(cfg.dataset, cfg.data_dir) if data is None else check_dataset(data)  # before any step
    train_split, val_split = hold_out(data.train, cfg.val_size, cfg.seed)
    n_img, c, h, w = train_split.images.shape
    steps_per_epoch = n_img // cfg.batch_size  # drop the last partial batch
    if steps_per_epoch == 0:  # this once wrote an untrained checkpoint and exited 0
        raise ValueError(
            f"batch_size={cfg.batch_size} and val_size={cfg.val_size} leave no training step: {data.name} has "
            f"{len(data.train)} training images, {n_img} after holding out val_size; lower batch_size or val_size"
        )
    mean, std = data.mean_std()
    if 0.0 in std:  # normalising divides by it: every loss NaN, and the checkpoint refused after the run
        where = f"{cfg.dataset} in {cfg.data_dir}" if cfg.data_dir else data.name
        raise DataError(
            f"{where}: every training pixel of channel {std.index(0.0)} has the same value; normalising divides "
            "by their spread, 0: these are not the images meant (float pixels in 0..1 read as bytes?)"
        )

    model = cfg.model(c, len(data.classes))
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)  # type: ignore[call-overload]
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]  # no weight decay on norms and biases
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=True,
    )
    total = steps_per_epoch * cfg.epochs
    warmup = warmup_steps(steps_per_epoch, total)
    start_epoch, elapsed, runs = _load_state(cfg, model, opt, rng)  # every rank reads the same state file
    trained = runs  # `_run` records of every epoch trained so far (the state's, then this call's)
    if ranks.main:
        each = " each" if ranks.world > 1 else ""
        print(f"training on {ranks.describe()}, {ranks.world} process(es), {threads} CPU threads{each}", flush=True)
        if start_epoch:
            print(f"resuming {cfg.out} after epoch {start_epoch}/{cfg.epochs}", flush=True)
    net = ranks.wrap(model, opt)  # DistributedDataParallel under torchrun; the model itself otherwise

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # same order on resume
        perm = torch.randperm(n_img, generator=g)
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            file=sys.stdout,
            mininterval=1.0 if sys.stdout.isatty() else 30.0,
            ncols=110,
            disable=not ranks.main,
        )
        seen = correct = 0  # at the accurate end (alpha 1, or a baseline's alpha)
        loss_sum = 0.0
        # and at every alpha sampled, summed on the device (no sync a step): with end_bias=0 and no sandwich rule
        # no step samples alpha 1, and the epoch's line said "train loss 0.0000 acc 0.00"
        seen_all, correct_all, loss_all = 0, torch.zeros((), device=ranks.device), torch.zeros((), device=ranks.device)
        for i in bar:
            step = epoch * steps_per_epoch + i
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, warmup, cfg.lr)
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            # augmented as the whole global batch on every rank: one RNG stream, as one process
            x = training_batch(train_split.images[idx], mean, std, g if cfg.augment else None)
            x = x.contiguous(memory_format=memory_format)
            y = train_split.labels[idx]
            x, y = ranks.shard(x), ranks.shard(y)  # [B / world, C, H, W]: this rank's share

            opt.zero_grad(set_to_none=True)
            progress = step / total
            alphas = sample_alphas(cfg, rng)  # the same on every rank (same seed, same draws)
            for j, alpha in enumerate(alphas):  # several alphas: gradients add up (sandwich rule)
                level = cfg.schedule().level(compression_alpha(alpha, progress, cfg.warmup_fraction))
                s = Setting(alpha, level, quantize_acts=step >= cfg.act_quant_warmup)
                with ranks.no_sync(net, last=j == len(alphas) - 1):  # one all-reduce per step, after the last
                    logits = net(x, s)
                    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                    loss.backward()
                hits = (logits.argmax(1) == y).sum()
                seen_all += len(y)
                correct_all += hits
                loss_all += loss.detach() * len(y)
                if alpha == 1.0 or cfg.fixed_alpha is not None:  # report the accurate end
                    correct += int(hits)
                    seen += len(y)
                    loss_sum += loss.item() * len(y)
            if model.line and cfg.beta > 0:  # the same on every rank: needs no all-reduce
                (cfg.beta * model.subspace_cos2()).backward()  # keeps the endpoints apart
            opt.step()
            if seen:
                bar.set_postfix(
                    loss=f"{loss_sum / seen:.3f}",
                    acc=f"{100 * correct / seen:.1f}",
                    lr=f"{opt.param_groups[0]['lr']:.3f}",
                    refresh=False,
                )
        bar.close()
        elapsed += time.perf_counter() - t0
        sums = ranks.sum(seen, correct, loss_sum, seen_all, float(correct_all), float(loss_all))  # all ranks' shards
        n_seen, n_correct, loss_total = sums[:3] if sums[0] else sums[3:]
        if not math.isfinite(loss_total):  # every rank has the same sums: all stop here, the last state kept
            over = f"delete {cfg.state_path} and start over" if cfg.state_path.exists() else "start over"
            raise ValueError(
                f"epoch {epoch + 1}: the training loss is {loss_total}: the run diverged (not saved; kept: "
                f"{resume_point(cfg)}); lower lr ({cfg.lr:g}), beta ({cfg.beta:g}) or weight_decay "
                f"({cfg.weight_decay:g}), {over}"
            )
        if not ranks.main:
            continue
        over = "" if sums[0] else ", over the alphas sampled, none of them 1"
        line = (
            f"epoch {epoch + 1}: train loss {loss_total / max(1, n_seen):.4f} "
            f"acc {100 * n_correct / max(1, n_seen):.2f} "
            f"({time.perf_counter() - t0:.0f} s{over})"
        )
        if len(val_split):
            torch.set_num_threads(cfg.threads)  # the node's: rank 0 alone evaluates, the others wait for it
            vm = model if ranks.device.type == "cpu" else copy.deepcopy(model).cpu()  # evaluation runs on CPU
            calibrate(vm, train_split.images, mean, std, batches=5, batch_size=cfg.batch_size, seed=epoch)
            line += " | val " + " ".join(
                f"a={a:g}:{accuracy(vm, val_split, mean, std, a, cfg.eval_batch_size):.2f}"
                for a in (vm.stat_alphas[0], vm.stat_alphas[-1])
            )
            torch.set_num_threads(threads)
        print(line, flush=True)
        trained = [*runs, _run(ranks, threads, start_epoch + 1, epoch + 1)]
        _save_state(cfg, model, opt, epoch + 1, rng, elapsed, trained)

    if not ranks.main:
        return Path(cfg.out)  # rank 0 calibrates, evaluates and writes the checkpoint
    torch.set_num_threads(cfg.threads)  # the node's: the other processes are done
    model = model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    if ranks.device.type != "cpu":
        model = model.cpu()
    calibrate(model, train_split.images, mean, std, batches=cfg.calib_batches, batch_size=cfg.batch_size, seed=cfg.seed)
    table = accuracy_table(model, data.test, mean, std, list(model.stat_alphas), cfg.eval_batch_size)
    last = trained[-1]  # where the last epochs ran (a finished run again trains none here)
    meta = checkpoint.CheckpointMeta(
        arch=checkpoint.Arch(name=cfg.arch, kwargs=dict(cfg.arch_kwargs)),
        kind=cfg.kind,
        subspace=cfg.subspace,
        schedule=cfg.schedule().to_dict(),
        norm=cfg.norm,  # type: ignore[arg-type]
        stat_alphas=list(model.stat_alphas),
        fixed_alpha=cfg.fixed_alpha,
        input=checkpoint.InputSpec(channels=c, height=h, width=w, mean=mean, std=std),
        classes=data.classes,
        dataset=data.name,
        split="test",
        accuracy=[checkpoint.AccuracyPoint(**p) for p in table],
        training={
            "command": command,
            "config": cfg.to_dict(),
            "train_seconds": round(elapsed, 1),
            # where the last epochs ran (rank 0's device; under torchrun every rank has its own of the same kind)
            "device": last.get("device", "unknown"),
            "processes": last.get("processes", "unknown"),
            "runs": trained,
            "torch": torch.__version__,
        },
    )
    with _writing(Path(cfg.out), cfg):
        checkpoint.save(cfg.out, model, meta, samples=sample_images(train_split, cfg.seed))
    for p in table:
        print(f"alpha {p['alpha']:.3f}  level {p['level']:>7g}  test accuracy {p['accuracy']:.2f} %", flush=True)
    print(f"wrote {cfg.out}", flush=True)
    return Path(cfg.out)


def attach_samples(path: Path | str, data_dir: str | None = None) -> None:
    """Add the sample images `train` stores today to a checkpoint written before checkpoints carried them,
    drawn from its training split (`data_dir`, else the one it recorded; see trained_dataset)."""
    model, meta = checkpoint.load(path)
    check_writable(
        Path(path),
        option="the checkpoint",
        shown=f"samples {path}",
        example=f"samples {Path(path) / 'model.safetensors'}",
    )
    val_size, seed = (_recorded_count(path, meta, key) for key in ("val_size", "seed"))
    data = trained_dataset(path, meta, data_dir)
    train_split, _ = hold_out(data.train, val_size, seed)
    if not len(train_split):  # 0 samples is a checkpoint without them: its start-up self-check would be skipped
        raise DataError(
            f"{data_dir or recorded_data_dir(path, meta) or meta.dataset}: {len(data.train)} training images, "
            f"none left beside the {val_size} {path} held out for validation; pass --data-dir with the dataset it "
            "was trained on"
        )
    checkpoint.save(path, model, meta, samples=sample_images(train_split, seed))


def _recorded_count(path: Path | str, meta: checkpoint.CheckpointMeta, key: str) -> int:
    """A whole-number training option the checkpoint recorded (training.config), 0 if it recorded none."""
    config = meta.training.get("config", {})
    if not isinstance(config, dict):
        raise checkpoint.CheckpointError(
            f"{path}: field 'training.config' is {type(config).__name__}, not the training options; the file was edited"
        )
    value = config.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise checkpoint.CheckpointError(
            f"{path}: field 'training.config.{key}' is {value!r}, not a whole number (0 or more); the file was edited"
        )
    return value
