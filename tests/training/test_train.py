"""The training loop: alpha sampling, schedules, and real (tiny) end-to-end runs with resume."""

from __future__ import annotations

import itertools
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lcs import checkpoint
from lcs.layers import Setting
from training import train as train_module
from training.config import TrainConfig, load_config
from training.data import DataError, Dataset, Split
from training.train import compression_alpha, lr_at, sample_alphas, train, warmup_steps

# -- alpha sampling --------------------------------------------------------------------------------


def test_sandwich_trains_both_ends_and_two_random_widths() -> None:
    cfg = TrainConfig(kind="structured", sandwich=True)
    rng = random.Random(0)
    seen = []
    for _ in range(200):
        alphas = sample_alphas(cfg, rng)
        assert len(alphas) == 4 and alphas[:2] == [0.0, 1.0]
        assert all(0.0 <= a < 1.0 for a in alphas[2:])
        seen += alphas[2:]
    assert min(seen) < 0.05 and max(seen) > 0.95  # the random pair covers the range


def test_sandwich_off_samples_one_alpha() -> None:
    cfg = TrainConfig(kind="structured", sandwich=False)
    assert len(sample_alphas(cfg, random.Random(0))) == 1


@pytest.mark.parametrize("end_bias", [0.0, 0.5, 0.8])
@pytest.mark.parametrize("kind", ["unstructured", "quantized"])
def test_end_bias_share_of_samples_at_the_ends(kind: str, end_bias: float) -> None:
    cfg = TrainConfig(kind=kind, end_bias=end_bias)
    rng = random.Random(1)
    n = 20_000
    samples = [a for _ in range(n) for a in sample_alphas(cfg, rng)]
    assert len(samples) == n and all(0.0 <= a <= 1.0 for a in samples)
    zeros, ones = samples.count(0.0) / n, samples.count(1.0) / n
    assert zeros == pytest.approx(end_bias / 2, abs=0.015)
    assert ones == pytest.approx(end_bias / 2, abs=0.015)
    interior = [a for a in samples if 0.0 < a < 1.0]
    if interior:  # the rest is uniform: mean 1/2, a quarter below 0.25
        assert sum(interior) / len(interior) == pytest.approx(0.5, abs=0.02)
        assert sum(a < 0.25 for a in interior) / len(interior) == pytest.approx(0.25, abs=0.02)


@pytest.mark.parametrize("kind", ["unstructured", "structured", "quantized"])
def test_fixed_alpha_is_always_sampled(kind: str) -> None:
    cfg = TrainConfig(kind=kind, fixed_alpha=0.35)
    rng = random.Random(0)
    assert all(sample_alphas(cfg, rng) == [0.35] for _ in range(50))


def test_sampling_is_reproducible_from_the_seed() -> None:
    cfg = TrainConfig(kind="unstructured")
    a = [sample_alphas(cfg, random.Random(5)) for _ in range(3)]
    b = [sample_alphas(cfg, random.Random(5)) for _ in range(3)]
    assert a == b


# -- schedules -------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_compression_alpha_ramp(alpha: float) -> None:
    assert compression_alpha(alpha, 0.0, 0.8) == 1.0  # no compression at the start
    assert compression_alpha(alpha, 0.4, 0.8) == pytest.approx(1.0 - 0.5 * (1.0 - alpha))  # half-way
    assert compression_alpha(alpha, 0.8, 0.8) == pytest.approx(alpha)  # fully phased in
    assert compression_alpha(alpha, 0.95, 0.8) == pytest.approx(alpha)
    assert compression_alpha(alpha, 0.0, 0.0) == alpha  # no warm-up
    assert compression_alpha(alpha, 0.95, 0.8) == alpha  # exactly, once phased in
    ramp = [compression_alpha(alpha, p / 100, 0.5) for p in range(101)]
    assert all(x >= y for x, y in itertools.pairwise(ramp))  # compression only grows


@pytest.mark.parametrize("bits", range(3, 9))
def test_after_the_warm_up_training_compresses_exactly_as_evaluated(bits: int) -> None:
    """A baseline at the smallest alpha of a bit width must train at that bit width, not one below."""
    schedule = TrainConfig(kind="quantized").schedule()
    alpha = (bits - 3) / 6  # the smallest alpha of `bits`: b = 3 + min(5, floor(6 * alpha))
    assert schedule.level(alpha).bits == bits and (bits == 3 or schedule.level(alpha - 1e-9).bits == bits - 1)
    assert schedule.level(compression_alpha(alpha, 0.9, 0.8)).bits == bits
    assert schedule.level(compression_alpha(alpha, 0.5, 0.0)).bits == bits


