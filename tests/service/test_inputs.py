"""service.inputs: request inputs -> float batch [N, C, H, W] of pixel values, or an InputError naming the input."""

from __future__ import annotations

import base64
import binascii
import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from lcs.checkpoint import InputSpec
from service.inputs import B64_CHUNK, InputError, b64decode, decode, nested_numbers, normaliser, numbers

GRAY = InputSpec(channels=1, height=6, width=5, mean=[0.5], std=[0.25])
RGB = InputSpec(channels=3, height=4, width=5, mean=[0.1, 0.2, 0.3], std=[0.5, 0.25, 0.125])


def run(inputs: object, spec: InputSpec = GRAY, *, max_inputs: int = 8, max_pixels: int = 10_000) -> np.ndarray:
    return decode(inputs, spec, max_inputs=max_inputs, max_pixels=max_pixels)  # type: ignore[arg-type]


def b64(image: Image.Image, fmt: str, **kwargs: object) -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return base64.b64encode(buf.getvalue()).decode()


def ramp(h: int, w: int, c: int | None = None) -> np.ndarray:
    """Distinct pixel values so that a transposition or reshaping mistake shows."""
    n = h * w * (c or 1)
    return (np.arange(n, dtype=np.float32) % 256).reshape((h, w) if c is None else (h, w, c))


# -- arrays ---------------------------------------------------------------------------------------


def test_hw_and_chw_arrays_give_the_same_batch() -> None:
    img = ramp(6, 5)
    out = run([img.tolist(), img[None].tolist(), img[:, :, None].tolist()])
    assert out.dtype == np.float32
    assert out.shape == (3, 1, 6, 5)
    for i in range(3):
        assert np.array_equal(out[i, 0], img)


def test_hwc_arrays_are_transposed_to_chw() -> None:
    hwc = ramp(4, 5, 3)
    out = run([hwc.tolist()], RGB)
    assert out.shape == (1, 3, 4, 5)
    assert np.array_equal(out[0], hwc.transpose(2, 0, 1))
    chw = hwc.transpose(2, 0, 1)
    assert np.array_equal(run([chw.tolist()], RGB)[0], chw)


def test_hw_is_refused_for_a_colour_model_and_the_message_lists_what_is_accepted() -> None:
    with pytest.raises(InputError) as e:
        run([ramp(4, 5).tolist()], RGB)
    msg = str(e.value)
    assert msg.startswith("inputs[0]: shape [4, 5]")
    assert "[3, 4, 5] or [4, 5, 3]" in msg
    assert "[4, 5]," not in msg  # [H, W] is only offered to single-channel models


def test_errors_name_the_offending_input() -> None:
    good = ramp(6, 5).tolist()
    with pytest.raises(InputError, match=r"^inputs\[2\]: shape \[6, 4\]"):
        run([good, good, ramp(6, 4).tolist()])


@pytest.mark.parametrize(
    ("bad_value", "message"),
    [(float("nan"), "NaN, Infinity"), (float("inf"), "NaN, Infinity"), (256.0, "0-255"), (-1.0, "0-255")],
)
def test_non_finite_or_out_of_range_pixels_are_refused_with_the_index(bad_value: float, message: str) -> None:
    good = ramp(6, 5)
    bad = good.copy()
    bad[3, 2] = bad_value
    with pytest.raises(InputError, match=rf"^inputs\[1\]: .*{message}"):
        run([good.tolist(), bad.tolist()])  # all arrays: the batched fast path
    with pytest.raises(InputError, match=rf"^inputs\[1\]: .*{message}"):
        run([good.tolist(), bad.tolist(), b64(Image.new("L", (5, 6)), "PNG")])  # mixed: per-input path


def test_boundary_values_0_and_255_are_accepted() -> None:
    img = np.zeros((6, 5), dtype=np.float32)
    img[0, 0] = 255.0
    out = run([img.tolist()])
    assert float(out.min()) == 0.0 and float(out.max()) == 255.0


