"""Request inputs -> a float batch [N, C, H, W] in the model's input space. No FastAPI here.

An input is either a nested array of raw pixel values (0-255) shaped [H, W] (single-channel models),
[C, H, W] or [H, W, C], or a string holding a base64 PNG or JPEG (optionally a data: URL), which is turned
upright by its EXIF orientation, composited onto black where it is transparent, converted to the model's
channel count and resized to its height and width.

Decoded inputs stay numpy arrays through the event loop (normalised, batched): torch work belongs to
the inference thread alone (`service.runtime.inference_executor` says why).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import itertools
import struct
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from lcs.checkpoint import InputSpec

if TYPE_CHECKING:
    from PIL import Image


class InputError(ValueError):
    """An input the client must fix; the message says which one and how."""


def _from_arrays(arr: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    """[N, *image] -> [N, C, H, W], each image given as [H, W] (single-channel models), [C, H, W] or [H, W, C]."""
    c, h, w = spec.channels, spec.height, spec.width
    image = arr.shape[1:]
    if image == (h, w) and c == 1:
        arr = arr[:, None]
    elif image == (h, w, c) and image != (c, h, w):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.shape[1:] != (c, h, w):
        raise _shape_error(image, spec, where)
    return arr


def _shape_error(image: tuple[int, ...], spec: InputSpec, where: str) -> InputError:
    c, h, w = spec.channels, spec.height, spec.width
    accepted = f"[{h}, {w}], " if c == 1 else ""
    return InputError(
        f"{where}: shape {list(image)} does not match the model input; "
        f"send {accepted}[{c}, {h}, {w}] or [{h}, {w}, {c}] raw pixel values (0-255)"
    )


_JSON_NAMES = {str: "strings", bool: "true/false", type(None): "null", dict: "objects", list: "arrays"}


def check_numbers(nested: Sequence[object], depth: int, where: str) -> None:
    """numpy reads "12" as 12, true as 1 and null as NaN: refuse anything but JSON numbers in a rectangular
    array `depth` levels deep. One pass over the leaves (~15 us per 28x28 image)."""
    leaves: Iterable[object] = nested
    for _ in range(depth - 1):
        leaves = itertools.chain.from_iterable(leaves)  # type: ignore[arg-type]  # rows are lists here
    bad = set(map(type, leaves)) - {int, float}
    if bad:
        names = sorted(_JSON_NAMES.get(t, t.__name__) for t in bad)
        raise InputError(f"{where}: pixel values must be JSON numbers (0-255), got {', '.join(names)}")


def check_range(arr: np.ndarray, where: str) -> None:
    if not arr.size:
        return
    lo, hi = arr.min(), arr.max()  # a NaN makes both NaN, and an infinity is one of them: both fail below
    if lo >= 0 and hi <= 255:
        return
    if not np.isfinite(arr).all():
        raise InputError(
            f"{where}: contains NaN, Infinity or a number too large to read; pixel values must be numbers in 0-255"
        )
    raise InputError(f"{where}: pixel values must be in 0-255, got {lo:g}..{hi:g}")


B64_CHUNK = 1 << 18  # characters a b64decode call takes: a multiple of 4, about 1.5 ms of work here


def b64decode(text: str) -> bytes:
    """Strict base64 (`validate=True`), decoded in chunks: the decode pool's thread gives the GIL back between
    them. In one call a 5 MB photo's base64 held it for 25-40 ms, and the event loop, waiting for it, with it."""
    if text.find("=", 0, max(0, len(text) - 2)) != -1:  # padding before the end, which one call refuses too
        raise binascii.Error("padding before the end of the data")
    return b"".join(base64.b64decode(text[i : i + B64_CHUNK], validate=True) for i in range(0, len(text), B64_CHUNK))


