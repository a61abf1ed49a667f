"""Training configuration: YAML + key=value overrides, refusals of unknown keys and bad values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lcs.alpha import KINDS, Schedule
from training.config import DEFAULT_GRID, RESUME_MAY_CHANGE, TrainConfig, load_config


def test_defaults() -> None:
    cfg = load_config(None, [])
    assert cfg == TrainConfig()
    assert cfg.kind == "structured" and cfg.subspace == "line" and cfg.fixed_alpha is None
    assert cfg.stat_alphas == DEFAULT_GRID and len(DEFAULT_GRID) == 21
    assert DEFAULT_GRID[0] == 0.0 and DEFAULT_GRID[-1] == 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_schedule_defaults_are_lcs_s(kind: str) -> None:
    assert TrainConfig(kind=kind).schedule() == Schedule(kind)  # type: ignore[arg-type]


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("# a comment\nkind: quantized\nsubspace: point\nepochs: 3\nlr: 0.05\nout: a.safetensors\n")
    cfg = load_config(path, ["epochs=5", "bits_min=4", "stat_alphas=[0, 0.5, 1]", "out=b.safetensors"])
    assert (cfg.kind, cfg.subspace, cfg.lr) == ("quantized", "point", 0.05)  # from the file
    assert cfg.epochs == 5 and cfg.out == "b.safetensors"  # the override wins
    assert cfg.bits_min == 4 and cfg.schedule().level(0.0).bits == 4
    assert cfg.stat_alphas == [0, 0.5, 1]


def test_override_value_parsing() -> None:
    cfg = load_config(
        None,
        [
            "lr=1",  # int for a float option
            "augment=false",
            "data_dir=null",
            "out=123",  # a str option keeps the raw text
            "arch_kwargs={widths: [8, 16], blocks: [1, 1]}",
            "fixed_alpha=0.25",
        ],
    )
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.augment is False and cfg.data_dir is None and cfg.out == "123"
    assert cfg.arch_kwargs == {"widths": [8, 16], "blocks": [1, 1]}
    assert cfg.fixed_alpha == 0.25


def test_empty_yaml_is_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config(path, []) == TrainConfig()


def test_unknown_override_key() -> None:
    with pytest.raises(ValueError, match="unknown option 'epoch'"):
        load_config(None, ["epoch=3"])


def test_unknown_yaml_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 2\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_config(path, [])


def test_unknown_yaml_keys_of_other_types_are_named_too(tmp_path: Path) -> None:
    """YAML 1.1 reads `on:` as True; sorting it beside a string key was a TypeError traceback."""
    path = tmp_path / "c.yaml"
    path.write_text("on: 1\nepoch: 2\n")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['epoch', True\]"):
        load_config(path, [])


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- epochs\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(path, [])


def test_missing_config_file_suggests_the_near_name(tmp_path: Path) -> None:
    (tmp_path / "structured_line.yaml").write_text("epochs: 2\n")
    missing = tmp_path / "structured_line.yml"  # was a FileNotFoundError traceback
    with pytest.raises(ValueError, match="No such file") as err:
        load_config(missing, [])
    assert str(err.value).startswith(f"{missing}: cannot read this config file")
    assert str(err.value).endswith(f"did you mean {tmp_path / 'structured_line.yaml'}?")
    with pytest.raises(ValueError, match="Is a directory"):
        load_config(tmp_path, [])


def test_a_config_nested_too_deeply_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("x: " + "[" * 5000 + "]" * 5000 + "\n")  # was PyYAML's RecursionError traceback
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: nested too deeply to be a config file$"):
        load_config(path, [])


@pytest.mark.parametrize(
    ("text", "where"),
    [("kind: [unclosed\n", "line 2, column 1"), ("kind: structured\n  epochs: 3\n", "line 2, column 9")],
)
def test_yaml_syntax_error_is_one_line_with_its_place(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)  # was a yaml ScannerError / ParserError traceback
    with pytest.raises(ValueError) as err:
        load_config(path, [])
    message = str(err.value)
    assert message.startswith(f"{path}: not valid YAML (") and where in message and "\n" not in message


def test_override_that_is_not_yaml() -> None:
    """`arch_kwargs={foo: 1}` unquoted reaches Python as two arguments, the first "arch_kwargs={foo:"."""
    with pytest.raises(ValueError, match=r"option 'arch_kwargs': '\{foo:' is not a YAML value .* needs quotes"):
        load_config(None, ["arch_kwargs={foo:", "1}"])
    assert load_config(None, ["out=[x.safetensors"]).out == "[x.safetensors"  # a string option is taken as typed


def test_override_without_equals() -> None:
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["epochs"])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("kind=bogus", "kind"),
        ("subspace=plane", "subspace"),
        ("norm=layer", "norm"),
        ("epochs=0", "positive"),
        ("batch_size=-1", "positive"),
        ("fixed_alpha=1.5", "fixed_alpha"),
        ("warmup_fraction=1", "warmup_fraction"),
        ("keep_min=0", "keep_min"),
        ("width_min=2", "width_min"),
        ("bits_min=9", "bits"),
        ("epochs=abc", "epochs"),  # wrong type: refused at load time, not deep inside training
        ("epochs=2.5", "epochs"),
        ("lr=fast", "lr"),
        ("augment=maybe", "augment"),
        ("stat_alphas=0.5", "stat_alphas"),
        ("arch_kwargs=[1]", "arch_kwargs"),
    ],
)
def test_bad_values(override: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("kind=bogus", "kind must be one of ('unstructured', 'structured', 'quantized'); got 'bogus'"),
        ("norm=layer", "norm must be one of ('batch', 'group'); got 'layer'"),
        ("fixed_alpha=1.5", "fixed_alpha=1.5: alpha must be in [0, 1] (alpha in [0, 1]; 1 = least compressed"),
        ("fixed_alpha=.nan", "fixed_alpha=nan: alpha must be in [0, 1]"),
        ("keep_min=0", "keep_min must be in (0, 1]; got 0"),
        ("width_min=2", "width_min must be in (0, 1]; got 2"),
        ("bits_min=9", "need 1 <= bits_min <= bits_max <= 16; got 9..8"),
    ],
)
def test_values_lcs_checks_name_the_option_and_what_is_valid(override: str, message: str) -> None:
    """kind, the schedule fields, norm's values and the alpha range are lcs's (Schedule, NormType,
    check_alpha): the config asks lcs instead of repeating its checks, and says which option is wrong."""
    with pytest.raises(ValueError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(
    ("override", "use"),
    [
        ("val_size=-1", "val_size >= 0"),
        ("beta=-0.5", "beta >= 0"),
        ("end_bias=5", "0 <= end_bias <= 1"),  # every sample was alpha 0
        ("end_bias=-0.1", "0 <= end_bias <= 1"),
        ("act_quant_warmup=-1", "act_quant_warmup >= 0"),
        ("stat_alphas=[]", "non-empty"),  # an IndexError after the first epoch
        ("stat_alphas=[0, 1.5]", "in [0, 1]"),
        ("stat_alphas=[0, 0.5, 0.5]", "distinct"),
        ("stat_alphas=[0, true]", "stat_alphas"),
        ("calib_batches=0", "calib_batches >= 1"),
        ("lr=0", "lr > 0"),
        ("lr=.nan", "lr > 0"),
        ("lr=.inf", "lr > 0"),
        ("momentum=0", "0 < momentum < 1"),  # torch refuses Nesterov without momentum, after data loading
        ("momentum=1", "0 < momentum < 1"),
        ("weight_decay=-1", "weight_decay >= 0"),
        ("label_smoothing=1", "0 <= label_smoothing < 1"),
        ("seed=-1", "0 <= seed"),
        ("threads=0", "threads >= 1"),  # a RuntimeError from torch.set_num_threads
        ("eval_batch_size=0", "eval_batch_size >= 1"),  # "range() arg 3 must not be zero" after the last epoch
    ],
)
def test_out_of_range_values_name_the_option_the_value_and_the_fix(override: str, use: str) -> None:
    name, _, raw = override.partition("=")
    with pytest.raises(ValueError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert message.startswith(f"{name}=") and "out of range; use" in message and use in message
    assert raw.strip(".").lower() in message.lower()  # the value as given ("nan" for .nan)


@pytest.mark.parametrize("kwarg", ["norm", "line", "schedule", "in_channels"])
def test_arch_kwargs_may_not_set_what_the_options_set(kwarg: str) -> None:
    """arch_kwargs={norm: group} loaded, then failed with a TypeError when the model was built."""
    with pytest.raises(ValueError) as err:
        load_config(None, [f"arch_kwargs={{widths: [8, 16], {kwarg}: 1}}"])
    message = str(err.value)
    assert message.startswith(f"arch_kwargs={{'widths': [8, 16], '{kwarg}': 1}}: architecture kwargs set ['{kwarg}']")
    assert "subspace (line), norm, stat_alphas and kind, keep_min" in message  # the options that set them
    assert message.endswith("set those options instead")


@pytest.mark.parametrize(
    ("arch_kwargs", "problem"),
    [  # the first three built, then failed at the first training step with a RuntimeError traceback
        ("{stem_stride: 0}", "stem_stride must be a positive integer (1: full resolution, 2: half), got 0"),
        ("{stem_stride: -1}", "stem_stride must be a positive integer (1: full resolution, 2: half), got -1"),
        ("{widths: [0, 16]}", "widths must be a non-empty list of positive integers (the channels of each stage)"),
        ("{blocks: [-1, 1]}", "blocks must be a non-empty list of positive integers"),  # was accepted silently
        ("{blocks: []}", "blocks must be a non-empty list"),
        ("{widths: 16}", "widths must be a non-empty list"),
        ("{stem_stride: true}", "stem_stride must be a positive integer"),
    ],
)
def test_arch_kwargs_that_build_but_cannot_run(arch_kwargs: str, problem: str) -> None:
    with pytest.raises(ValueError) as err:
        load_config(None, ["arch=tiny_resnet", f"arch_kwargs={arch_kwargs}"])
    message = str(err.value)
    assert message.startswith("arch_kwargs={") and problem in message and "set those options" not in message


def test_models_refuse_stage_sizes_that_cannot_run() -> None:
    """The same check guards a model built directly, or from a checkpoint's arch.kwargs (lcs.checkpoint)."""
    from lcs.models import build_model

    with pytest.raises(ValueError, match="stem_stride must be a positive integer"):
        build_model("tiny_resnet", stem_stride=0)
    with pytest.raises(ValueError, match="widths must be a non-empty list of positive integers"):
        build_model("tiny_resnet", widths=(8, 0))