@pytest.mark.parametrize(
    "inputs",
    [
        [[[1, 2, 3], [4, 5]]],  # ragged rows
        [[[1, 2], "x"]],  # not numbers
        [[[{"a": 1}] * 5] * 6],  # objects
    ],
)
def test_ragged_or_non_numeric_arrays_are_refused(inputs: list[object]) -> None:
    with pytest.raises(InputError, match=r"^inputs\[0\]: not a rectangular array of numbers"):
        run(inputs)


@pytest.mark.parametrize("depth", [4, 63, 64])
def test_an_array_nested_deeper_than_an_image_is_a_shape_error_up_to_numpys_limit(depth: int) -> None:
    """At numpy's 64 axes, adding the batch axis raised IndexError: a 500 (found by the review of 6344158)."""
    nested: object = 1
    for _ in range(depth):
        nested = [nested]
    with pytest.raises(InputError, match=r"^inputs\[0\]: shape \[1, 1, 1, 1(, 1)*\] does not match the model input"):
        run([nested])
    with pytest.raises(InputError, match=r"^inputs\[0\]: shape \[1, 1, 1, 1(, 1)*\] does not match"):
        run([nested, "x"])  # the path that decodes each input by itself


def test_flat_list_is_a_shape_error_not_a_crash() -> None:
    with pytest.raises(InputError, match=r"^inputs\[0\]: shape \[30\]"):
        run([list(range(30))])


@pytest.mark.parametrize("inputs", [[], (), "not a list", None])
def test_empty_or_non_list_inputs_are_refused(inputs: object) -> None:
    with pytest.raises(InputError, match="non-empty list"):
        run(inputs)


def test_too_many_inputs_are_refused_before_decoding() -> None:
    with pytest.raises(InputError, match="9 images in one request, the limit is 8"):
        run([ramp(6, 5).tolist()] * 9)


def test_other_json_types_are_refused() -> None:
    with pytest.raises(InputError, match=r"^inputs\[1\]: expected a nested array"):
        run([ramp(6, 5).tolist(), 42])


def outcome(inputs: object, booleans: bool) -> tuple[str, object]:
    """What decode answers: the batch (its values, to the bit, and shape) or the error's message."""
    try:
        x = decode(inputs, GRAY, max_inputs=8, max_pixels=10_000, booleans=booleans)  # type: ignore[arg-type]
    except InputError as e:
        return "refused", str(e)
    return "decoded", (x.dtype.str, x.shape, x.tobytes())


IMAGE_OF = ramp(6, 5).tolist()


@pytest.mark.parametrize(
    "inputs",
    [
        [IMAGE_OF, IMAGE_OF],
        [[[0.5 + v for v in row] for row in IMAGE_OF]],  # floats
        [[[*row[:-1], 255.0] for row in IMAGE_OF]],  # ints and floats mixed
        [[[*row[:-1], "7"] for row in IMAGE_OF]],  # digit strings: numpy reads them as numbers when told the type
        [[[*row[:-1], None] for row in IMAGE_OF]],  # null
        [[[*row[:-1], {"a": 1}] for row in IMAGE_OF]],  # an object
        [[[*row[:-1], 2**70] for row in IMAGE_OF]],  # beyond 64 bits
        [[[*row[:-1], 2**63] for row in IMAGE_OF]],  # beyond int64, within uint64
        # past 2**53, where a direct cast to float32 rounds otherwise than numpy's int -> double -> float32, and
        # the refusal printed another number (found by the review of 6344158)
        [[[*map(int, row[:-1]), 36028850706055169] for row in IMAGE_OF]],  # all integers: an int64 array
        [[[*map(int, row[:-1]), -36028850706055169] for row in IMAGE_OF]],
        [[[*row[:-1], 1e300] for row in IMAGE_OF]],  # beyond float32
        [[[*row[:-1], float("nan")] for row in IMAGE_OF]],  # json.loads reads NaN
        [[[*row[:-1], -1] for row in IMAGE_OF]],
        [[[1, 2, 3], [4, 5]]],  # ragged
        [[[row] for row in IMAGE_OF]],  # one level too deep
        [list(range(30))],  # too shallow
        [[]],
        [IMAGE_OF, "iVBORw0KGgo="],  # an encoded image among arrays
    ],
)
def test_without_booleans_numpy_checks_the_values_as_check_numbers_does(inputs: list[object]) -> None:
    """`booleans=False` (the JSON text holds no true or false) lets numpy's type discovery check the values:
    the same batch, bit for bit, or the same refusal, whatever else the arrays hold."""
    assert outcome(inputs, booleans=False) == outcome(inputs, booleans=True)