def test_lr_warmup_then_cosine_to_zero() -> None:
    total, warmup, peak = 100, 10, 0.1
    lrs = [lr_at(s, total, warmup, peak) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / warmup)
    assert lrs[:warmup] == sorted(lrs[:warmup])  # linear rise
    assert lrs[warmup - 1] == pytest.approx(peak) and lrs[warmup] == pytest.approx(peak)
    after = lrs[warmup:]
    assert after == sorted(after, reverse=True)  # cosine decay
    assert all(lr > 0 for lr in lrs) and lrs[-1] < 0.001 * peak
    assert lr_at(warmup + 45, total, warmup, peak) == pytest.approx(peak / 2)  # cosine midpoint
    assert lr_at(total, total, warmup, peak) == pytest.approx(0.0, abs=1e-12)
    assert max(lrs) <= peak + 1e-12
    assert math.isfinite(lr_at(0, 1, 1, peak))


def test_warmup_is_one_epoch_but_at_most_half_the_run() -> None:
    assert warmup_steps(100, 100) == 50  # epochs=1: half warm-up, half decay
    assert warmup_steps(100, 200) == 100  # epochs=2 and more: one epoch, as before
    assert warmup_steps(100, 1500) == 100
    assert warmup_steps(1, 1) == 0 and math.isfinite(lr_at(0, 1, 0, 0.1))


