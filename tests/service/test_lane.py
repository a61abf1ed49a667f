"""The inference routes' lane: served around FastAPI's per-request machinery, answering as FastAPI would.

Its answers on every success and error path are what test_app and test_hostile check; here: that the lane
is the path those requests take, and its own edges."""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import logging
import random
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.types import Message

import service.lane
from service.app import create_app
from service.lane import Lane
from tests.service.service_support import IMAGE, TinyCheckpoint, app_state, make_settings, post_scope, serve

ZEROS = [[0] * IMAGE for _ in range(IMAGE)]


@pytest.fixture(scope="module")
def client(structured: TinyCheckpoint) -> Iterator[TestClient]:
    with serve(make_settings(structured.path, api_key="k")) as c:
        yield c


def test_inference_routes_skip_fastapis_dependency_machinery(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("FastAPI resolved dependencies")

    name = client.get("/model").json()["name"]
    monkeypatch.setattr("fastapi.routing.solve_dependencies", broken)
    assert client.post("/predict", json={"inputs": [ZEROS]}).status_code == 200
    v2 = {"inputs": [{"name": "input", "shape": [1, IMAGE, IMAGE], "datatype": "UINT8", "data": [0] * IMAGE * IMAGE}]}
    assert client.post(f"/v2/models/{name}/infer", json=v2).status_code == 200
    # every other route still goes through FastAPI (here, into the broken resolver: a 500)
    assert client.put("/admin/pin", json={"alpha": 1.0}, headers={"x-api-key": "k"}).status_code == 500


def test_a_lane_without_its_route_fails_at_start_up() -> None:
    with pytest.raises(RuntimeError, match="no POST route declared for \\['/predict'\\]"):
        Lane(None, routes=[], paths=("/predict",), binary=(), state=lambda scope: None, body_timeout=1.0)  # type: ignore[arg-type]


def test_the_error_shape_is_the_same_through_the_lane_and_through_fastapi(client: TestClient) -> None:
    lane = client.post("/predict", content=b"{", headers={"content-type": "application/json"})
    fastapi = client.get("/v2/models/nope")
    assert (lane.status_code, fastapi.status_code) == (422, 404)
    assert lane.json().keys() == fastapi.json().keys() == {"error", "detail", "request_id"}
    assert lane.json()["detail"] == "body: invalid JSON (Expecting property name enclosed in double quotes)"
    missing = client.post("/predict", json={"quality": 1})
    assert missing.json()["detail"] == "body.inputs: Field required"


def test_a_client_gone_before_its_body_gets_no_answer_and_counts_as_499(structured: TinyCheckpoint) -> None:
    app = create_app(make_settings(structured.path), warm_up=False)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = post_scope("/predict", [])

    async def run() -> float | None:
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)
            registry = app.state.lcs.metrics.registry
            return registry.get_sample_value("lcs_requests_total", {"endpoint": "/predict", "status": "499"})

    assert asyncio.run(run()) == 1.0
    assert sent == []


def test_a_client_gone_while_queued_is_not_computed_and_counts_as_499(structured: TinyCheckpoint) -> None:
    """The batcher asks the server whether the client is still there when its batch forms: one that left is
    dropped, its 499 sent into the void (the server drops it). One that stays is computed, a 200."""
    app = create_app(make_settings(structured.path))
    body = json.dumps({"inputs": [ZEROS]}).encode()

    async def call(leaves: bool) -> list[Message]:
        sent: list[Message] = []
        received = 0
        never = asyncio.Event()

        async def receive() -> Message:
            nonlocal received
            received += 1
            if received == 1:
                return {"type": "http.request", "body": body, "more_body": False}
            if not leaves:
                await never.wait()  # as a server does until the client goes
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)

        scope = post_scope("/predict", [(b"content-length", str(len(body)).encode())])
        await app(scope, receive, send)
        return sent

    async def run() -> tuple[list[Message], list[Message], dict[str, float | None]]:
        async with app.router.lifespan_context(app):
            while not app.state.lcs.runtime.ready:
                await asyncio.sleep(0.005)
            stays, leaves = await call(leaves=False), await call(leaves=True)
            registry = app.state.lcs.metrics.registry
            count = {
                s: registry.get_sample_value("lcs_requests_total", {"endpoint": "/predict", "status": s})
                for s in ("200", "499")
            }
            count["batches"] = registry.get_sample_value("lcs_batch_compute_seconds_count")
            return stays, leaves, count

    stays, leaves, count = asyncio.run(run())
    assert (stays[0]["status"], leaves[0]["status"]) == (200, 499)
    assert json.loads(leaves[1]["body"])["detail"] == "the client left before its batch ran"
    assert count == {"200": 1.0, "499": 1.0, "batches": 1.0}  # only the one that stayed was computed


