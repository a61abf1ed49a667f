"""The service's own pure-ASGI layers, outermost (cheaper than BaseHTTPMiddleware on the hot path): request
ids and metrics (Observe), the gate that refuses inference before reading a body (Shed), the body limit
(BodyLimit), and the FastAPI subclass that puts them around FastAPI's own (Edge)."""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Coroutine
from types import SimpleNamespace
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.routing import Match, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.lane import error_response
from service.metrics import INFERENCE_ROUTES
from service.state import NOT_READY, State, retry_after

log = logging.getLogger("lcs.service")


# Request ids: a random per-process prefix and a counter, unique across replicas and restarts in practice
# and cheaper than uuid4 (a system call for 16 random bytes, per request)
_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count(1)


class Observe:
    """Pure ASGI middleware: request id, metrics by route and status, and a JSON 500 carrying the request
    id for any unhandled error (cheaper than BaseHTTPMiddleware on the hot path)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # no route takes one: closed before it is accepted, which the server
            # answers 403; counted as a request no route takes (it was answered and counted nowhere)
            t0 = time.monotonic()
            await self.app(scope, receive, send)
            return self._count(scope, 403, t0, answered=403)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = headers(scope).get(b"x-request-id", b"").decode("latin-1")[:64]
        rid = given or f"{_ID_PREFIX}-{next(_ID_COUNTER):x}"
        t0 = time.monotonic()
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["arrived"] = t0  # a request's deadline counts from here: reading and parsing it are part of it
        state["receive"] = receive  # the server's own, for client_left (the batcher drops a job whose client left)
        status = 500
        started = completed = body_read = gone = False
        unsent: Exception | None = None  # what the server's send raised: the connection is gone

        async def receive_watched() -> Message:
            nonlocal body_read, gone
            message = await receive()
            if message["type"] == "http.disconnect":
                gone = True
            elif not message.get("more_body"):
                body_read = True
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, started, completed, gone, unsent
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                gone = gone or (body_read and client_left(receive))
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            try:
                await send(message)
            except Exception as e:
                unsent = e
                raise
            if message["type"] == "http.response.body" and not message.get("more_body"):
                completed = True  # once sent: an answer the server refused is not complete

        try:
            await self.app(scope, receive_watched, send_with_id)
        except Exception:
            if unsent is not None and not _misused(unsent):
                # The connection closed under the answer. uvicorn marks only the newest request on a connection
                # as disconnected, so the answer to one pipelined before it is still written, and uvloop raises
                # on a closed transport: 20 such requests were counted nowhere and logged 40 tracebacks. Its
                # client left; uvicorn logs that the answer is incomplete and closes the connection.
                gone = True
                log.info(
                    "request %s: its answer could not be sent, its client left (%s: %s)",
                    rid,
                    type(unsent).__name__,
                    unsent,
                )
            else:
                log.exception("unhandled error in request %s", rid)
                if started and not completed:
                    self._count(scope, 500, t0, answered=None)
                    raise  # the server drops the connection: a half-sent answer cannot be taken back
                if not started:  # else FastAPI's error middleware answered (internal_error_response), re-raised
                    await internal_error_response(scope)(scope, receive, send_with_id)
        else:
            gone = gone or not started  # the app ended without an answer: its client had left
        # the client left before its answer: 499 (nginx's code for it), whatever the app answered
        self._count(scope, 499 if gone else status, t0, answered=status if started else None)

    @staticmethod
    def _count(scope: Scope, status: int, t0: float, answered: int | None) -> None:
        """The request in the metrics and the controller's statistics, once. `answered`: the app's status."""
        # FastAPI's own pages (/docs, /openapi.json, ...) are plain Starlette routes: matched, with no route
        # object; their paths have no parameters, so each is its own label
        route = scope.get("route")
        endpoint = route.path if route is not None else scope["path"] if "endpoint" in scope else _template(scope)
        st: State | None = getattr(scope["app"].state, "lcs", None)
        if st is not None and endpoint != "/metrics":
            elapsed = time.monotonic() - t0
            st.metrics.request_done(endpoint, status, elapsed)
            if endpoint in INFERENCE_ROUTES:
                st.loop_cost.count()
                if answered == 200:  # its time counts, whether or not the client waited for it
                    st.requests.finished(elapsed)


def headers(scope: Scope) -> dict[bytes, bytes]:
    """The request's headers by name (the last of a repeated one), built once a request: Observe, Shed and
    BodyLimit each read one."""
    state = scope.setdefault("state", {})
    found: dict[bytes, bytes] | None = state.get("lcs_headers")
    if found is None:
        found = state["lcs_headers"] = dict(scope.get("headers") or [])
    return found


def _misused(e: Exception) -> bool:
    """Whether the server refused an answer as malformed (uvicorn's RuntimeErrors: a body longer or shorter than
    its Content-Length, a message out of order), which is a bug here, not a client gone."""
    return isinstance(e, RuntimeError) and str(e).startswith(
        ("Response content", "Expected ASGI message", "Unexpected ASGI message")
    )


def _template(scope: Scope) -> str:
    """The template of the route a request's path names where routing never ran, as for a body refused from its
    Content-Length (413), else "unmatched" (the label of every path no route takes: 404s)."""
    for route in scope["app"].router.routes:
        if route.matches(scope)[0] is not Match.NONE:
            return str(route.path)
    return "unmatched"


def client_left(receive: Receive) -> bool:
    """Whether the client has disconnected, asked without waiting, once its whole body has been received:
    the server's receive() then answers at once only with http.disconnect, and otherwise waits (here it is
    stepped once, and dropped if it would wait). Starlette's Request.is_disconnected asks the same through
    a cancelled anyio scope, at 27 us a call against 1.5 us here: this runs for every request with a body."""
    pending = receive()
    if not isinstance(pending, Coroutine):
        return False
    try:
        pending.send(None)
    except StopIteration as done:
        return bool(done.value.get("type") == "http.disconnect")
    pending.close()
    return False


def internal_error_response(scope: Scope) -> JSONResponse:
    return error_response(
        scope, 500, "the request failed inside the service; report the request_id", kind="internal error"
    )


class Shed:
    """Pure ASGI middleware: refuses inference requests with 429 + Retry-After *before their body is read*
    when the queue is full, or when what is already queued would take longer than the SLO even if this
    request held one image (so it would be refused as predicted late after parsing anyway). Parsing and
    validating a body only to refuse it is what saturates the event loop under overload; this refusal
    costs the HTTP parse alone. `_infer` checks again with the request's own size and deadline."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):  # uvicorn's --root-path prefixes the path; routes match without it
            path = path[len(root) :]
        route = next((template for template, pattern in LANE_MATCHERS if pattern.match(path)), None)
        st: State | None = getattr(scope["app"].state, "lcs", None)
        if route is None or st is None:
            return await self.app(scope, receive, send)
        scope["route"] = SimpleNamespace(path=route)  # so Observe counts it under its endpoint, a 413 included
        length = headers(scope).get(b"content-length", b"")
        limit = st.settings.max_body_bytes  # a chunked body may hold up to it
        size = int(length) if length.isdigit() else limit
        if st.draining:  # SIGTERM came first: read nothing, and the drain waits on no such body (while
            # starting, bodies are read, so that a malformed one hears what is wrong with it). The connection
            # closes after it: a pooled client's keep-alive connection would bring its next requests here
            # too (8 such clients got 15-153 of these 503s in a rollout), where a new one reaches a live pod
            st.metrics.shed.labels("not_ready").inc()
            answer = {"Retry-After": "1"}
            if length.isdigit() and size <= SERVER_BUFFERS:  # else (larger, or chunked: of no stated length)
                answer["Connection"] = "close"  # closing could reset a client still uploading, losing the answer
            await error_response(scope, 503, NOT_READY, answer)(scope, receive, send)
            return
        if size > limit:  # BodyLimit answers 413 next: a 429 would ask for a retry that can never succeed
            return await self.app(scope, receive, send)
        refusal = st.refusal_before_body(size)
        if refusal is None:
            state = scope.setdefault("state", {})
            st.parsing_begins(state, size)
            try:
                return await self.app(scope, receive, send)
            finally:
                st.parsed(state)  # if the route never got as far (a 4xx on the body, say)
        reason, detail = refusal
        st.metrics.shed.labels(reason).inc()
        await error_response(scope, 429, detail, {"Retry-After": retry_after(st.settings)})(scope, receive, send)


