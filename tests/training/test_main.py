"""The command line: `python -m training train ...` and `python -m training evaluate ...`."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
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
        (["train", "dataset=imagenet", "epochs=1"], "dataset='imagenet' is not one training reads"),
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


REPORT = {"kind": "structured", "subspace": "line", "dataset": "folder", "points": [{"level": 1, "accuracy": 9}]}


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read it (No such file or directory)"),
        ("{", "not valid JSON (Expecting property name enclosed in double quotes at line 1, column 2)"),
        ("[1, 2]", 'a JSON list, not a report object {"kind": ..., "points": [...]}'),  # was a TypeError
        (json.dumps({"points": []}), '"kind" is missing'),  # was a KeyError traceback
        (json.dumps({**REPORT, "kind": "pruned"}), '"kind" is "pruned", not one of'),
        (json.dumps({k: v for k, v in REPORT.items() if k != "subspace"}), '"subspace" is missing'),
        (json.dumps({**REPORT, "points": {}}), '"points" is an object, not a non-empty list'),
        (json.dumps({**REPORT, "points": [{"level": 1}]}), '"points"[0] is {"level": 1}, not {"level": number'),
    ],
)
def test_plot_names_the_report_and_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, problem: str
) -> None:
    """A report that was not JSON said only the decoder's message; one without "kind" or a JSON list was a
    KeyError or TypeError traceback."""
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    assert main(["plot", str(bad), "--out", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: report {bad}: {problem}") and err.count("\n") == 1
    assert err.endswith("give a report written by `python -m training evaluate --json`\n")
    assert not (tmp_path / "p.png").exists()


def test_plot_with_a_bad_baseline_and_reports_of_two_kinds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, other, base = tmp_path / "s.json", tmp_path / "q.json", tmp_path / "b.json"
    good.write_text(json.dumps(REPORT))
    other.write_text(json.dumps({**REPORT, "kind": "quantized"}))
    base.write_text('{"kind": "structured"}')
    assert main(["plot", str(good), "--baseline", str(base), "--out", str(tmp_path / "p.png")]) == 2
    assert capsys.readouterr().err.startswith(f'error: --baseline {base}: "points" is missing')
    assert main(["plot", str(good), str(other), "--out", str(tmp_path / "p.png")]) == 2
    assert f"report {other}: a quantized report, but {good} is structured" in capsys.readouterr().err
    base.write_text(json.dumps({"kind": "quantized", "points": [{"level": 8, "accuracy": 9}]}))  # a reference line
    assert main(["plot", str(good), "--baseline", str(base), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    # the output over a report it reads, or without a PNG's name: refused before drawing
    odd = tmp_path / "r.png"  # a report under a PNG's name
    odd.write_text(json.dumps(REPORT))
    assert main(["plot", str(odd), "--out", str(odd)]) == 2
    assert f"--out {odd}: that file is report {odd}, which this command reads" in capsys.readouterr().err
    assert json.loads(odd.read_text()) == REPORT
    assert main(["plot", str(good), "--out", str(tmp_path / "o9")]) == 2
    assert f"--out {tmp_path / 'o9'}: the file written is PNG; name it o9.png" in capsys.readouterr().err
    assert json.loads(good.read_text()) == REPORT and not (tmp_path / "o9.png").exists()


def _no_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    import training.evaluate

    def evaluate_checkpoint(*a: Any, **kw: Any) -> None:
        raise AssertionError("evaluated before the arguments were checked")

    monkeypatch.setattr(training.evaluate, "evaluate_checkpoint", evaluate_checkpoint)


@pytest.mark.parametrize(
    ("args", "message"),
    [  # each was found only after the evaluation (minutes on Fashion-MNIST), and its accuracies were lost
        (["--json", "{tmp}/file/r.json"], "--json {tmp}/file/r.json: {tmp}/file is a file, not a directory"),
        (["--json", "{tmp}"], "--json {tmp}: {tmp} is a directory; name a file, e.g. --json {tmp}/report.json"),
        pytest.param(
            ["--json", "/proc/r.json"],
            "--json /proc/r.json: cannot create files in /proc",  # a folder where no file can be created
            marks=pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc"),
        ),
        (["--json", "{tmp}/r.json", "--plot", "{tmp}/file/p.png"], "--plot {tmp}/file/p.png: {tmp}/file is a file"),
        (
            ["--json", "{tmp}/r.json", "--plot", "{tmp}/p.png", "--baseline", "{tmp}/none.json"],
            "--baseline {tmp}/none.json: cannot read it (No such file or directory)",
        ),
        (
            ["--json", "{tmp}/r.json", "--plot", "{tmp}/p.png", "--baseline", "{tmp}/file"],
            "--baseline {tmp}/file: not valid JSON (Expecting value at line 1, column 1)",
        ),
        (
            ["--json", "{tmp}/r.json", "--plot", "{tmp}/p.png", "--compare", "{tmp}/q.json"],
            "--compare {tmp}/q.json: a quantized report, but {ckpt} is structured",
        ),
        # matplotlib read the format from the name: an error after the evaluation, or p.png written for p
        (
            ["--json", "{tmp}/r.json", "--plot", "{tmp}/p.xyz"],
            "--plot {tmp}/p.xyz: the file written is PNG; name it p.png",
        ),
        (["--json", "{tmp}/r.json", "--plot", "{tmp}/p"], "--plot {tmp}/p: the file written is PNG; name it p.png"),
        # an output over an input: the checkpoint became a 259-byte JSON file, exit 0
        (["--json", "{ckpt}"], "--json {ckpt}: that file is the checkpoint {ckpt}, which this command reads"),
        (
            ["--json", "{tmp}/q.json", "--plot", "{tmp}/p.png", "--baseline", "{tmp}/q.json"],
            "--json {tmp}/q.json: that file is --baseline {tmp}/q.json, which this command reads",
        ),
        (
            ["--json", "{tmp}/p.png", "--plot", "{tmp}/p.png"],
            "--plot {tmp}/p.png: that file is also --json {tmp}/p.png; give each output its own file",
        ),
        # silently ignored without --plot
        (["--json", "{tmp}/r.json", "--baseline", "{tmp}/q.json"], "--baseline only draws on the plot; add --plot"),
        (["--json", "{tmp}/r.json", "--compare", "{tmp}/q.json"], "--compare only draws on the plot; add --plot"),
    ],
)
def test_evaluate_checks_its_arguments_before_evaluating(
    trained_run: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    (tmp_path / "file").write_text("not a folder, not JSON")
    (tmp_path / "q.json").write_text(json.dumps({**REPORT, "kind": "quantized"}))
    _no_evaluation(monkeypatch)
    fill = {"tmp": str(tmp_path), "ckpt": str(trained_run.path)}
    rc = main(["evaluate", str(trained_run.path), *(a.format(**fill) for a in args)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: " + message.format(**fill)) and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "q.json"]  # nothing written, no probe left


def test_evaluate_prints_the_accuracies_before_writing_files(
    trained_run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """write_json ran before the print: a write that failed after the evaluation lost every number."""
    import lcs.paths

    def disk_full(*a: Any) -> None:
        raise OSError(28, "No space left on device", str(tmp_path / "r.json"))

    monkeypatch.setattr(lcs.paths, "write_json", disk_full)
    assert main(["evaluate", str(trained_run.path), "--json", str(tmp_path / "r.json")]) == 2
    out, err = capsys.readouterr()
    assert out.count("accuracy") == 3 and "alpha 1.000" in out
    assert "No space left on device" in err


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

NO_SPACE = (
    "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors 0.4+, on a full tmpfs
)
NO_SPACE_OLD = (
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
)


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

    out = tmp_path / "m.safetensors"
    args = ["train", *tiny_overrides(out, dataset="folder", data_dir=image_folder)]
    real_save_file = checkpoint.save_file  # the state and the checkpoint are written through lcs.checkpoint
    calls = []

    def fills_the_disk_at_the_second_epoch(*a: Any, **kw: Any) -> None:
        calls.append(a[1])
        if len(calls) == 2:
            Path(a[1]).write_bytes(b"half a file")  # what a full disk leaves behind
            raise SafetensorError(NO_SPACE)
        real_save_file(*a, **kw)

    monkeypatch.setattr(checkpoint, "save_file", fills_the_disk_at_the_second_epoch)
    assert main(args) == 2
    err = capsys.readouterr().err
    state = out.with_name("m.state.safetensors")
    assert err == (
        f"error: {state}: cannot write it (No space left on device); free space and rerun the same command to "
        "resume (state saved after epoch 1)\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [state.name]  # epoch 1's state; no .tmp left
    monkeypatch.setattr(checkpoint, "save_file", real_save_file)
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

    real_save_file = checkpoint.save_file

    def no_space(*a: Any, **kw: Any) -> None:
        if ".state." in Path(a[1]).name:  # the per-epoch state (written through the same helper) still saves
            return real_save_file(*a, **kw)  # type: ignore[no-any-return]
        raise SafetensorError(NO_SPACE_OLD)

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


def test_sigterm_says_what_was_saved(
    tmp_path: Path,
    image_folder: Path,
    tiny_overrides: Callable[..., list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SIGTERM (a container stopped) ended training at once, with no word on what was saved."""
    from training import train as train_module

    save_state = train_module._save_state

    def save_then_sigterm(*a: Any) -> None:
        save_state(*a)
        os.kill(os.getpid(), signal.SIGTERM)

    def not_handled(signum: int, frame: object) -> None:  # not the default, which would end pytest itself
        pytest.fail("SIGTERM reached the handler training found")

    before = signal.signal(signal.SIGTERM, not_handled)
    try:
        monkeypatch.setattr(train_module, "_save_state", save_then_sigterm)
        overrides = tiny_overrides(tmp_path / "m.safetensors", dataset="folder", data_dir=image_folder)
        assert main(["train", *overrides]) == 143
        assert capsys.readouterr().err == "terminated; state saved after epoch 1; rerun the same command to resume\n"
        assert signal.getsignal(signal.SIGTERM) is not_handled  # put back: the handler is training's alone
    finally:
        signal.signal(signal.SIGTERM, before)


