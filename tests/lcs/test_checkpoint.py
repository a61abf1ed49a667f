"""The checkpoint format: exact round trip, and a clear refusal (naming the file) of anything else."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lcs import checkpoint
from lcs.checkpoint import CheckpointError, CheckpointMeta
from lcs.models import SubspaceResNet

Saved = tuple[Path, SubspaceResNet, CheckpointMeta]
GRID = (0.0, 0.3, 0.7, 1.0)


def _x() -> torch.Tensor:
    return torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(7))


def _parts(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        raw = json.loads(f.metadata()[checkpoint.META_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return raw, tensors


def _resave(
    src: Path,
    dest: Path,
    meta: Callable[[dict[str, Any]], None] | None = None,
    tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> Path:
    """Copy a checkpoint with its metadata JSON and/or tensors edited in place by the callbacks."""
    raw, ts = _parts(src)
    if meta:
        meta(raw)
    if tensors:
        tensors(ts)
    save_file(ts, str(dest), metadata={checkpoint.META_KEY: json.dumps(raw)})
    return dest


def _refused(path: Path, *fragments: str, tensors: bool = False) -> str:
    """load (and, unless the problem is in the tensors, read_meta) refuse with CheckpointError naming
    the file and each fragment."""
    for fn in (checkpoint.load,) if tensors else (checkpoint.load, checkpoint.read_meta):
        with pytest.raises(CheckpointError) as err:
            fn(path)
        message = str(err.value)
        assert str(path) in message
        for fragment in fragments:
            assert fragment in message, message
    return message


# -- round trip ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["unstructured", "structured", "quantized"])
@pytest.mark.parametrize("subspace", ["line", "point"])
def test_round_trip_reproduces_outputs_exactly(
    tmp_path: Path,
    settled_model: Callable[..., SubspaceResNet],
    make_meta: Callable[..., CheckpointMeta],
    kind: str,
    subspace: str,
) -> None:
    model = settled_model(kind, subspace, "batch", GRID)
    meta = make_meta(model, kind)
    path = tmp_path / "nested" / "m.safetensors"  # parent folders are created
    checkpoint.save(path, model, meta)
    assert not path.with_suffix(".safetensors.tmp").exists()  # written atomically, temp file gone

    loaded, loaded_meta = checkpoint.load(path)
    assert loaded_meta == meta
    assert checkpoint.read_meta(path) == meta
    assert not loaded.training
    assert loaded.schedule == model.schedule and loaded.stat_alphas == model.stat_alphas
    assert loaded.line == (subspace == "line")
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    x = _x()
    with torch.no_grad():
        for alpha in GRID:
            assert torch.equal(loaded(x, loaded.at(alpha)), model(x, model.at(alpha)))
            assert torch.equal(loaded.export(loaded.at(alpha))(x), model.export(model.at(alpha))(x))


def test_a_failed_save_keeps_the_old_checkpoint_and_leaves_no_temp_file(
    tmp_path: Path,
    settled_model: Callable[..., SubspaceResNet],
    make_meta: Callable[..., CheckpointMeta],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = settled_model("structured", "line", "batch", GRID)
    path = tmp_path / "m.safetensors"
    checkpoint.save(path, model, make_meta(model, "structured"))
    before = path.read_bytes()

    def full_disk(self: Path, target: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(path, model, make_meta(model, "structured", dataset="another"))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_round_trip_with_groupnorm(
    tmp_path: Path, settled_model: Callable[..., SubspaceResNet], make_meta: Callable[..., CheckpointMeta]
) -> None:
    model = settled_model("structured", "line", "group", GRID)
    checkpoint.save(tmp_path / "g.safetensors", model, make_meta(model, "structured"))
    loaded, meta = checkpoint.load(tmp_path / "g.safetensors")
    assert meta.norm == "group"
    with torch.no_grad():
        assert torch.equal(loaded(_x(), loaded.at(0.45)), model(_x(), model.at(0.45)))  # any alpha


def test_metadata_is_self_describing(saved_checkpoint: Saved) -> None:
    path, model, meta = saved_checkpoint
    raw, tensors = _parts(path)
    assert raw["format"] == checkpoint.FORMAT == "lcs-serve.checkpoint" and raw["version"] == checkpoint.VERSION
    assert "alpha" in raw["alpha_convention"]
    assert raw["arch"]["name"] == "tiny_resnet" and raw["kind"] == "structured"
    assert set(model.state_dict()) <= set(tensors)
    assert meta.schedule_obj() == model.schedule
    assert checkpoint.build(meta).state_dict().keys() == model.state_dict().keys()


def test_samples_travel_with_the_checkpoint(saved_checkpoint: Saved, tmp_path: Path) -> None:
    path, model, meta = saved_checkpoint
    assert checkpoint.load_with_samples(path)[2] is None
    images = torch.randint(0, 256, (5, 1, 12, 12), dtype=torch.uint8)
    labels = torch.arange(5) % len(meta.classes)
    with_samples = tmp_path / "s.safetensors"
    checkpoint.save(with_samples, model, meta, samples=(images, labels))
    loaded, loaded_meta, got = checkpoint.load_with_samples(with_samples)
    assert got is not None and torch.equal(got[0], images) and torch.equal(got[1], labels)
    assert loaded_meta == meta
    assert loaded.state_dict().keys() == model.state_dict().keys()  # the samples are not model state
    assert checkpoint.load(with_samples)[0].state_dict().keys() == model.state_dict().keys()
    # whatever else travels under samples. is not model state either (a later format may add some)
    tensors = {
        **model.state_dict(),
        "samples.images": images,
        "samples.labels": labels,
        "samples.names": labels.clone(),
    }
    save_file(tensors, str(with_samples), metadata={checkpoint.META_KEY: meta.model_dump_json()})
    assert checkpoint.load_with_samples(with_samples)[2] is not None


# -- refusals --------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    _refused(tmp_path / "nope.safetensors", "no such file", "Point the command's argument at a checkpoint written by")
    (tmp_path / "a.safetensors").mkdir()  # a directory with a checkpoint's name: said to be one
    (tmp_path / "inner.safetensors").write_bytes(b"")
    _refused(tmp_path / "a.safetensors", "a directory, not a checkpoint file")
    _refused(tmp_path, "a directory, not a checkpoint file (it holds a.safetensors, inner.safetensors)")


@pytest.mark.parametrize("keep", ["none", "4 bytes", "length only", "half the header", "header only", "all but 1"])
def test_truncated_file(saved_checkpoint: Saved, tmp_path: Path, keep: str) -> None:
    src = saved_checkpoint[0]
    raw = src.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    cut = {
        "none": 0,
        "4 bytes": 4,
        "length only": 8,
        "half the header": 8 + header_len // 2,
        "header only": 8 + header_len,
        "all but 1": len(raw) - 1,
    }[keep]
    path = tmp_path / "cut.safetensors"
    path.write_bytes(raw[:cut])
    _refused(path, "not a readable safetensors file")


def test_corrupt_header_bytes(saved_checkpoint: Saved, tmp_path: Path) -> None:
    raw = bytearray(saved_checkpoint[0].read_bytes())
    raw[9:17] = b"\xff\xfe\x00garba"  # inside the JSON header
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(bytes(raw))
    _refused(path, "not a readable safetensors file")


def test_corrupt_header_length(saved_checkpoint: Saved, tmp_path: Path) -> None:
    raw = bytearray(saved_checkpoint[0].read_bytes())
    raw[0:8] = (10**12).to_bytes(8, "little")
    path = tmp_path / "length.safetensors"
    path.write_bytes(bytes(raw))
    _refused(path, "not a readable safetensors file")


def test_foreign_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path))
    _refused(path, "'lcs'", "missing")
    other = tmp_path / "other_meta.safetensors"
    save_file({"weight": torch.zeros(3)}, str(other), metadata={"format": "pt"})
    _refused(other, "'lcs'")


def test_metadata_that_is_not_json(saved_checkpoint: Saved, tmp_path: Path) -> None:
    _, tensors = _parts(saved_checkpoint[0])
    path = tmp_path / "badjson.safetensors"
    save_file(tensors, str(path), metadata={checkpoint.META_KEY: "{not json"})
    _refused(path, "not valid JSON")


def test_metadata_nested_too_deeply_for_the_parser(saved_checkpoint: Saved, tmp_path: Path) -> None:
    _, tensors = _parts(saved_checkpoint[0])
    path = tmp_path / "deep.safetensors"
    save_file(tensors, str(path), metadata={checkpoint.META_KEY: "[" * 100_000 + "]" * 100_000})
    _refused(path, "not valid JSON (nested too deeply)")


def test_a_training_state_file_is_named_as_such_with_the_checkpoint_to_use(tmp_path: Path) -> None:
    path = tmp_path / "m.state.safetensors"
    save_file({"model.w": torch.zeros(3)}, str(path), metadata={"epoch": "1", "config": "{}"})
    _refused(path, "the state `python -m training train` keeps to resume a run", str(tmp_path / "m.safetensors"))


def test_wrong_format_name(saved_checkpoint: Saved, tmp_path: Path) -> None:
    path = _resave(saved_checkpoint[0], tmp_path / "fmt.safetensors", meta=lambda m: m.update(format="other"))
    _refused(path, "format", "'other'")


@pytest.mark.parametrize("version", [checkpoint.VERSION + 1, 99])  # the next one too (only 99 was tried)
def test_newer_format_version(saved_checkpoint: Saved, tmp_path: Path, version: int) -> None:
    path = _resave(saved_checkpoint[0], tmp_path / "newer.safetensors", meta=lambda m: m.update(version=version))
    _refused(path, f"version {version}", "upgrade")


def test_torch_save_pickle(saved_checkpoint: Saved, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(saved_checkpoint[1].state_dict(), path)
    _refused(path, "never unpickles")


class _Payload:
    """Unpickling this creates `target` (open(target, "w")): proof that code ran."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.target), "w"))


