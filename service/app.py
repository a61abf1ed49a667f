"""The HTTP edge: routes parse, call the core (runtime, batcher, controller) and shape the answer."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import hmac
import importlib.metadata
import itertools
import logging
import math
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lcs.checkpoint import CheckpointError
from service import docs
from service.batcher import Batcher, Draining, Job, QueueFull, Result
from service.controller import Signals
from service.fleet import PrometheusFleet
from service.inputs import InputError, check_count, check_range, decode, has_images, nested_numbers, numbers
from service.lane import BINARY_HEADER, ApiError, Lane, error_response, problems, require_json, validate
from service.metrics import INFERENCE_ROUTES, Metrics
from service.runtime import LEVEL_NAMES, Runtime, inference_executor, softmax
from service.schemas import (
    PRESETS,
    ErrorResponse,
    Hint,
    PinRequest,
    PredictRequest,
    PredictResponse,
    V2InferRequest,
    V2Parameters,
    V2Tensor,
)
from service.settings import Settings
from service.signals import LoopCost, MachineProbe, RequestStats

log = logging.getLogger("lcs.service")
try:
    VERSION = importlib.metadata.version("lcs-serve")  # pyproject.toml's, as installed
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "unknown"


class State:
    """Everything the routes need, created in lifespan (nothing at import time)."""

    def __init__(self, settings: Settings, runtime: Runtime, executor: ThreadPoolExecutor) -> None:
        self.settings = settings
        self.runtime = runtime
        self.metrics = Metrics(settings.slo_p99_seconds, runtime.grid.alphas, lambda: runtime.cache)
        self.metrics.ceiling.set(runtime.controller.ceiling)
        self.executor = executor  # the inference thread: all torch work runs on it
        self.batcher = Batcher(
            runtime.logits,
            runtime.controller.batch_alpha,
            self.executor,
            max_batch=settings.max_batch,
            max_wait=settings.max_wait_ms / 1000.0,
            queue_max=settings.queue_max,
            on_batch=self._on_batch,
            behind=runtime.controller.predicted_wait,
            reserve=settings.slack_reserve,
            pending=lambda: self.parsing,
        )
        self.requests = RequestStats()
        self.loop_cost = LoopCost()
        self.probe = MachineProbe()
        self.inflight = 0
        # read when scraped, not set per request
        self.metrics.inflight.set_function(lambda: self.inflight)
        self.metrics.queue_depth.set_function(lambda: self.batcher.depth)
        self.metrics.ready.set_function(lambda: 1 if self.ready else 0)  # what /readyz answers, probed or not
        self.parsing = 0  # inference requests past Shed whose body is not yet decoded
        self._computed = 0.0  # model seconds since the last control step
        self._computed_since = time.monotonic()
        # SIGTERM (or shutdown) time: requests received before it are still served, later ones get 503
        self.draining_since: float | None = None
        self.failure: str | None = None  # why the warm-up failed: the service never becomes ready
        self.drain_deadline: float | None = None  # set by SIGTERM: monotonic time by which to be done
        self.battery_override: tuple[float | None, bool] | None = None  # tests and demos simulate a battery
        # fleet figures from Prometheus, refreshed in the background each control interval; a value
        # serves the step after the refresh that read it and no later one (max_age 1.5 intervals)
        self.fleet = (
            PrometheusFleet(
                settings.prometheus_url,
                timeout=settings.prometheus_timeout_seconds,
                max_age=1.5 * settings.control_interval_seconds,
                selector=settings.prometheus_selector,
                window_seconds=settings.prometheus_window_seconds,
            )
            if settings.prometheus_url
            else None
        )

    @property
    def draining(self) -> bool:
        return self.draining_since is not None

    @property
    def ready(self) -> bool:
        """What every readiness endpoint answers: models built and profiled, and not draining."""
        return self.runtime.ready and not self.draining

    def start_draining(self) -> None:
        if self.draining_since is None:
            self.draining_since = time.monotonic()

    def refusal_before_body(self) -> tuple[str, str] | None:
        """(reason, message) if an inference request must be refused before its body is read: the queue
        is full, or what is queued would already take longer than the SLO (the deadline of a request
        that names none) with this request at its smallest, one image. Requests already past this gate
        and still being read count as queued, with the mean images per request: under overload hundreds
        arrive while the queue is momentarily empty, and each would be parsed only to be refused.
        None: read the body."""
        depth = self.batcher.depth + self.parsing
        if depth >= self.settings.queue_max:
            return "queue_full", _queue_full(self.settings.queue_max)
        if depth > 0:
            slo = self.settings.slo_p99_seconds
            images = self.batcher.queued_images + self.parsing * self.requests.images_per_request + 1
            wait = self.runtime.controller.predicted_wait(math.ceil(images), depth + 1)
            if wait is not None and wait > slo:
                return "predicted_late", _late(wait, slo)
        return None

    def parsed(self, scope_state: dict[str, Any]) -> None:
        """The request's body is read and decoded: it leaves the gate's count (once)."""
        if scope_state.pop("lcs_parsing", False):
            self.parsing -= 1

    def _on_batch(self, alpha: float, images: int, seconds: float, handoff: float, jobs: list[Job]) -> None:
        self._computed += seconds
        self.metrics.batch_size.observe(images)
        self.metrics.compute.observe(seconds)
        self.runtime.controller.observe_batch(alpha, images, seconds, handoff)

    def signals(self, now: float) -> Signals:
        rate, per_request, p99 = self.requests.tick(now)
        battery, on_battery = self.battery_override or self.probe.battery()
        fleet = self.fleet.current(now) if self.fleet is not None else None
        return Signals(
            now=now,
            queue_depth=self.batcher.depth,
            inflight=self.inflight,
            arrival_rate=rate,
            images_per_request=per_request,
            p99=p99,
            cpu_other=self.probe.cpu_other(),
            memory_available=self.probe.memory_available(),
            battery_percent=battery,
            on_battery=on_battery,
            fleet_rate=fleet.rate if fleet is not None else None,
            fleet_p99=fleet.p99 if fleet is not None else None,
            request_cost=self.loop_cost.tick(),
            offered_rate=self.loop_cost.rate,
            loop_busy=self.loop_cost.busy,
            model_busy=self._model_busy(now),
        )

    def pin(self, alpha: float | None) -> None:
        """An operator's pin (None: release it), exported as a control step's move is."""
        before = self.runtime.controller.ceiling
        self.runtime.controller.pin(alpha, time.monotonic())
        self._export_ceiling(before)

    def _export_ceiling(self, before: float) -> None:
        """lcs_alpha_ceiling, and a move from `before` counted under the reason of the decision that made it
        (every move is one: the controller records a decision whenever its ceiling changes)."""
        c = self.runtime.controller
        if c.ceiling != before:
            self.metrics.ceiling_changes.labels(c.decisions[-1].reason).inc()
        self.metrics.ceiling.set(c.ceiling)

    def _model_busy(self, now: float) -> float:
        busy = min(1.0, self._computed / max(1e-6, now - self._computed_since))
        self._computed, self._computed_since = 0.0, now
        return busy

    def control_step(self, now: float) -> None:
        c = self.runtime.controller
        before = c.ceiling
        s = self.signals(now)
        c.update(s)
        self._export_ceiling(before)
        for name in _SIGNAL_NAMES:  # every signal, from the one definition of what they are
            v = getattr(s, name)
            if v is not None:
                self.metrics.signal.labels(name).set(float(v))
            else:  # unknown now (p99 of a quiet window, fleet figures without Prometheus): no stale value
                self.metrics.signal.remove(name)


# async: FastAPI runs a plain `def` dependency in its thread pool, a thread hop on every request
async def get_state(request: Request) -> State:
    return request.app.state.lcs  # type: ignore[no-any-return]


StateDep = Annotated[State, Depends(get_state)]


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
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")[:64]
        rid = given or f"{_ID_PREFIX}-{next(_ID_COUNTER):x}"
        t0 = time.monotonic()
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["arrived"] = t0  # a request's deadline counts from here: reading and parsing it are part of it
        status = 500
        started = completed = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started, completed
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            elif not message.get("more_body"):
                completed = True
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in request %s", rid)
            if started and not completed:
                raise  # the server drops the connection: a half-sent answer cannot be taken back
            if not started:  # else FastAPI's error middleware answered (with _internal_error) and re-raised
                await _internal_error(scope)(scope, receive, send_with_id)
        else:
            if not started:
                status = 499  # the client left before its answer (nginx's code for it)
        # FastAPI's own pages (/docs, /openapi.json, ...) are plain Starlette routes: matched, with no route
        # object; their paths have no parameters, so each is its own label
        route = scope.get("route")
        endpoint = route.path if route is not None else scope["path"] if "endpoint" in scope else "unmatched"
        st: State | None = getattr(scope["app"].state, "lcs", None)
        if st is not None and endpoint != "/metrics":
            elapsed = time.monotonic() - t0
            st.metrics.request_done(endpoint, status, elapsed)
            if endpoint in INFERENCE_ROUTES:
                st.loop_cost.count()
                if status == 200:
                    st.requests.finished(elapsed)


def _internal_error(scope: Scope) -> JSONResponse:
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
        route = next((template for template, pattern in _LANE_MATCHERS if pattern.match(path)), None)
        st: State | None = getattr(scope["app"].state, "lcs", None)
        if route is None or st is None:
            return await self.app(scope, receive, send)
        scope["route"] = SimpleNamespace(path=route)  # so Observe counts it under its endpoint, a 413 included
        if st.draining:  # SIGTERM came first: read nothing, and the drain waits on no such body (while
            # starting, bodies are read, so that a malformed one hears what is wrong with it)
            st.metrics.shed.labels("not_ready").inc()
            await error_response(scope, 503, _NOT_READY, {"Retry-After": "1"})(scope, receive, send)
            return
        refusal = st.refusal_before_body()
        if refusal is None:
            st.parsing += 1
            state = scope.setdefault("state", {})
            state["lcs_parsing"] = True
            try:
                return await self.app(scope, receive, send)
            finally:
                st.parsed(state)  # if the route never got as far (a 4xx on the body, say)
        reason, detail = refusal
        st.metrics.shed.labels(reason).inc()
        await error_response(scope, 429, detail, {"Retry-After": _retry_after(st.settings)})(scope, receive, send)


_SIGNAL_NAMES = [f.name for f in dataclasses.fields(Signals) if f.name != "now"]  # lcs_signal{signal}
_LANE_PATHS = INFERENCE_ROUTES
_V2_INFER = tuple(r for r in INFERENCE_ROUTES if r.startswith("/v2/"))  # the binary tensor extension: OIP only
_LANE_MATCHERS = [(template, compile_path(template)[0]) for template in _LANE_PATHS]  # as the routes match them


def _late(wait: float, budget: float) -> str:
    return (
        f"the queue would take about {wait * 1000:.0f} ms, over this request's {budget * 1000:.0f} ms budget; "
        "retry after a moment"
    )


_NOT_READY = "the service is starting or shutting down; retry shortly"


def _queue_full(queue_max: int) -> str:
    return f"the queue is full ({queue_max} request{'s' if queue_max != 1 else ''}); retry after a moment"


def _retry_after(settings: Settings) -> str:
    return str(max(1, round(settings.control_interval_seconds * 2)))


class BodyLimit:
    """Pure ASGI middleware: 413 for bodies over the limit, counted as they stream in."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
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


