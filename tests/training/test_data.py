"""Dataset readers on small real files, splitting, normalisation and augmentation."""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    DataError,
    Dataset,
    Split,
    augment,
    hold_out,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    load_folder,
    normalise,
    read_idx,
    reads_file,
    training_batch,
)

# -- IDX (Fashion-MNIST) ----------------------------------------------------------------------------


def _idx(arr: np.ndarray) -> bytes:
    """IDX bytes: magic 0x00 0x00 0x08 (unsigned byte) ndim, then big-endian uint32 dims, then data."""
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def _write_fashion(root: Path, n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28)).astype(np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28)).astype(np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        (root / name).write_bytes(gzip.compress(_idx(arr)))
    return arrays


def test_read_idx_gz_and_plain(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "x.gz").write_bytes(gzip.compress(_idx(images)))
    (tmp_path / "x.idx").write_bytes(_idx(images))
    for name in ("x.gz", "x.idx"):
        got = read_idx(tmp_path / name)
        assert got.dtype == np.uint8 and np.array_equal(got, images)
    labels = np.array([3, 1, 4], dtype=np.uint8)
    (tmp_path / "y.gz").write_bytes(gzip.compress(_idx(labels)))
    assert np.array_equal(read_idx(tmp_path / "y.gz"), labels)


@pytest.mark.parametrize(
    ("name", "make", "match"),
    [
        ("data_cut.gz", lambda raw: gzip.compress(raw[:-5]), r"75 bytes, but it holds 70 \(cut short\?\)"),
        ("data_long.gz", lambda raw: gzip.compress(raw + bytes(5)), r"holds 80 \(not the file its header describes\)"),
        ("header_cut.gz", lambda raw: gzip.compress(raw[:9]), "truncated"),
        ("magic_only.gz", lambda raw: gzip.compress(raw[:3]), "magic"),
        ("bad_magic.gz", lambda raw: gzip.compress(b"\x00\x00\x0d" + raw[3:]), "magic"),  # float IDX
        ("gzip_cut.gz", lambda raw: gzip.compress(raw)[:-7], "cannot read"),
        ("not_gzip.gz", lambda raw: raw, "cannot read"),
        ("corrupt_stream.gz", lambda raw: _flip_byte(gzip.compress(raw * 40), 30), "cannot read"),
    ],
)
def test_read_idx_refuses_damaged_files(tmp_path: Path, name: str, make: Callable[[bytes], bytes], match: str) -> None:
    raw = _idx(np.random.default_rng(1).integers(0, 256, (3, 5, 5)).astype(np.uint8))
    path = tmp_path / name
    path.write_bytes(make(raw))
    with pytest.raises(DataError, match=match) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def _flip_byte(data: bytes, i: int) -> bytes:
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]