def test_an_answer_the_server_cannot_send_counts_once_as_499(
    structured: TinyCheckpoint, caplog: pytest.LogCaptureFixture
) -> None:
    """A request pipelined before another on a connection that closes: uvicorn marks only the newest one
    disconnected and writes this one's answer to the closed transport, which uvloop refuses with a
    RuntimeError. Such requests were counted nowhere, and each logged two tracebacks."""
    app = create_app(make_settings(structured.path))
    body = json.dumps({"inputs": [ZEROS]}).encode()
    read = asyncio.Event()

    async def receive() -> Message:
        if not read.is_set():
            read.set()
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect is ever reported to this request
        raise AssertionError

    async def send(message: Message) -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")

    async def run() -> tuple[float | None, float | None]:
        async with app.router.lifespan_context(app):
            while not app.state.lcs.runtime.ready:
                await asyncio.sleep(0.005)
            scope = post_scope("/predict", [(b"content-length", str(len(body)).encode())])
            await app(scope, receive, send)  # returns: the server closes the connection
            registry = app.state.lcs.metrics.registry
            labels = {"endpoint": "/predict", "status": "499"}
            return (
                registry.get_sample_value("lcs_requests_total", labels),
                registry.get_sample_value("lcs_request_duration_seconds_count", labels),
            )

    with caplog.at_level(logging.INFO, logger="lcs.service"):
        assert asyncio.run(run()) == (1.0, 1.0)
    said = [r for r in caplog.records if r.name == "lcs.service" and r.levelno >= logging.WARNING]
    assert said == [], [r.getMessage() for r in said]
    assert any("its answer could not be sent, its client left" in r.getMessage() for r in caplog.records)


