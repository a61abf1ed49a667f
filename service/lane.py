"""The inference routes' way through the HTTP edge, around FastAPI's per-request machinery; the error shape.

The inference routes (POST /predict and the OIP v2 infer paths) are declared as FastAPI routes: their functions hold the
logic and their signatures the OpenAPI schema. Around each call FastAPI adds its router, exception and
dependency layers, a large share of a request's event-loop time on this model (single-image JSON at
saturation, 2 threads, wrk -c64, one-off): 1,072-1,394 requests/s through them; interleaved, 1,629-1,784
with this lane inside FastAPI's middleware and 1,834-1,848 with it and the service's other layers
outside (`middleware.Edge`). `Lane` serves those routes by calling their functions itself and does what
FastAPI would have done around them: the content type, the body read and parsed strictly, validated
against the function's body model, and every error in the service's shape. Every other request goes on
to FastAPI, whose handlers answer with the same functions below.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar, get_type_hints

import numpy as np
import orjson
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from lcs.checkpoint import message
from service.inputs import InputError

M = TypeVar("M", bound=BaseModel)

BINARY_HEADER = "inference-header-content-length"

_REASONS = {
    401: "unauthorized",
    403: "forbidden",
    404: "not found",
    405: "method not allowed",
    408: "request timeout",
    413: "payload too large",
    415: "unsupported media type",
    422: "invalid request",
    429: "overloaded",
    503: "unavailable",
}


class ApiError(Exception):
    """An error answered as JSON {"error": ..., "detail": ...} with a status and optional headers."""

    def __init__(
        self, status: int, detail: str, headers: dict[str, str] | None = None, kind: str | None = None
    ) -> None:
        self.status, self.detail, self.headers, self.kind = status, detail, headers or {}, kind


class FastJSONResponse(JSONResponse):
    """A JSON answer rendered by orjson: a /predict answer in 1 us against json.dumps's 11. orjson writes NaN
    and infinities as null where json.dumps refuses them, so it renders only what holds none (the inference
    routes' answers: `service.app._infer` refuses a model's non-finite output)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(
    scope: Scope, status: int, detail: str, headers: Mapping[str, str] | None = None, kind: str | None = None
) -> JSONResponse:
    """Every error answers in one shape: {"error", "detail", "request_id"}. On the OIP v2 paths `error` holds
    the detail too: the protocol's error body is {"error": message}, and its clients (tritonclient) show that
    field alone, which said only "invalid input"."""
    rid = scope.get("state", {}).get("request_id")
    error = kind or _REASONS.get(status, "error")
    if scope.get("path", "").startswith("/v2/"):
        error = f"{error}: {detail}"
    body = {"error": error, "detail": detail, "request_id": rid}
    return JSONResponse(body, status_code=status, headers=dict(headers) if headers else None)


def problems(errors: Iterable[Mapping[str, Any]]) -> str:
    """A validation failure as one line a client can act on: `where: what` for the first ten problems."""
    return "; ".join(
        _invalid_json(e.get("ctx", {}).get("error", "unreadable"))
        if e["type"] == "json_invalid"
        else f"{'.'.join(str(p) for p in e['loc'])}: {message(e)}"
        for e in list(errors)[:10]
    )


