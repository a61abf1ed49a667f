"""Training configuration: one dataclass, loaded from YAML, overridden with key=value arguments.

Every knob is here with a one-line why. The effective config is saved inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import torch
import yaml

from lcs.alpha import SUBSPACES, Schedule, check_alpha, is_grid
from lcs.checkpoint import STATE_SUFFIX
from lcs.layers import NormType
from lcs.models import (
    SUBSPACE_ARGS,
    SubspaceResNet,
    arch_args,
    build_model,
    check_arch_kwargs,
    model_names,
    subspace_kwargs,
)
from training.data import DATASETS

# 21 evenly spaced alphas: the grid that gets BatchNorm statistics and an accuracy measurement
DEFAULT_GRID = [round(i / 20, 4) for i in range(21)]


# Options a resumed run may change: they alter the speed of the training steps or what happens after the
# last one, never the steps themselves. Every other option, and any added later, must match the state's.
RESUME_MAY_CHANGE = frozenset(
    {
        "threads",  # torch intra-op threads: speed (and float summation order at most)
        "channels_last",  # memory layout of activations: speed (and float summation order at most)
        "out",  # where the files go; the state file is the one next to it
        "eval_batch_size",  # accuracy measurement, which never feeds back into training
        "calib_batches",  # BatchNorm statistics, estimated after the last epoch (training uses batch statistics)
    }
)


class OptionError(ValueError):
    """A bad option value. `options` are the option(s) it concerns, so that load_config can name the config
    file a value came from."""

    def __init__(self, message: str, *options: str) -> None:
        super().__init__(message)
        self.options = options


@dataclass
class TrainConfig:
    # -- data --
    dataset: str = "fashion-mnist"  # fashion-mnist | cifar10 | folder
    data_dir: str | None = None  # None: the dataset's standard location (Debian package for fashion-mnist)
    val_size: int = 0  # images held out of training for validation (0: train on all of them)
    augment: bool = True  # random crop (pad 2) + horizontal flip
    # -- model --
    arch: str = "preact_resnet"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # widths, blocks, stem_stride (lcs.models.arch_args)
    norm: str = "batch"  # batch (per-alpha statistics, calibrated after training) | group (alpha-free)
    # -- method (README.md, "The method, as implemented") --
    kind: str = "structured"  # unstructured | structured | quantized
    subspace: str = "line"  # line (LCS+L) | point (LCS+P)
    fixed_alpha: float | None = None  # train one compression level only: the independent baseline
    keep_min: float = Schedule.keep_min  # unstructured: keep fraction at alpha = 0
    width_min: float = Schedule.width_min  # structured: width at alpha = 0
    bits_min: int = Schedule.bits_min  # quantized: bits at alpha = 0
    bits_max: int = Schedule.bits_max  # quantized: bits at alpha = 1
    beta: float = 1.0  # weight of the cos^2(w0, w1) line regulariser
    # share of alpha samples put on the two ends of [0, 1], as the reference samples unstructured sparsity (it
    # samples bit widths uniformly, end_bias=0; measured for the quantized lines in README, The method)
    end_bias: float = 0.5
    warmup_fraction: float = 0.8  # compression is phased in over this share of the steps
    act_quant_warmup: int = 200  # quantized: steps of activation-range tracking before quantising them
    sandwich: bool = True  # structured: each step sums losses at widths min, max and two random ones
    stat_alphas: list[float] = field(default_factory=lambda: list(DEFAULT_GRID))
    calib_batches: int = 20  # batches of training images per alpha to estimate BatchNorm statistics
    # -- optimisation --
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1  # peak learning rate: linear warm-up for one epoch (at most half the steps), cosine decay to 0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    # -- run --
    seed: int = 0
    threads: int = 2  # torch intra-op threads on this node, shared by its processes under torchrun
    channels_last: bool = True  # ~25 % faster training on CPU here
    out: str = "runs/model.safetensors"  # final checkpoint; resumable state goes beside it
    eval_batch_size: int = 500

    def __post_init__(self) -> None:
        """Refuse every out-of-range value here, at load time: each one used to surface only deep inside
        training (eval_batch_size=0 after the last epoch), or never (end_bias=5 trained alpha 0 only)."""
        try:
            self.schedule()  # lcs.alpha.Schedule refuses a bad kind, keep_min, width_min, bits_min or bits_max
        except ValueError as e:  # its message names the field(s)
            fields = [f.name for f in dataclasses.fields(Schedule) if f.name in str(e)]
            raise OptionError(str(e), *fields) from None
        if self.subspace not in SUBSPACES:
            raise OptionError(f"subspace must be one of {SUBSPACES}; got {self.subspace!r}", "subspace")
        if self.norm not in get_args(NormType):
            raise OptionError(f"norm must be one of {get_args(NormType)}; got {self.norm!r}", "norm")
        try:
            check_arch_kwargs(self.arch_kwargs)
        except ValueError as e:  # at load time, not as a TypeError or RuntimeError from the first model build or step
            hint = (
                ". Training sets them from the dataset (in_channels, num_classes) and its options subspace (line), "
                "norm, stat_alphas and kind, keep_min, width_min, bits_min, bits_max (schedule): set those options "
                "instead"
                if any(k in SUBSPACE_ARGS for k in self.arch_kwargs)
                else ""
            )
            raise OptionError(f"arch_kwargs={self.arch_kwargs!r}: {e}{hint}", "arch_kwargs") from None
        if self.fixed_alpha is not None:
            try:
                check_alpha(self.fixed_alpha)
            except ValueError as e:
                raise OptionError(f"fixed_alpha={self.fixed_alpha!r}: {e}", "fixed_alpha") from None
            self.subspace = "point"  # a baseline is one network: nothing to interpolate
            self.stat_alphas = [self.fixed_alpha]
        if self.out.endswith(("/", os.sep)):  # written as the file `runs` beside a `runs.state.safetensors`
            raise OptionError(
                f"out={self.out} names a folder; name the checkpoint file, e.g. out={self.out}model.safetensors", "out"
            )
        self.out = os.path.expanduser(self.out)  # a YAML value is no shell word: `~/runs` made a folder named ~
        if self.data_dir is not None:
            self.data_dir = os.path.expanduser(self.data_dir)
        finite = math.isfinite
        _require(self.val_size >= 0, "val_size", self.val_size, "val_size >= 0 (0: train on every image)")
        _require(finite(self.beta) and self.beta >= 0, "beta", self.beta, "beta >= 0 (0: no line regulariser)")
        _require(  # u < end_bias puts a sample on an end: above 1, every sample lands on alpha 0
            0.0 <= self.end_bias <= 1.0, "end_bias", self.end_bias, "0 <= end_bias <= 1 (a share of the samples)"
        )
        _require(0.0 <= self.warmup_fraction < 1.0, "warmup_fraction", self.warmup_fraction, "0 <= warmup_fraction < 1")
        _require(self.act_quant_warmup >= 0, "act_quant_warmup", self.act_quant_warmup, "act_quant_warmup >= 0")
        _require(
            _is_grid(self.stat_alphas),
            "stat_alphas",
            self.stat_alphas,
            "a non-empty list of distinct alphas in [0, 1], e.g. stat_alphas=[0, 0.5, 1]",
        )
        self.stat_alphas = sorted(self.stat_alphas)  # a checkpoint's grid is ascending (lcs.checkpoint)
        _require(self.calib_batches >= 1, "calib_batches", self.calib_batches, "calib_batches >= 1")
        _require(self.epochs >= 1, "epochs", self.epochs, "a positive number of epochs")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "a positive batch_size")
        _require(finite(self.lr) and self.lr > 0, "lr", self.lr, "a learning rate lr > 0")
        _require(  # nesterov=True: torch refuses momentum 0 when it builds the optimiser
            0.0 < self.momentum < 1.0, "momentum", self.momentum, "0 < momentum < 1 (Nesterov needs momentum)"
        )
        wd = self.weight_decay
        _require(finite(wd) and wd >= 0, "weight_decay", wd, "weight_decay >= 0")
        _require(0.0 <= self.label_smoothing < 1.0, "label_smoothing", self.label_smoothing, "0 <= label_smoothing < 1")
        _require(0 <= self.seed < 2**32, "seed", self.seed, "0 <= seed < 2**32")
        _require(self.threads >= 1, "threads", self.threads, "threads >= 1 (torch refuses 0)")
        _require(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "eval_batch_size >= 1")
        # the names and the network they build, here too: checked in training, their errors named no config file
        if self.dataset not in DATASETS:
            raise OptionError(
                f"dataset={self.dataset!r} is not one training reads; use one of {list(DATASETS)}", "dataset"
            )
        if self.arch not in model_names():
            raise OptionError(
                f"arch={self.arch!r} is not a registered architecture; use one of {model_names()}", "arch"
            )
        try:
            with torch.device("meta"):  # no memory, no random draws: only whether it builds
                self.model(in_channels=1, num_classes=2)
        except (TypeError, ValueError, RuntimeError) as e:
            raise OptionError(
                f"arch_kwargs={self.arch_kwargs!r} does not build {self.arch!r} ({e}); "
                f"arch_kwargs may set {arch_args()}",
                "arch_kwargs",
            ) from None

    def schedule(self) -> Schedule:
        return Schedule(self.kind, self.keep_min, self.width_min, self.bits_min, self.bits_max)  # type: ignore[arg-type]

    def model(self, in_channels: int, num_classes: int) -> SubspaceResNet:
        """The network this config trains, for data of `in_channels` channels and `num_classes` classes."""
        kwargs = subspace_kwargs(
            self.arch_kwargs,
            in_channels=in_channels,
            num_classes=num_classes,
            subspace=self.subspace,  # type: ignore[arg-type]
            norm=self.norm,  # type: ignore[arg-type]
            stat_alphas=self.stat_alphas,
            schedule=self.schedule(),
        )
        return build_model(self.arch, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resume_conflicts(self, saved: dict[str, Any]) -> list[str]:
        """The options outside RESUME_MAY_CHANGE whose values differ from `saved` (a state file's config), as
        "name: VALUE in the state, VALUE now"; none means the state can be resumed."""
        now = json.loads(json.dumps(self.to_dict()))  # as the state file stores it: lists, not tuples

        def show(config: dict[str, Any], key: str) -> str:
            return json.dumps(config[key]) if key in config else "(absent)"

        return [
            f"{k}: {show(saved, k)} in the state, {show(now, k)} now"
            for k in sorted((now.keys() | saved.keys()) - RESUME_MAY_CHANGE)
            if k not in saved or k not in now or saved[k] != now[k]  # 1 == 1.0: stat_alphas=[0, 1] is [0.0, 1.0]
        ]

    @property
    def state_path(self) -> Path:
        """Resumable training state, written every epoch next to `out`."""
        out = Path(self.out)
        return out.with_name(out.stem + STATE_SUFFIX)


def options_help(width: int = 100) -> str:
    """Every option with its default, for `python -m training train --help`: generated from TrainConfig, so
    it cannot fall behind it. What each one does: the comment beside it above."""

    def show(v: Any) -> str:
        if v is None or isinstance(v, bool):
            return yaml.safe_dump(v).split("\n")[0]  # null, true, false
        if isinstance(v, list):
            items = [show(x) for x in v]
            return "[" + ", ".join(items if len(items) <= 4 else [*items[:2], "...", items[-1]]) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {show(x)}" for k, x in v.items()) + "}"
        return str(v)

    defaults = TrainConfig()
    lines = [""]
    for f in dataclasses.fields(TrainConfig):
        item = f"  {f.name}={show(getattr(defaults, f.name))}"  # two spaces apart: some values hold one
        if len(lines[-1]) + len(item) > width:
            lines.append("")
        lines[-1] += item
    return "\n".join(
        [
            "Options are key=value arguments after an optional YAML config file that maps the same keys to values",
            "(a repository checkout's configs/*.yaml); a key=value wins over the file. Values are YAML: 0.5, true,",
            "null, [0, 0.5, 1], 'arch_kwargs={widths: [16, 32], blocks: [1, 1]}'. What each option does:",
            "training/config.py.",
            "",
            "options and their defaults:",
            *lines,
            "",
            "example: python -m training train configs/structured_line.yaml epochs=2 out=runs/try.safetensors",
        ]
    )


def _as_written(value: object) -> str:
    """A value as the config or command line would write it: YAML's spelling (true, not True; null, not
    None), a string in quotes."""
    return repr(value) if isinstance(value, str) else json.dumps(value, default=str)


def _require(ok: bool, name: str, value: object, valid: str) -> None:
    if not ok:
        raise OptionError(f"{name}={_as_written(value)} is out of range; use {valid}", name)


def _is_grid(alphas: list[float]) -> bool:
    """Non-empty, numbers in [0, 1], no two within SAME_ALPHA (stats_index matches an alpha to a row within
    it, so a second one that close would get a statistics row nothing can ever select)."""
    if not alphas or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in alphas):
        return False
    grid = sorted(alphas)
    return all(0.0 <= a <= 1.0 for a in grid) and is_grid(grid)


def _coerce(name: str, raw: str, typ: Any) -> Any:
    if typ is str or typ == "str":
        return raw  # as typed: out=[x is a file name, not broken YAML
    try:
        value = _load_yaml(raw)  # "0.5" -> 0.5, "[1,2]" -> [1, 2], "true" -> True, "null" -> None
    except _DuplicateKey as e:
        raise ValueError(f"option {name!r}: {raw!r} sets {e.key!r} twice; keep one") from None
    except yaml.YAMLError as e:
        raise ValueError(
            f"option {name!r}: {raw!r} is not a YAML value ({_yaml_problem(e)}); "
            f"a value with spaces needs quotes in the shell: '{name}=...'"
        ) from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _alternatives(typ: Any) -> tuple[Any, ...]:
    return get_args(typ) if get_origin(typ) in (Union, types.UnionType) else (typ,)


def _numbers(value: Any, typ: Any) -> Any:
    """A number written as a string, for an option that takes numbers: YAML 1.1 (PyYAML) reads 1e-3, having no
    dot, as the string '1e-3', so lr=1e-3 and `lr: 1e-3` were refused as not a number."""

    def number(x: Any) -> Any:
        if isinstance(x, str):
            try:
                return float(x)
            except ValueError:
                return x  # not a number: refused by _check_type, by name
        return x

    for t in _alternatives(typ):
        if t is float:
            return number(value)
        if get_origin(t) is list and get_args(t) == (float,) and isinstance(value, list):
            return [number(x) for x in value]
    return value


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def _type_name(typ: Any) -> str:
    """How an option's type reads in an error: 'a number or null', 'a list of numbers', 'a mapping'."""
    names = []
    for t in _alternatives(typ):
        base = get_origin(t) or t
        if base is list:
            names.append(f"a list of {_type_name(get_args(t)[0]).split(' ', 1)[1]}s" if get_args(t) else "a list")
        elif base is dict:
            names.append("a mapping (e.g. {widths: [16, 32]})")
        else:
            names.append(_TYPE_NAMES.get(base, str(base)))
    return " or ".join(names)


