"""A catalogue of hostile requests: each one gets a clear 4xx (the detail says what to fix), never a 5xx.

Cases tested elsewhere are referenced, not repeated:

| class | inputs (answer) | tested in |
| --- | --- | --- |
| wrong shape | [5, 5] image, an image [3, 12], ragged rows, flat list (422) | test_app, test_inputs |
| pixel range | 256, -0.5 (422) | test_app, test_inputs |
| NaN / Infinity | NaN, Infinity, -Infinity pixels; NaN quality (422) | test_app `test_non_finite_...`, `test_nan_...` |
| bad base64, not an image | "%%% not base64 %%%", text, truncated PNG, GIF (422) | test_app, test_inputs |
| decompression bomb | PNG header claiming 10^10 px; 9 M pixels over max_pixels (422) | test_inputs; here (HTTP) |
| batch size | [] and 5 images over a limit of 4, /predict and v2 (422) | test_app |
| body size | Content-Length over the limit; chunked over the limit (413) | test_app `test_body_over_...` |
| content type | text/plain, form-urlencoded (415); missing (JSON) | test_app `test_predict_needs_json` |
| malformed JSON | unterminated (422) | test_app `test_malformed_json_is_a_422` |
| extra fields | "colour" in /predict (422) | test_app |
| parameters | quality 1.5 / "ultra", deadline_ms 0, top_k 0, min > quality, v2 parameters (422) | test_app |

This module adds: wrong dtypes inside arrays (digit strings, booleans, null, objects, deeper nesting),
numbers too large for a float (1e309, a 400-digit integer, a 5000-digit integer), the same for the v2
tensor, deeply nested JSON (100,000 `[` or `{`), duplicate keys, invalid UTF-8 and other unicode garbage,
bodies that are not objects, more content types, lying and non-numeric Content-Length, decompression
bombs over HTTP, more bad base64, out-of-range and wrongly typed quality / min_quality / deadline_ms /
top_k, extra fields on the admin body, garbage request ids and model names. Each case also checks that the
answer is the service's JSON error (error, detail, request_id) and that the service still serves after.
The last test repeats the framing cases over a real socket against uvicorn (`python -m service`, ~3 s).

The v2 request body accepts unknown fields on purpose (the Open Inference Protocol lets clients add them).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from tests.service.service_support import (
    IMAGE,
    TinyCheckpoint,
    app_state,
    make_settings,
    post_scope,
    real_server,
    serve,
)

NAME = "tiny_structured"
V2 = f"/v2/models/{NAME}/infer"
ZEROS = [[0] * IMAGE for _ in range(IMAGE)]
PIXELS = IMAGE * IMAGE


@pytest.fixture(scope="module")
def client(structured: TinyCheckpoint) -> Iterator[TestClient]:
    with serve(make_settings(structured.path, max_inputs=4, max_image_pixels=1000 * 1000, api_key="k")) as c:
        yield c


def image_with(token: str, n: int = 1) -> str:
    """JSON text of a 12x12 image of zeros whose first n pixels are the raw JSON `token`."""
    cells = [token] * n + ["0"] * (PIXELS - n)
    rows = [",".join(cells[r * IMAGE : (r + 1) * IMAGE]) for r in range(IMAGE)]
    return "[" + ",".join(f"[{row}]" for row in rows) + "]"


def predict_with(image: str, extra: str = "") -> str:
    return '{"inputs": [' + image + "]" + extra + "}"


def v2_with(data: str | None = None, shape: str | None = None, datatype: str = '"UINT8"', extra: str = "") -> str:
    data = data if data is not None else "[" + ",".join(["0"] * PIXELS) + "]"
    shape = shape if shape is not None else f"[1, {PIXELS}]"
    tensor = '{"name": "input", "shape": ' + shape + ', "datatype": ' + datatype + ', "data": ' + data + "}"
    return '{"inputs": [' + tensor + "]" + extra + "}"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 8-bit grayscale pixels, with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def b64_png(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


@dataclass(frozen=True)
class Hostile:
    body: str | bytes
    detail: str  # a fragment of the answer's detail: the message tells the client what is wrong
    status: int = 422
    content_type: str = "application/json"
    path: str = "/predict"


def v2(body: str, detail: str, status: int = 422) -> Hostile:
    return Hostile(body, detail, status, path=V2)


def v2_data(token: str) -> str:
    return v2_with(data="[" + ",".join([token] * PIXELS) + "]")


DEEP = 100_000
CASES: dict[str, Hostile] = {
    # -- wrong dtypes inside pixel arrays (numpy alone would read "7" as 7, true as 1, null as NaN) --
    "digit strings": Hostile(predict_with(image_with('"7"', PIXELS)), "must be JSON numbers (0-255), got strings"),
    "one digit string": Hostile(predict_with(image_with('"7"')), "inputs[0]: pixel values must be JSON numbers"),
    "booleans": Hostile(predict_with(image_with("true", PIXELS)), "got true/false"),
    "one boolean": Hostile(predict_with(image_with("false")), "got true/false"),
    "null pixel": Hostile(predict_with(image_with("null")), "got null"),
    "object pixel": Hostile(predict_with(image_with('{"r": 1}')), "not a rectangular array of numbers"),
    "array pixel": Hostile(predict_with(image_with("[1]")), "not a rectangular array of numbers"),
    "empty image": Hostile('{"inputs": [[]]}', "inputs[0]: shape [0]"),
    "empty rows": Hostile('{"inputs": [[[], []]]}', "inputs[0]: shape [2, 0]"),
    "number as input": Hostile('{"inputs": [7]}', "inputs.0"),
    "object as input": Hostile('{"inputs": [{"image": []}]}', "inputs.0"),
    # -- numbers too large for a float, or for Python's int parser --
    "1e309 pixel": Hostile(predict_with(image_with("1e309")), "NaN, Infinity"),
    "-1e309 pixel": Hostile(predict_with(image_with("-1e309")), "NaN, Infinity"),
    "1e300 pixel (finite, over float32)": Hostile(predict_with(image_with("1e300")), "a number too large to read"),
    "1e38 pixel": Hostile(predict_with(image_with("1e38")), "pixel values must be in 0-255"),
    "400-digit integer pixel": Hostile(predict_with(image_with("9" * 400)), "a number too large to read"),
    "5000-digit integer": Hostile(predict_with(image_with("9" * 5000)), "invalid JSON (Exceeds the limit"),
    # -- deeply nested or malformed JSON: the parser's recursion limit is a 422, not a 500 --
    "100k nested [ unterminated": Hostile("[" * DEEP, "invalid JSON (nested too deeply)"),
    "100k nested [ balanced": Hostile('{"inputs": ' + "[" * DEEP + "]" * DEEP + "}", "nested too deeply"),
    "100k nested {": Hostile('{"a": ' * DEEP + "1" + "}" * DEEP, "nested too deeply"),
    "100k nested [ in v2": v2(v2_with(data="[" * DEEP + "]" * DEEP), "nested too deeply"),
    "50 nested arrays": Hostile('{"inputs": [' + "[" * 50 + "1" + "]" * 50 + "]}", "does not match the model input"),
    "duplicate key": Hostile('{"inputs": [], "inputs": [' + json.dumps(ZEROS) + "]}", "duplicate key 'inputs'"),
    "duplicate nested key": Hostile(
        v2_with(extra=', "parameters": {"quality": 1, "quality": 0}'), "duplicate key 'quality'", path=V2
    ),
    "trailing garbage": Hostile('{"inputs": []} {"inputs": []}', "invalid JSON (Extra data)"),
    "body is an array": Hostile("[1, 2, 3]", "valid dictionary"),
    "body is a string": Hostile('"inputs"', "valid dictionary"),
    "body is null": Hostile("null", "valid dictionary"),
    "empty body": Hostile("", "Field required"),
    "form body as JSON": Hostile("inputs=1&quality=2", "invalid JSON"),
    # -- unicode garbage --
    "invalid UTF-8": Hostile(b'{"inputs": ["\xff\xfe\xfd"]}', "invalid JSON ('utf-8' codec can't decode"),
    "overlong UTF-8": Hostile(b'{"inputs": ["\xc0\xaf"]}', "invalid JSON"),
    "lone surrogate": Hostile('{"inputs": ["\\ud800"]}', "inputs[0]: not valid base64"),
    "raw NUL in string": Hostile('{"inputs": ["\x00"]}', "invalid JSON (Invalid control character"),
    "zero-width key": Hostile(predict_with(json.dumps(ZEROS), ', "qua\u200blity": 1'), "qua\u200blity"),
    "emoji quality": Hostile(predict_with(json.dumps(ZEROS), ', "quality": "\U0001f525"'), "quality"),
    # -- base64 and image bytes --
    "base64 cut short, with a newline": Hostile(
        '{"inputs": ["' + b64_png(4, 4)[:8] + '\\n"]}', "not a readable PNG or JPEG"
    ),
    "base64 with a stray character": Hostile('{"inputs": ["' + b64_png(4, 4)[:8] + '*"]}', "not valid base64"),
    "empty string": Hostile('{"inputs": [""]}', "not a readable PNG or JPEG"),
    "data URL without a comma": Hostile('{"inputs": ["data:image/png;base64"]}', "not a readable PNG or JPEG"),
    "PDF bytes": Hostile(
        '{"inputs": ["' + base64.b64encode(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj").decode() + '"]}',
        "not a readable PNG or JPEG",
    ),
    "bomb: header claims 10^10 pixels": Hostile(
        '{"inputs": ["' + base64.b64encode(png_header_only(100_000, 100_000)).decode() + '"]}', "inputs[0]"
    ),
    "bomb: 9 M zero pixels in a few kB": Hostile(
        '{"inputs": ["' + b64_png(3000, 3000) + '"]}', "image is 3000x3000 pixels, over the limit of 1000000"
    ),
    # -- content types (text/plain, form, and missing, read as JSON: test_app) --
    "multipart": Hostile(b"--x\r\n\r\n{}\r\n--x--", "send application/json", 415, "multipart/form-data; boundary=x"),
    "json-patch": Hostile("{}", "send application/json", status=415, content_type="application/json-patch+json"),
    "xml": Hostile("<inputs/>", "send application/json", status=415, content_type="application/xml"),
    "v2 octet-stream": Hostile(
        b"\x00" * 16, "needs the inference-header-content-length header", 415, "application/octet-stream", V2
    ),
    # -- request parameters: out of range or wrongly typed --
    "quality -0.1": Hostile(predict_with(json.dumps(ZEROS), ', "quality": -0.1'), "quality"),
    "quality 1.0001": Hostile(predict_with(json.dumps(ZEROS), ', "quality": 1.0001'), "quality"),
    "quality 1e309": Hostile(predict_with(json.dumps(ZEROS), ', "quality": 1e309'), "quality"),
    "quality true": Hostile(predict_with(json.dumps(ZEROS), ', "quality": true'), "quality"),
    "quality '0.5'": Hostile(predict_with(json.dumps(ZEROS), ', "quality": "0.5"'), "quality"),
    "quality 'BEST'": Hostile(predict_with(json.dumps(ZEROS), ', "quality": "BEST"'), "quality"),
    "quality [0.5]": Hostile(predict_with(json.dumps(ZEROS), ', "quality": [0.5]'), "quality"),
    "min_quality Infinity": Hostile(predict_with(json.dumps(ZEROS), ', "min_quality": Infinity'), "min_quality"),
    "deadline_ms -1": Hostile(predict_with(json.dumps(ZEROS), ', "deadline_ms": -1'), "deadline_ms"),
    "deadline_ms 1e9": Hostile(predict_with(json.dumps(ZEROS), ', "deadline_ms": 1e9'), "deadline_ms"),
    "deadline_ms 1e309": Hostile(
        predict_with(json.dumps(ZEROS), ', "deadline_ms": 1e309'), "deadline_ms: Input should be a finite number"
    ),
    "deadline_ms NaN": Hostile(
        predict_with(json.dumps(ZEROS), ', "deadline_ms": NaN'), "deadline_ms: Input should be a finite number"
    ),
    "deadline_ms '50'": Hostile(predict_with(json.dumps(ZEROS), ', "deadline_ms": "50"'), "deadline_ms"),
    "deadline_ms true": Hostile(predict_with(json.dumps(ZEROS), ', "deadline_ms": true'), "deadline_ms"),
    "top_k true": Hostile(predict_with(json.dumps(ZEROS), ', "top_k": true'), "top_k"),
    "top_k 2.5": Hostile(predict_with(json.dumps(ZEROS), ', "top_k": 2.5'), "top_k"),
    "top_k 10^30": Hostile(predict_with(json.dumps(ZEROS), ', "top_k": 1' + "0" * 30), "top_k"),
    "extra field on admin pin": Hostile('{"alpha": 0.5, "force": true}', "force", path="/admin/pin"),
    # -- the v2 tensor --
    "v2 booleans": v2(v2_data("true"), "must be JSON numbers (0-255), got true/false"),
    "v2 digit strings": v2(v2_data('"1"'), "got strings"),
    "v2 nested data": v2(v2_data("[1]"), "as its shape [1, 144]; nest it so, or send one flat list"),
    "v2 null data": v2(v2_data("null"), "got null"),
    "v2 400-digit integer": v2(v2_data("9" * 400), "a number too large to read"),
    "v2 1e309": v2(v2_data("1e309"), "contains NaN, Infinity or a number too large"),
    "v2 NaN": v2(v2_data("NaN"), "contains NaN, Infinity or a number too large"),
    "v2 shape of strings": v2(v2_with(shape=f'["1", "{PIXELS}"]'), "shape"),
    "v2 shape of floats": v2(v2_with(shape=f"[1.0, {PIXELS}.0]"), "shape"),
    "v2 negative shape": v2(v2_with(shape=f"[-1, -{PIXELS}]"), "every dimension must be a positive number"),
    "v2 zero batch": v2(v2_with(shape=f"[0, {PIXELS}]", data="[]"), "every dimension must be a positive number"),
    "v2 lower-case datatype": v2(v2_with(datatype='"fp32"'), "datatype 'fp32' is not supported"),
    "v2 parameters not an object": v2(v2_with(extra=', "parameters": [1]'), "parameters"),
    "v2 deadline 1e9": v2(v2_with(extra=', "parameters": {"deadline_ms": 1e9}'), "deadline_ms"),
    "v2 no inputs": v2('{"inputs": []}', "inputs"),
    # -- names --
    "unicode model name": Hostile(v2_with(), "not found", 404, path="/v2/models/%E2%80%AEmodel%00/infer"),
    "dot-dot model name": Hostile(v2_with(), "Not Found", 404, path="/v2/models/..%2F..%2Fetc/infer"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_hostile_request_gets_a_clear_4xx(client: TestClient, case: Hostile) -> None:
    body = case.body.encode() if isinstance(case.body, str) else case.body
    headers = {"content-type": case.content_type, "x-api-key": "k"}
    method = "PUT" if case.path == "/admin/pin" else "POST"
    r = client.request(method, case.path, content=body, headers=headers)
    assert r.status_code == case.status, r.text[:500]
    payload = r.json()
    assert set(payload) == {"error", "detail", "request_id"}, payload
    assert case.detail in payload["detail"], payload["detail"]
    assert payload["request_id"] == r.headers["x-request-id"]
    assert len(r.content) < 4096  # the answer does not echo a hostile body back


def test_still_serving_after_the_catalogue(client: TestClient) -> None:
    assert client.post("/predict", json={"inputs": [ZEROS]}).status_code == 200
    assert client.get("/readyz").status_code == 200


def test_long_request_ids_are_cut_to_64_characters(client: TestClient) -> None:
    r = client.post("/predict", json={"inputs": [ZEROS]}, headers={"x-request-id": "A" * 10_000})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "A" * 64 == r.json()["request_id"]
    # (bytes that are not ASCII: the real-server test below; the in-process client cannot carry them back)


# -- Content-Length that lies, or is not a number: the limit counts the bytes that actually arrive ------


def _raw_asgi(app: Any, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[int, dict[str, Any]]:
    """One POST /predict straight into the ASGI app, the body in `chunks`; (status, JSON answer)."""
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = post_scope("/predict", headers)
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


@pytest.fixture(scope="module")
def small_limit_app(structured: TinyCheckpoint) -> Any:
    """An app with a 2048-byte body limit, without its lifespan: a 413 is answered before any route runs."""
    return create_app(make_settings(structured.path, max_body_bytes=2048))


BIG = json.dumps({"inputs": [ZEROS] * 8}).encode()  # ~2.5 kB, over the 2048-byte limit


@pytest.mark.parametrize(
    ("headers", "chunks"),
    [
        ([(b"content-length", b"10")], [BIG]),  # claims 10 bytes, sends the whole body
        ([(b"content-length", b"10")], [BIG[i : i + 100] for i in range(0, len(BIG), 100)]),
        ([(b"content-length", b"1000000000000")], [b"{}"]),  # claims a terabyte: refused before reading
        ([(b"content-length", b"abc")], [BIG]),  # not a number
        ([(b"content-length", b"-1")], [BIG]),
        ([(b"transfer-encoding", b"chunked")], [BIG[i : i + 512] for i in range(0, len(BIG), 512)]),
    ],
    ids=["small claim", "small claim, streamed", "huge claim", "not a number", "negative", "chunked"],
)
def test_lying_or_missing_content_length_still_gets_413(
    small_limit_app: Any, headers: list[tuple[bytes, bytes]], chunks: list[bytes]
) -> None:
    status, payload = _raw_asgi(small_limit_app, headers, chunks)
    assert status == 413
    assert payload["error"] == "payload too large" and "2048 bytes" in payload["detail"]


# -- the same over a real socket, against uvicorn ---------------------------------------------------


def _exchange(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes on a new connection; everything the server answers until it closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)  # with "connection: close": the server closes once it has answered
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else -1


def test_framing_attacks_on_a_real_server(structured: TinyCheckpoint, tmp_path: Path) -> None:
    with real_server(structured.path, tmp_path, LCS_MAX_BODY_BYTES="200000") as server:
        head = b"POST /predict HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\n"
        big = json.dumps({"inputs": [ZEROS] * 800}).encode()  # ~0.4 MB, over the 200 kB limit
        # claims a terabyte: refused from the header, nothing read
        assert _status(_exchange(server.port, head + b"content-length: 1000000000000\r\n\r\n")) == 413
        # chunked, over the limit
        pieces = [big[i : i + 8192] for i in range(0, len(big), 8192)]
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        answer = _exchange(server.port, head + b"transfer-encoding: chunked\r\n\r\n" + chunked)
        assert _status(answer) == 413, answer[:300]
        # claims 10 bytes and sends 0.4 MB: uvicorn takes 10 bytes as the body and fails to parse the rest as
        # a next request: 400 and the connection closed (the app's 422 for the 10 bytes may come first)
        answer = _exchange(server.port, head + b"content-length: 10\r\n\r\n" + big)
        statuses = [int(line.split(b" ")[1]) for line in answer.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]
        assert statuses and all(s in (400, 422) for s in statuses), answer[:500]
        # 100,000 nested brackets
        deep = b"[" * DEEP
        answer = _exchange(server.port, head + b"content-length: %d\r\n\r\n" % len(deep) + deep)
        assert _status(answer) == 422 and b"nested too deeply" in answer, answer[:300]
        # a request id of bytes that are not ASCII is cut to 64 and echoed byte for byte
        ok = json.dumps({"inputs": [ZEROS]}).encode()
        rid = b"\xe9\xff" * 5000
        answer = _exchange(server.port, head + b"x-request-id: %s\r\ncontent-length: %d\r\n\r\n" % (rid, len(ok)) + ok)
        assert _status(answer) == 200 and b"x-request-id: " + rid[:64] + b"\r\n" in answer, answer[:300]
        # and it still serves
        assert _status(_exchange(server.port, head + b"content-length: %d\r\n\r\n" % len(ok) + ok)) == 200
        assert server.proc.poll() is None
    assert "Traceback" not in server.log.read_text()


def test_a_stalled_upload_gets_408_and_leaves_the_queue(structured: TinyCheckpoint) -> None:
    """A client that sends the headers and part of the body, then nothing: 408 after LCS_BODY_TIMEOUT_SECONDS,
    instead of holding its place in the pre-body gate's count for as long as the connection stays open."""
    with serve(make_settings(structured.path, body_timeout_seconds=0.05)) as c:
        st = app_state(c)
        sent: list[dict[str, Any]] = []
        parts = [{"type": "http.request", "body": b'{"inputs": [', "more_body": True}]

        async def receive() -> dict[str, Any]:
            if parts:
                return parts.pop(0)
            await asyncio.Event().wait()  # the rest never comes
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async def stalled() -> None:
            app = c.app(post_scope("/predict", []), receive, send)  # type: ignore[arg-type]
            await asyncio.wait_for(app, 10)  # without the bound it would wait for ever

        c.portal.call(stalled)  # type: ignore[union-attr]  # on the app's own event loop
        assert next(m["status"] for m in sent if m["type"] == "http.response.start") == 408
        answer = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
        assert answer["error"] == "request timeout" and "within 0.05 s" in answer["detail"]
        assert st.parsing == 0
        assert c.post("/predict", json={"inputs": [ZEROS]}).status_code == 200