def _decode_image(text: str, spec: InputSpec, where: str, budget: int, limit: int) -> tuple[np.ndarray, int]:
    """(the image as [C, H, W] pixel values, its decoded pixel count). `budget`: the pixels the request's
    images may still decode, of `limit` per request; the header is checked against it before decoding."""
    from PIL import Image, UnidentifiedImageError

    if text[:5].lower() == "data:":  # a URL's scheme is case-insensitive
        text = text.partition(",")[2]
    try:  # line breaks and spaces allowed: `base64` (GNU coreutils) wraps its output at 76 characters
        raw = b64decode("".join(text.split()))
    except (binascii.Error, ValueError):
        raise InputError(f"{where}: not valid base64; send a base64-encoded PNG or JPEG") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if (other := _other_format(raw)) is not None:
                raise InputError(f"{where}: image format {other} is not supported; send PNG or JPEG")
            # only these parsers (a phone camera's JPEG opens as MPO, its first picture read): without `formats`,
            # Pillow tried each it has, and its EPS parser read 8 MB of "%%" lines for 8 s holding the GIL
            im: Image.Image = Image.open(io.BytesIO(raw), formats=("PNG", "JPEG"))
            pixels = im.width * im.height
            if pixels > budget:
                raise InputError(_too_many_pixels(where, im.width, im.height, limit, alone=budget == limit))
            _decode(im, where)
            _upright(im)
            mode = "L" if spec.channels == 1 else "RGB"
            if im.mode.startswith("I"):  # 16-bit greyscale PNG: scale to 0-255 (converting to "L" would clip)
                im = Image.fromarray(np.asarray(im, dtype=np.float32) * np.float32(255 / 65535), mode="F")
            elif im.has_transparency_data:
                # Onto black, the training images' background: converted alone, two images that look the
                # same but hide different colours under their transparent pixels gave different answers
                alpha = im.convert("LA" if mode == "L" else "RGBA")
                im = Image.new(mode, im.size)
                im.paste(alpha.convert(mode), mask=alpha.getchannel("A"))
            elif im.mode != mode:
                im = im.convert(mode)
            if im.size != (spec.width, spec.height):
                im = im.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.float32)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # Pillow's own bound, from the header
        raise InputError(f"{where}: image is over {Image.MAX_IMAGE_PIXELS} pixels; resize it") from None
    # Pillow reports a malformed PNG chunk met while decoding as SyntaxError
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{where}: not a readable PNG or JPEG image ({type(e).__name__})") from None
    if arr.ndim == 2:
        arr = arr[None] if spec.channels == 1 else np.repeat(arr[None], spec.channels, axis=0)
    else:
        arr = arr.transpose(2, 0, 1)
    return arr, pixels


def _decode(im: Image.Image, where: str) -> None:
    """Decode the pixels now, refusing what Pillow cannot: on crafted files its chunk readers raise more than
    the errors it documents (IndexError from a short iCCP chunk after the image data, met while EXIF
    orientation loaded the image: a 500), and a palette image with no PLTE chunk decodes without a palette
    (and has_transparency_data asserts on it: a 500)."""
    try:
        im.load()
    except Exception as e:  # anything Pillow raises decoding untrusted bytes: the image is not readable
        raise InputError(f"{where}: not a readable PNG or JPEG image ({type(e).__name__})") from None
    if im.mode in ("P", "PA") and im.palette is None:
        raise InputError(f"{where}: not a readable PNG or JPEG image (a palette image with no palette)")


def _upright(im: Image.Image) -> None:
    """Turn a photo stored rotated upright, as a viewer shows it, by its EXIF orientation. An EXIF block Pillow
    cannot read leaves the image as stored, as viewers do (and Pillow does for a JPEG's): in a PNG it raised
    SyntaxError (refused as no readable image) or struct.error (a 500)."""
    from PIL import ImageOps

    with contextlib.suppress(SyntaxError, struct.error, ValueError):
        ImageOps.exif_transpose(im, in_place=True)


_OTHER_FORMATS = {b"GIF8": "GIF", b"BM": "BMP", b"II*\0": "TIFF", b"MM\0*": "TIFF", b"%!PS": "EPS", b"\0\0\1\0": "ICO"}


def _other_format(raw: bytes) -> str | None:
    """The name of a common image format that is not PNG or JPEG, from its first bytes, for the message."""
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _OTHER_FORMATS.items() if raw.startswith(magic)), None)


def _too_many_pixels(where: str, width: int, height: int, limit: int, *, alone: bool) -> str:
    if alone:
        return f"{where}: image is {width}x{height} pixels, over the limit of {limit} per request; resize it"
    return (
        f"{where}: image is {width}x{height} pixels, and with the request's earlier images over the limit of "
        f"{limit} pixels per request; resize the images or split the request"
    )


def check_count(n: int, limit: int, where: str) -> None:
    if n > limit:
        raise InputError(f"{where}: {n} images in one request, the limit is {limit}; split the request")


def _float32(values: Sequence[object], where: str) -> np.ndarray:
    """`values` as float32: a number beyond float32 becomes inf (refused by check_range), an integer beyond
    any float an InputError; ValueError or TypeError if they are not a rectangular array of numbers."""
    with np.errstate(over="ignore"):
        try:
            return np.asarray(values, dtype=np.float32)
        except OverflowError:
            raise InputError(f"{where}: pixel values must be in 0-255, got a number too large to read") from None


def _numeric(nested: Sequence[object]) -> np.ndarray | None:
    """`nested` as float32 where numpy's type discovery finds a rectangular array of numbers, else None. It
    reads true and false as integers, so this stands in for check_numbers only for JSON known to hold
    neither: strings, null and objects it finds (an array of text or of objects), and rows of different
    lengths it refuses."""
    with np.errstate(over="ignore"):  # beyond float32: inf, refused by check_range as `_float32`'s is
        try:
            arr = np.asarray(nested)
        except (ValueError, TypeError, OverflowError):
            return None
        # integers through float64, as numpy converts a Python int to float32 (rounded twice: a direct cast
        # rounds once, and a value past 2**53 refused by check_range was worded otherwise)
        return arr.astype(np.float64, copy=False).astype(np.float32) if arr.dtype.kind in "iuf" else None