# -- evaluate and the dataset a checkpoint records ---------------------------------------------------------


def _checkpoint_trained_on(
    tmp_path: Path, settled_model: Callable[..., Any], make_meta: Callable[..., Any], data_dir: object
) -> Path:
    """A tiny 4-class, 12x12 checkpoint whose metadata records `data_dir` as the one it was trained with."""
    model = settled_model()
    path = tmp_path / "m.safetensors"
    checkpoint.save(path, model, make_meta(model, "structured", training={"config": {"data_dir": data_dir}}))
    return path


def _folder(root: Path, classes: list[str], size: int) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            Image.new("L", (size, size)).save(root / split / cls / "0.png")
    return root


@pytest.mark.parametrize(
    ("recorded", "args", "message"),
    [  # the recorded folder is gone: the fix named the training option data_dir, not --data-dir
        (
            "{tmp}/gone",
            [],
            "{tmp}/gone: an image-folder dataset needs train/<class>/ and test/<class>/ folders; set "
            "--data-dir to a folder that has them",
        ),
        (123, [], "{ckpt}: field 'training.config.data_dir' is 123, not a folder; pass --data-dir"),  # was a TypeError
        (123, ["--data-dir", "{tmp}/small"], "{tmp}/small: test images are 1x6x6, but {ckpt} takes 1x12x12"),
        ("{tmp}/two", [], "{tmp}/two: classes ['c0', 'c1'], but {ckpt} was trained on ['c0', 'c1', 'c2', 'c3']"),
    ],
)
@pytest.mark.parametrize("command", ["evaluate", "samples"])
def test_the_dataset_problem_and_its_option_are_named(
    tmp_path: Path,
    settled_model: Callable[..., Any],
    make_meta: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
    command: str,
    recorded: object,
    args: list[str],
    message: str,
) -> None:
    """evaluate and samples read the dataset a checkpoint was trained on (`trained_dataset`) and take
    --data-dir when it has moved; neither writes anything when the dataset is not the checkpoint's."""
    _folder(tmp_path / "small", ["c0", "c1", "c2", "c3"], 6)
    _folder(tmp_path / "two", ["c0", "c1"], 12)
    fill = {"tmp": str(tmp_path)}
    recorded = recorded.format(**fill) if isinstance(recorded, str) else recorded
    ckpt = _checkpoint_trained_on(tmp_path, settled_model, make_meta, recorded)
    fill["ckpt"] = str(ckpt)
    before = ckpt.read_bytes()
    report = ["--json", str(tmp_path / "r.json")] if command == "evaluate" else []
    rc = main([command, str(ckpt), *report, *(a.format(**fill) for a in args)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: " + message.format(**fill)) and err.count("\n") == 1, err
    assert not (tmp_path / "r.json").exists() and ckpt.read_bytes() == before


def test_samples_stores_images_from_the_dataset_given(
    tmp_path: Path, settled_model: Callable[..., Any], make_meta: Callable[..., Any]
) -> None:
    """`samples --data-dir` for a checkpoint whose recorded dataset has moved (it had no such option: its error
    said to set data_dir, which only `train` takes)."""
    ckpt = _checkpoint_trained_on(tmp_path, settled_model, make_meta, str(tmp_path / "gone"))
    assert checkpoint.load_with_samples(ckpt)[2] is None
    assert (
        main(["samples", str(ckpt), "--data-dir", str(_folder(tmp_path / "moved", ["c0", "c1", "c2", "c3"], 12))]) == 0
    )
    images, labels = checkpoint.load_with_samples(ckpt)[2] or (None, None)
    assert images is not None and labels is not None
    assert images.shape[1:] == (1, 12, 12) and set(labels.tolist()) <= {0, 1, 2, 3}


@pytest.mark.parametrize(
    ("config", "message"),
    [  # it wrote 0 sample images, exit 0 (and the service then skipped its self-check without a word)
        ({"val_size": 10}, "4 training images, none left beside the 10 {ckpt} held out for validation"),
        # tracebacks (AttributeError, TypeError), or a message that named neither file nor field
        ([1], "{ckpt}: field 'training.config' is list, not the training options"),
        ({"val_size": None}, "{ckpt}: field 'training.config.val_size' is None, not a whole number"),
        ({"seed": "abc"}, "{ckpt}: field 'training.config.seed' is 'abc', not a whole number"),
    ],
)
def test_samples_refuses_what_would_store_none_or_a_config_it_cannot_read(
    tmp_path: Path,
    settled_model: Callable[..., Any],
    make_meta: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
    config: object,
    message: str,
) -> None:
    model = settled_model()
    ckpt = tmp_path / "m.safetensors"
    checkpoint.save(ckpt, model, make_meta(model, "structured", training={"config": config}))
    before = ckpt.read_bytes()
    data = _folder(tmp_path / "data", ["c0", "c1", "c2", "c3"], 12)
    assert main(["samples", str(ckpt), "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert message.format(ckpt=ckpt) in err and err.count("\n") == 1, err
    assert ckpt.read_bytes() == before


@pytest.mark.parametrize("command", [["evaluate", "--json", "r.json"], ["samples"]])
def test_a_dataset_this_build_cannot_read_is_named_as_the_checkpoints_field(
    tmp_path: Path,
    settled_model: Callable[..., Any],
    make_meta: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
    command: list[str],
) -> None:
    # it said "unknown dataset 'mnist'; choose fashion-mnist, cifar10 or folder": no option chooses it here
    model = settled_model()
    ckpt = tmp_path / "m.safetensors"
    checkpoint.save(ckpt, model, make_meta(model, "structured", dataset="mnist"))
    assert main([command[0], str(ckpt), *(str(tmp_path / a) if a.endswith(".json") else a for a in command[1:])]) == 2
    err = capsys.readouterr().err
    assert f"{ckpt}: field 'dataset' is 'mnist', which this build cannot read (fashion-mnist, cifar10, folder)" in err


# -- under torchrun: one report per job, from rank 0 -------------------------------------------------------


@pytest.fixture
def rank_1(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """This process as rank 1 of 2 under torchrun; returns the waits it made (time.sleep records them)."""
    import training.__main__ as cli

    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    waits: list[float] = []
    monkeypatch.setattr(cli.time, "sleep", waits.append)
    return waits


def test_other_ranks_leave_an_error_to_rank_0(
    rank_1: list[float], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each of the two ranks printed `error: ...` (interleaved on one line at times). Rank 1 now waits for
    torchrun to stop it once rank 0 has reported the same error, and speaks, naming itself, only if it was not
    stopped (an error of its own)."""
    import training.__main__ as cli

    class Stopped(BaseException):  # torchrun's SIGTERM once rank 0 has exited
        pass

    def stopped(seconds: float) -> None:
        raise Stopped

    monkeypatch.setattr(cli.time, "sleep", stopped)
    with pytest.raises(Stopped):
        main(["train", "lr=abc"])
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(cli.time, "sleep", rank_1.append)  # not stopped: rank 0 did not fail
    assert main(["train", "lr=abc"]) == 2
    assert capsys.readouterr().err == "error: rank 1: option 'lr' must be a number; got 'abc'\n"
    assert rank_1 == [cli.OTHER_RANK_WAIT_S]


def test_rank_0_reports_an_error_at_once(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import training.__main__ as cli

    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(cli.time, "sleep", lambda s: pytest.fail("rank 0 waited"))
    assert main(["train", "lr=abc"]) == 2
    assert capsys.readouterr().err == "error: option 'lr' must be a number; got 'abc'\n"


def test_ctrl_c_is_reported_by_rank_0_alone(
    rank_1: list[float], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every rank got the signal and each printed "interrupted; ..."; rank 0 alone says what its state kept."""
    import training.train as train_module

    def ctrl_c(*a: Any, **k: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", ctrl_c)
    assert main(["train", "epochs=1"]) == 130
    assert capsys.readouterr() == ("", "") and rank_1 == []


GLOO_PEER_GONE = (
    "[pair.cc:553] Connection closed by peer [127.0.0.1]:18354. This is typically caused by a remote worker"
)


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_peer_rank_gone_is_one_line_not_gloos_traceback(
    rank: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun, a rank whose peer stopped (rank 0 on an error of its own, or another rank killed) died
    in a collective with gloo's RuntimeError traceback; rank 0 never said what its state file kept."""
    import training.__main__ as cli
    import training.train as train_module

    for k, v in {"RANK": rank, "WORLD_SIZE": "2", "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(cli.time, "sleep", lambda s: None)

    def peer_gone(*a: Any, **k: Any) -> None:
        raise RuntimeError(GLOO_PEER_GONE)

    monkeypatch.setattr(train_module, "train", peer_gone)
    out = str(tmp_path / "m.safetensors")
    assert main(["train", f"out={out}"]) == 1
    prefix = "" if rank == "0" else "rank 1: "
    assert capsys.readouterr().err == (
        f"error: {prefix}another process of this torchrun job stopped (its own error, or torchrun's report of its "
        "exit, says why), so this one cannot go on; no epoch finished yet, nothing saved; rerun the same command to "
        "start over\n"
    )


def test_any_other_runtime_error_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    import training.train as train_module

    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)

    def bug(*a: Any, **k: Any) -> None:
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(train_module, "train", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["train"])
    monkeypatch.setenv("WORLD_SIZE", "1")  # no peers: gloo's words alone are not a peer gone
    monkeypatch.setattr(train_module, "train", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(GLOO_PEER_GONE)))
    with pytest.raises(RuntimeError):
        main(["train"])