def shown(value: object, limit: int = 40) -> str:
    """A client's value quoted in an error message, as repr, cut to `limit` characters: an answer must not
    echo back a 100 kB string."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return repr(value[: limit - 5]) + "..." if isinstance(value, str) else text[: limit - 3] + "..."


def _invalid_json(why: str) -> str:
    return f"body: invalid JSON ({why})"


SLACK_COMMAS = 1024  # beside the pixels' commas: the other fields', and a `data:` URL's one per image
MAX_KEYS = 256  # in one JSON object: the request bodies' objects have under 10, a v2 `parameters` a few more
BYTES_PER_NUMBER = 16  # at most, per comma, in a body `parse_json` hands to orjson: pixels take 2-6, base64 1,000s
BYTES_PER_QUOTE = 64  # at least, per quote, in such a body: strings and keys are json.loads's (the checks cost 3-10x)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len(pairs) > MAX_KEYS:  # each unknown key became a validation error: 200,000 of them held the loop 1.1 s
        raise ValueError(f"an object of {len(pairs)} keys, over the {MAX_KEYS} allowed")
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()  # in one pass: keys.count(k) per key took 37 s on the event loop for 420 kB
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {shown(dup)}; send each key once")
    return d


_KEY_END = re.compile(rb'"[ \t\n\r]*:')  # a key's closing quote, or an escaped quote inside a string
_DIGITS_ONLY = bytes(0x39 if 0x30 <= c <= 0x39 else 0x20 for c in range(256))  # digits -> "9", the rest -> " "
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
SAFE_DEPTH = 256  # nesting `_fast` takes: bodies nest 6 deep; json.loads refuses from ~950 (the stack), orjson 1025


def _fast(body: bytes) -> Any:
    """`body` as orjson reads it where that is provably what `json.loads` with `_unique_keys` gives, else
    None. orjson parses a single-image body in 7 us against json.loads's 39 (the event loop's largest
    share after uvicorn's, at saturation; with this function's checks, 22 us), but keeps the last of
    duplicate keys, reads integers beyond 64 bits as floats and nests deeper than Python's stack lets
    json.loads. So: every key the text holds (each key ends in a quote then a colon; an escaped quote inside
    a string can match too, which only overcounts) must be one the parse kept, counted through the objects
    it found (it descends only into lists that start with an object: one hidden after a number is missed,
    which only undercounts); no run of 19 digits may occur outside strings; and the text may nest at most
    SAFE_DEPTH deep. Anything orjson refuses (NaN, a BOM, lone surrogates, UTF-16) is left to json.loads,
    which accepts it or words the error as before. orjson goes first: a malformed body fails within bytes
    of the fault, where the scans below would read all of it."""
    try:
        tree = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    keys = 0
    for keys, _ in enumerate(_KEY_END.finditer(body), 1):
        if keys > MAX_KEYS:  # json.loads words the refusal
            return None
    # outside strings, where an escaped quote does not leave it unclear where they end
    outside = None if b'\\"' in body else b" ".join(body.split(b'"')[::2])
    if b"9" * 19 in (body if outside is None else outside).translate(_DIGITS_ONLY) or _deep(body, outside):
        return None
    try:
        kept = _members(tree)
    except RecursionError:  # two frames a level: a caller deep in its own stack (the service's is shallow)
        return None
    return tree if kept == keys else None


def _deep(body: bytes, outside: bytes | None) -> bool:
    """Whether the text may nest SAFE_DEPTH or deeper: it opens that many brackets in all, and (where the
    text outside strings is known) they stack that deep."""
    text = body if outside is None else outside
    if text.count(b"[") + text.count(b"{") < SAFE_DEPTH:
        return False
    if outside is None:
        return True
    brackets = np.frombuffer(outside.translate(None, _NOT_BRACKETS), dtype=np.uint8)
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    return int(np.cumsum(steps).max()) >= SAFE_DEPTH


def _members(node: Any) -> int:
    """Keys in the objects of a parsed tree, except those in lists that do not start with an object."""
    if type(node) is dict:
        return len(node) + sum(_members(v) for v in node.values())
    if type(node) is list and node and type(node[0]) is dict:
        return sum(_members(v) for v in node)
    return 0


def parse_json(body: bytes, commas: int | None = None) -> Any:
    """A JSON body, strictly. Duplicate keys (which parsers resolve differently), nesting deeper than the
    parser's stack, integers over Python's 4300-digit limit and bytes that are not UTF-8 all become a
    JSONDecodeError, answered with a 422 like any malformed JSON. A body mostly of numbers (`commas`, its
    count of commas, where the caller has it) is read by orjson where that gives the same (`_fast`); one
    of strings or keys, base64 images, is not: json.loads reads those as fast, and the checks cost 2.5-10x."""
    numbers = (body.count(b",") if commas is None else commas) * BYTES_PER_NUMBER >= len(body)
    if numbers and body.count(b'"') * BYTES_PER_QUOTE <= len(body):
        tree = _fast(body)
        if tree is not None:
            return tree
    try:
        return json.loads(body, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", "", 0) from None
    except ValueError as e:  # duplicate keys, too many digits, UnicodeDecodeError
        raise json.JSONDecodeError(str(e).split(";")[0][:200], "", 0) from None


def may_hold_booleans(body: bytes) -> bool:
    """Whether the JSON text `body` may hold true or false, the values numpy reads as numbers: it spells one
    of them, or is not in UTF-8 (json.loads also reads UTF-16 and UTF-32, where the bytes spell neither).
    4 us for one image's 3 kB."""
    return json.detect_encoding(body) not in ("utf-8", "utf-8-sig") or b"true" in body or b"false" in body