class _Edge(FastAPI):
    """FastAPI with the service's own pure-ASGI layers (`wrap`: the observer, the gate, the body limit and the
    inference lane) outermost, around FastAPI's error, telemetry and body-limit middleware, which the
    inference requests then skip: Lane answers them. Observe answers any error that escapes with a JSON 500."""

    wrap: Callable[[ASGIApp], ASGIApp] = staticmethod(lambda inner: inner)

    def build_middleware_stack(self) -> ASGIApp:
        return self.wrap(super().build_middleware_stack())


def _errors(*codes: int, retry_after: tuple[int, ...] = ()) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error statuses a route can answer, all with the ErrorResponse body."""
    text = {
        401: "No API key",
        403: "Wrong API key",
        404: "Not found (or admin endpoints off)",
        408: "The body did not arrive within LCS_BODY_TIMEOUT_SECONDS",
        413: "Body too large",
        415: "Not JSON",
        422: "Invalid request or input",
        429: "Overloaded or min_quality unavailable; see Retry-After",
        503: "Starting or shutting down; see Retry-After",
    }
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        out[code] = {"model": ErrorResponse, "description": text[code]}
        if code in retry_after:
            out[code]["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before retrying",
                    "required": True,
                    "schema": {"type": "string", "pattern": "^[0-9]+$"},
                }
            }
    return out


def _alpha(value: float | str | None, default: float) -> float:
    """A validated `quality` or `min_quality` (schemas.Quality) as an alpha."""
    if value is None:
        return default
    return PRESETS[value] if isinstance(value, str) else float(value)


async def _infer(
    st: State, state: dict[str, Any], x_raw: np.ndarray, hint: Hint
) -> tuple[np.ndarray, Result, float | None]:
    """Admission, queueing and inference shared by /predict and the v2 infer path, once the body is decoded.
    `state`: the request's scope state (its arrival time, from which its deadline counts; its place in the
    pre-body gate's count, which it leaves here)."""
    st.parsed(state)
    arrived: float = state.get("arrived", time.monotonic())
    rt = st.runtime
    if not rt.ready:  # starting (after SIGTERM, Shed refuses at arrival: what gets here came before it)
        st.metrics.shed.labels("not_ready").inc()
        raise ApiError(503, _NOT_READY, {"Retry-After": "1"})
    want = _alpha(hint.quality, 1.0)
    floor_req = _alpha(hint.min_quality, 0.0)
    if floor_req > want:
        raise ApiError(422, f"min_quality ({floor_req:g}) is above quality ({want:g}); lower min_quality")
    target = rt.grid.down(want)
    floor = rt.grid.up(floor_req)
    if floor is None or floor > target:
        raise ApiError(
            422,
            f"no served alpha lies between min_quality {floor_req:g} and quality {want:g}; "
            f"served alphas: {rt.grid.alphas}",
        )
    ceiling = rt.controller.ceiling
    retry = _retry_after(st.settings)
    if floor > ceiling:
        st.metrics.shed.labels("min_quality").inc()
        cap = {"pinned": "an operator has pinned alpha at", "battery": "on low battery the service serves alpha"}
        why = cap.get(rt.controller.mode, "under current load the service serves alpha")
        raise ApiError(
            429,
            f"{why} <= {ceiling:g}, below min_quality {floor_req:g}; retry later or lower min_quality",
            {"Retry-After": retry},
            kind="min_quality unavailable",
        )
    now = time.monotonic()
    # every request has a deadline: its own, or the SLO; the batcher's slack rule works from it
    budget = hint.deadline_ms / 1000.0 if hint.deadline_ms is not None else st.settings.slo_p99_seconds
    deadline = arrived + budget
    images = int(x_raw.shape[0])
    need = rt.controller.least_seconds(images, floor) if hint.deadline_ms is not None else None
    if need is not None and need > budget:  # even an idle machine could not: waiting would not help, so not a 429
        cheapest = rt.controller.least_seconds(images, 0.0)
        lower = f", or lower min_quality ({floor_req:g})" if cheapest is not None and cheapest <= budget else ""
        raise ApiError(
            422,
            f"these {images} image(s) take about {need * 1000:.3g} ms to compute at the cheapest alpha this "
            f"request allows, on an idle machine: over its deadline_ms ({hint.deadline_ms:g}); raise "
            f"deadline_ms{lower}, or send fewer images",
        )
    queued, depth = st.batcher.queued_images + images, st.batcher.depth + 1
    wait = rt.controller.predicted_wait(queued, depth, own=images, floor=floor)
    if st.batcher.depth > 0 and wait is not None and wait > deadline - now:
        # it would be answered late even at the cheapest alpha it allows: refuse now rather than serve late
        st.metrics.shed.labels("predicted_late").inc()
        detail = _late(wait, budget)
        if (cheapest := rt.controller.predicted_wait(queued, depth)) is not None and cheapest <= deadline - now:
            detail += f", or lower min_quality ({floor_req:g}): at the cheapest alpha it would be in time"
        raise ApiError(429, detail, {"Retry-After": retry})
    x = x_raw * rt.scale + rt.shift
    job = Job(x, target, floor, deadline, now, arrived=arrived)
    try:
        fut = st.batcher.submit(job)
    except QueueFull:
        st.metrics.shed.labels("queue_full").inc()
        raise ApiError(429, _queue_full(st.settings.queue_max), {"Retry-After": retry}) from None
    except Draining:
        raise ApiError(503, "the service is shutting down", {"Retry-After": "1"}) from None
    st.requests.arrived(int(x.shape[0]))
    st.inflight += 1
    try:
        res = await asyncio.shield(fut)
    except Draining:  # still queued when the drain deadline passed
        raise ApiError(503, "the service shut down before this request ran; retry", {"Retry-After": "1"}) from None
    finally:
        st.inflight -= 1
    st.metrics.queue_wait.observe(res.queue_seconds)
    st.metrics.alpha.observe(res.alpha)
    return softmax(res.outputs), res, rt.accuracy.get(res.alpha)  # None: not measured at that alpha