def _check_type(name: str, value: Any, typ: Any) -> None:
    """Raise ValueError unless value has the option's type (an int is a float; a bool is not an int)."""
    for t in _alternatives(typ):
        base = get_origin(t) or t  # list[float] -> list, dict[str, Any] -> dict
        if base is type(None):
            ok = value is None
        elif base is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif base is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, base)
        if ok:
            return
    raise OptionError(f"option {name!r} must be {_type_name(typ)}; got {_as_written(value)}", name)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, first: int, second: int) -> None:
        super().__init__(f"{key!r} is set twice (lines {first} and {second}); keep one")
        self.key = key


class _UniqueKeys(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (_DuplicateKey): PyYAML
    keeps the last one without a word, so `lr: 0.1` ten lines above `lr: 0.01` trained at 0.01. The keys are
    checked as written: before PyYAML merges `<<` into a mapping (which it does in place, so a mapping merged
    into another and also used by an alias is seen merged the second time), once per mapping."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._checked: set[int] = set()  # ids of the mapping nodes whose keys were checked

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        if id(node) not in self._checked:
            self._checked.add(id(node))
            lines: dict[str, int] = {}
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in lines:
                        raise _DuplicateKey(key.value, lines[key.value], key.start_mark.line + 1)
                    lines[key.value] = key.start_mark.line + 1
        super().flatten_mapping(node)


def _load_yaml(text: str) -> Any:
    """yaml.safe_load, refusing duplicate keys (_UniqueKeys)."""
    return yaml.load(text, Loader=_UniqueKeys)  # a SafeLoader: builds only plain data


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line from PyYAML's several: what is wrong and where (1-based, as editors count)."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def _did_you_mean(path: Path) -> str:
    """A hint for a config file that is not there: configs/structured_line.yml -> configs/structured_line.yaml."""
    if path.exists():
        return ""
    try:
        names = [p.name for p in path.parent.iterdir() if p.suffix in (".yaml", ".yml")]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1)
    return f"; did you mean {path.parent / close[0]}?" if close else ""