def v2_outcome(data: list[object], shape: list[int] | None, booleans: bool) -> tuple[str, object]:
    """What OIP v2's readers answer for `data`: flat (`shape` None) or nested as `shape`."""
    try:
        if shape is None:
            x = numbers(data, "data", booleans=booleans)
        else:
            x = nested_numbers(data, shape, "data", booleans=booleans)
    except InputError as e:
        return "refused", str(e)
    return "read", (x.dtype.str, x.shape, x.tobytes())


@pytest.mark.parametrize("shape", [None, [1, 6, 5], [6, 5], [1, 5, 6]])
@pytest.mark.parametrize(
    "inputs",
    [
        [IMAGE_OF],
        [[[*map(int, row[:-1]), 36028850706055169] for row in IMAGE_OF]],
        [[[*row[:-1], "7"] for row in IMAGE_OF]],
        [[[*row[:-1], None] for row in IMAGE_OF]],
        [[[*row[:-1], [1]] for row in IMAGE_OF]],
        [[[*row[:-1], 1e300] for row in IMAGE_OF]],
        [[[1, 2, 3], [4, 5]]],
    ],
)
def test_v2_data_without_booleans_is_read_as_with_the_check(inputs: list[object], shape: list[int] | None) -> None:
    """OIP v2 `data`, flat or nested: numpy's type discovery stands in for check_numbers as in `decode`."""
    data: list[object] = inputs if shape is not None else [v for img in inputs for row in img for v in row]  # type: ignore[attr-defined]
    assert v2_outcome(data, shape, booleans=False) == v2_outcome(data, shape, booleans=True)


PIXEL = st.integers(0, 255) | st.floats(0, 255)
ODD = (  # anything JSON has but booleans
    st.integers() | st.integers(2**53, 2**64) | st.floats() | st.sampled_from(["7", "x", None, {}, []])
)
ROW = st.lists(PIXEL, min_size=5, max_size=5) | st.lists(PIXEL | ODD, min_size=4, max_size=6)
ARRAY = st.lists(ROW, min_size=6, max_size=6) | st.lists(ROW, min_size=5, max_size=7)


@settings(max_examples=300, deadline=None)
@given(st.lists(ARRAY, min_size=1, max_size=3))
def test_without_booleans_random_arrays_decode_as_before(inputs: list[object]) -> None:
    assert outcome(inputs, booleans=False) == outcome(inputs, booleans=True)
    shape = [len(inputs), 6, 5]
    assert v2_outcome(inputs, shape, booleans=False) == v2_outcome(inputs, shape, booleans=True)
    flat = [v for img in inputs for row in img for v in (row if isinstance(row, list) else [row])]  # type: ignore[attr-defined]
    assert v2_outcome(flat, None, booleans=False) == v2_outcome(flat, None, booleans=True)


# -- encoded images -------------------------------------------------------------------------------


def test_png_decodes_losslessly() -> None:
    img = ramp(6, 5).astype(np.uint8)
    out = run([b64(Image.fromarray(img, "L"), "PNG")])
    assert out.shape == (1, 1, 6, 5)
    assert np.array_equal(out[0, 0], img.astype(np.float32))


def test_data_url_prefix_is_accepted() -> None:
    img = ramp(6, 5).astype(np.uint8)
    out = run(["data:image/png;base64," + b64(Image.fromarray(img, "L"), "PNG")])
    assert np.array_equal(out[0, 0], img.astype(np.float32))