def validate(model: type[M], raw: bytes, commas: int | None = None) -> M:
    """A JSON body, strictly parsed and validated against `model`; a 422 naming each problem otherwise."""
    if not raw:
        raise ApiError(422, "body: Field required")
    try:
        return model.model_validate(parse_json(raw, commas))
    except json.JSONDecodeError as e:
        raise ApiError(422, _invalid_json(e.msg)) from None
    except ValidationError as e:
        raise ApiError(422, problems({**err, "loc": ("body", *err["loc"])} for err in e.errors())) from None


def require_json(content_type: str, binary: bool = False) -> None:
    """415 unless the body is JSON. A body with no content type is read as JSON, as FastAPI reads one: OIP v2
    clients send none with JSON tensors (tritonclient's every such request was a 415). `binary`: the route
    also takes the v2 binary tensor extension, which a body without its length header is not using."""
    media = content_type.split(";")[0].strip().lower()
    if media in ("application/json", ""):
        return
    if binary and media == "application/octet-stream":
        raise ApiError(
            415,
            f"a binary body needs the {BINARY_HEADER} header (the length of its JSON part, for the binary tensor "
            "extension); or send the tensors as JSON with content type application/json",
        )
    raise ApiError(415, f"content type {shown(content_type)} is not supported; send application/json")


def require_uncompressed(content_encoding: str) -> None:
    """415 for a compressed body (no route inflates one; read as it is, it would be invalid JSON)."""
    encoding = content_encoding.strip().lower() or "identity"
    if encoding != "identity":
        raise ApiError(415, f"content encoding {shown(encoding)} is not supported; send the body uncompressed")


def split_binary(body: bytes, length: str) -> tuple[bytes, memoryview]:
    """The OIP v2 binary tensor extension (KServe, Triton): the body is `Inference-Header-Content-Length`
    bytes of JSON followed by raw tensor bytes. (JSON part, tensor bytes)."""
    # "²".isdigit() is true; over 19 digits no body is that long (and int() refuses 4,300: it was a 500)
    if not (length.isascii() and length.isdigit() and len(length) <= 19) or not 0 < int(length) <= len(body):
        raise ApiError(
            422,
            f"{BINARY_HEADER}: {shown(length, 20)} is not the length of the JSON part of this {len(body)}-byte body",
        )
    return body[: int(length)], memoryview(body)[int(length) :]


class Reads:
    """The request bodies a `Lane` is reading, so that a shutdown can end them at its deadline (`end`): each is
    then answered 503 + Retry-After. Left to the server, a body still arriving at the deadline was cancelled
    a second later with uvicorn's plain-text 500, counted nowhere."""

    def __init__(self) -> None:
        self.open: set[asyncio.Timeout] = set()
        self.cut: set[asyncio.Timeout] = set()  # those `end` ended, until their reader has answered
        self.ended = False

    def begin(self, read: asyncio.Timeout) -> None:
        """`read` (a body read's timeout) is in progress; one begun after `end` is ended at once."""
        self.open.add(read)
        if self.ended:
            self._cut(read)

    def end(self) -> int:
        """End every body read in progress, and any begun from now on; returns how many it ended."""
        self.ended = True
        for read in self.open:
            # one whose own timeout fired in this pass of the loop cannot be moved (RuntimeError, which stopped
            # the drain before it handed over, and the server never shut down): its 408 stands
            if not read.expired():
                self._cut(read)
        return len(self.cut)

    def _cut(self, read: asyncio.Timeout) -> None:
        read.reschedule(asyncio.get_running_loop().time())
        self.cut.add(read)