def test_malicious_pickle_is_refused_without_running_code(tmp_path: Path) -> None:
    # positive control: the payload does run code when unpickled
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control))).close()
    assert control.exists()

    target = tmp_path / "pwned"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"state_dict": _Payload(target)}))
    _refused(path, "never unpickles")
    assert not target.exists()


def test_tensor_shapes_that_do_not_match_the_architecture(saved_checkpoint: Saved, tmp_path: Path) -> None:
    src = saved_checkpoint[0]
    wider = _resave(src, tmp_path / "w.safetensors", meta=lambda m: m["arch"].update(kwargs={"widths": [8, 32]}))
    _refused(wider, "the architecture needs", tensors=True)

    def shrink(ts: dict[str, torch.Tensor]) -> None:
        ts["fc.weight0"] = ts["fc.weight0"][:, :3].contiguous()

    _refused(_resave(src, tmp_path / "s.safetensors", tensors=shrink), "'fc.weight0'", "shape", tensors=True)
    _refused(
        _resave(src, tmp_path / "m.safetensors", tensors=lambda ts: ts.pop("stem.weight1")), "missing", tensors=True
    )
    _refused(
        _resave(src, tmp_path / "u.safetensors", tensors=lambda ts: ts.update(extra=torch.zeros(1))),
        "unexpected",
        tensors=True,
    )
    point = _resave(src, tmp_path / "p.safetensors", meta=lambda m: m.update(subspace="point"))
    _refused(point, "unexpected", tensors=True)  # a line's second endpoint in a point checkpoint