def create_app(
    settings: Settings | None = None,
    *,
    warm_up: bool = True,
    runtime: Runtime | None = None,
    executor: ThreadPoolExecutor | None = None,
    stop: Callable[[], None] | None = None,
) -> FastAPI:
    """The ASGI app. Settings default to the LCS_* environment; a bad checkpoint fails start-up. `runtime`:
    one already loaded from these settings on `executor`, the inference thread (`python -m service` loads
    it before binding the port). `stop`: asks the server to exit, called if the warm-up fails (the reason
    is then in `app.state.lcs.failure`); without it the app stays unready."""

    s = settings or Settings()
    preloaded, given = runtime, executor

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        executor = given or inference_executor()
        loaded = preloaded
        if loaded is None:
            try:
                loaded = await asyncio.get_running_loop().run_in_executor(executor, Runtime.load, s)
            except BaseException:
                executor.shutdown(wait=False)
                raise
        st = State(s, loaded, executor)
        app.state.lcs = st
        st.metrics.info.info(
            {
                "version": VERSION,
                "model": loaded.name,
                "kind": loaded.meta.kind,
                "subspace": loaded.meta.subspace,
                "torch": torch.__version__,
            }
        )
        tasks = [asyncio.create_task(st.batcher.run_forever(), name="batcher")]
        if warm_up:
            tasks.append(asyncio.create_task(_warm(st, stop), name="warm-up"))
        tasks.append(asyncio.create_task(_control_loop(st), name="controller"))
        loop = asyncio.get_running_loop()
        previous = signal.getsignal(signal.SIGTERM)
        if callable(previous):  # uvicorn's handler, which stops accepting connections and shuts down

            def on_term(signum: int, frame: Any) -> None:
                # What SIGTERM guarantees: at once, readiness answers 503 and new work 503 + Retry-After, while
                # the server still accepts connections (so probes and clients get an answer, not a refusal).
                # Requests received before the signal are answered, those whose body is still arriving or
                # decoding too (`Shed` refuses the rest as they arrive); only then (or after LCS_DRAIN_SECONDS) does
                # uvicorn's handler run, close the listener and shut down. A second SIGTERM hands over at once.
                if st.draining:
                    previous(signum, frame)
                    return
                st.start_draining()
                st.drain_deadline = time.monotonic() + s.drain_seconds
                loop.call_soon_threadsafe(  # a signal handler must not touch the loop's internals directly
                    lambda: tasks.append(loop.create_task(_drain_then(st, lambda: previous(signum, frame))))
                )

            with contextlib.suppress(ValueError):  # not in the main thread (e.g. TestClient)
                signal.signal(signal.SIGTERM, on_term)
        try:
            yield
        finally:
            st.start_draining()
            left = s.drain_seconds if st.drain_deadline is None else max(0.0, st.drain_deadline - time.monotonic())
            if not await st.batcher.drain(left):
                log.warning("drain timed out with work left; refused %d queued requests", st.batcher.abandon())
            for t in tasks:
                t.cancel()
            if st.fleet is not None:
                await st.fleet.aclose()
            st.executor.shutdown(wait=False, cancel_futures=True)

    app = _Edge(
        title="lcs-serve",
        version=VERSION,
        lifespan=lifespan,
        description="Any alpha of one compressible-subspace checkpoint: alpha = 1 is the most accurate model, "
        "alpha = 0 the most compressed. `quality` asks for an alpha; under load the controller may "
        "serve less, never more.",
        responses={
            413: {"model": ErrorResponse, "description": "Body too large (any route)"},
            500: {"model": ErrorResponse, "description": "Internal error; quote the request_id"},
        },
        docs_url=None,  # FastAPI's pages load their scripts from a CDN; docs.add serves them from here
        redoc_url=None,
    )
    docs.add(app)
    lane_routes = app.router.routes  # filled below; Lane reads it when the stack is built, at the first request
    app.wrap = lambda inner: Observe(
        Shed(
            BodyLimit(
                Lane(
                    inner,
                    routes=lane_routes,
                    paths=_LANE_PATHS,
                    binary=_V2_INFER,
                    state=lambda scope: getattr(scope["app"].state, "lcs", None),
                    body_timeout=s.body_timeout_seconds,
                    check=lambda scope, st: _model(
                        st, scope["path_params"].get("name", st.runtime.name), scope["path_params"].get("version")
                    ),
                ),
                limit=s.max_body_bytes,
            )
        )
    )

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request.scope, exc.status, exc.detail, exc.headers, exc.kind)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # unknown paths (404) and methods (405) answer in the same shape as every other error
        return error_response(request.scope, exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)  # FastAPI's error middleware answers with this, then re-raises to Observe
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return _internal_error(request.scope)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request.scope, 422, problems(exc.errors()))

    # The inference routes (metrics.INFERENCE_ROUTES) are served through Lane (content type, strict JSON, body
    # validation, errors); FastAPI documents them from these declarations.
    @app.post(
        "/predict",
        response_model=PredictResponse,
        responses=_errors(408, 415, 422, 429, 503, retry_after=(429, 503)),
    )
    async def predict(body: PredictRequest, st: StateDep, request: Request) -> JSONResponse:
        """Classify one or more images at an alpha chosen from `quality`, the load and the deadline."""
        rt = st.runtime
        limits = {"max_inputs": st.settings.max_inputs, "max_pixels": st.settings.max_image_pixels}
        read = functools.partial(decode, body.inputs, rt.meta.input, **limits)
        # Encoded images decode on a worker thread (Pillow releases the GIL while it decodes and resizes), so a
        # request of large images does not stall the event loop: 64 blank 4096x4096 PNGs (4 MB of base64) held
        # every other request and /healthz for 11 s when they decoded on it. Arrays stay on the loop (~0.1 ms).
        x = await asyncio.to_thread(read) if has_images(body.inputs) else read()
        probs, res, acc = await _infer(st, request.scope["state"], x, body)
        k = body.top_k or st.settings.top_k
        classes = rt.meta.classes
        preds = []
        for ps in probs.tolist():  # in Python: numpy's per-call cost outweighs ten values (7 us against 14)
            ix = sorted(range(len(ps)), key=ps.__getitem__, reverse=True)[:k]  # stable: ties keep class order
            top = [{"label": classes[i], "index": i, "probability": round(ps[i], 6)} for i in ix]
            preds.append({**top[0], "top": top})
        # a Response skips re-validating our own output against PredictResponse (kept for the docs)
        return JSONResponse(
            {
                "predictions": preds,
                "model": rt.name,
                **_served(rt, res, acc),
                "batch_images": res.batch_images,
                "request_id": request.state.request_id,
            }
        )

    # GET or HEAD (some load balancers probe with HEAD, which answered 405); HEAD left out of the schema
    @app.head("/healthz", include_in_schema=False)
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process is up and its event loop answers."""
        return {"status": "alive"}

    @app.head("/readyz", include_in_schema=False)
    @app.get("/readyz", responses={503: {"description": "Starting or draining"}})
    async def readyz(st: StateDep) -> JSONResponse:
        """Readiness: models built and profiled, not draining. Load never makes this fail."""
        ok = st.ready
        if st.failure is not None:
            return JSONResponse({"status": "failed", "detail": st.failure}, status_code=503)
        status = "ready" if ok else ("draining" if st.draining else "starting")
        return JSONResponse({"status": status}, status_code=200 if ok else 503)

    @app.get("/model")
    async def model_info(st: StateDep) -> dict[str, object]:
        """Model metadata: kind, served alphas, the accuracy-per-alpha table, latency profile, cache."""
        return st.runtime.describe()

    @app.get("/controller")
    async def controller_state(st: StateDep) -> dict[str, object]:
        """Controller mode, ceiling, last signals and the last decisions with their reasons."""
        return st.runtime.controller.state()

    async def _admin(
        st: StateDep,
        x_api_key: Annotated[str | None, Header()] = None,
        authorization: Annotated[str | None, Header()] = None,
    ) -> None:
        key = st.settings.api_key
        if key is None:
            raise ApiError(404, "admin endpoints are off: set LCS_API_KEY to enable them")
        scheme, _, token = (authorization or "").partition(" ")
        given = x_api_key or (token.strip() if scheme.lower() == "bearer" and token.strip() else None)
        if given is None:
            raise ApiError(
                401,
                "admin endpoint: send the API key in X-API-Key or Authorization: Bearer",
                {"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(given.encode(), key.get_secret_value().encode()):
            raise ApiError(403, "admin endpoint: wrong API key")

    async def _json_content(content_type: Annotated[str, Header()] = "") -> None:
        require_json(content_type)  # FastAPI itself would read any content type as JSON, or answer 422

    # The body is read here, after the key is checked: had FastAPI read it, a malformed body would have got a
    # 422 before the 401 (FastAPI parses JSON before it resolves dependencies).
    @app.put(
        "/admin/pin",
        dependencies=[Depends(_admin), Depends(_json_content)],
        responses=_errors(401, 403, 404, 415, 422),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PinRequest.model_json_schema()}},
            }
        },
    )
    async def pin(request: Request, st: StateDep) -> dict[str, object]:
        """Pin the ceiling to an alpha (snapped down to the grid) until released."""
        body = validate(PinRequest, await request.body())
        st.pin(body.alpha)
        return st.runtime.controller.state()

    @app.delete("/admin/pin", dependencies=[Depends(_admin)], responses=_errors(401, 403, 404, 422))
    async def unpin(st: StateDep) -> dict[str, object]:
        """Release a pin; the controller takes over again."""
        st.pin(None)
        return st.runtime.controller.state()

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(st: StateDep) -> Response:
        """Prometheus text exposition."""
        return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- Open Inference Protocol v2 ----------------------------------------------------------------

    @app.get("/v2")
    async def v2_server() -> dict[str, object]:
        """OIP v2 server metadata."""
        return {"name": "lcs-serve", "version": VERSION, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def v2_live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", responses={503: {"description": "Not ready"}})
    async def v2_ready(st: StateDep) -> JSONResponse:
        return JSONResponse({"ready": st.ready}, status_code=200 if st.ready else 503)

    # A model has one version, "1": each /v2/models/{name} path is also served at /v2/models/{name}/versions/1
    @app.get("/v2/models/{name}", responses=_errors(404, 422))
    async def v2_model(name: str, st: StateDep) -> dict[str, object]:
        return _v2_metadata(_model(st, name))

    @app.get("/v2/models/{name}/versions/{version}", responses=_errors(404, 422))
    async def v2_model_version(name: str, version: str, st: StateDep) -> dict[str, object]:
        return _v2_metadata(_model(st, name, version))

    def _v2_metadata(rt: Runtime) -> dict[str, object]:
        i = rt.meta.input
        return {
            "name": rt.name,
            "versions": [_VERSION],
            "platform": "pytorch",
            "inputs": [{"name": _V2_INPUT, "datatype": "FP32", "shape": [-1, i.channels, i.height, i.width]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(rt.meta.classes)]}],
            "parameters": {
                "kind": rt.meta.kind,
                "backend": rt.settings.backend,
                "grid": rt.grid.alphas,
                "accuracy": [p.model_dump() for p in rt.meta.accuracy],
            },
        }

    @app.get("/v2/models/{name}/ready", responses=_errors(404, 422, 503))
    async def v2_model_ready(name: str, st: StateDep) -> JSONResponse:
        return _v2_ready(st, _model(st, name))

    @app.get("/v2/models/{name}/versions/{version}/ready", responses=_errors(404, 422, 503))
    async def v2_model_version_ready(name: str, version: str, st: StateDep) -> JSONResponse:
        return _v2_ready(st, _model(st, name, version))

    def _v2_ready(st: State, rt: Runtime) -> JSONResponse:
        return JSONResponse({"name": rt.name, "ready": st.ready}, status_code=200 if st.ready else 503)

    # Lane checks the model's name and version before it reads the body (its `check`), then calls these.
    _infer_errors = _errors(404, 408, 415, 422, 429, 503, retry_after=(429, 503))

    @app.post("/v2/models/{name}/infer", responses=_infer_errors)  # Lane checks each route is declared
    async def v2_infer(name: str, body: V2InferRequest, st: StateDep, request: Request) -> dict[str, object]:
        """OIP v2 inference; `parameters` may carry quality, min_quality and deadline_ms."""
        rt = st.runtime
        t = body.inputs[0]
        if t.name != _V2_INPUT:
            raise InputError(
                f"inputs[0].name {t.name[:40]!r} is not an input of this model; its one input is {_V2_INPUT!r}"
            )
        if t.datatype not in _BINARY_DTYPES:  # the datatypes this route reads, as JSON data or binary
            raise InputError(
                f"inputs[0].datatype {t.datatype!r} is not supported; use one of {', '.join(_BINARY_DTYPES)}"
            )
        unknown = [o.get("name") for o in body.outputs or [] if o.get("name") != "probabilities"]
        if unknown:
            raise ApiError(422, f"outputs: {unknown} not produced; this model's one output is 'probabilities'")
        if any(d < 1 for d in t.shape):
            raise InputError(f"inputs[0].shape {t.shape}: every dimension must be a positive number")
        i = rt.meta.input
        per = i.channels * i.height * i.width
        n = t.shape[0] if t.shape else 0
        binary = request.scope["state"].get("binary")
        if binary is not None and not len(binary):  # the whole body is JSON
            binary = None
        if t.data is not None and binary is not None:
            raise InputError("inputs[0]: send the values either in data or as binary data, not both")
        if t.data is None and binary is None:
            raise InputError(f"inputs[0] has no data: send data, or binary_data_size with the {BINARY_HEADER} header")
        flat = None  # the data, if nested (the first value says it; an array later on: numbers() names it)
        if t.data and isinstance(t.data[0], list):
            flat = nested_numbers(t.data, t.shape, "inputs[0].data")
        values = flat.size if flat is not None else len(t.data) if t.data is not None else None
        if n < 1 or math.prod(t.shape) != n * per or (values is not None and values != n * per):
            raise InputError(
                f"inputs[0]: shape {t.shape} with {values if values is not None else 'binary'} values does not "
                f"hold whole {i.channels}x{i.height}x{i.width} images",
            )
        check_count(n, st.settings.max_inputs, "inputs[0]")
        if t.data is None:
            x = _binary_tensor(binary, t, n * per).reshape(n, i.channels, i.height, i.width)
        else:
            x = (flat if flat is not None else numbers(t.data, "inputs[0].data")).reshape(
                n, i.channels, i.height, i.width
            )
        check_range(x, "inputs[0].data" if t.data is not None else "inputs[0]")
        if t.datatype in _INTEGER_DTYPES and t.data is not None and (x != np.floor(x)).any():
            raise InputError(f"inputs[0].data: {t.datatype} values must be whole numbers")
        probs, res, acc = await _infer(st, request.scope["state"], x, body.parameters or V2Parameters())
        return {
            "model_name": rt.name,
            "model_version": _VERSION,
            "id": body.id or uuid.uuid4().hex,
            "parameters": _served(rt, res, acc),
            "outputs": [
                {
                    "name": "probabilities",
                    "datatype": "FP32",
                    "shape": list(probs.shape),
                    "data": probs.reshape(-1).tolist(),
                }
            ],
        }

    @app.post("/v2/models/{name}/versions/{version}/infer", responses=_infer_errors)
    async def v2_infer_version(
        name: str, version: str, body: V2InferRequest, st: StateDep, request: Request
    ) -> dict[str, object]:
        """OIP v2 inference at the model's one version, "1": the same as without a version."""
        return await v2_infer(name, body, st, request)

    return app