# what uvicorn reads of a body before the app asks for it (its flow control's high-water mark): a body this
# small has left the client's socket when the answer is written, so closing the connection resets nothing
SERVER_BUFFERS = 65536

LANE_MATCHERS = [(template, compile_path(template)[0]) for template in INFERENCE_ROUTES]  # as the routes match them


class BodyLimit:
    """Pure ASGI middleware: 413 for bodies over the limit, counted as they stream in."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = headers(scope).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _too_large(scope, receive, send, self.limit)
        seen, tripped, answered = 0, False, False

        async def limited() -> Message:
            nonlocal seen, tripped
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    tripped = True
                    raise _BodyTooLarge
            return message

        async def guarded(message: Message) -> None:
            # FastAPI turns an error while reading the body into its own 400: answer 413 instead
            nonlocal answered
            if not tripped:
                return await send(message)
            if not answered:
                answered = True
                await _too_large(scope, receive, send, self.limit)

        try:
            await self.app(scope, limited, guarded)
        except _BodyTooLarge:
            if not answered:
                answered = True
                await _too_large(scope, receive, send, self.limit)


class _BodyTooLarge(Exception):
    pass


async def _too_large(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    detail = f"request body over {limit} bytes; send fewer or smaller images"
    await error_response(scope, 413, detail)(scope, receive, send)


class Edge(FastAPI):
    """FastAPI with the service's own pure-ASGI layers (`wrap`: the observer, the gate, the body limit and the
    inference lane) outermost, around FastAPI's error, telemetry and body-limit middleware, which the
    inference requests then skip: Lane answers them. Observe answers any error that escapes with a JSON 500."""

    wrap: Callable[[ASGIApp], ASGIApp] = staticmethod(lambda inner: inner)

    def build_middleware_stack(self) -> ASGIApp:
        return self.wrap(super().build_middleware_stack())