def test_non_finite_tensors(saved_checkpoint: Saved, tmp_path: Path) -> None:
    def poison(ts: dict[str, torch.Tensor]) -> None:
        ts["blocks.0.conv1.weight0"] = ts["blocks.0.conv1.weight0"].clone()
        ts["blocks.0.conv1.weight0"].view(-1)[3] = float("nan")

    _refused(_resave(saved_checkpoint[0], tmp_path / "nan.safetensors", tensors=poison), "NaN", tensors=True)


def test_negative_normalisation_variances(saved_checkpoint: Saved, tmp_path: Path) -> None:
    """A negative running variance loaded, and every answer at its alpha was NaN (a 500 at request time; found
    by fuzzing the checkpoint)."""
    name = next(k for k in _parts(saved_checkpoint[0])[1] if k.endswith("running_var"))

    def negate(ts: dict[str, torch.Tensor]) -> None:
        ts[name] = ts[name].clone()
        ts[name][-1, 0] = -0.5

    bad = _resave(saved_checkpoint[0], tmp_path / "var.safetensors", tensors=negate)
    _refused(bad, repr(name), "negative variances", tensors=True)


def test_bad_arch_kwargs(saved_checkpoint: Saved, tmp_path: Path) -> None:
    path = _resave(
        saved_checkpoint[0], tmp_path / "k.safetensors", meta=lambda m: m["arch"].update(kwargs={"depth": 3})
    )
    with pytest.raises(CheckpointError, match=r"arch\.kwargs") as err:
        checkpoint.load(path)
    assert str(path) in str(err.value)


def test_arch_kwargs_far_larger_than_the_tensors_are_refused_without_allocating_them(
    saved_checkpoint: Saved, tmp_path: Path
) -> None:
    # built for real first, this was a RuntimeError traceback from a 1.4 TB allocation
    path = _resave(
        saved_checkpoint[0],
        tmp_path / "huge.safetensors",
        meta=lambda m: m["arch"].update(kwargs={**m["arch"]["kwargs"], "widths": [200_000, 200_000]}),
    )
    _refused(path, "the architecture needs (200000, 1, 3, 3)", "the file is corrupt or was edited", tensors=True)