def test_fixed_alpha_replaces_the_config_file_s_grid(tmp_path: Path) -> None:
    """A baseline's grid is its own alpha: a subspace config's stat_alphas (here empty) give way to fixed_alpha
    on the command line, as scripts/train_shipped.sh trains each config's baselines."""
    path = tmp_path / "c.yaml"
    path.write_text("subspace: line\nstat_alphas: []\n")
    cfg = load_config(path, ["fixed_alpha=0.5"])
    assert cfg.stat_alphas == [0.5] and cfg.subspace == "point"


def test_shipped_configs_load() -> None:
    for path in sorted(Path(__file__).resolve().parents[2].glob("configs/*.yaml")):
        assert load_config(path, []).epochs >= 2, path  # so warmup_steps leaves their one-epoch warm-up as it was
        assert load_config(path, ["fixed_alpha=0.5"]).stat_alphas == [0.5], path  # their baselines (train_shipped)


@pytest.mark.parametrize(
    ("yaml_text", "override", "message"),
    [  # each said only the part after "FILE: ", so the file with the bad value had to be guessed
        ("lr: -1\n", None, "{path}: lr=-1 is out of range; use a learning rate lr > 0"),
        ("kind: bogus\n", None, "{path}: kind must be one of"),
        ("bits_max: 2\n", None, "{path}: need 1 <= bits_min <= bits_max <= 16; got 3..2"),
        ("subspace: plane\n", None, "{path}: subspace must be one of"),
        ("fixed_alpha: 2\n", None, "{path}: fixed_alpha=2: alpha must be in [0, 1]"),
        ("arch_kwargs: {stem_stride: 0}\n", None, "{path}: arch_kwargs={{'stem_stride': 0}}: stem_stride must be"),
        ("epochs: ten\n", None, "{path}: option 'epochs' must be an integer; got 'ten'"),
        # checked in training until session 35, where their errors named no file (nor, for dataset, the option)
        ("arch: resnet\n", None, "{path}: arch='resnet' is not a registered architecture; use one of"),
        ("dataset: mnist\n", None, "{path}: dataset='mnist' is not one training reads; use one of"),
        ("arch_kwargs: {widths: [8, 16], blocks: [1]}\n", None, "{path}: arch_kwargs={{'widths': [8, 16], "),
        # a value from the command line is not the file's fault
        ("lr: 0.1\n", "lr=-1", "lr=-1.0 is out of range"),
        ("lr: -1\n", "lr=0.2", None),
    ],
)
def test_errors_name_the_config_file_a_value_came_from(
    tmp_path: Path, yaml_text: str, override: str | None, message: str | None
) -> None:
    path = tmp_path / "neglr.yaml"
    path.write_text(yaml_text)
    overrides = [override] if override else []
    if message is None:
        assert load_config(path, overrides).lr == 0.2
        return
    with pytest.raises(ValueError) as err:
        load_config(path, overrides)
    assert str(err.value).startswith(message.format(path=path)), str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [  # they said "must be of type <class 'int'>" and "dict[str, typing.Any]"
        ("epochs=ten", "option 'epochs' must be an integer; got 'ten'"),
        ("lr=fast", "option 'lr' must be a number; got 'fast'"),
        ("augment=maybe", "option 'augment' must be true or false; got 'maybe'"),
        ("fixed_alpha=half", "option 'fixed_alpha' must be a number or null; got 'half'"),
        ("stat_alphas=0.5", "option 'stat_alphas' must be a list of numbers; got 0.5"),
        ("arch_kwargs=[1]", "option 'arch_kwargs' must be a mapping (e.g. {widths: [16, 32]}); got [1]"),
        ("data_dir=[1]", "option 'data_dir' must be a string or null; got [1]"),
        ("epochs=true", "option 'epochs' must be an integer; got true"),  # YAML's spelling, not Python's True
        (
            "stat_alphas=[true]",
            "stat_alphas=[true] is out of range; use a non-empty list of distinct alphas in [0, 1], e.g. "
            "stat_alphas=[0, 0.5, 1]",
        ),
    ],
)
def test_type_errors_say_what_is_expected_in_words(override: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        load_config(None, [override])
    assert str(err.value) == message


def test_numbers_in_exponent_notation_are_numbers(tmp_path: Path) -> None:
    """PyYAML reads 1e-3 (no dot) as a string: lr=1e-3 was refused as not a float."""
    cfg = load_config(None, ["lr=1e-3", "fixed_alpha=5e-1", "stat_alphas=[5e-1]"])
    assert cfg.lr == 0.001 and cfg.fixed_alpha == 0.5 and cfg.stat_alphas == [0.5]
    assert load_config(None, ["stat_alphas=[0, 5e-1, 1]"]).stat_alphas == [0, 0.5, 1]
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nweight_decay: 5E-4\nstat_alphas: [0, 2.5e-2, 1]\n")
    cfg = load_config(path, [])
    assert cfg.lr == 0.001 and cfg.weight_decay == 0.0005 and cfg.stat_alphas == [0, 0.025, 1]
    with pytest.raises(ValueError, match="option 'epochs' must be an integer; got '1e1'"):
        load_config(None, ["epochs=1e1"])  # integers stay integers


def test_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    """PyYAML keeps the last of two equal keys without a word: the run trained with the other value."""
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.1\nepochs: 2\nlr: 0.01\n")
    with pytest.raises(ValueError) as err:
        load_config(path, [])
    assert str(err.value) == f"{path}: 'lr' is set twice (lines 1 and 3); keep one"
    path.write_text("arch_kwargs:\n  widths: [8, 16]\n  widths: [4, 8]\n")
    with pytest.raises(ValueError, match=r"'widths' is set twice \(lines 2 and 3\)"):
        load_config(path, [])
    with pytest.raises(ValueError) as err:
        load_config(None, ["arch_kwargs={widths: [8], widths: [9]}"])
    assert str(err.value) == "option 'arch_kwargs': '{widths: [8], widths: [9]}' sets 'widths' twice; keep one"
    # on the command line too: the last of two overrides won without a word (README: "a key given twice is
    # refused"); overriding the file's value is not giving it twice
    path.write_text("lr: 0.1\n")
    with pytest.raises(ValueError) as err:
        load_config(path, ["epochs=2", "lr=0.05", "lr=0.01"])
    assert str(err.value) == "option 'lr' is given twice on the command line (lr=0.05 and lr=0.01); keep one"
    assert load_config(path, ["lr=0.05"]).lr == 0.05
    # a key overriding one merged in with `<<` is not given twice; an alias is read once
    from training.config import _load_yaml

    # a mapping merged into another and also used by an alias: PyYAML merges in place, and the second use
    # was read merged, as 'lr' set twice
    assert _load_yaml("x:\n  <<: &b {<<: {lr: 0.1}, lr: 0.2}\ny: *b\n") == {"x": {"lr": 0.2}, "y": {"lr": 0.2}}
    assert _load_yaml("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\nc: *a\n") == {
        "a": {"x": 1, "y": 2},
        "b": {"x": 3, "y": 2},
        "c": {"x": 1, "y": 2},
    }


def test_a_config_path_with_an_equals_sign(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cfg/lr=0.1.yaml was taken for an override and refused as the unknown option 'cfg/lr'."""
    from training.config import split_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "lr=0.1.yaml").write_text("lr: 0.1\n")
    (tmp_path / "lr=0.5").write_text("a file named like an override")
    assert split_config(["cfg/lr=0.1.yaml", "epochs=2"]) == ("cfg/lr=0.1.yaml", ["epochs=2"])
    assert split_config(["cfg/missing=1.yaml"]) == ("cfg/missing=1.yaml", [])  # refused as a missing config
    assert split_config(["lr=0.5", "epochs=2"]) == (None, ["lr=0.5", "epochs=2"])  # an option's name: an override
    (tmp_path / "lr=0.5.yaml").write_text("lr: 0.5\n")  # an option's name, but an existing YAML file
    (tmp_path / "lr=0.1").mkdir()
    (tmp_path / "lr=0.1" / "cfg.yaml").write_text("lr: 0.1\n")
    assert split_config(["lr=0.5.yaml"]) == ("lr=0.5.yaml", [])
    assert load_config(*split_config(["lr=0.1/cfg.yaml"])).lr == 0.1
    assert split_config(["lr=0.7.yaml"]) == (None, ["lr=0.7.yaml"])  # no such file: an lr, refused as no number
    assert split_config(["c.yaml", "lr=0.5"]) == ("c.yaml", ["lr=0.5"])
    assert split_config(["foo=1"]) == (None, ["foo=1"])  # refused as an unknown option
    assert split_config([]) == (None, [])
    assert load_config(*split_config(["cfg/lr=0.1.yaml", "epochs=2"])).epochs == 2


def test_bad_yaml_value_type(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("epochs: ten\n")
    with pytest.raises(ValueError, match="epochs"):
        load_config(path, [])


def test_fixed_alpha_forces_a_point_and_its_own_statistics_row() -> None:
    cfg = load_config(None, ["fixed_alpha=0.3"])
    assert cfg.subspace == "point"
    assert cfg.stat_alphas == [0.3]
    assert load_config(None, ["fixed_alpha=0.3", "subspace=point", "stat_alphas=[0.3]"]) == cfg  # saying so is fine


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "message"),
    [  # each was overridden without a word: the run trained a point at one alpha
        (None, ["fixed_alpha=0.3", "subspace=line"], "fixed_alpha=0.3 trains one network at that alpha"),
        (None, ["subspace=line", "fixed_alpha=0.3"], 'but subspace="line" asks for a line; leave out subspace or'),
        (None, ["fixed_alpha=0.3", "stat_alphas=[0, 1]"], "but stat_alphas=[0, 1] asks for other alphas"),
        ("fixed_alpha: 0.3\nsubspace: line\n", [], "{path}: fixed_alpha=0.3 trains one network"),
        ("fixed_alpha: 0.3\n", ["subspace=line"], "{path}: fixed_alpha=0.3 trains one network"),
    ],
)
def test_fixed_alpha_against_an_explicit_subspace_or_grid(
    tmp_path: Path, yaml_text: str | None, overrides: list[str], message: str
) -> None:
    path = tmp_path / "c.yaml"
    if yaml_text is not None:
        path.write_text(yaml_text)
    with pytest.raises(ValueError) as err:
        load_config(path if yaml_text is not None else None, overrides)
    assert message.format(path=path) in str(err.value)


def test_state_path_sits_next_to_the_checkpoint() -> None:
    cfg = TrainConfig(out="runs/x/model.safetensors")
    assert cfg.state_path == Path("runs/x/model.state.safetensors")


def test_out_must_name_a_file_and_a_home_folder_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # out=runs/ wrote a file named runs (and runs.state.safetensors); `out: ~/m` made a folder named ~
    with pytest.raises(ValueError, match=r"out=runs/ names a folder; name the checkpoint file, e\.g\. out=runs/model"):
        load_config(None, ["out=runs/"])
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "c.yaml"
    path.write_text("out: ~/runs/m.safetensors\ndata_dir: ~/data\n")
    cfg = load_config(path, [])
    assert (cfg.out, cfg.data_dir) == (f"{tmp_path}/runs/m.safetensors", f"{tmp_path}/data")


def test_to_dict_round_trips() -> None:
    cfg = load_config(None, ["kind=unstructured", "keep_min=0.05"])
    assert TrainConfig(**cfg.to_dict()) == cfg


def test_resume_conflicts_name_only_options_that_change_the_training_steps() -> None:
    cfg = load_config(None, ["stat_alphas=[0, 1]"])
    saved = {**cfg.to_dict(), "stat_alphas": [0.0, 1.0]}  # 1 == 1.0: the same grid
    assert cfg.resume_conflicts(saved) == []
    assert set(saved) > RESUME_MAY_CHANGE  # every name in it is an option
    saved.update({k: "other" for k in RESUME_MAY_CHANGE}, seed=3)
    del saved["beta"]  # a state written before an option existed
    assert cfg.resume_conflicts(saved) == ["beta: (absent) in the state, 1.0 now", "seed: 3 in the state, 0 now"]


def test_stat_alphas_are_kept_ascending() -> None:
    """Row i of every statistics tensor is alpha i of an ascending grid: a checkpoint with another order is
    refused (lcs.checkpoint), so the config sorts it rather than fail at the end of the run."""
    assert load_config(None, ["stat_alphas=[1, 0, 0.5]"]).stat_alphas == [0.0, 0.5, 1.0]