def test_load_fashion_mnist(tmp_path: Path) -> None:
    arrays = _write_fashion(tmp_path / "fm")
    data = load_fashion_mnist(tmp_path / "fm")
    assert data.name == "fashion-mnist" and data.classes == FASHION_MNIST_CLASSES
    assert data.train.images.shape == (6, 1, 28, 28) and data.train.images.dtype == torch.uint8
    assert data.test.images.shape == (4, 1, 28, 28)
    assert data.train.labels.dtype == torch.int64 and len(data.train) == 6
    assert np.array_equal(data.train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte.gz"])
    assert np.array_equal(data.test.labels.numpy(), arrays["t10k-labels-idx1-ubyte.gz"])
    assert load_dataset("fashion-mnist", str(tmp_path / "fm")).train.images.shape == (6, 1, 28, 28)


def test_load_fashion_mnist_missing_dir_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset-fashion-mnist") as err:
        load_fashion_mnist(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(err.value)


def test_load_fashion_mnist_with_a_truncated_file(tmp_path: Path) -> None:
    _write_fashion(tmp_path)
    name = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(name.read_bytes())
    name.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(DataError, match="cut short"):
        load_fashion_mnist(tmp_path)


# -- CIFAR-10 python batches ----------------------------------------------------------------------


def _cifar_batch(n: int, seed: int) -> dict[bytes, Any]:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"batch",
        b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
        b"labels": rng.integers(0, 10, n).tolist(),
        b"filenames": [f"img{i}.png".encode() for i in range(n)],
    }


def _write_cifar(root: Path, protocol: int = pickle.DEFAULT_PROTOCOL) -> dict[str, dict[bytes, Any]]:
    root.mkdir(parents=True, exist_ok=True)
    batches = {f"data_batch_{i}": _cifar_batch(3, i) for i in range(1, 6)} | {"test_batch": _cifar_batch(2, 9)}
    for name, batch in batches.items():
        (root / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return batches


@pytest.mark.parametrize("protocol", [2, 4])  # 2: how the real batches were written
def test_load_cifar10(tmp_path: Path, protocol: int) -> None:
    batches = _write_cifar(tmp_path / "cifar", protocol)
    data = load_cifar10(tmp_path / "cifar")
    assert data.name == "cifar10" and data.classes == CIFAR10_CLASSES
    assert data.train.images.shape == (15, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert data.test.images.shape == (2, 3, 32, 32)
    first = batches["data_batch_1"][b"data"][0]
    assert np.array_equal(data.train.images[0].numpy().reshape(-1), first)  # row-major R, G, B planes
    assert np.array_equal(data.train.images[0, 1].numpy().reshape(-1), first[1024:2048])
    expected = [y for i in range(1, 6) for y in batches[f"data_batch_{i}"][b"labels"]]
    assert data.train.labels.tolist() == expected and data.train.labels.dtype == torch.int64
    assert data.test.labels.tolist() == batches["test_batch"][b"labels"]
    assert load_dataset("cifar10", str(tmp_path / "cifar")).test.images.shape == (2, 3, 32, 32)


class _Payload:
    """Unpickling this creates `target` (open(target, "w")): proof that code ran."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.target), "w"))


def test_malicious_cifar_pickle_runs_no_code(tmp_path: Path) -> None:
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control))).close()  # positive control: the payload works
    assert control.exists()

    root = tmp_path / "cifar"
    _write_cifar(root)
    target = tmp_path / "pwned"
    evil = {b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 2], b"x": _Payload(target)}
    (root / "data_batch_3").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(DataError, match="refusing") as err:
        load_cifar10(root)
    assert "data_batch_3" in str(err.value)
    assert not target.exists()


@pytest.mark.parametrize(
    "content",
    [
        pickle.dumps({b"labels": [1]}),
        pickle.dumps([1, 2, 3]),
        b"not a pickle",
        pickle.dumps({b"data": 1})[:-4],
        pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [2**70, 1]}),  # an OverflowError traceback
        # pixels that are not bytes were cast (0.5 to 0, 300 to 44): other images than the file's, trained on
        pickle.dumps({b"data": np.full((2, 3072), 0.5), b"labels": [0, 1]}),
        pickle.dumps({b"data": np.full((2, 3072), 300), b"labels": [0, 1]}),
    ],
)
def test_cifar_batch_that_is_not_a_batch(tmp_path: Path, content: bytes) -> None:
    root = tmp_path / "cifar"
    _write_cifar(root)
    (root / "test_batch").write_bytes(content)
    with pytest.raises(DataError, match="test_batch"):
        load_cifar10(root)


def test_cifar_missing_batches(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    _write_cifar(root)
    (root / "data_batch_5").unlink()
    with pytest.raises(DataError, match="data_batch_5"):
        load_cifar10(root)
    with pytest.raises(DataError, match="data_dir"):
        load_dataset("cifar10")


# -- image folders ----------------------------------------------------------------------------------


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_load_folder_grayscale(tmp_path: Path, write_folder: Callable[[Path, Dataset], Path]) -> None:
    rng = np.random.default_rng(0)
    train = Split(torch.from_numpy(rng.integers(0, 256, (6, 1, 8, 8)).astype(np.uint8)), torch.tensor([0, 1, 2] * 2))
    test = Split(torch.from_numpy(rng.integers(0, 256, (3, 1, 8, 8)).astype(np.uint8)), torch.tensor([2, 0, 1]))
    root = write_folder(tmp_path / "shapes", Dataset("x", train, test, ["circle", "square", "triangle"]))
    data = load_folder(root)
    assert data.classes == ["circle", "square", "triangle"]
    assert data.name == "folder"  # the loader's name: `evaluate` reloads it from the checkpoint
    assert data.train.images.shape == (6, 1, 8, 8) and data.train.images.dtype == torch.uint8
    # files are read class by class; PNG is lossless
    for images, labels, src in (
        (data.train.images, data.train.labels, train),
        (data.test.images, data.test.labels, test),
    ):
        for img, label in zip(images, labels, strict=True):
            assert any(torch.equal(img, s) for s, sl in zip(src.images, src.labels, strict=True) if sl == label)
    assert data.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert load_dataset("folder", str(root)).test.labels.tolist() == [0, 1, 2]


def test_load_folder_rgb_and_skips_other_files(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    for split in ("train", "test"):
        _png(tmp_path / split / "a" / "0.png", rgb)
        _png(tmp_path / split / "b" / "0.png", rgb[::-1].copy())
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    data = load_folder(tmp_path)
    assert data.train.images.shape == (2, 3, 5, 7)
    assert np.array_equal(data.train.images[0].numpy().transpose(1, 2, 0), rgb)


def test_load_folder_reads_16_bit_and_bilevel_greyscale_as_greyscale(tmp_path: Path) -> None:
    """A 16-bit PNG was converted to RGB, which clipped it: 99.5 % of its pixels 255, trained on without a word."""
    deep = np.array([[0, 257, 32896], [65535, 1000, 40000]], dtype=np.uint16)
    bits = np.array([[True, False, True], [False, True, False]])
    for split in ("train", "test"):
        _png(tmp_path / split / "a" / "0.png", deep)
        _png(tmp_path / split / "b" / "0.png", bits)
    with Image.open(tmp_path / "train" / "a" / "0.png") as image:
        assert image.mode.startswith("I")
    data = load_folder(tmp_path)
    assert data.train.images.shape == (2, 1, 2, 3)
    assert data.train.images[0, 0].tolist() == [[0, 1, 128], [255, 4, 156]]  # value x 255 / 65535, rounded
    assert data.train.images[1, 0].tolist() == [[255, 0, 255], [0, 255, 0]]


def test_load_folder_class_missing_from_test(tmp_path: Path) -> None:
    img = np.zeros((4, 4), np.uint8)
    for cls in ("a", "b"):
        _png(tmp_path / "train" / cls / "0.png", img)
    _png(tmp_path / "test" / "a" / "0.png", img)
    data = load_folder(tmp_path)
    assert data.classes == ["a", "b"] and data.test.labels.tolist() == [0]


def test_hidden_and_empty_folders_are_no_classes(tmp_path: Path) -> None:
    """A notebook's .ipynb_checkpoints or an empty test/unlabelled/ made the dataset refused as a test class
    with no training folder (found in review), and a hidden folder in train/ counted as a class."""
    img = np.zeros((4, 4), np.uint8)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            _png(tmp_path / split / cls / "0.png", img)
        (tmp_path / split / ".ipynb_checkpoints").mkdir()
        (tmp_path / split / ".ipynb_checkpoints" / "0.png").write_bytes(b"not an image")
    (tmp_path / "test" / "unlabelled").mkdir()
    data = load_folder(tmp_path)
    assert data.classes == ["a", "b"] and len(data.test.labels) == 2


def test_load_folder_refusals(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train/<class>"):
        load_folder(tmp_path)
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_folder(tmp_path)
    img = np.zeros((4, 4), np.uint8)
    (tmp_path / "train" / "a").mkdir()
    with pytest.raises(DataError, match="no class folders holding images"):  # an empty folder is no class
        load_folder(tmp_path)
    _png(tmp_path / "train" / "a" / "0.png", img)
    (tmp_path / "test" / "a").mkdir()
    with pytest.raises(DataError, match="one class folder"):
        load_folder(tmp_path)
    _png(tmp_path / "train" / "b" / "0.png", img)
    with pytest.raises(DataError, match="no images"):
        load_folder(tmp_path)
    _png(tmp_path / "train" / "a" / "0.png", np.zeros((4, 4), np.uint8))
    _png(tmp_path / "train" / "a" / "1.png", np.zeros((5, 4), np.uint8))
    _png(tmp_path / "test" / "a" / "0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(
        DataError, match=r"0\.png is 1x4x4 but .*1\.png is 1x5x4 \(channels x height x width\); resize them"
    ):
        load_folder(tmp_path)
    _png(tmp_path / "train" / "a" / "1.png", np.zeros((4, 4, 3), np.uint8))  # the channels differ, not the size
    with pytest.raises(
        DataError, match=r"0\.png is 1x4x4 but .*1\.png is 3x4x4 \(channels x height x width\); save them all greyscale"
    ):
        load_folder(tmp_path)
    (tmp_path / "train" / "a" / "1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"1\.png"):
        load_folder(tmp_path)
    with pytest.raises(DataError, match="data_dir"):
        load_dataset("folder")


# -- cross-checks at load time: each of these once trained (rc 0 or a traceback after the run) ----------


def _rewrite(root: Path, name: str, arr: np.ndarray) -> Path:
    (root / name).write_bytes(gzip.compress(_idx(arr)))
    return root / name


@pytest.mark.parametrize(
    ("name", "arr", "match"),
    [  # the test images file replaced by a labels file: once trained and wrote garbage accuracy
        ("t10k-images-idx3-ubyte.gz", np.zeros(4, np.uint8), r"shape \(4,\), not images .* a labels file"),
        ("train-labels-idx1-ubyte.gz", np.zeros((6, 28, 28), np.uint8), r"not labels \[N\] \(is it an images file"),
        # 32x32 test images for 28x28 training images: once rc 0 with wrong results
        ("t10k-images-idx3-ubyte.gz", np.zeros((4, 32, 32), np.uint8), r"test images are 1x32x32 .* are 1x28x28"),
        # more labels than images: once trained the whole run, then IndexError
        ("train-labels-idx1-ubyte.gz", np.zeros(7, np.uint8), r"7 labels for 6 training images in .*train-images"),
        # a label of 200: once IndexError mid-epoch
        ("t10k-labels-idx1-ubyte.gz", np.array([1, 2, 200, 3], np.uint8), r"label 200 \(image 2\) is outside 0\.\.9"),
    ],
)
def test_fashion_mnist_files_are_cross_checked(tmp_path: Path, name: str, arr: np.ndarray, match: str) -> None:
    _write_fashion(tmp_path)
    path = _rewrite(tmp_path, name, arr)
    with pytest.raises(DataError, match=match) as err:
        load_dataset("fashion-mnist", str(tmp_path))
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_cifar_batch_with_labels_for_other_images(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    _write_cifar(root)
    batch = _cifar_batch(3, 4) | {b"labels": [0, 1, 2, 3]}
    (root / "data_batch_4").write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match=r"data_batch_4: 4 labels for 3 images"):
        load_cifar10(root)


def _two_class_folder(root: Path, test_image: np.ndarray) -> None:
    gray = np.zeros((6, 6), np.uint8)
    for cls in ("a", "b"):
        _png(root / "train" / cls / "0.png", gray)
        _png(root / "test" / cls / "0.png", test_image)


def test_folder_with_rgb_test_and_grayscale_train_images(tmp_path: Path) -> None:
    """Once trained, then raised a RuntimeError traceback when it measured test accuracy."""
    _two_class_folder(tmp_path, np.zeros((6, 6, 3), np.uint8))
    with pytest.raises(DataError, match=r"test images are 3x6x6 .* training images .* are 1x6x6") as err:
        load_folder(tmp_path)
    assert str(tmp_path / "test" / "a" / "0.png") in str(err.value)
    assert str(tmp_path / "train" / "a" / "0.png") in str(err.value)


def test_folder_with_one_class(tmp_path: Path) -> None:
    """Once trained, then failed with a multi-line pydantic dump writing the checkpoint."""
    _png(tmp_path / "train" / "only" / "0.png", np.zeros((4, 4), np.uint8))
    _png(tmp_path / "test" / "only" / "0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match=r"one class folder .*at least two") as err:
        load_dataset("folder", str(tmp_path))
    assert str(err.value).startswith(str(tmp_path / "train")) and "\n" not in str(err.value)


def test_folder_test_class_without_training_images(tmp_path: Path) -> None:
    _two_class_folder(tmp_path, np.zeros((6, 6), np.uint8))
    _png(tmp_path / "test" / "c" / "0.png", np.zeros((6, 6), np.uint8))  # was skipped without a word
    with pytest.raises(DataError, match="no training folder"):
        load_folder(tmp_path)


def test_in_memory_data_is_checked_too() -> None:
    from training.data import check_dataset

    images = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    ok = Split(images, torch.tensor([0, 1, 0]))
    assert check_dataset(Dataset("x", ok, ok, ["a", "b"])).train is ok
    with pytest.raises(DataError, match=r"x training labels: 1 class\(es\)"):
        check_dataset(Dataset("x", ok, ok, ["a"]))
    with pytest.raises(DataError, match=r"label -1 \(image 1\)"):
        check_dataset(Dataset("x", ok, Split(images, torch.tensor([0, -1, 0])), ["a", "b"]))
    with pytest.raises(DataError, match="x test images: no test images"):
        check_dataset(Dataset("x", ok, Split(images[:0], ok.labels[:0]), ["a", "b"]))


def test_unknown_dataset() -> None:
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet", "/nowhere")


# -- splitting, normalisation, augmentation ---------------------------------------------------------


def _split(n: int = 50) -> Split:
    return Split(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).clone(), torch.arange(n))


def test_hold_out_is_deterministic_and_disjoint() -> None:
    split = _split()
    tr, va = hold_out(split, 10, seed=3)
    tr2, va2 = hold_out(split, 10, seed=3)
    assert torch.equal(va.labels, va2.labels) and torch.equal(tr.labels, tr2.labels)
    assert len(va) == 10 and len(tr) == 40
    assert sorted(tr.labels.tolist() + va.labels.tolist()) == list(range(50))
    assert torch.equal(va.images[:, 0, 0, 0].long(), va.labels)  # images travel with their labels
    _, other = hold_out(split, 10, seed=4)
    assert not torch.equal(other.labels, va.labels)


def test_hold_out_nothing() -> None:
    split = _split()
    tr, va = hold_out(split, 0, seed=0)
    assert tr is split and len(va) == 0 and va.images.shape[1:] == split.images.shape[1:]


def test_mean_std_and_normalise() -> None:
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (20, 3, 6, 6)).astype(np.uint8))
    images[:, 1] //= 4  # a darker channel
    data = Dataset("x", Split(images, torch.zeros(20, dtype=torch.int64)), Split(images, torch.zeros(20)), ["a"])
    mean, std = data.mean_std()
    assert len(mean) == 3 and mean[1] < mean[0]
    x = normalise(images, mean, std)
    assert x.dtype == torch.float32 and x.shape == images.shape
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4, rtol=0)


def test_augment_keeps_shape_and_dtype() -> None:
    x = torch.randn(16, 3, 10, 12)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(0)))  # the generator decides
    assert not torch.equal(out, x)


def test_a_training_batch_is_cropped_on_raw_pixels_so_its_padding_is_black() -> None:
    """Cropped after normalising, the padding was 0 there: the mean pixel, grey, on 96 % of the images,
    a border test images never have. Padded on the raw pixels it is black, as the images' background."""
    images = torch.zeros(64, 2, 8, 8, dtype=torch.uint8)  # black, as Fashion-MNIST's background
    mean, std = [0.3, 0.5], [0.4, 0.2]
    out = training_batch(images, mean, std, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, normalise(images, mean, std))  # every pixel black, padding included
    assert torch.equal(training_batch(images, mean, std, None), normalise(images, mean, std))


def test_augment_without_padding_only_flips() -> None:
    x = torch.randn(64, 1, 5, 5)
    out = augment(x, torch.Generator().manual_seed(1), pad=0)
    same = [torch.equal(o, i) for o, i in zip(out, x, strict=True)]
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)]
    assert all(s or f for s, f in zip(same, flipped, strict=True))
    assert 10 < sum(flipped) < 54  # about half


def test_augment_crops_shift_the_image() -> None:
    x = torch.zeros(200, 1, 6, 6)
    x[:, :, 2, 3] = 1.0  # one bright pixel
    out = augment(x, torch.Generator().manual_seed(2), pad=2)
    assert torch.equal(out.sum(dim=(1, 2, 3)).clamp(max=1), out.sum(dim=(1, 2, 3)))  # never duplicated
    positions = {tuple(o[0].nonzero().flatten().tolist()) for o in out}
    assert len(positions) > 5  # many different shifts (and some pixel shifted out entirely)


def test_reads_file_names_the_files_each_dataset_is_read_from(tmp_path: Path) -> None:
    """What training's out= may not replace (or add to the dataset): the files its loader reads, by name."""
    d = str(tmp_path)
    assert reads_file("fashion-mnist", d, tmp_path / "t10k-labels-idx1-ubyte.gz")
    assert not reads_file("fashion-mnist", d, tmp_path / "m.safetensors")
    assert not reads_file("fashion-mnist", d, tmp_path / "runs" / "train-images-idx3-ubyte.gz")
    assert reads_file("cifar10", d, tmp_path / "data_batch_5") and not reads_file("cifar10", d, tmp_path / "x")
    assert reads_file("folder", d, tmp_path / "test" / "cat" / "1.JPG")
    assert not reads_file("folder", d, tmp_path / "train" / "1.png")  # not in a class folder: never read
    assert not reads_file("folder", d, tmp_path / "train" / "cat" / "m.safetensors")
    assert not reads_file("folder", None, tmp_path / "train" / "cat" / "1.png")  # no folder: nothing to read
    store = tmp_path / "store" / "cat"  # a class folder linked in from elsewhere: read through the link
    store.mkdir(parents=True)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "cat").symlink_to(store)
    assert reads_file("folder", d, tmp_path / "train" / "cat" / "0.png")