_VERSION = "1"  # OIP v2: the one version of the one model a server serves
_V2_INPUT = "input"  # the name of its one input tensor


def _served(rt: Runtime, res: Result, accuracy: float | None) -> dict[str, object]:
    """How a request was served, as /predict's body and OIP v2's response parameters report it."""
    return {
        "alpha": res.alpha,
        "kind": rt.meta.kind,
        "level": rt.level(res.alpha),
        "level_name": LEVEL_NAMES[rt.meta.kind],
        "accuracy": accuracy,
        "queue_ms": round(res.queue_seconds * 1000, 3),
        "compute_ms": round(res.compute_seconds * 1000, 3),
    }


def _model(st: State, name: str, version: str | None = None) -> Runtime:
    """The runtime serving model `name` (at `version`, if given), or 404 (checked before an inference body is
    read, `Lane`)."""
    if name != st.runtime.name:
        raise ApiError(404, f"model {name!r} not found; this server serves {st.runtime.name!r}")
    if version is not None and version != _VERSION:
        raise ApiError(404, f"model {name!r} has no version {version!r}; its one version is {_VERSION!r}")
    return st.runtime


_BINARY_DTYPES = {"UINT8": "u1", "FP32": "<f4", "FP64": "<f8", "INT32": "<i4", "INT64": "<i8"}
_INTEGER_DTYPES = {"UINT8", "INT32", "INT64"}


