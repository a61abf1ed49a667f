"""Training configuration: YAML + key=value overrides, refusals of unknown keys and bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import DEFAULT_GRID, TrainConfig, load_config


def test_defaults() -> None:
    cfg = load_config(None, [])
    assert cfg == TrainConfig()
    assert cfg.kind == "structured" and cfg.subspace == "line" and cfg.fixed_alpha is None
    assert cfg.stat_alphas == DEFAULT_GRID and len(DEFAULT_GRID) == 21
    assert DEFAULT_GRID[0] == 0.0 and DEFAULT_GRID[-1] == 1.0


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


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- epochs\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(path, [])


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


def test_bad_yaml_value_type(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("epochs: ten\n")
    with pytest.raises(ValueError, match="epochs"):
        load_config(path, [])


def test_fixed_alpha_forces_a_point_and_its_own_statistics_row() -> None:
    cfg = load_config(None, ["fixed_alpha=0.3", "subspace=line", "stat_alphas=[0, 1]"])
    assert cfg.subspace == "point"
    assert cfg.stat_alphas == [0.3]


def test_state_path_sits_next_to_the_checkpoint() -> None:
    cfg = TrainConfig(out="runs/x/model.safetensors")
    assert cfg.state_path == Path("runs/x/model.state.safetensors")


def test_to_dict_round_trips() -> None:
    cfg = load_config(None, ["kind=unstructured", "keep_min=0.05"])
    assert TrainConfig(**cfg.to_dict()) == cfg