class Lane:
    """Pure ASGI middleware, the innermost of the service's own layers (all outside FastAPI's). Serves POST
    to `paths` (route path templates) by calling their route functions as `endpoint(body=..., st=...,
    request=..., **path_params)`, where `body` is validated against the function's `body` annotation and
    `st` is `state(scope)`. Routes in `binary` also take the v2 binary tensor extension; its bytes wait in
    the request state under "binary". A body that takes longer than `body_timeout` seconds to arrive gets 408,
    one still arriving when `reads` is ended 503; `check(scope, st)` may refuse a request before its body is
    read."""

    def __init__(
        self,
        app: ASGIApp,
        routes: Sequence[BaseRoute],
        paths: Sequence[str],
        binary: Sequence[str],
        state: Callable[[Scope], Any],
        body_timeout: float,
        check: Callable[[Scope, Any], object] | None = None,
        capacity: Callable[[Any], tuple[int, int]] | None = None,
        reads: Reads | None = None,
    ) -> None:
        # built at the first request, after every route is declared
        self.app, self.binary, self.state, self.body_timeout = app, set(binary), state, body_timeout
        self.capacity = capacity  # st -> (images a request may hold, values per image): a JSON body's bound
        self.check = check  # (scope, st) -> None or ApiError, before the body is read: an unknown model, say
        self.reads = Reads() if reads is None else reads
        self.routes = [
            (r, get_type_hints(r.endpoint)["body"])
            for r in routes
            if isinstance(r, APIRoute) and r.path in paths and "POST" in (r.methods or ())
        ]
        missing = set(paths) - {r.path for r, _ in self.routes}
        if missing:
            raise RuntimeError(f"Lane: no POST route declared for {sorted(missing)}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            for route, model in self.routes:
                match, child = route.matches(scope)
                if match is Match.FULL:
                    scope.update(child)
                    scope["route"] = route  # as Starlette's router sets it: Observe labels metrics by it
                    try:
                        response = await self._serve(route, model, Request(scope, receive))
                    except ClientDisconnect:  # gone before its body arrived: nobody to answer
                        return
                    return await response(scope, receive, send)
        await self.app(scope, receive, send)

    async def _serve(self, route: APIRoute, model: type[BaseModel], request: Request) -> Response:
        scope = request.scope
        try:
            st = self.state(scope)
            if st is not None and self.check is not None:
                self.check(scope, st)
            capacity = None if st is None or self.capacity is None else self.capacity(st)
            body = await self._body(route, model, request, capacity)
            if st is None:
                raise ApiError(503, "the service is starting; retry shortly", {"Retry-After": "1"})
            result = await route.endpoint(body=body, st=st, request=request, **scope["path_params"])
        except ApiError as e:
            return error_response(scope, e.status, e.detail, e.headers, e.kind)
        except InputError as e:
            return error_response(scope, 422, str(e), kind="invalid input")
        return result if isinstance(result, Response) else JSONResponse(result)

    async def _body(
        self, route: APIRoute, model: type[BaseModel], request: Request, capacity: tuple[int, int] | None
    ) -> BaseModel:
        length = request.headers.get(BINARY_HEADER) if route.path in self.binary else None
        require_uncompressed(request.headers.get("content-encoding", ""))
        if length is None:
            require_json(request.headers.get("content-type", ""), binary=route.path in self.binary)
        # A request past the pre-body gate counts as queued until its body is read: bound the wait. Not with
        # asyncio.wait_for: an error raised through its inner task (a client gone mid-body, a chunked body over
        # the limit) made a cycle, error -> traceback -> wait_for's frame -> task -> error, that held the body
        # read so far until a full collection, rare at the threshold `python -m service` sets: 8 MiB kept per
        # abandoned 8 MB upload, 1.1 GiB after 150 of them.
        reads = self.reads
        read: asyncio.Timeout | None = None
        try:
            async with asyncio.timeout(self.body_timeout) as read:
                reads.begin(read)
                try:
                    raw = await request.body()
                finally:
                    reads.open.discard(read)
        except TimeoutError:
            if read in reads.cut:
                raise ApiError(
                    503, "the service shut down before this request's body arrived; retry", {"Retry-After": "1"}
                ) from None
            raise ApiError(
                408, f"the body did not arrive within {self.body_timeout:g} s; send the whole request at once"
            ) from None
        finally:
            reads.cut.discard(read)  # type: ignore[arg-type]
        commas = None
        if length is not None:
            raw, request.scope.setdefault("state", {})["binary"] = split_binary(raw, length)
        elif capacity is not None:
            # A JSON body of more values than the most images a request may hold is refused before it is parsed:
            # json.loads holds the GIL, and 8 MiB of numbers (refused after, as too many images) held the event
            # loop ~300 ms. Commas count them (n values in nested lists take n - 1; base64 has none): ~5 ms for 6.6 MB.
            images, per_image = capacity
            commas = raw.count(b",")
            if commas > images * per_image + SLACK_COMMAS:
                raise ApiError(
                    422, f"body: more values than {images} images of {per_image} values hold; send fewer images"
                )
        return validate(model, raw, commas)