def test_jpeg_decodes_close_to_the_original() -> None:
    img = np.full((6, 5), 100, dtype=np.uint8)
    img[:3] = 200
    out = run([b64(Image.fromarray(img, "L"), "JPEG", quality=95)])
    assert out.shape == (1, 1, 6, 5)
    assert float(np.abs(out[0, 0] - img.astype(np.float32)).mean()) < 10.0


def test_colour_png_is_converted_to_the_model_channels_and_resized() -> None:
    grey_rgb = Image.new("RGB", (20, 24), (90, 90, 90))  # 4x larger than the model input, R = G = B
    out = run([b64(grey_rgb, "PNG")])
    assert out.shape == (1, 1, 6, 5)
    assert np.array_equal(out, np.full((1, 1, 6, 5), 90.0))
    gray = Image.new("L", (5, 4), 40)
    out = run([b64(gray, "PNG")], RGB)
    assert out.shape == (1, 3, 4, 5)
    assert np.array_equal(out, np.full((1, 3, 4, 5), 40.0))


def test_arrays_and_images_mix_in_one_request() -> None:
    img = ramp(6, 5)
    out = run([img.tolist(), b64(Image.fromarray(img.astype(np.uint8), "L"), "PNG")])
    assert np.array_equal(out[0], out[1])


@pytest.mark.parametrize("text", ["not base64 at all!", "QUJD=Rg=="])
def test_invalid_base64_is_refused(text: str) -> None:
    with pytest.raises(InputError, match=r"^inputs\[0\]: not valid base64"):
        run([text])