@pytest.mark.parametrize("epochs", [1, 2])
def test_one_epoch_run_decays_the_learning_rate(
    tmp_path: Path,
    synthetic_data: Dataset,
    tiny_overrides: Callable[..., list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    epochs: int,
) -> None:
    """With epochs=1 the warm-up was the whole run: the last step trained at the peak lr, never decayed."""
    calls: list[tuple[int, int, int, float]] = []

    def recording_lr_at(step: int, total: int, warmup: int, peak: float) -> float:
        calls.append((step, total, warmup, lr_at(step, total, warmup, peak)))
        return calls[-1][3]

    monkeypatch.setattr(train_module, "lr_at", recording_lr_at)
    _run(load_config(None, tiny_overrides(tmp_path / "m.safetensors", epochs=epochs)), synthetic_data, capsys)
    steps_per_epoch = 256 // 32
    lr_of_step = {step: lr for step, _, _, lr in calls}  # set once per parameter group
    assert list(lr_of_step) == list(range(steps_per_epoch * epochs))
    assert {warmup for _, _, warmup, _ in calls} == {steps_per_epoch // 2 if epochs == 1 else steps_per_epoch}
    lrs = list(lr_of_step.values())
    assert max(lrs) == pytest.approx(0.1) and lrs[-1] < 0.2 * 0.1  # up to the peak, then down


def test_the_config_builds_the_model_it_describes() -> None:
    cfg = TrainConfig(arch="tiny_resnet", kind="quantized", subspace="point", norm="group", stat_alphas=[0.0, 1.0])
    model = cfg.model(in_channels=3, num_classes=7)
    assert not model.line and model.norm_type == "group" and model.stat_alphas == (0.0, 1.0)
    assert model.schedule == cfg.schedule() and model.stem.c_in == 3 and model.fc.c_out == 7
    out = model(torch.randn(2, 3, 12, 12), Setting(1.0, model.schedule.level(1.0)))
    assert out.shape == (2, 7)


# -- end to end ------------------------------------------------------------------------------------


def _epoch_losses(log: str) -> list[float]:
    return [float(x) for x in re.findall(r"epoch \d+: train loss ([0-9.]+)", log)]


def test_training_learns_and_writes_a_loadable_checkpoint(trained_run: Any) -> None:
    model, meta = checkpoint.load(trained_run.path)
    losses = _epoch_losses(trained_run.log)
    assert len(losses) == 2 and losses[1] < 0.7 * losses[0]  # the loss goes down
    assert f"wrote {trained_run.path}" in trained_run.log
    # measured accuracy at every grid alpha is far above chance (50 %) on held-out test images
    assert [p.alpha for p in meta.accuracy] == [0.0, 0.5, 1.0]
    assert [p.level for p in meta.accuracy] == [0.25, 0.625, 1.0]
    assert all(p.accuracy >= 90.0 for p in meta.accuracy), meta.accuracy
    # the metadata describes the run
    assert meta.kind == "structured" and meta.subspace == "line" and meta.norm == "batch"
    assert meta.dataset == "folder" and meta.classes == ["bottom", "top"]
    assert (meta.input.channels, meta.input.height, meta.input.width) == (1, 12, 12)
    assert meta.stat_alphas == [0.0, 0.5, 1.0] and meta.fixed_alpha is None
    assert meta.training["command"] == "pytest trained_run"
    assert meta.training["config"]["arch"] == "tiny_resnet"
    assert (meta.training["device"], meta.training["processes"]) == ("cpu", 1)  # where the steps ran
    assert "training on cpu, 1 process(es)" in trained_run.log
    # BatchNorm statistics were calibrated for every grid row
    assert all(not torch.equal(model.norm.running_mean[i], torch.zeros(16)) for i in range(3))
    # and the model rebuilt from the file classifies the test images
    from training.data import load_folder, normalise

    test = load_folder(trained_run.data_dir).test
    x = normalise(test.images, meta.input.mean, meta.input.std)
    with torch.no_grad():
        for alpha in (0.0, 1.0):
            acc = (model(x, model.at(alpha)).argmax(1) == test.labels).float().mean()
            assert float(acc) >= 0.9
    # the resumable state sits next to the checkpoint
    assert trained_run.path.with_name("tiny.state.safetensors").is_file()


def test_an_epoch_where_no_step_sampled_alpha_1_reports_over_the_alphas_sampled(
    tiny_overrides: Any, synthetic_data: Dataset, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The loss and accuracy are the accurate end's (alpha 1); uniform sampling without the sandwich rule
    never draws it, and the line said "train loss 0.0000 acc 0.00"."""
    overrides = tiny_overrides(tmp_path / "m.safetensors", epochs=1, kind="quantized", end_bias=0, sandwich=False)
    log = _run(load_config(None, overrides), synthetic_data, capsys)
    line = next(line for line in log.splitlines() if line.startswith("epoch 1: train loss"))
    assert line.endswith("over the alphas sampled, none of them 1)"), line
    loss, acc = map(float, re.findall(r"train loss ([0-9.]+) acc ([0-9.]+)", line)[0])
    assert loss > 0 and acc > 0


def _run(cfg: TrainConfig, data: Dataset, capsys: pytest.CaptureFixture[str]) -> str:
    train(cfg, data=data, command="pytest")
    return capsys.readouterr().out


@pytest.mark.parametrize(
    ("where", "extra", "match"),
    [
        ("dir", {}, "dir is a directory; name a file"),  # was an IsADirectoryError after training, dir.tmp left
        ("under_file", {}, "file is a file, not a directory"),  # was a FileExistsError after the first epoch
        ("new/deep", {}, None),  # missing folders are fine: they are created when the first file is written
        ("model", {"arch_kwargs": "{foo: 1}"}, r"arch_kwargs=\{'foo': 1\} does not build .* may set \['widths'"),
        ("model", {"arch": "resnet50"}, "arch='resnet50' is not a registered architecture"),
        ("model", {"batch_size": 300}, "batch_size=300 and val_size=0 leave no training step"),  # 256 images
        ("model", {"val_size": 250}, "256 training images, 6 after holding out val_size"),
    ],
)
def test_refused_before_training(
    tmp_path: Path,
    synthetic_data: Dataset,
    tiny_overrides: Callable[..., list[str]],
    capsys: pytest.CaptureFixture[str],
    where: str,
    extra: dict[str, object],
    match: str | None,
) -> None:
    """Each of these once failed only after training (or trained nothing and exited 0); now the run stops
    before its first step and leaves no file behind."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("not a folder")
    out = {"dir": tmp_path / "dir", "under_file": tmp_path / "file" / "m.safetensors"}.get(
        where, tmp_path / where / "m.safetensors"
    )
    if match is None:
        _run(load_config(None, tiny_overrides(out, epochs=1, **extra)), synthetic_data, capsys)
        assert out.is_file()
        return
    with pytest.raises(ValueError, match=match):  # the config itself refuses a bad arch or arch_kwargs
        _run(load_config(None, tiny_overrides(out, epochs=1, **extra)), synthetic_data, capsys)
    assert "epoch" not in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["dir", "file"]  # no .tmp, no state, no probe


def test_inconsistent_data_is_refused_before_training(
    tmp_path: Path,
    synthetic_data: Dataset,
    tiny_overrides: Callable[..., list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A label outside the classes once raised IndexError mid-epoch; now nothing trains."""
    labels = synthetic_data.train.labels.clone()
    labels[5] = 200
    bad = Dataset("bad", Split(synthetic_data.train.images, labels), synthetic_data.test, synthetic_data.classes)
    cfg = load_config(None, tiny_overrides(tmp_path / "m.safetensors", epochs=1))
    with pytest.raises(DataError, match=r"bad training labels: label 200 \(image 5\) is outside 0\.\.1"):
        _run(cfg, bad, capsys)
    assert "epoch" not in capsys.readouterr().out and not list(tmp_path.iterdir())


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_out_where_no_file_can_be_created(
    synthetic_data: Dataset, tiny_overrides: Callable[..., list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    """/proc exists and is a directory, but creating a file there fails: a SafetensorError traceback after
    the first epoch, before the output location was probed."""
    cfg = load_config(None, tiny_overrides(Path("/proc/x.safetensors")))
    with pytest.raises(ValueError, match=re.escape("out=/proc/x.safetensors: cannot create files in /proc")):
        _run(cfg, synthetic_data, capsys)
    assert "epoch" not in capsys.readouterr().out


def _interrupted_after_the_first_epoch(
    cfg: TrainConfig, data: Dataset, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Train `cfg` until its state is saved after the first epoch, then stop, as a machine going away would."""
    save_state = train_module._save_state

    def save_then_stop(cfg: TrainConfig, *args: Any) -> None:
        save_state(cfg, *args)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(train_module, "_save_state", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            _run(cfg, data, capsys)


def test_resume_after_an_interruption_continues_exactly(
    tmp_path: Path,
    synthetic_data: Dataset,
    tiny_overrides: Callable[..., list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    reference = load_config(None, tiny_overrides(tmp_path / "ref.safetensors", kind="unstructured"))
    _run(reference, synthetic_data, capsys)

    cfg = load_config(None, tiny_overrides(tmp_path / "run.safetensors", kind="unstructured"))
    _interrupted_after_the_first_epoch(cfg, synthetic_data, capsys, monkeypatch)
    assert "epoch 1:" in capsys.readouterr().out
    assert cfg.state_path.is_file() and not Path(cfg.out).exists()
    assert load_file(str(cfg.state_path)).keys()  # a real safetensors state

    log = _run(cfg, synthetic_data, capsys)
    assert "resuming" in log and "after epoch 1/2" in log
    assert "epoch 1:" not in log and "epoch 2:" in log  # only the missing epoch ran
    resumed, meta = checkpoint.load(cfg.out)
    expected, ref_meta = checkpoint.load(reference.out)
    a, b = resumed.state_dict(), expected.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    assert meta.accuracy == ref_meta.accuracy


def test_the_checkpoint_records_where_each_resumed_part_ran(
    tmp_path: Path,
    synthetic_data: Dataset,
    tiny_overrides: Callable[..., list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Epoch 1 on one thread, epoch 2 resumed on two: `training.runs` has both (`processes` and `device`
    alone said only where the last invocation ran: 2 processes for a run resumed under torchrun)."""
    cfg = load_config(None, tiny_overrides(tmp_path / "m.safetensors", threads=1))
    _interrupted_after_the_first_epoch(cfg, synthetic_data, capsys, monkeypatch)
    _run(load_config(None, tiny_overrides(tmp_path / "m.safetensors", threads=2)), synthetic_data, capsys)
    where = {"device": "cpu", "processes": 1}
    assert checkpoint.read_meta(cfg.out).training["runs"] == [
        {"epochs": [1, 1], **where, "threads": 1},
        {"epochs": [2, 2], **where, "threads": 2},
    ]


@pytest.mark.parametrize("saved", [None, "{not json", '"x"', "[1, 2]", '[{"epochs": "all"}]'])
def test_a_state_without_readable_runs_still_resumes(
    tmp_path: Path,
    synthetic_data: Dataset,
    tiny_overrides: Callable[..., list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    saved: str | None,
) -> None:
    """A state saved before runs were recorded (None), or with a damaged entry: its epochs are recorded as
    run somewhere unknown (junk was copied into the checkpoint, and bad JSON refused the whole state)."""
    cfg = load_config(None, tiny_overrides(tmp_path / "m.safetensors"))
    _interrupted_after_the_first_epoch(cfg, synthetic_data, capsys, monkeypatch)
    tensors = load_file(str(cfg.state_path))
    with safe_open(str(cfg.state_path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "runs"}
    save_file(tensors, str(cfg.state_path), metadata=meta if saved is None else {**meta, "runs": saved})
    _run(cfg, synthetic_data, capsys)
    runs = checkpoint.read_meta(cfg.out).training["runs"]
    assert runs == [{"epochs": [1, 1]}, {"epochs": [2, 2], "device": "cpu", "processes": 1, "threads": 1}]


def test_a_finished_run_run_again_records_where_its_epochs_ran(
    tmp_path: Path,
    synthetic_data: Dataset,
    tiny_overrides: Callable[..., list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Run again, a finished run trains nothing: device and processes said where that call ran."""
    out = tmp_path / "m.safetensors"
    _run(load_config(None, tiny_overrides(out, epochs=1)), synthetic_data, capsys)
    monkeypatch.setattr(train_module.Ranks, "describe", lambda self: "cuda:0 (elsewhere)")
    _run(load_config(None, tiny_overrides(out, epochs=1)), synthetic_data, capsys)
    training = checkpoint.read_meta(out).training
    assert training["device"] == "cpu"
    assert training["runs"] == [{"epochs": [1, 1], "device": "cpu", "processes": 1, "threads": 1}]


def test_rank_0_evaluates_on_the_nodes_threads(
    tmp_path: Path,
    synthetic_data: Dataset,
    tiny_overrides: Callable[..., list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Of 2 threads shared by 2 processes, each trains on 1; the evaluation rank 0 runs alone, on both."""
    monkeypatch.setattr(train_module.Ranks, "from_env", classmethod(lambda cls: cls(rank=0, world=1, local_world=2)))
    threads: list[int] = []  # each set_num_threads, in turn
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    at_table: list[int] = []
    table = train_module.accuracy_table

    def recorded(*args: Any, **kwargs: Any) -> Any:
        at_table.append(threads[-1])
        return table(*args, **kwargs)

    monkeypatch.setattr(train_module, "accuracy_table", recorded)
    _run(load_config(None, tiny_overrides(tmp_path / "m.safetensors", threads=2, epochs=1)), synthetic_data, capsys)
    assert threads[0] == 1 and at_table == [2]  # the steps on 1 thread, the final table on 2


def test_resume_counts_the_training_time_from_the_saved_elapsed(
    tmp_path: Path,
    synthetic_data: Dataset,
    tiny_overrides: Callable[..., list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A resumed run adds its epochs to the seconds the state saved (here made 1000 s), not to 0: the
    checkpoint's train_seconds and the state after the last epoch count the whole run."""
    cfg = load_config(None, tiny_overrides(tmp_path / "m.safetensors"))
    _interrupted_after_the_first_epoch(cfg, synthetic_data, capsys, monkeypatch)
    with safe_open(str(cfg.state_path), framework="pt") as f:
        meta = f.metadata()
    assert 0.0 < float(meta["elapsed"]) < 1000.0  # the first epoch's seconds
    save_file(load_file(str(cfg.state_path)), str(cfg.state_path), metadata={**meta, "elapsed": "1000.0"})

    assert "after epoch 1/2" in _run(cfg, synthetic_data, capsys)
    with safe_open(str(cfg.state_path), framework="pt") as f:
        elapsed = float(f.metadata()["elapsed"])
    assert 1000.0 < elapsed < 1100.0
    assert checkpoint.read_meta(cfg.out).training["train_seconds"] == round(elapsed, 1)


def test_resume_refuses_a_state_from_another_config(
    tmp_path: Path,
    synthetic_data: Dataset,
    tiny_overrides: Callable[..., list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    one = load_config(None, tiny_overrides(tmp_path / "m.safetensors", epochs=1, kind="quantized"))
    _run(one, synthetic_data, capsys)
    assert Path(one.out).is_file()
    two = load_config(None, tiny_overrides(tmp_path / "m.safetensors", epochs=2, kind="quantized", lr=0.05, threads=2))
    with pytest.raises(ValueError) as err:
        _run(two, synthetic_data, capsys)
    message = str(err.value)  # names each differing option with both values; threads may differ
    assert message.startswith(f"{one.state_path}: saved by a run with other training options (")
    assert "epochs: 1 in the state, 2 now; lr: 0.1 in the state, 0.05 now)" in message
    assert "threads" not in message and "delete it to start over" in message
    # the same command again resumes after its last epoch (nothing left to train) and rewrites the file
    log = _run(one, synthetic_data, capsys)
    assert "resuming" in log and "after epoch 1/1" in log and "epoch 1:" not in log


def test_resume_accepts_options_that_leave_the_training_steps_alone(
    tmp_path: Path,
    synthetic_data: Dataset,
    tiny_overrides: Callable[..., list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """threads, channels_last, eval_batch_size and calib_batches (and out) once made a finished epoch
    unresumable: the whole config JSON was compared."""
    out = tmp_path / "m.safetensors"
    _run(load_config(None, tiny_overrides(out, epochs=1)), synthetic_data, capsys)
    changed = tiny_overrides(out, epochs=1, threads=2, channels_last="false", eval_batch_size=7, calib_batches=1)
    log = _run(load_config(None, changed), synthetic_data, capsys)
    assert "after epoch 1/1" in log and "epoch 1:" not in log
    assert checkpoint.read_meta(out).training["config"]["calib_batches"] == 1  # the new values were used


@pytest.mark.parametrize("keep", [0.5, 0.01, 0.0])
def test_a_damaged_state_file_says_to_delete_it(
    tmp_path: Path,
    synthetic_data: Dataset,
    tiny_overrides: Callable[..., list[str]],
    capsys: pytest.CaptureFixture[str],
    keep: float,
) -> None:
    """A state cut short (keep: the share of bytes left) was a SafetensorError traceback."""
    cfg = load_config(None, tiny_overrides(tmp_path / "m.safetensors", epochs=1))
    _run(cfg, synthetic_data, capsys)
    raw = cfg.state_path.read_bytes()
    cfg.state_path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(ValueError) as err:
        _run(cfg, synthetic_data, capsys)
    message = str(err.value)
    assert message.startswith(f"{cfg.state_path}: not a readable training state (")
    assert message.endswith("delete it to start over") and "\n" not in message


@pytest.mark.parametrize(("key", "value"), [("config", "[]"), ("elapsed", "n/a"), ("epoch", "-3")])
def test_a_state_file_with_a_bad_header_value_says_to_delete_it(
    tmp_path: Path,
    synthetic_data: Dataset,
    tiny_overrides: Callable[..., list[str]],
    capsys: pytest.CaptureFixture[str],
    key: str,
    value: str,
) -> None:
    """Headers that parse but hold the wrong thing were tracebacks (an AttributeError; a ValueError naming no
    file), or a run from epoch -3."""
    cfg = load_config(None, tiny_overrides(tmp_path / "m.safetensors", epochs=1))
    _run(cfg, synthetic_data, capsys)
    with safe_open(str(cfg.state_path), framework="pt") as f:
        meta = {**f.metadata(), key: value}
    save_file(load_file(str(cfg.state_path)), str(cfg.state_path), metadata=meta)
    with pytest.raises(ValueError, match=r"not a readable training state \(.*delete it to start over$"):
        _run(cfg, synthetic_data, capsys)


def test_a_state_file_with_a_misshapen_momentum_buffer_says_to_delete_it(
    tmp_path: Path,
    synthetic_data: Dataset,
    tiny_overrides: Callable[..., list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A momentum buffer not shaped as its weight loaded, then stopped the first step with SGD's traceback."""
    cfg = load_config(None, tiny_overrides(tmp_path / "m.safetensors"))
    _interrupted_after_the_first_epoch(cfg, synthetic_data, capsys, monkeypatch)
    with safe_open(str(cfg.state_path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(cfg.state_path))
    tensors["optim.0"] = tensors["optim.0"].flatten()[:3]
    save_file(tensors, str(cfg.state_path), metadata=meta)
    with pytest.raises(ValueError, match=r"\(optim\.0 is shaped \[3\], its weight \[.*delete it to start over$"):
        _run(cfg, synthetic_data, capsys)


@pytest.mark.parametrize(
    ("height", "match"), [(4, "every training pixel of channel 0 has the same value"), (0, "1x0x4")]
)
def test_images_that_cannot_train_are_refused_before_the_first_step(
    tmp_path: Path,
    tiny_overrides: Callable[..., list[str]],
    capsys: pytest.CaptureFixture[str],
    height: int,
    match: str,
) -> None:
    """One pixel value everywhere (float pixels in 0..1 cast to bytes: all 0) trained every epoch on NaN, then
    failed with a pydantic dump naming no file; images 0 pixels high were a convolution's traceback."""
    images = torch.zeros(64, 1, height, 4, dtype=torch.uint8)
    split = Split(images, torch.tensor([0, 1] * 32))
    cfg = load_config(None, tiny_overrides(tmp_path / "m.safetensors", epochs=1))
    with pytest.raises(DataError, match=match):
        _run(cfg, Dataset("flat", split, split, ["a", "b"]), capsys)
    assert "epoch" not in capsys.readouterr().out and not list(tmp_path.iterdir())


def test_a_diverged_run_stops_keeping_the_last_finite_state(
    tmp_path: Path,
    synthetic_data: Dataset,
    tiny_overrides: Callable[..., list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With lr=1e6 the loss went NaN: the run saved the NaN state over the finite one, exited 0 and wrote a
    checkpoint with an accuracy table that `evaluate` then refused as corrupt."""
    cfg = load_config(None, tiny_overrides(tmp_path / "m.safetensors", epochs=3, lr=1e6))
    diverged = r"the training loss is nan: the run diverged \(not saved; kept: .*\); lower lr \(1e\+06\)"
    with pytest.raises(ValueError, match=diverged):
        _run(cfg, synthetic_data, capsys)
    assert not Path(cfg.out).exists()
    if cfg.state_path.exists():  # the last epoch whose loss was finite
        assert all(torch.isfinite(t).all() for t in load_file(str(cfg.state_path)).values() if t.is_floating_point())


def test_a_state_holding_nan_is_refused(
    tmp_path: Path,
    synthetic_data: Dataset,
    tiny_overrides: Callable[..., list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Resumed with no epoch left to train, it wrote a NaN checkpoint and exited 0."""
    cfg = load_config(None, tiny_overrides(tmp_path / "m.safetensors", epochs=1))
    _run(cfg, synthetic_data, capsys)
    Path(cfg.out).unlink()
    with safe_open(str(cfg.state_path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(cfg.state_path))
    name = next(k for k, v in tensors.items() if k.startswith("model.") and v.is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(cfg.state_path), metadata=meta)
    with pytest.raises(ValueError, match=rf"not a readable training state \({re.escape(name)} holds NaN or Inf\)"):
        _run(cfg, synthetic_data, capsys)
    assert not Path(cfg.out).exists()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_a_state_this_user_cannot_read_is_not_called_damaged(
    synthetic_data: Dataset, tiny_overrides: Callable[..., list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    """safetensors writes it 0600 and reports EACCES as 'No such file': resumed as another user, the message
    said the state was damaged and to delete it, the work of every epoch it kept."""
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c"]
    repo = Path(__file__).resolve().parents[2]
    probe = subprocess.run([*nobody, "import training.train"], cwd=repo, capture_output=True, timeout=120)
    if probe.returncode:  # a clone under a private folder (/root): that user cannot run the code at all
        pytest.skip(f"uid 65534 cannot import training from {repo}")
    shared = Path(tempfile.mkdtemp(prefix="lcs-state-"))  # pytest's folders are root's alone: untraversable
    try:
        shared.chmod(0o755)
        overrides = tiny_overrides(shared / "m.safetensors", epochs=1)
        cfg = load_config(None, overrides)
        _run(cfg, synthetic_data, capsys)
        code = (
            "import random, torch; from training.config import load_config; from training.train import _load_state; "
            f"cfg = load_config(None, {overrides!r}); m = cfg.model(1, 2); "
            "_load_state(cfg, m, torch.optim.SGD(m.parameters(), lr=0.1), random.Random(0))"
        )
        run = subprocess.run([*nobody, code], cwd=repo, capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(shared)
    message = f"{cfg.state_path}: not readable by this process (uid 65534); make it readable to resume"
    assert message in run.stderr and "damaged" not in run.stderr, run.stderr


@pytest.mark.parametrize("kind", ["fifo", "config"])
def test_out_never_replaces_a_special_file_or_the_config(tmp_path: Path, kind: str) -> None:
    """Writing renames over `out`: out=/dev/null made /dev/null a regular file, and out= naming the config
    replaced it with the checkpoint."""
    from training.__main__ import main

    config = tmp_path / "c.yaml"
    config.write_text("epochs: 1\n")
    target = tmp_path / "pipe" if kind == "fifo" else config
    if kind == "fifo":
        os.mkfifo(target)
    assert main(["train", str(config), f"out={target}"]) == 2
    assert target.is_fifo() if kind == "fifo" else config.read_text() == "epochs: 1\n"


@pytest.mark.parametrize("link", [False, True])
def test_out_never_replaces_a_file_of_the_dataset(
    tmp_path: Path,
    synthetic_data: Dataset,
    tiny_overrides: Callable[..., list[str]],
    capsys: pytest.CaptureFixture[str],
    link: bool,
) -> None:
    """out= naming one of the dataset's files (here a folder dataset's image; or a link to one kept elsewhere,
    which the write replaces) replaced it with the checkpoint."""
    image = tmp_path / "data" / "train" / "a" / "0.png"
    image.parent.mkdir(parents=True)
    stored = tmp_path / "store" / "0.png" if link else image
    stored.parent.mkdir(exist_ok=True)
    stored.write_bytes(b"png")
    if link:
        image.symlink_to(stored)
    where = {"dataset": "folder", "data_dir": tmp_path / "data", "epochs": 1}
    with pytest.raises(ValueError, match=re.escape(f"{image} is a file of the folder dataset this run reads")):
        _run(load_config(None, tiny_overrides(image, **where)), synthetic_data, capsys)
    assert image.read_bytes() == b"png" and image.is_symlink() == link


def test_a_run_whose_out_is_in_the_datasets_folder_still_resumes_and_reruns(
    tmp_path: Path,
    synthetic_data: Dataset,
    tiny_overrides: Callable[..., list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Only the dataset's own files are refused: a first check refused every file under its folder, the run's
    own state and checkpoint too, so a resume or a rerun of the same command failed."""
    out = tmp_path / "data" / "runs" / "m.safetensors"
    cfg = load_config(None, tiny_overrides(out, dataset="folder", data_dir=tmp_path / "data"))
    _interrupted_after_the_first_epoch(cfg, synthetic_data, capsys, monkeypatch)
    assert "after epoch 1/2" in _run(cfg, synthetic_data, capsys)
    _run(cfg, synthetic_data, capsys)  # the same command again, once finished
    assert out.is_file()


def test_fixed_alpha_baseline_with_validation(
    tmp_path: Path,
    synthetic_data: Dataset,
    tiny_overrides: Callable[..., list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path / "b.safetensors", kind="unstructured", fixed_alpha=0.5, stat_alphas="[0.5]", val_size=32, epochs=1
        ),
    )
    log = _run(cfg, synthetic_data, capsys)
    assert "| val a=0.5:" in log
    model, meta = checkpoint.load(cfg.out)
    assert meta.fixed_alpha == 0.5 and meta.subspace == "point" and meta.stat_alphas == [0.5]
    assert [p.alpha for p in meta.accuracy] == [0.5] and meta.accuracy[0].level == pytest.approx(0.4875)
    assert not model.line


@pytest.mark.parametrize(("kind", "subspace"), [("quantized", "line"), ("unstructured", "point")])
def test_groupnorm_run(
    tmp_path: Path,
    synthetic_data: Dataset,
    tiny_overrides: Callable[..., list[str]],
    capsys: pytest.CaptureFixture[str],
    kind: str,
    subspace: str,
) -> None:
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path / "g.safetensors", kind=kind, subspace=subspace, norm="group", act_quant_warmup=4, augment=False
        ),
    )
    _run(cfg, synthetic_data, capsys)
    model, meta = checkpoint.load(cfg.out)
    assert meta.norm == "group" and meta.kind == kind and meta.subspace == subspace
    assert meta.accuracy[-1].accuracy >= 75.0  # alpha = 1 learnt the task
    if kind == "quantized":
        assert int(model.blocks[0].conv2.act.seen) > 0  # activation ranges were tracked