def _binary_tensor(binary: memoryview, t: V2Tensor, count: int) -> np.ndarray:
    """`count` little-endian values of t.datatype from the binary part of the body, as float32."""
    size = (t.parameters or {}).get("binary_data_size")
    if isinstance(size, bool) or not isinstance(size, int) or size != len(binary):
        raise InputError(
            f"inputs[0].parameters.binary_data_size must be the {len(binary)} bytes after the JSON, got {size!r}"
        )
    dtype = np.dtype(_BINARY_DTYPES[t.datatype])
    if size != count * dtype.itemsize:
        raise InputError(
            f"inputs[0]: {size} bytes of {t.datatype} hold {size / dtype.itemsize:g} values, not the {count} "
            "the shape needs",
        )
    return np.frombuffer(binary, dtype=dtype).astype(np.float32)


async def _warm(st: State, stop: Callable[[], None] | None) -> None:
    """Build, profile and self-check; then ready. If that fails the service cannot serve this checkpoint:
    the reason goes to the log and `st.failure`, and `stop` ends the process (an orchestrator sees a crash
    with the message, not a pod that stays unready for ever)."""
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(st.executor, st.runtime.warm_up)
    except CheckpointError as e:  # the self-check: the message says it all
        st.failure = str(e)
        log.error("%s", e)
    except Exception as e:
        st.failure = f"{st.settings.checkpoint}: warm-up failed ({type(e).__name__}: {e}); the log has the trace"
        log.exception("warm-up failed")
    else:
        # the model, torch and every module are loaded for good: move them out of the collector's view, so
        # a full collection (every few thousand requests) no longer walks them and stalls the loop ~100 ms
        gc.freeze()
        log.info("ready: %s, alphas %s built", st.runtime.name, st.runtime.cache.cached())
        return
    if stop is not None:
        stop()


async def _drain_then(st: State, stop: Callable[[], None]) -> None:
    """After SIGTERM: wait until every accepted request is answered (at most until the deadline), then stop.
    Requests still queued at the deadline get 503 + Retry-After rather than a dropped connection."""
    assert st.drain_deadline is not None
    if not await st.batcher.drain(max(0.0, st.drain_deadline - time.monotonic())):
        log.warning("drain deadline reached; refused %d queued requests", st.batcher.abandon())
    stop()


async def _control_loop(st: State) -> None:
    interval = st.settings.control_interval_seconds
    while True:
        await asyncio.sleep(interval)
        try:
            st.control_step(time.monotonic())
        except Exception:
            log.exception("control step failed; keeping the last ceiling")
        if st.fleet is not None:
            st.fleet.poll()  # in the background: read by the next step, never awaited here