@pytest.mark.parametrize("size", [0, 1, 3, B64_CHUNK // 4 * 3, B64_CHUNK // 4 * 3 + 1, 5 * B64_CHUNK // 4 * 3 + 2])
def test_base64_decodes_in_chunks_as_in_one_call(size: int) -> None:
    """In chunks so the decoding thread gives the GIL back: one call for a 5 MB photo held the event loop
    25-40 ms. Sizes at and across a chunk's edge, padded and not."""
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    assert b64decode(base64.b64encode(data).decode()) == data


@pytest.mark.parametrize(
    "text", ["QUJD=Rg==", "QUJD" * (B64_CHUNK // 4 - 1) + "QQ==" + "QUJD", "QUJD" * (B64_CHUNK // 4) + "Q"]
)
def test_base64_chunks_refuse_what_one_call_refuses(text: str) -> None:
    """Padding in the middle, even where a chunk ends, and a length that is no multiple of 4."""
    with pytest.raises(binascii.Error):
        base64.b64decode(text, validate=True)
    with pytest.raises(binascii.Error):
        b64decode(text)


def test_bytes_that_are_not_an_image_are_refused() -> None:
    with pytest.raises(InputError, match=r"^inputs\[0\]: not a readable PNG or JPEG"):
        run([base64.b64encode(b"hello, this is plain text and no image").decode()])


def _chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_truncated_png_is_refused() -> None:
    full = base64.b64decode(b64(Image.fromarray(ramp(6, 5).astype(np.uint8), "L"), "PNG"))
    with pytest.raises(InputError, match=r"^inputs\[0\]: not a readable PNG or JPEG"):
        run([base64.b64encode(full[: len(full) // 2]).decode()])


def test_a_png_with_a_broken_chunk_among_its_data_is_refused() -> None:
    # Pillow raises SyntaxError ("broken PNG file") for it while decoding the pixels, after the header read well
    data = zlib.compress(bytes(6 * 6))
    ihdr = struct.pack(">IIBBBBB", 5, 6, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data[:5]) + _chunk(b"\0\1\2\3", data[5:])
    with pytest.raises(InputError, match=r"^inputs\[0\]: not a readable PNG or JPEG image \(SyntaxError\)"):
        run([base64.b64encode(png + _chunk(b"IEND", b"")).decode()])


@pytest.mark.parametrize(
    ("ancillary", "colour_type", "reason"),
    [
        # Pillow's iCCP reader indexes past a short chunk met after the image data: IndexError (a 500)
        (_chunk(b"iCCP", b"p\0"), 0, "IndexError"),
        # colour type 3 with no PLTE: decodes with no palette, and has_transparency_data asserts (a 500)
        (b"", 3, "a palette image with no palette"),
    ],
    ids=["short iCCP after the data", "palette without PLTE"],
)
def test_pngs_pillow_decodes_with_undocumented_errors_are_refused(
    ancillary: bytes, colour_type: int, reason: str
) -> None:
    """Found by fuzzing a running service: both were 500 "internal error"."""
    png = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", 28, 28, 8, colour_type, 0, 0, 0))
        + _chunk(b"IDAT", zlib.compress(bytes(29 * 28)))
        + ancillary
        + _chunk(b"IEND", b"")
    )
    with pytest.raises(InputError, match=rf"^inputs\[0\]: not a readable PNG or JPEG image \({reason}\)$"):
        run([base64.b64encode(png).decode()])


@pytest.mark.filterwarnings("ignore:Invalid APNG:UserWarning")  # Pillow's, for a broken animation chunk
def test_pngs_with_random_ancillary_chunks_decode_or_are_refused_never_anything_else() -> None:
    """Chunks Pillow reads (colour, text, EXIF, animation), short or random, before or after the data, in each
    colour type: the fuzzing that found the two above (102 of 1,500 were 500s). Any exception other than
    InputError would be a 500."""
    kinds = [b"PLTE", b"tRNS", b"iCCP", b"gAMA", b"cHRM", b"sRGB", b"pHYs", b"tEXt", b"zTXt", b"iTXt", b"eXIf"]
    kinds += [b"acTL", b"fcTL", b"fdAT", b"sBIT", b"bKGD", b"tIME"]
    rng = np.random.default_rng(1)
    outcomes = {"decoded": 0, "refused": 0}
    for i in range(500):
        colour_type = [0, 2, 3, 4, 6][i % 5]
        width = 1 + [1, 3, 1, 2, 4][i % 5] * 6
        extra = [
            (bool(rng.integers(2)), _chunk(kinds[rng.integers(len(kinds))], rng.bytes(int(rng.integers(0, 12)))))
            for _ in range(int(rng.integers(1, 4)))
        ]
        if colour_type == 3 and rng.integers(4):  # mostly with the palette it needs, to reach past it
            extra.insert(0, (True, _chunk(b"PLTE", rng.bytes(3 * int(rng.integers(1, 16))))))
        png = (
            b"\x89PNG\r\n\x1a\n"
            + _chunk(b"IHDR", struct.pack(">IIBBBBB", 6, 5, 8, colour_type, 0, 0, 0))
            + b"".join(c for before, c in extra if before)
            + _chunk(b"IDAT", zlib.compress(bytes(width * 5)))
            + b"".join(c for before, c in extra if not before)
            + _chunk(b"IEND", b"")
        )
        try:
            run([base64.b64encode(png).decode()])
            outcomes["decoded"] += 1
        except InputError:
            outcomes["refused"] += 1
    assert min(outcomes.values()) > 20, outcomes  # both outcomes reached: the fuzzing is not trivially one-sided


def test_mutated_images_decode_or_are_refused_never_anything_else() -> None:
    # any exception other than InputError would be a 500: flip, overwrite and cut bytes of PNGs (one and two
    # data chunks, grey and colour) and a JPEG; the two-chunk PNG is what found Pillow's SyntaxError
    data = zlib.compress(bytes(6 * 6))
    split = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", 5, 6, 8, 0, 0, 0, 0))
        + _chunk(b"IDAT", data[:5])
        + _chunk(b"IDAT", data[5:])
        + _chunk(b"IEND", b"")
    )
    seeds = [split] + [
        base64.b64decode(b64(Image.fromarray(ramp(6, 5, c).astype(np.uint8)), fmt))
        for c, fmt in [(None, "PNG"), (3, "PNG"), (None, "JPEG")]
    ]
    rng = np.random.default_rng(0)
    outcomes = {"decoded": 0, "refused": 0}
    for i in range(600):
        raw = bytearray(seeds[i % len(seeds)])
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(8, len(raw)))  # past the signature: else it is merely not an image
            if rng.random() < 0.8:
                raw[at] = int(rng.integers(0, 256))
            else:
                del raw[at:]
                break
        try:
            assert run([base64.b64encode(bytes(raw)).decode()]).shape == (1, 1, 6, 5)
            outcomes["decoded"] += 1
        except InputError:
            outcomes["refused"] += 1
    assert min(outcomes.values()) > 50  # both paths were exercised


def test_a_phone_cameras_jpeg_with_more_pictures_reads_its_first() -> None:
    """A JPEG with a Multi-Picture segment (MPO, as phone cameras write) is a JPEG to every decoder; it was
    refused as 'format MPO'."""
    first, second = Image.fromarray(ramp(6, 5).astype(np.uint8)), Image.new("L", (5, 6), 255)
    mpo = b64(first, "MPO", save_all=True, append_images=[second], quality=100)
    np.testing.assert_allclose(run([mpo])[0, 0], ramp(6, 5), atol=8)


@pytest.mark.parametrize("orientation", [3, 6])  # rotated 180 degrees; 90 (stored on its side)
def test_a_photo_stored_rotated_is_read_upright_as_viewers_show_it(orientation: int) -> None:
    upright = np.zeros((6, 6), np.uint8)
    upright[:3] = 255  # bright top half
    stored = Image.fromarray(upright).transpose(
        Image.Transpose.ROTATE_180 if orientation == 3 else Image.Transpose.ROTATE_90
    )
    exif = Image.Exif()
    exif[0x0112] = orientation  # EXIF Orientation: how to turn the stored pixels for display
    x = run([b64(stored, "JPEG", exif=exif, quality=100)], InputSpec(channels=1, height=6, width=6, mean=[0], std=[1]))
    assert x[0, 0, :3].mean() > 240 and x[0, 0, 3:].mean() < 15


@pytest.mark.parametrize(
    "exif",
    [b"Exif\0\0II*\0", b"MM\0*", b"II+\0\0\0\0\0"],
)
def test_a_png_whose_exif_cannot_be_read_is_taken_as_stored(exif: bytes) -> None:
    """As viewers show it, and as Pillow reads a JPEG's: these raised struct.error (a 500) or SyntaxError
    (refused as no readable image)."""
    img = ramp(6, 5).astype(np.uint8)
    out = run([b64(Image.fromarray(img, "L"), "PNG", exif=exif)])
    assert np.array_equal(out[0, 0], img.astype(np.float32))


def test_a_data_url_scheme_is_case_insensitive() -> None:
    img = ramp(6, 5).astype(np.uint8)
    out = run(["DATA:image/png;base64," + b64(Image.fromarray(img, "L"), "PNG")])
    assert np.array_equal(out[0, 0], img.astype(np.float32))


def _hidden_colours(spec: InputSpec, mode: str, colour: tuple[int, int, int]) -> Image.Image:
    """A picture the model's size: a bright block top left on a half-transparent grey, and a fully
    transparent right side that holds `colour`, which no viewer shows."""
    rgba = np.zeros((spec.height, spec.width, 4), np.uint8)
    rgba[...] = (40, 40, 40, 128)
    rgba[:2, :2] = (200, 200, 200, 255)
    rgba[:, 3:] = (*colour, 0)
    return Image.fromarray(rgba, "RGBA").convert(mode)


@pytest.mark.parametrize("spec", [GRAY, RGB])
@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_pixels_are_composited_onto_black(spec: InputSpec, mode: str) -> None:
    """Two images that look the same, hiding different colours under transparent pixels, are one input (the
    alpha channel was dropped, and the hidden colours decided the answer)."""
    white, red = (b64(_hidden_colours(spec, mode, c), "PNG") for c in [(255, 255, 255), (255, 0, 0)])
    out = run([white, red], spec)
    assert np.array_equal(out[0], out[1])
    assert np.all(out[:, :, :, 3:] == 0)  # transparent: black
    np.testing.assert_allclose(out[0, :, 2:, :2], 20, atol=1)  # grey 40 at half opacity
    assert np.all(out[0, :, :2, :2] == 200)  # opaque: as it is


def test_a_palette_png_with_a_transparent_colour_is_composited_onto_black() -> None:
    palette = Image.fromarray(np.array([[0, 1, 1, 0, 0]] * 6, np.uint8), "P")
    palette.putpalette([250, 250, 250, 90, 90, 90])
    palette.info["transparency"] = 0
    out = run([b64(palette, "PNG")])
    assert np.array_equal(out[0, 0], np.array([[0, 90, 90, 0, 0]] * 6, np.float32))


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP", "EPS"])
def test_other_image_formats_are_refused_by_name(fmt: str) -> None:
    """Named from their first bytes, and never parsed: Pillow's EPS parser read 8 MB of "%%" lines for 8 s
    holding the GIL before the format was refused."""
    with pytest.raises(InputError, match=f"format {fmt} is not supported; send PNG or JPEG"):
        run([b64(Image.new("L", (5, 6)), fmt)])


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height 8-bit grayscale pixels, followed by almost no data."""

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 16)) + _chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused_from_its_header() -> None:
    """A few hundred bytes claiming 10^10 pixels: refused from the header, never decoded."""
    bomb = base64.b64encode(_png_header_only(100_000, 100_000)).decode()
    assert len(bomb) < 200
    with pytest.raises(InputError, match=r"^inputs\[0\]"):
        run([bomb], max_pixels=4096 * 4096)


def test_image_over_max_pixels_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    big = b64(Image.new("L", (3000, 3000)), "PNG")  # 9 M pixels in ~10 kB
    assert len(big) < 100_000
    decoded: list[object] = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self))  # must never be reached
    with pytest.raises(InputError, match=r"^inputs\[0\]: image is 3000x3000 pixels, over the limit of 1000"):
        run([big], max_pixels=1000)
    assert decoded == []


def test_the_pixel_limit_covers_all_of_a_requests_images_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each image fits the limit alone; the third takes the request over it, refused from its header."""
    image = b64(Image.new("L", (20, 20)), "PNG")  # 400 pixels
    assert run([image, image], max_pixels=1000).shape == (2, 1, 6, 5)
    with pytest.raises(InputError, match=r"^inputs\[2\]: .* earlier images over the limit of 1000 pixels per request"):
        run([image, image, image], max_pixels=1000)


def test_wrapped_base64_is_read() -> None:
    """GNU base64 wraps at 76 characters; the line breaks are not part of the data."""
    pixels = ramp(6, 5).astype(np.uint8)
    flat = b64(Image.fromarray(pixels, "L"), "PNG")
    wrapped = "\n".join(flat[i : i + 76] for i in range(0, len(flat), 76)) + "\n"
    assert "\n" in wrapped.strip()
    assert np.array_equal(run([wrapped])[0, 0], pixels)


@pytest.mark.parametrize("spec", [GRAY, RGB], ids=["grey model", "colour model"])
def test_16_bit_png_is_scaled_to_8_bits_not_clipped(spec: InputSpec) -> None:
    pixels = (ramp(spec.height, spec.width) * 3).astype(np.uint8)  # 0..255 in steps of 3, wrapping
    wide = Image.fromarray(pixels.astype(np.uint16) * 257)  # the same image in 16 bits: 0..65535
    assert wide.mode.startswith("I")
    buf = io.BytesIO()
    wide.save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")  # read back as 16-bit
    out = run([base64.b64encode(buf.getvalue()).decode()], spec)
    assert out.shape == (1, spec.channels, spec.height, spec.width)
    for c in range(spec.channels):
        np.testing.assert_allclose(out[0, c], pixels, atol=1e-3)


def test_normaliser_maps_pixels_like_training() -> None:
    scale, shift = normaliser(RGB)
    x = np.broadcast_to(np.array([0.0, 127.5, 255.0], dtype=np.float32).reshape(1, 1, 3, 1), (1, 3, 3, 1))
    got = x * scale + shift
    assert got.dtype == np.float32
    for c in range(3):
        expected = (x[0, c] / 255.0 - RGB.mean[c]) / RGB.std[c]
        np.testing.assert_allclose(got[0, c], expected, atol=1e-6)