def _check_baseline(values: dict[str, Any], from_file: set[str]) -> None:
    """fixed_alpha trains one network at one alpha: TrainConfig sets subspace point and stat_alphas [alpha].
    A subspace or stat_alphas given to the contrary, in the same file or on the command line, was overridden
    without a word: refused. A subspace config's own values give way to fixed_alpha on the command line
    (`configs/structured_line.yaml fixed_alpha=0.5`: that config's baseline, as scripts/train_shipped.sh runs)."""
    alpha = values.get("fixed_alpha")
    if alpha is None:
        return
    for key, implied, wants in (("subspace", "point", "a line"), ("stat_alphas", [alpha], "other alphas")):
        if key not in values or values[key] == implied or (key in from_file and "fixed_alpha" not in from_file):
            continue
        raise OptionError(
            f"fixed_alpha={alpha} trains one network at that alpha (subspace point, stat_alphas [{alpha}]), but "
            f"{key}={json.dumps(values[key])} asks for {wants}; leave out {key} or fixed_alpha",
            "fixed_alpha",
            key,
        )


def split_config(items: list[str]) -> tuple[str | None, list[str]]:
    """The command line's optional config file and its key=value overrides. The first item is the config if
    it is an existing .yaml/.yml file, else unless it is an override: key=value with an option's name for
    key, or with an '=' and no .yaml suffix (cfg/lr=0.1.yaml was taken for an override and refused as an
    unknown option 'cfg/lr'; an existing lr=0.5.yaml as an lr that is no number)."""
    if not items:
        return None, []
    first = items[0]
    key, sep, _ = first.partition("=")
    yaml_file = first.endswith((".yaml", ".yml"))
    if sep and not (yaml_file and Path(first).is_file()) and (key in get_type_hints(TrainConfig) or not yaml_file):
        return None, list(items)
    return first, list(items[1:])


