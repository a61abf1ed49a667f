"""The inference routes' lane: served around FastAPI's per-request machinery, answering as FastAPI would.

Its answers on every success and error path are what test_app and test_hostile check; here: that the lane
is the path those requests take, and its own edges."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.types import Message

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


def test_a_client_gone_while_its_answer_was_computed_counts_as_499(structured: TinyCheckpoint) -> None:
    """Its answer is computed and sent into the void (the server drops it); the count says the client left.
    One that stays is a 200."""
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
            return stays, leaves, count

    stays, leaves, count = asyncio.run(run())
    assert stays[0]["status"] == leaves[0]["status"] == 200  # both computed and answered
    assert count == {"200": 1.0, "499": 1.0}


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
