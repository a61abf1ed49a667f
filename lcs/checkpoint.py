"""The checkpoint format: one .safetensors file whose header carries versioned JSON metadata.

Tensors are the subspace model's state_dict (both endpoints on a line, BatchNorm statistics for every
grid alpha). The metadata (`CheckpointMeta`, stored as JSON under the header key "lcs") says everything
needed to rebuild and use the model without the training package: architecture and its arguments,
compression kind and schedule, subspace type, normalisation, input shape and normalisation constants,
class names, dataset, the training command and config, and the measured accuracy per alpha.

Loading never unpickles: safetensors holds raw tensors only, and anything else is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lcs.alpha import ALPHA_CONVENTION, SAME_ALPHA, Kind, Schedule, SubspaceType, is_grid, spelled
from lcs.layers import NormType
from lcs.models import SubspaceResNet, build_model, model_names, subspace_kwargs
from lcs.paths import file_problem

Format = Literal["lcs-serve.checkpoint"]  # the metadata's "format" value, spelt once
FORMAT: Format = get_args(Format)[0]
VERSION = 1
META_KEY = "lcs"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file, the problem and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Arch(_Strict):
    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)  # widths, blocks, stem_stride, ...

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in model_names():
            raise ValueError(f"unknown architecture {v!r}; this build knows {model_names()}")
        return v


class InputSpec(_Strict):
    channels: int = Field(ge=1, le=4)
    height: int = Field(ge=1, le=4096)
    width: int = Field(ge=1, le=4096)
    mean: list[float]  # per channel, applied to pixels scaled to [0, 1]
    std: list[float]

    @model_validator(mode="after")
    def _per_channel(self) -> InputSpec:
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != self.channels:
                raise ValueError(f"input.{name} has {len(values)} values for {self.channels} channel(s)")
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"input.{name} must be finite numbers, got {values}")
        if not all(v > 0 for v in self.std):
            raise ValueError(f"input.std must be positive (it divides), got {self.std}")
        return self


class AccuracyPoint(_Strict):
    alpha: float = Field(ge=0.0, le=1.0)
    level: float  # sparsity fraction | width fraction | bits
    accuracy: float = Field(ge=0.0, le=100.0)  # percent, on `split`


class CheckpointMeta(_Strict):
    format: Format = FORMAT
    version: int = VERSION
    alpha_convention: str = ALPHA_CONVENTION
    arch: Arch
    kind: Kind
    subspace: SubspaceType
    schedule: dict[str, Any]  # lcs.alpha.Schedule fields
    norm: NormType
    stat_alphas: list[float]  # alphas that have BatchNorm statistics (the servable grid for "batch")
    fixed_alpha: float | None = Field(None, ge=0.0, le=1.0)  # set for a baseline trained at one compression level
    input: InputSpec
    classes: list[str]
    dataset: str
    split: str = "test"  # where `accuracy` was measured
    accuracy: list[AccuracyPoint] = Field(default_factory=list)
    training: dict[str, Any] = Field(default_factory=dict)  # command, effective config, wall time

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: dict[str, Any]) -> dict[str, Any]:
        # every field, as save writes them: a missing one took Schedule's default, and the model ran at levels
        # its accuracy table was not measured at
        missing = sorted({f.name for f in dataclasses.fields(Schedule)} - v.keys())
        if missing:
            raise ValueError(f"missing {missing}: a checkpoint records every field of lcs.alpha.Schedule")
        try:
            Schedule(**v)
        except TypeError as e:  # an unknown field, or a value of the wrong type
            raise ValueError(f"not a schedule ({e}); its fields are those of lcs.alpha.Schedule") from None
        return v

    @field_validator("alpha_convention")
    @classmethod
    def _convention(cls, v: str) -> str:
        if v != ALPHA_CONVENTION:  # served as this build reads alpha, its models would run in the wrong order
            raise ValueError(f"{v!r} is not this build's convention ({ALPHA_CONVENTION!r}); retrain with this build")
        return v

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[str]) -> list[str]:
        if len(v) < 2 or len(set(v)) != len(v):
            raise ValueError(f"need two or more distinct class names (responses name the class), got {v}")
        return v

    @field_validator("stat_alphas")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        if not all(0.0 <= a <= 1.0 for a in v):
            raise ValueError(f"alphas must be in [0, 1], got {v}")
        if not is_grid(v):
            raise ValueError(
                f"must be strictly increasing, neighbours at least {SAME_ALPHA:g} apart (row i of each statistics "
                f"tensor is alpha i), got {v}"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> CheckpointMeta:
        if self.schedule.get("kind") != self.kind:
            raise ValueError(f"schedule.kind {self.schedule.get('kind')!r} differs from kind {self.kind!r}")
        if self.norm == "batch":
            if not self.stat_alphas:
                raise ValueError("stat_alphas is empty: a model with BatchNorm needs statistics for some alpha")
            grid = self.stat_alphas
            wanted = [a for a in [self.fixed_alpha, *(p.alpha for p in self.accuracy)] if a is not None]
            off = [a for a in wanted if spelled(a, grid) is None]
            if off:
                raise ValueError(f"fixed_alpha or accuracy[].alpha {off} not in stat_alphas {grid}")
        schedule = self.schedule_obj()
        wrong = [
            p.alpha for p in self.accuracy if not math.isclose(p.level, schedule.level(p.alpha).value, abs_tol=1e-6)
        ]
        if wrong:  # the table and the schedule disagree: the levels served are not the ones measured
            raise ValueError(f"accuracy[].level at alphas {wrong} differs from what the schedule gives them")
        return self

    def schedule_obj(self) -> Schedule:
        return Schedule(**self.schedule)

    def model_kwargs(self) -> dict[str, Any]:
        """build_model's arguments; ValueError if arch.kwargs sets one that the other fields set."""
        return subspace_kwargs(
            self.arch.kwargs,
            in_channels=self.input.channels,
            num_classes=len(self.classes),
            subspace=self.subspace,
            norm=self.norm,
            stat_alphas=self.stat_alphas,
            schedule=self.schedule_obj(),
        )