def numbers(flat: Sequence[object], where: str, *, booleans: bool = True) -> np.ndarray:
    """A flat list of JSON numbers (OIP v2 `data`) as float32, checked as nested arrays are (`booleans`: as
    `decode`'s)."""
    if not booleans and (arr := _numeric(flat)) is not None and arr.ndim == 1:
        return arr
    check_numbers(flat, 1, where)
    return _float32(flat, where)


def nested_numbers(nested: Sequence[object], shape: Sequence[int], where: str, *, booleans: bool = True) -> np.ndarray:
    """OIP v2 `data` in its nested form, which the protocol allows beside the flat one: JSON numbers
    nested as `shape` says, checked as nested arrays are, flattened (float32; `booleans`: as `decode`'s)."""
    if not booleans and (arr := _numeric(nested)) is not None and list(arr.shape) == list(shape):
        return arr.reshape(-1)
    try:
        arr = _float32(nested, where)  # the nesting first: numpy reads "12" and true as numbers, checked below
    except InputError:
        raise
    except (TypeError, ValueError):  # rows of different lengths
        arr = None
    if arr is None or list(arr.shape) != list(shape):
        got = f"nested as {list(arr.shape)}, not" if arr is not None else "not nested"
        raise InputError(f"{where}: {got} as its shape {list(shape)[:8]}; nest it so, or send one flat list")
    check_numbers(nested, len(shape), where)
    return arr.reshape(-1)


def has_images(inputs: Sequence[object]) -> bool:
    """Whether any input is an encoded image, whose decoding is worth taking off the event loop."""
    return any(isinstance(x, str) for x in inputs)


def decode(
    inputs: Sequence[object], spec: InputSpec, *, max_inputs: int, max_pixels: int, booleans: bool = True
) -> np.ndarray:
    """Raw inputs -> float32 array [N, C, H, W] of pixel values in 0-255 (not yet normalised).

    `max_pixels` bounds the pixels a request's encoded images decode to, all together: each image's
    header is checked before it is decoded, so a request costs at most that much decoding. `booleans`:
    whether the JSON they came from may hold true or false; where its text has neither, numpy's type
    discovery checks the values (`_numeric`), ~20 us an image sooner than check_numbers."""
    if not isinstance(inputs, list | tuple) or len(inputs) == 0:
        raise InputError("inputs: send a non-empty list of images")
    check_count(len(inputs), max_inputs, "inputs")
    if all(isinstance(x, list) for x in inputs):  # fast path: one numpy conversion for the whole batch
        batch = None if booleans else _numeric(inputs)
        if batch is None:
            try:
                batch = _float32(inputs, "inputs")
                if batch.ndim >= 3:
                    check_numbers(inputs, batch.ndim, "inputs")
            except (ValueError, TypeError):  # InputError is a ValueError
                batch = None  # ragged, non-numeric or too large: fall through to per-item errors
        if batch is not None and batch.ndim >= 3:
            out = _from_arrays(batch, spec, "inputs[0]")  # one shape for all: the first is as wrong as any
            try:
                check_range(out, "inputs")
            except InputError:  # say which input: the client has to find it among up to max_inputs
                for i, a in enumerate(out):
                    check_range(a, f"inputs[{i}]")
                raise
            return out
    items = []
    budget = max_pixels
    for i, x in enumerate(inputs):
        where = f"inputs[{i}]"
        if isinstance(x, str):
            image, pixels = _decode_image(x, spec, where, budget, max_pixels)
            budget -= pixels
            items.append(image[None])
        elif isinstance(x, list):
            try:
                arr = _float32(x, where)
            except InputError:
                raise
            except (ValueError, TypeError):
                raise InputError(f"{where}: not a rectangular array of numbers") from None
            check_numbers(x, arr.ndim, where)
            if arr.ndim > 3:  # no image has more axes; and at numpy's 64, arr[None] raised IndexError (a 500)
                raise _shape_error(arr.shape, spec, where)
            arr = _from_arrays(arr[None], spec, where)
            check_range(arr, where)
            items.append(arr)
        else:
            raise InputError(f"{where}: expected a nested array of pixel values or a base64 PNG/JPEG string")
    return np.concatenate(items)


def normaliser(spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    """float32 (scale, shift) such that x * scale + shift == (x / 255 - mean) / std, per channel [1, C, 1, 1]."""
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.float32(1.0) / (np.float32(255.0) * std), -mean / std
