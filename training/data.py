"""Datasets read from local files only (nothing is ever downloaded), held in memory as uint8 tensors.

Images are [N, C, H, W] uint8, labels [N] int64. Normalisation constants are computed from the
training images and travel in the checkpoint, so the service applies exactly what training did.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
FASHION_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
CIFAR10_FILES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]


class DataError(ValueError):
    """Data that cannot be read; the message names the file and what to do."""


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # [N, C, H, W] uint8
    labels: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    test: Split
    classes: list[str]

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of training pixels scaled to [0, 1]."""
        x = self.train.images.float().div_(255)
        return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


# -- readers -------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array: uint8 images [N, H, W] or labels [N]."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: cannot read IDX file ({e})") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: IDX header of {ndim} dimensions is cut short (truncated?)")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != (need := int(np.prod(dims))):
        why = "cut short?" if data.size < need else "not the file its header describes"
        raise DataError(f"{path}: IDX header says {dims}, {need} bytes, but it holds {data.size} ({why})")
    return data.reshape(dims)


def load_fashion_mnist(root: Path | None = None, *, option: str = "data_dir") -> Dataset:
    """`option` is what sets the folder, as the fix in an error names it (`evaluate`: --data-dir)."""
    root = root or FASHION_MNIST_DIR
    files = FASHION_MNIST_FILES
    missing = [name for name in files.values() if not (root / name).is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found in {root} (missing {missing}). Install it with "
            f"`apt-get install dataset-fashion-mnist`, or set {option} to a folder holding the IDX files."
        )
    arr = {k: read_idx(root / v) for k, v in files.items()}
    for key, name in files.items():  # a labels file under an images file's name once trained on garbage, rc 0
        split_name = "training" if key.startswith("train") else "test"
        want, ndim = ("images [N, height, width]", 3) if key.endswith("_x") else ("labels [N]", 1)
        if arr[key].ndim != ndim:
            other = "a labels" if ndim == 3 else "an images"
            raise DataError(
                f"{root / name}: holds an array of shape {arr[key].shape}, not {want} (is it {other} file?); "
                f"put the Fashion-MNIST {split_name} {want.split()[0]} file under this name"
            )

    def split(x: np.ndarray, y: np.ndarray) -> Split:
        return Split(torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))

    data = Dataset(
        "fashion-mnist",
        split(arr["train_x"], arr["train_y"]),
        split(arr["test_x"], arr["test_y"]),
        list(FASHION_MNIST_CLASSES),
    )
    return check_dataset(
        data,
        train=Sources(str(root / files["train_x"]), str(root / files["train_y"])),
        test=Sources(str(root / files["test_x"]), str(root / files["test_y"])),
    )


class _ArraysOnly(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a CIFAR batch can run no code."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only arrays are allowed")
        return super().find_class(module, name)


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _ArraysOnly(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        data = np.asarray(d[b"data"])
        if data.dtype != np.uint8:  # cast, 0.5 became 0 and 300 became 44: other images than the file's
            raise ValueError(f"pixels of type {data.dtype}, where CIFAR-10's are bytes, uint8")
        data = data.reshape(-1, 3, 32, 32)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError, OverflowError) as e:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({e})") from None
    if labels.shape != (len(data),):
        raise DataError(
            f"{path}: {labels.size} labels for {len(data)} images; each image needs exactly one label "
            "(the batch is damaged: extract it again)"
        )
    return data, labels


def load_cifar10(root: Path, *, option: str = "data_dir") -> Dataset:
    """The standard `cifar-10-batches-py` folder: data_batch_1..5 and test_batch."""
    names = CIFAR10_FILES[:-1]
    missing = [n for n in CIFAR10_FILES if not (root / n).is_file()]
    if missing:
        raise DataError(
            f"CIFAR-10 python batches not found in {root} (missing {missing}); "
            f"set {option} to the extracted cifar-10-batches-py folder."
        )
    parts = [_cifar_batch(root / n) for n in names]
    tx, ty = _cifar_batch(root / "test_batch")
    train = Split(
        torch.from_numpy(np.concatenate([p[0] for p in parts])), torch.from_numpy(np.concatenate([p[1] for p in parts]))
    )
    data = Dataset("cifar10", train, Split(torch.from_numpy(tx), torch.from_numpy(ty)), list(CIFAR10_CLASSES))
    batches = str(root / "data_batch_{1..5}")
    test = str(root / "test_batch")
    return check_dataset(data, train=Sources(batches, batches), test=Sources(test, test))