def test_an_answer_the_server_refuses_as_malformed_is_an_error_not_a_client_gone(
    structured: TinyCheckpoint, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn raises on an answer shorter or longer than its Content-Length. Read as a client gone (info, 499),
    and with uvicorn's own error for it dropped from the log, such a bug would leave no error anywhere."""
    app = create_app(make_settings(structured.path))

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            raise RuntimeError("Response content shorter than Content-Length")

    async def run() -> float | None:
        async with app.router.lifespan_context(app):
            with pytest.raises(RuntimeError, match="shorter than Content-Length"):  # the server drops the connection
                await app({**post_scope("/healthz", []), "method": "GET"}, receive, send)
            labels = {"endpoint": "/healthz", "status": "500"}
            return app.state.lcs.metrics.registry.get_sample_value("lcs_requests_total", labels)

    with caplog.at_level(logging.INFO, logger="lcs.service"):
        assert asyncio.run(run()) == 1.0
    assert any(r.levelno == logging.ERROR and "unhandled error in request" in r.getMessage() for r in caplog.records)
    assert not any("its client left" in r.getMessage() for r in caplog.records)


def test_a_body_read_that_fails_leaves_nothing_for_the_collector(structured: TinyCheckpoint) -> None:
    """Read through asyncio.wait_for, a client gone mid-body or a chunked body over the limit left a cycle
    (error, traceback, wait_for's frame, its task) holding the body read so far until a full collection,
    which `python -m service`'s threshold makes rare: 8 MiB kept per abandoned 8 MB upload."""
    from starlette.requests import ClientDisconnect

    from service.middleware import _BodyTooLarge

    app = create_app(make_settings(structured.path, max_body_bytes=4096), warm_up=False)
    statuses: list[int] = []

    async def call(last: Message) -> None:
        chunks = [{"type": "http.request", "body": b'{"inputs": [' + b"0," * 1000, "more_body": True}, last]

        async def receive() -> Message:
            return chunks.pop(0) if chunks else {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(post_scope("/predict", []), receive, send)  # chunked: no content-length

    async def run() -> int:
        async with app.router.lifespan_context(app):
            gc.collect()
            gc.disable()
            try:
                for _ in range(3):
                    await call({"type": "http.disconnect"})  # the client left mid-body
                    await call({"type": "http.request", "body": b"0," * 2000, "more_body": True})  # over 4096
                return sum(type(o) in (ClientDisconnect, _BodyTooLarge) for o in gc.get_objects())
            finally:
                gc.enable()

    assert asyncio.run(run()) == 0
    assert statuses == [413] * 3  # the client gone mid-body gets no answer


def test_an_error_in_a_route_fastapi_serves_is_a_json_500_with_the_request_id(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # FastAPI's error middleware answers it (inside Observe), then re-raises; Observe logs it and stops there
    def broken() -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(app_state(client).runtime, "describe", broken)
    r = client.get("/model", headers={"x-request-id": "fastapi-500"})
    assert r.status_code == 500
    assert r.json() == {
        "error": "internal error",
        "detail": "the request failed inside the service; report the request_id",
        "request_id": "fastapi-500",
    }
    assert r.headers["x-request-id"] == "fastapi-500"
    registry = app_state(client).metrics.registry
    assert registry.get_sample_value("lcs_requests_total", {"endpoint": "/model", "status": "500"}) == 1.0
    assert client.get("/healthz").status_code == 200


def _strict(body: bytes) -> Any:
    """What parse_json answered before its orjson path: json.loads with the duplicate-key hook."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(service.lane, "_fast", lambda body: None)
        return service.lane.parse_json(body)


def _outcome(parse: Any, body: bytes) -> tuple[str, str]:
    """A parse's result, written so that 1 and 1.0 differ, or its error."""
    try:
        return "ok", json.dumps(parse(body))
    except json.JSONDecodeError as e:
        return "error", e.msg


SINGLE = json.dumps({"inputs": [ZEROS], "quality": "balanced"}).encode()
V2_INPUT = {"name": "input", "shape": [1, 28, 28], "datatype": "UINT8", "data": [0] * 784}
V2_BODY = json.dumps({"inputs": [V2_INPUT], "parameters": {"a": 1}}).encode()


def test_the_usual_bodies_take_the_fast_parse_and_base64_images_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the ~30 us a request it saves goes missing, nothing else would show it. Base64 strings orjson
    reads no faster than json.loads, and the checks around it cost 2.5x for 64 of them."""
    taken = []
    fast = service.lane._fast
    monkeypatch.setattr(service.lane, "_fast", lambda body: taken.append(body) or fast(body))
    for body in (SINGLE, V2_BODY):
        assert service.lane.parse_json(body) == json.loads(body) and taken[-1] is body
        assert fast(body) is not None
    png = "iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAAAF0lEQVR4nGNgGAWjYBSMglEwCkbBKAEAAP//"
    images = json.dumps({"inputs": [png] * 64})
    assert service.lane.parse_json(images.encode()) == json.loads(images) and len(taken) == 2
    letters = json.dumps(["a"] * 1000)  # a comma every 5 bytes, but strings: the checks cost 10x json.loads
    assert service.lane.parse_json(letters.encode()) == json.loads(letters) and len(taken) == 2


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": 1, "a" : 2}',  # a space before the duplicate's colon
        b'{"a": 1,\n"a"\t:2}',
        b'[1, {"a": 1, "a": 2}]',  # an object after a number, where the count does not look
        b'[[{"b": 1, "b": 2}]]',  # an object in a list of lists
        b'{"x": [0, 1, {"q": 1, "q": 2}]}',
        b'{"a": "x\\":", "a": 1}',  # an escaped quote and a colon inside a string
        b'{"a\\\\": 1, "a\\\\": 2}',  # a key ending in an escaped backslash
        b'{"inputs": [], "parameters": {"quality": 1, "quality": 0}}',
    ],
)
def test_duplicate_keys_are_refused_however_they_are_written(body: bytes) -> None:
    assert service.lane._fast(body) is None
    assert _outcome(service.lane.parse_json, body)[0] == "error"
    assert "duplicate key" in _outcome(service.lane.parse_json, body)[1]


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": 18446744073709551616}',  # orjson reads 2**64 and over as a float
        b"[-9223372036854775809, 0, 0]",  # and below -2**63 (found by the review of the first version)
        b"[-9999999999999999999, 0, 0]",
        b"[" * 995 + b"0" + b",0" * 143 + b"]" * 995,  # lists nested deeper than json.loads goes, within orjson's 1024
        b"[" * 1024 + b"0" + b",0" * 150 + b"]" * 1024,
        b"[" * 300 + b"0" + b",0" * 150 + b"]" * 300,
        b"[123456789012345678901234567890, -99999999999999999999]",
        b"[0.30000000000000004441, 1e400, -1e400]",
        b"[NaN, Infinity]",
        b'\xef\xbb\xbf{"a": 1}',  # a BOM
        b'["\\ud800"]',  # a lone surrogate
        '{"a": 1}'.encode("utf-16"),
        b'{"a": ' * 990 + b"1" + b"}" * 990,  # deeper than Python's stack, within orjson's 1024
        b"[" * 1100 + b"]" * 1100,
        b'{"k": 1, ' + b", ".join(b'"k%d": 1' % i for i in range(300)) + b"}",  # over MAX_KEYS
        b"null",
        b"",
        b"[1, 2",
        b'{"a": 1}{"b": 2}',
    ],
)
def test_what_orjson_reads_otherwise_is_answered_as_before(body: bytes) -> None:
    assert _outcome(service.lane._fast, body) in {("ok", "null"), _outcome(_strict, body)}  # None: not taken
    assert _outcome(service.lane.parse_json, body) == _outcome(_strict, body)


def test_a_caller_deep_in_its_stack_gets_json_loads_answer_not_a_recursion_error() -> None:
    """Counting the kept keys takes two frames a level, json.loads one: with 255 levels and a low limit (or a
    deep caller) the count overflowed (found by the review of febbe3e)."""
    body = (b'{"a":' + b" " * 130) * 255 + b"1" + b"}" * 255  # quotes sparse enough for the orjson path
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack()) + 500)
    try:
        assert _outcome(lambda b: service.lane.parse_json(b, 10**9), body) == _outcome(_strict, body)
    finally:
        sys.setrecursionlimit(limit)


def test_any_json_value_parses_as_json_loads_reads_it() -> None:
    """Random documents, written with random spacing, duplicate keys in some: the same value or the same error."""
    rng = random.Random(0)

    def value(depth: int) -> Any:
        kind = rng.randrange(8 if depth < 4 else 5)
        if kind == 0:
            return rng.randint(-(2**70), 2**70) if rng.random() < 0.2 else rng.randint(-300, 300)
        if kind == 1:
            return rng.choice([rng.uniform(-1e6, 1e6), rng.random() * 10.0 ** rng.randint(-320, 308), -0.0, 5e-324])
        if kind == 2:
            return "".join(rng.choice('ab:"\\ é\u2028{}[],') for _ in range(rng.randrange(6)))
        if kind == 3:
            return rng.choice([True, False, None])
        if kind == 4:
            return rng.random() < 0.5
        if kind == 5:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {rng.choice(["a", "b", 'c"', "d\\", "e:"]) + str(rng.randrange(3)): value(depth + 1) for _ in range(3)}

    def written(v: Any) -> str:
        space = rng.choice(["", " ", "\n", "\t "])
        if isinstance(v, dict):
            items = [(k, written(x)) for k, x in v.items()]
            if items and rng.random() < 0.3:
                items.append((items[0][0], written(None)))  # a duplicate key
            return "{" + ",".join(f"{json.dumps(k)}{space}:{space}{x}" for k, x in items) + "}"
        if isinstance(v, list):
            return "[" + f",{space}".join(written(x) for x in v) + "]"
        return json.dumps(v)

    fast = 0
    for _ in range(3000):
        body = written(value(0)).encode(rng.choice(["utf-8", "utf-8", "utf-8", "utf-16"]))
        assert _outcome(service.lane.parse_json, body) == _outcome(_strict, body), body
        taken = service.lane._fast(body)
        if taken is not None:  # what parse_json gives a body of enough commas
            assert ("ok", json.dumps(taken)) == _outcome(_strict, body), body
            fast += 1
    assert fast > 1000  # the fast path answered most of them, so the comparison is of it