def build(meta: CheckpointMeta) -> SubspaceResNet:
    """An untrained model with the architecture the metadata describes."""
    return build_model(meta.arch.name, **meta.model_kwargs())


SAMPLES = "samples."  # tensor-name prefix of the sample images (not model state)
STATE_SUFFIX = ".state.safetensors"  # training's resumable state beside a checkpoint (m.safetensors: m.state...)


def save(
    path: str | Path,
    model: SubspaceResNet,
    meta: CheckpointMeta,
    samples: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Write model tensors + metadata atomically (a crash never leaves a half-written checkpoint).

    `samples` (uint8 images [N, C, H, W], int64 labels [N]) are a few training images that travel with
    the model, so the service can calibrate 8-bit kernels and self-check accuracy without the dataset.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if samples is not None:
        tensors[SAMPLES + "images"] = samples[0].to(torch.uint8).contiguous()
        tensors[SAMPLES + "labels"] = samples[1].to(torch.int64).contiguous()
        _check_samples(path, meta, tensors)  # refused here rather than by every later load
    # safetensors creates 0600 files: the service (another user in the image) must read it
    write_tensors(path, tensors, {META_KEY: meta.model_dump_json()}, mode=0o644)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, mode: int = 0o600) -> None:
    """A safetensors file written atomically: to a temporary name beside `path`, then renamed over it, so a
    crash or a full disk leaves the file there before untouched and no half-written one (checkpoints, and
    training's per-epoch state). `mode`: the file's permissions, set here: safetensors writes 0600 from 0.8,
    0644 (under umask 022) before it."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.chmod(mode)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after a replace; after a failure, no stray half-written file


def _sniff(path: Path) -> str:
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError:
        return ""
    if head[:2] == b"PK":
        return " It is a zip archive (a torch.save/pickle checkpoint?); this service never unpickles."
    if head[:1] == b"\x80":
        return " It starts like a Python pickle; this service never unpickles."
    return ""


COMMAND_ARGUMENT = "the command's argument"  # what names the checkpoint path, for a command-line tool


def read_meta(path: str | Path, *, named_by: str = COMMAND_ARGUMENT) -> CheckpointMeta:
    """The metadata of a checkpoint, validated with the rest of the file (the whole file is read)."""
    return _open(Path(path), named_by)[0]


def _open(path: Path, named_by: str) -> tuple[CheckpointMeta, dict[str, torch.Tensor]]:
    fix = f"Point {named_by} at a checkpoint written by `python -m training train`."
    if (problem := file_problem(path)) is not None:
        raise CheckpointError(f"{path}: {problem}. {fix}")
    if not os.access(path, os.R_OK):
        raise CheckpointError(
            f"{path}: not readable by this process (uid {os.getuid()}); make it readable, e.g. chmod a+r."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupt: {e}).{_sniff(path)} {fix}"
        ) from None
    if META_KEY not in header and path.name.endswith(STATE_SUFFIX) and "epoch" in header:
        kept_for = path.with_name(path.name.removesuffix(STATE_SUFFIX) + ".safetensors")
        raise CheckpointError(
            f"{path}: the state `python -m training train` keeps to resume a run, not a checkpoint; point "
            f"{named_by} at the checkpoint the run writes ({kept_for})."
        )
    if META_KEY not in header:
        raise CheckpointError(
            f"{path}: a safetensors file without lcs-serve metadata (header key {META_KEY!r} missing); "
            f"it was not written by lcs-serve. {fix}"
        )
    try:
        raw = json.loads(header[META_KEY])
    except (json.JSONDecodeError, RecursionError) as e:
        why = e if isinstance(e, json.JSONDecodeError) else "nested too deeply"
        raise CheckpointError(f"{path}: metadata {META_KEY!r} is not valid JSON ({why}). {fix}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: metadata format is {raw.get('format') if isinstance(raw, dict) else raw!r}, "
            f"expected {FORMAT!r}. {fix}"
        )
    version = raw.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is not a version number (1, 2, ...). {fix}"
        )
    if version > VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is newer than this build supports ({VERSION}); "
            "upgrade lcs-serve to load it."
        )
    try:
        meta = CheckpointMeta.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"field '{'.'.join(map(str, err['loc']))}': {message(err)}" if err["loc"] else message(err)
            for err in e.errors()
        )
        raise CheckpointError(f"{path}: invalid metadata: {problems}. {fix}") from None
    _check_samples(path, meta, tensors)
    return meta, tensors


def message(err: Mapping[str, Any]) -> str:
    """One of pydantic's errors as its validator said it, without the "Value error, " pydantic puts before a
    validator's own ValueError (the service's request and settings errors read the same way)."""
    return str(err["msg"]).removeprefix("Value error, ")


def _check_samples(path: Path, meta: CheckpointMeta, tensors: dict[str, torch.Tensor]) -> None:
    """The sample images calibrate int8 and self-check the model at start-up: they must fit the input spec."""
    images, labels = tensors.get(SAMPLES + "images"), tensors.get(SAMPLES + "labels")
    if images is None and labels is None:
        return
    i = meta.input
    shape = ("N", i.channels, i.height, i.width)
    if images is None or images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != shape[1:]:
        got = "missing" if images is None else f"{tuple(images.shape)} {images.dtype}"
        raise CheckpointError(
            f"{path}: tensor 'samples.images' is {got}, input needs uint8 {shape}; the file is corrupt or was edited."
        )
    if labels is None or labels.dtype != torch.int64 or tuple(labels.shape) != (len(images),):
        got = "missing" if labels is None else f"{tuple(labels.shape)} {labels.dtype}"
        raise CheckpointError(
            f"{path}: tensor 'samples.labels' is {got}, needs int64 ({len(images)},); "
            "the file is corrupt or was edited."
        )
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(meta.classes):
        raise CheckpointError(
            f"{path}: tensor 'samples.labels' holds classes outside 0..{len(meta.classes) - 1}; the file is corrupt."
        )


def load(path: str | Path, *, named_by: str = COMMAND_ARGUMENT) -> tuple[SubspaceResNet, CheckpointMeta]:
    """Load, validate and rebuild a checkpoint: an eval-mode model and its metadata. `named_by`: what the
    fix in an error message tells the user to point at another file (the service: LCS_CHECKPOINT)."""
    model, meta, _ = load_with_samples(path, named_by=named_by)
    return model, meta


def load_with_samples(
    path: str | Path, *, named_by: str = COMMAND_ARGUMENT
) -> tuple[SubspaceResNet, CheckpointMeta, tuple[torch.Tensor, torch.Tensor] | None]:
    """`load`, and the sample (uint8 images, int64 labels) stored with the model, or None: one read of the
    file, so the samples always come from the same checkpoint as the model."""
    path = Path(path)
    meta, tensors = _open(path, named_by)
    images, labels = tensors.get(SAMPLES + "images"), tensors.get(SAMPLES + "labels")
    samples = None if images is None or labels is None else (images, labels)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(SAMPLES)}  # not model state
    try:  # shapes first, on the meta device: an edited width of 200,000 must be this error, not a 1.4 TB allocation
        with torch.device("meta"):
            expected = build(meta).state_dict()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: field 'arch.kwargs' does not build {meta.arch.name!r}: {e}") from None
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensors do not match the architecture in its metadata "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}); the file is corrupt or was edited."
        )
    for k, v in expected.items():
        if tensors[k].shape != v.shape or tensors[k].dtype != v.dtype:
            raise CheckpointError(
                f"{path}: tensor {k!r} has shape {tuple(tensors[k].shape)} {tensors[k].dtype}, "
                f"the architecture needs {tuple(v.shape)} {v.dtype}; the file is corrupt or was edited."
            )
        if v.is_floating_point() and not torch.isfinite(tensors[k]).all():
            raise CheckpointError(f"{path}: tensor {k!r} contains NaN or Inf; the checkpoint is corrupt.")
        if k.endswith("running_var") and (tensors[k] < 0).any():
            # sqrt(var + eps) of a negative variance is NaN: every answer at that alpha was NaN, a 500
            raise CheckpointError(
                f"{path}: tensor {k!r} holds negative variances, which no training writes; "
                "the checkpoint is corrupt or was edited."
            )
    model = build(meta)  # its size now the file's
    model.load_state_dict(tensors)
    return model.eval(), meta, samples