def _read_folder_split(root: Path, classes: list[str]) -> tuple[Split, Path]:
    """The split's images and labels, and its first image file (to name in messages)."""
    from PIL import Image, UnidentifiedImageError

    images, labels, files = [], [], []
    for label, cls in enumerate(classes):
        if not (root / cls).is_dir():  # a class may have no images in this split
            continue
        for f in sorted((root / cls).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    images.append(_pixels(im))
            except (OSError, UnidentifiedImageError) as e:
                raise DataError(f"{f}: not a readable image ({e})") from None
            labels.append(label)
            files.append(f)
    if not images:
        raise DataError(f"{root}: no images found under its class folders")
    first: dict[tuple[int, ...], Path] = {}  # each shape's first file
    for pixels, f in zip(images, files, strict=True):
        first.setdefault(pixels.shape, f)
    if len(first) != 1:
        (a, fa), (b, fb) = list(first.items())[:2]
        fix = "resize them to one size" if len(a) == len(b) else "save them all greyscale or all RGB"
        raise DataError(
            f"{root}: {fa} is {shape_text(_chw(a))} but {fb} is {shape_text(_chw(b))} (channels x height x width); "
            f"{fix}"
        )
    x = np.stack(images)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return Split(torch.from_numpy(np.ascontiguousarray(x)), torch.tensor(labels, dtype=torch.int64)), files[0]


def _pixels(im: Any) -> np.ndarray:
    """An image's 8-bit pixels: greyscale modes as [H, W] (16-bit scaled from its full range, which converting
    would clip to 255, as the service's decoder does), every other mode as RGB [H, W, 3]."""
    if im.mode.startswith("I"):  # a 16-bit PNG opens as I;16 or I
        return np.clip(np.rint(np.asarray(im, dtype=np.float64) * (255 / 65535)), 0, 255).astype(np.uint8)
    return np.asarray(im if im.mode in ("L", "RGB") else im.convert("L" if im.mode in ("1", "LA") else "RGB"))


def _chw(shape: tuple[int, ...]) -> tuple[int, ...]:
    """`_pixels`' array shape, [H, W] or [H, W, 3], as (channels, height, width)."""
    return (1, *shape) if len(shape) == 2 else (shape[2], *shape[:2])


def _class_folders(split: Path) -> list[str]:
    """The class folders of a split: its folders that hold images, hidden ones (.ipynb_checkpoints) aside."""
    return sorted(
        p.name
        for p in split.iterdir()
        if p.is_dir() and not p.name.startswith(".") and any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir())
    )


def load_folder(root: Path, *, option: str = "data_dir") -> Dataset:
    """`root/train/<class>/*.png` and `root/test/<class>/*.png`; class names from the train folders that
    hold images (hidden and empty folders are not classes)."""
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise DataError(
            f"{root}: an image-folder dataset needs train/<class>/ and test/<class>/ folders; "
            f"set {option} to a folder that has them"
        )
    classes = _class_folders(root / "train")
    if not classes:
        raise DataError(
            f"{root / 'train'}: no class folders holding images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
            "put each class's images in a folder of its own"
        )
    if len(classes) < 2:  # this once trained, then failed on the checkpoint's metadata with a pydantic dump
        raise DataError(
            f"{root / 'train'}: one class folder ({classes[0]}); a classifier needs at least two: "
            f"add a folder of images for each class under {root / 'train'}"
        )
    extra = [c for c in _class_folders(root / "test") if c not in classes]
    if extra:  # its images would be skipped without a word
        raise DataError(
            f"{root / 'test' / extra[0]}: a test class with no training folder {root / 'train' / extra[0]}; "
            "add training images for it or move it out of test/"
        )
    (train, train_file), (test, test_file) = (_read_folder_split(root / s, classes) for s in ("train", "test"))
    data = Dataset("folder", train, test, classes)  # named by its loader: `evaluate` reloads it from the metadata
    return check_dataset(
        data,
        train=Sources(f"{root / 'train'} (e.g. {train_file})", f"{root / 'train'}'s class folders"),
        test=Sources(f"{root / 'test'} (e.g. {test_file})", f"{root / 'test'}'s class folders"),
    )


DATASETS = ("fashion-mnist", "cifar10", "folder")  # what load_dataset reads


def reads_file(name: str, data_dir: str | None, path: Path) -> bool:
    """Whether `load_dataset(name, data_dir)` reads the file `path` (a link counts as itself: what replacing
    `path` would replace), as far as its name tells: Fashion-MNIST's IDX files, the CIFAR-10 batches, an image
    folder's `train/<class>/` and `test/<class>/` images."""
    root = Path(data_dir) if data_dir else FASHION_MNIST_DIR if name == "fashion-mnist" else None
    if root is None:
        return False
    # as written (a linked class folder the loader reads through) and with its folders' links followed (a
    # dataset reached by another path), never the file's own link
    written = Path(os.path.normpath(path.absolute())), Path(os.path.normpath(root.absolute()))
    followed = path.absolute().parent.resolve() / path.name, root.resolve()
    for file, folder in (written, followed):
        if not file.is_relative_to(folder):
            continue
        inside = file.relative_to(folder)
        if name == "fashion-mnist":
            found = len(inside.parts) == 1 and inside.name in FASHION_MNIST_FILES.values()
        elif name == "cifar10":
            found = len(inside.parts) == 1 and inside.name in CIFAR10_FILES
        else:
            found = len(inside.parts) == 3 and inside.parts[0] in ("train", "test")
            found = found and inside.suffix.lower() in IMAGE_SUFFIXES
        if found:
            return True
    return False