def load_config(path: str | Path | None, overrides: list[str]) -> TrainConfig:
    """A TrainConfig from a YAML file (or the defaults) plus `key=value` overrides. An error about a value
    read from the file names the file."""
    values: dict[str, Any] = {}
    from_file: set[str] = set()  # the options whose value came from the file (not overridden)
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(
                f"{path}: cannot read this config file ({getattr(e, 'strerror', None) or e}){_did_you_mean(path)}"
            ) from None
        try:
            loaded = _load_yaml(text) or {}
        except _DuplicateKey as e:
            raise ValueError(f"{path}: {e}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
        except RecursionError:  # PyYAML's composer recurses once per level of nesting
            raise ValueError(f"{path}: nested too deeply to be a config file") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file must be a YAML mapping of option: value")
        values.update(loaded)
        from_file = set(loaded)
    hints = get_type_hints(TrainConfig)
    given: dict[str, str] = {}  # override key -> the item that set it: a second one is refused, as in a file
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value")
        if key not in hints:
            raise ValueError(f"unknown option {key!r}; options: {sorted(hints)}")
        if key in given:
            raise ValueError(f"option {key!r} is given twice on the command line ({given[key]} and {item}); keep one")
        given[key] = item
        values[key] = _coerce(key, raw, hints[key])
        from_file.discard(key)
    unknown = sorted(set(values) - set(hints), key=repr)  # YAML reads some keys as other types (on: as True)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} in {path}; options: {sorted(hints)}")
    try:
        for key, value in values.items():
            values[key] = _numbers(value, hints[key])
            _check_type(key, values[key], hints[key])
        _check_baseline(values, from_file)
        return TrainConfig(**values)
    except OptionError as e:
        if from_file & set(e.options):  # `lr: -1` in a file said only "lr=-1 is out of range"
            raise OptionError(f"{path}: {e}", *e.options) from None
        raise
