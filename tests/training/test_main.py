"""The command line: `python -m training train ...` and `python -m training evaluate ...`."""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lcs import checkpoint
from training.__main__ import main
from training.config import TrainConfig, load_config


def test_evaluate_writes_the_report_and_a_plot(
    trained_run: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, png = tmp_path / "reports" / "tiny.json", tmp_path / "plots" / "tiny.png"
    baseline = tmp_path / "base.json"
    baseline.write_text(
        json.dumps(
            {"kind": "structured", "subspace": "point", "points": [{"alpha": 0.0, "level": 0.25, "accuracy": 90}]}
        )
    )
    rc = main(["evaluate", str(trained_run.path), "--json", str(out), "--plot", str(png), "--baseline", str(baseline)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert set(rep) == {"kind", "subspace", "fixed_alpha", "dataset", "split", "points"}  # evaluate.py's docstring
    assert rep["kind"] == "structured" and rep["subspace"] == "line"
    assert isinstance(rep["points"], list) and len(rep["points"]) == 3
    for p in rep["points"]:
        assert set(p) == {"alpha", "level", "accuracy"}
        assert all(isinstance(p[k], int | float) for k in p)
        assert 0.0 <= p["alpha"] <= 1.0 and 0.0 <= p["accuracy"] <= 100.0
    assert [p["alpha"] for p in rep["points"]] == [0.0, 0.5, 1.0]
    meta = checkpoint.read_meta(trained_run.path)
    assert [p["accuracy"] for p in rep["points"]] == [p.accuracy for p in meta.accuracy]  # same model, same data
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "alpha 0.000" in capsys.readouterr().out


def test_evaluate_without_plot(trained_run: Any, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert main(["evaluate", str(trained_run.path), "--json", str(out), "--data-dir", str(trained_run.data_dir)]) == 0
    assert json.loads(out.read_text())["points"]
    assert not list(tmp_path.glob("*.png"))


def test_evaluate_a_missing_checkpoint_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "none.safetensors"
    assert main(["evaluate", str(missing), "--json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(missing) in err
    assert not (tmp_path / "r.json").exists()


def test_evaluate_when_the_dataset_is_gone(
    trained_run: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["evaluate", str(trained_run.path), "--json", str(tmp_path / "r.json"), "--data-dir", str(tmp_path)])
    assert rc == 2 and "train/<class>" in capsys.readouterr().err


def test_train_from_yaml_and_overrides(
    tmp_path: Path, image_folder: Path, tiny_overrides: Callable[..., list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("# python -m training train c.yaml\nkind: unstructured\nsubspace: point\n")
    out = tmp_path / "cli.safetensors"
    overrides = tiny_overrides(
        out, epochs=1, dataset="folder", data_dir=image_folder, arch_kwargs="{widths: [8, 16], blocks: [1, 1]}"
    )
    assert main(["train", str(config), *overrides]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    meta = checkpoint.read_meta(out)
    assert meta.kind == "unstructured" and meta.subspace == "point" and meta.dataset == "folder"
    # shell-quoted, so it re-runs as recorded: the arch_kwargs value with spaces stays one argument
    assert shlex.split(meta.training["command"]) == ["python", "-m", "training", "train", str(config), *overrides]
    assert meta.training["config"]["epochs"] == 1


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["train", "epoch=1"], "unknown option"),
        (["train", "kind=bogus"], "kind"),
        (["train", "dataset=imagenet", "epochs=1"], "unknown dataset"),
        (["train", "dataset=folder", "epochs=1"], "data_dir"),
        (["train", "eval_batch_size=0"], "eval_batch_size=0 is out of range; use eval_batch_size >= 1"),
        (["train", "threads=0"], "threads=0 is out of range; use threads >= 1"),
        (["train", "arch_kwargs={foo: 1}"], "arch_kwargs={'foo': 1} does not build 'preact_resnet'"),
        (["train", "out=."], "out=.: . is a directory"),
    ],
)
def test_train_errors_are_clean(
    args: list[str], match: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the default out, runs/model.safetensors, is probed for writing
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and match in err


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ("configs/structured_line.yml", "did you mean configs/structured_line.yaml?"),  # FileNotFoundError
        ("bad.yaml", "bad.yaml: not valid YAML"),  # a yaml ScannerError
    ],
)
def test_config_file_errors_are_one_line(
    config: str, match: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "structured_line.yaml").write_text("kind: structured\n")
    (tmp_path / "bad.yaml").write_text("kind: [unclosed\n")
    monkeypatch.chdir(tmp_path)
    assert main(["train", config]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and match in err and err.count("\n") == 1


def test_a_missing_report_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["plot", str(tmp_path / "none.json"), "--out", str(tmp_path / "p.png")])
    assert rc == 2 and capsys.readouterr().err.startswith("error: [Errno 2] No such file or directory")


def test_train_help_lists_every_option_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    """--help once listed no options: their names appeared only in an "unknown option" error."""
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "key=value" in out and "YAML config file" in out
    block = out.split("options and their defaults:\n")[1].split("\n\n")[0]
    items = [item for line in block.splitlines() for item in line.split("  ") if item]  # two spaces apart
    shown = dict(item.split("=", 1) for item in items)
    assert list(shown) == [f.name for f in dataclasses.fields(TrainConfig)]  # all of them, in class order
    for name, value in shown.items():  # each default, read back as an override, is the default
        if "..." not in value:
            assert load_config(None, [f"{name}={value}"]) == TrainConfig(), name
    assert shown["stat_alphas"] == "[0.0, 0.05, ..., 1.0]"


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["evaluate", "x.safetensors"])  # --json is required
    assert "--json" in capsys.readouterr().err


# -- a full disk and Ctrl-C: one line, and the last finished epoch survives ------------------------------

NO_SPACE = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def test_disk_full_while_saving_the_state(
    tmp_path: Path,
    image_folder: Path,
    tiny_overrides: Callable[..., list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """safetensors' SafetensorError was not among the errors caught: a traceback. Now one line, and the state
    of the last finished epoch is kept, so the same command resumes."""
    from safetensors import SafetensorError

    from training import train as train_module

    out = tmp_path / "m.safetensors"
    args = ["train", *tiny_overrides(out, dataset="folder", data_dir=image_folder)]
    real_save_file = train_module.save_file
    calls = []

    def fills_the_disk_at_the_second_epoch(*a: Any, **kw: Any) -> None:
        calls.append(a[1])
        if len(calls) == 2:
            Path(a[1]).write_bytes(b"half a file")  # what a full disk leaves behind
            raise SafetensorError(NO_SPACE)
        real_save_file(*a, **kw)

    monkeypatch.setattr(train_module, "save_file", fills_the_disk_at_the_second_epoch)
    assert main(args) == 2
    err = capsys.readouterr().err
    state = out.with_name("m.state.safetensors")
    assert err == (
        f"error: {state}: cannot write it (No space left on device); free space and rerun the same command to "
        "resume (state saved after epoch 1)\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [state.name]  # epoch 1's state; no .tmp left
    monkeypatch.setattr(train_module, "save_file", real_save_file)
    assert main(args) == 0
    assert "after epoch 1/2" in capsys.readouterr().out and out.is_file()


def test_disk_full_while_writing_the_checkpoint(
    tmp_path: Path,
    image_folder: Path,
    tiny_overrides: Callable[..., list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from safetensors import SafetensorError

    def no_space(*a: Any, **kw: Any) -> None:
        raise SafetensorError(NO_SPACE)

    out = tmp_path / "m.safetensors"
    monkeypatch.setattr(checkpoint, "save_file", no_space)
    assert main(["train", *tiny_overrides(out, epochs=1, dataset="folder", data_dir=image_folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}: cannot write it (No space left on device); free space and rerun")
    assert err.endswith("(state saved after epoch 1)\n") and err.count("\n") == 1


@pytest.mark.parametrize("when", ["after the first epoch", "before the first epoch"])
def test_ctrl_c_says_what_was_saved(
    tmp_path: Path,
    image_folder: Path,
    tiny_overrides: Callable[..., list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    when: str,
) -> None:
    """Ctrl-C was a KeyboardInterrupt traceback."""
    from training import train as train_module

    save_state = train_module._save_state

    def save_then_ctrl_c(*a: Any) -> None:
        save_state(*a)
        raise KeyboardInterrupt

    def ctrl_c(*a: Any) -> None:
        raise KeyboardInterrupt

    if when == "after the first epoch":
        monkeypatch.setattr(train_module, "_save_state", save_then_ctrl_c)
        expected = "interrupted; state saved after epoch 1; rerun the same command to resume\n"
    else:
        monkeypatch.setattr(train_module, "load_dataset", ctrl_c)
        expected = "interrupted; no epoch finished yet, nothing saved; rerun the same command to start over\n"
    assert main(["train", *tiny_overrides(tmp_path / "m.safetensors", dataset="folder", data_dir=image_folder)]) == 130
    assert capsys.readouterr().err == expected