def load_dataset(name: str, data_dir: str | None = None, *, option: str = "data_dir") -> Dataset:
    """The dataset `name` from `data_dir` (None: its standard location). `option` is what sets data_dir, as the
    fix in an error names it: the training option data_dir, or evaluate's --data-dir."""
    root = Path(data_dir) if data_dir else None
    if name == "fashion-mnist":
        return load_fashion_mnist(root, option=option)
    if name == "cifar10":
        if root is None:
            raise DataError(f"cifar10 needs {option}=<path to cifar-10-batches-py>")
        return load_cifar10(root, option=option)
    if name == "folder":
        if root is None:
            raise DataError(f"folder needs {option}=<path with train/ and test/ class folders>")
        return load_folder(root, option=option)
    raise DataError(f"unknown dataset {name!r}; choose {', '.join(DATASETS)}")


@dataclass(frozen=True)
class Sources:
    """Where a split's images and labels came from, as error messages name them (files or folders)."""

    images: str
    labels: str


def shape_text(dims: Sequence[int]) -> str:
    """An image shape as messages write it: (C, H, W) -> "CxHxW" (say "channels x height x width" beside it)."""
    return "x".join(map(str, dims))


def check_dataset(data: Dataset, *, train: Sources | None = None, test: Sources | None = None) -> Dataset:
    """Return `data` if it can be trained and evaluated on; otherwise raise DataError naming the file(s) and
    what is inconsistent. Checked at load time: each of these once surfaced only after (or deep into)
    training: image and label counts per split, train and test image shape and channels, labels in
    [0, number of classes), at least two classes."""
    sources = {"training": train, "test": test}
    n_classes = len(data.classes)
    if n_classes < 2:
        where = train.labels if train else f"{data.name} training labels"
        raise DataError(f"{where}: {n_classes} class(es) {data.classes}; a classifier needs at least two classes")
    for name, split in (("training", data.train), ("test", data.test)):
        src = sources[name] or Sources(f"{data.name} {name} images", f"{data.name} {name} labels")
        if split.images.ndim != 4 or split.labels.ndim != 1:
            raise DataError(
                f"{src.images}: {name} images of shape {tuple(split.images.shape)} and labels of shape "
                f"{tuple(split.labels.shape)}; need images [N, C, H, W] and labels [N]"
            )
        n_img, n_lab = len(split.images), len(split.labels)
        if n_img != n_lab:  # a mismatch once trained the whole run, then raised IndexError
            raise DataError(
                f"{src.labels}: {n_lab} labels for {n_img} {name} images in {src.images}; each image needs exactly "
                "one label: use the labels and images files that belong together"
            )
        if n_img == 0:
            raise DataError(f"{src.images}: no {name} images; the {name} split needs some")
        bad = ((split.labels < 0) | (split.labels >= n_classes)).nonzero()
        if len(bad):  # an out-of-range label once raised IndexError mid-epoch
            i = int(bad[0])
            raise DataError(
                f"{src.labels}: label {int(split.labels[i])} (image {i}) is outside 0..{n_classes - 1}, the "
                f"{n_classes} classes of {data.name}; the file is damaged or belongs to another dataset"
            )
    trained, tested = data.train.images.shape[1:], data.test.images.shape[1:]
    if 0 in trained:  # a convolution's traceback, after loading
        where = train.images if train else f"{data.name} training images"
        raise DataError(f"{where}: training images of {shape_text(trained)}; images need at least one pixel")
    if trained != tested:  # once trained, then gave wrong accuracy
        tr, te = train or Sources("training images", ""), test or Sources(f"{data.name} test images", "")
        raise DataError(
            f"{te.images}: test images are {shape_text(tested)} (channels x height x width) but the training "
            f"images ({tr.images}) are {shape_text(trained)}; the network takes one input shape: give both "
            "splits images of the same size and channels"
        )
    return data


# -- splitting, batching, augmentation -------------------------------------------------------------


def hold_out(split: Split, n: int, seed: int) -> tuple[Split, Split]:
    """Deterministic (train, validation) split: the validation set is n images chosen by `seed`."""
    if n <= 0:
        return split, Split(split.images[:0], split.labels[:0])
    perm = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    tr, va = perm[n:], perm[:n]
    return Split(split.images[tr], split.labels[tr]), Split(split.images[va], split.labels[va])


def normalise(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float, scaled to [0, 1] then standardised per channel."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x.float().div_(255) - m) / s


def training_batch(
    images: torch.Tensor, mean: list[float], std: list[float], g: torch.Generator | None
) -> torch.Tensor:
    """uint8 images [N, C, H, W] -> the normalised batch training runs on; randomly cropped and flipped first
    where `g` is given. Cropped on the raw pixels, so the padding is black, as the images' background: padded
    after normalising, it was 0 there, the mean pixel (grey), on 96 % of the images (all but the centred crop)."""
    return normalise(images if g is None else augment(images, g), mean, std)


def augment(x: torch.Tensor, g: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop after zero padding, and horizontal flip, per image. x: [N, C, H, W], any dtype."""
    n, _, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # [N, H, 1]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # [N, 1, W]
    out = xp[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # [N, C, H, W]
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out.contiguous()