def test_arch_kwargs_that_set_a_field_of_the_metadata_are_refused(saved_checkpoint: Saved, tmp_path: Path) -> None:
    """This loaded, the norm field silently overriding arch.kwargs, while training refused the same kwargs."""
    path = _resave(
        saved_checkpoint[0], tmp_path / "n.safetensors", meta=lambda m: m["arch"].update(kwargs={"norm": "group"})
    )
    with pytest.raises(CheckpointError, match=r"arch\.kwargs.*set \['norm'\]") as err:
        checkpoint.load(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda m: m.update(kind="bogus"), "'kind'"),
        (lambda m: m.update(subspace="plane"), "'subspace'"),
        (lambda m: m.update(norm="layer"), "'norm'"),
        (lambda m: m["arch"].update(name="resnet9000"), "'arch.name'"),
        (lambda m: m["input"].update(channels=0), "'input.channels'"),
        (lambda m: m["accuracy"][0].update(alpha=1.5), "'accuracy.0.alpha'"),
        (lambda m: m["accuracy"][0].update(accuracy=101), "'accuracy.0.accuracy'"),
        (lambda m: m.update(surprise=1), "'surprise'"),
        (lambda m: m.pop("classes"), "'classes'"),
        # each of these loaded and then served wrong answers, or failed only once the service warmed up
        (lambda m: m["input"].update(mean=[]), "input.mean has 0 values for 1 channel(s)"),
        (lambda m: m["input"].update(std=[0.2, 0.2, 0.2]), "input.std has 3 values"),
        (lambda m: m["input"].update(std=[0.0]), "input.std must be positive"),
        (lambda m: m["input"].update(mean=[float("nan")]), "input.mean must be finite numbers"),
        (lambda m: m.update(classes=m["classes"][:1]), "'classes': need two or more distinct"),
        (lambda m: m.update(stat_alphas=m["stat_alphas"][::-1]), "'stat_alphas': must be strictly"),
        (lambda m: m.update(stat_alphas=[m["stat_alphas"][0]] * 2), "must be strictly increasing"),
        (lambda m: m.update(stat_alphas=[0.5, 0.5000001]), "neighbours at least 1e-06 apart"),
        (lambda m: m.update(stat_alphas=[*m["stat_alphas"][:-1], 1.5]), "'stat_alphas': alphas must"),
        (lambda m: m["schedule"].update(kind="quantized"), "schedule.kind 'quantized' differs from kind"),
        (lambda m: m["schedule"].update(width_min=0), "'schedule': width_min must be in"),
        (lambda m: m["schedule"].update(foo=1), "'schedule': not a schedule"),
        # these loaded, and the model ran at levels other than those its accuracy table was measured at
        (lambda m: m["schedule"].pop("width_min"), "'schedule': missing ['width_min']: a checkpoint records every"),
        (lambda m: m["schedule"].update(bits_min=3.5), "bits_min must be a whole number; got 3.5"),
        (
            lambda m: m["schedule"].update(width_min=0.5),
            "accuracy[].level at alphas [0.0, 0.3, 0.7] differs from what the schedule",
        ),
        (lambda m: m.update(fixed_alpha=5.0), "'fixed_alpha'"),
        (lambda m: m.update(fixed_alpha=0.123), "[0.123] not in stat_alphas"),
        (lambda m: m["accuracy"][0].update(alpha=0.123), "[0.123] not in stat_alphas"),
        (
            lambda m: m.update(classes=["a", "a", *m["classes"][2:]]),
            "'classes': need two or more distinct",
        ),
        # served as this build reads alpha, its accuracy table and its models would be in the wrong order
        (lambda m: m.update(alpha_convention="reversed"), "'alpha_convention': 'reversed' is not this build's"),
    ],
)
def test_invalid_metadata_names_the_field(
    saved_checkpoint: Saved, tmp_path: Path, edit: Callable[[dict[str, Any]], None], field: str
) -> None:
    path = _resave(saved_checkpoint[0], tmp_path / "bad.safetensors", meta=edit)
    _refused(path, "invalid metadata", field)


def test_checkpoint_error_is_a_value_error() -> None:
    assert issubclass(CheckpointError, ValueError)  # the CLI and the service catch ValueError


@pytest.mark.parametrize("version", ["1", 0, True, None])
def test_a_version_that_is_not_a_version_number(saved_checkpoint: Saved, tmp_path: Path, version: object) -> None:
    path = _resave(saved_checkpoint[0], tmp_path / "v.safetensors", meta=lambda m: m.update(version=version))
    _refused(path, f"version {version!r} is not a version number")


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda ts: ts.update({"samples.images": ts["samples.images"].to(torch.int8)}), "'samples.images' is"),
        (lambda ts: ts.update({"samples.images": ts["samples.images"][:, :, :6].contiguous()}), "input needs uint8"),
        (lambda ts: ts.update({"samples.labels": ts["samples.labels"][:3]}), "'samples.labels' is (3,)"),
        (lambda ts: ts.update({"samples.labels": ts["samples.labels"] + 100}), "classes outside"),
        (lambda ts: ts.pop("samples.labels"), "'samples.labels' is missing"),
    ],
)
def test_sample_images_that_do_not_fit_the_input(
    saved_checkpoint: Saved, tmp_path: Path, edit: Callable[[dict[str, torch.Tensor]], None], fragment: str
) -> None:
    """The service calibrates int8 and self-checks on these: a mismatch would fail (or mislead) after start-up."""
    _, model, meta = saved_checkpoint
    with_samples = tmp_path / "s.safetensors"
    images = torch.randint(0, 256, (5, meta.input.channels, meta.input.height, meta.input.width), dtype=torch.uint8)
    checkpoint.save(with_samples, model, meta, samples=(images, torch.arange(5) % len(meta.classes)))
    _refused(_resave(with_samples, tmp_path / "bad.safetensors", tensors=edit), fragment)


def test_saving_refuses_samples_that_do_not_fit(saved_checkpoint: Saved, tmp_path: Path) -> None:
    _, model, meta = saved_checkpoint
    with pytest.raises(CheckpointError, match="input needs uint8"):
        checkpoint.save(tmp_path / "x.safetensors", model, meta, samples=(torch.zeros(2, 1, 3, 3), torch.zeros(2)))


def test_a_negative_sample_label_is_refused_on_save_and_on_load(saved_checkpoint: Saved, tmp_path: Path) -> None:
    """A label of -1 matches no prediction, so the start-up self-check would score its image wrong whatever
    the model says: refused as outside the classes, when saved and when loaded."""
    _, model, meta = saved_checkpoint
    images = torch.zeros((5, meta.input.channels, meta.input.height, meta.input.width), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, -1])
    with pytest.raises(CheckpointError, match=r"'samples.labels' holds classes outside 0\.\.3"):
        checkpoint.save(tmp_path / "x.safetensors", model, meta, samples=(images, labels))
    assert not (tmp_path / "x.safetensors").exists()
    with_samples = tmp_path / "s.safetensors"
    checkpoint.save(with_samples, model, meta, samples=(images, labels.abs()))
    negated = _resave(
        with_samples,
        tmp_path / "bad.safetensors",
        tensors=lambda ts: ts.update({"samples.labels": -ts["samples.labels"]}),
    )
    _refused(negated, "'samples.labels' holds classes outside 0..3", tensors=True)


def test_saved_checkpoints_are_readable_by_other_users(saved_checkpoint: Saved) -> None:
    """The image's service user (not the one who trained) must read the file, whatever safetensors writes."""
    assert saved_checkpoint[0].stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("written", [0o600, 0o644])  # what safetensors 0.8 writes, and 0.4-0.7 (umask 022)
def test_training_state_is_private_whatever_safetensors_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, written: int
) -> None:
    """Training's state (`write_tensors`' default) is 0600: it relied on safetensors' own, 0644 before 0.8."""

    def save(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str]) -> None:
        save_file(tensors, filename, metadata=metadata)
        Path(filename).chmod(written)

    monkeypatch.setattr(checkpoint, "save_file", save)
    checkpoint.write_tensors(tmp_path / "m.state.safetensors", {"x": torch.zeros(1)}, {})
    assert (tmp_path / "m.state.safetensors").stat().st_mode & 0o777 == 0o600


def test_an_unreadable_file_is_named_with_the_fix(saved_checkpoint: Saved, monkeypatch: pytest.MonkeyPatch) -> None:
    """(As root, which CI runs as, every file is readable: the permission check is simulated.) It used to end in
    a PermissionError traceback from the error handler's own second look at the file."""
    monkeypatch.setattr(checkpoint.os, "access", lambda path, mode: False)
    _refused(saved_checkpoint[0], "not readable by this process", "chmod a+r")
