"""The HTTP edge: routes parse, call the core (runtime, batcher, controller) and shape the answer."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import hmac
import importlib.metadata
import logging
import math
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import numpy as np
import orjson
import torch
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from lcs.alpha import SAME_ALPHA
from lcs.checkpoint import CheckpointError, InputSpec
from service import docs
from service.batcher import Capped, ClientLeft, Draining, Job, QueueFull, Result
from service.inputs import InputError, check_count, check_range, decode, has_images, nested_numbers, numbers
from service.lane import (
    BINARY_HEADER,
    ApiError,
    FastJSONResponse,
    Lane,
    Reads,
    error_response,
    may_hold_booleans,
    problems,
    require_json,
    require_uncompressed,
    shown,
    validate,
)
from service.metrics import INFERENCE_ROUTES
from service.middleware import BodyLimit, Edge, Observe, Shed, client_left, internal_error_response
from service.runtime import LEVEL_NAMES, Runtime, WarmUpStopped, inference_executor
from service.schemas import (
    PRESETS,
    ErrorResponse,
    Hint,
    PinRequest,
    PredictRequest,
    PredictResponse,
    V2InferRequest,
    V2InferResponse,
    V2OutputParameters,
    V2Parameters,
    V2Tensor,
)
from service.settings import Settings
from service.state import NOT_READY, State, StateDep, late_detail, queue_full_detail, retry_after

log = logging.getLogger("lcs.service")
try:
    VERSION = importlib.metadata.version("lcs-serve")  # pyproject.toml's, as installed
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "unknown"


_V2_INFER = tuple(r for r in INFERENCE_ROUTES if r.startswith("/v2/"))  # the binary tensor extension: OIP only


def _errors(*codes: int, retry_after: tuple[int, ...] = ()) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error statuses a route can answer, all with the ErrorResponse body. Retry-After
    is declared on `retry_after`'s statuses; required but on 429, which a min_quality refusal under a pin or the
    battery cap answers without one (`_infer`)."""
    text = {
        401: "No API key",
        403: "Wrong API key",
        404: "Not found (or admin endpoints off)",
        408: "The body did not arrive within LCS_BODY_TIMEOUT_SECONDS",
        413: "Body too large",
        415: "Not JSON",
        422: "Invalid request or input",
        429: "Overloaded or min_quality unavailable; see Retry-After where given",
        503: "Starting or shutting down; see Retry-After",
    }
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        out[code] = {"model": ErrorResponse, "description": text[code]}
        if code in retry_after:
            out[code]["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before retrying"
                    + ("; absent when a pin or the battery cap refuses min_quality" if code == 429 else ""),
                    "required": code != 429,
                    "schema": {"type": "string", "pattern": "^[0-9]+$"},
                }
            }
    return out


def _alpha(value: float | str | None, default: float) -> float:
    """A validated `quality` or `min_quality` (schemas.Quality) as an alpha."""
    if value is None:
        return default
    return PRESETS[value] if isinstance(value, str) else float(value)


def _below_min_quality(st: State, floor: float, floor_req: float) -> ApiError:
    """The 429 for a request whose floor (`min_quality` snapped up to `floor`) is above the ceiling, counted
    as shed: on arrival, or once queued, where a pin or the battery cap has fallen below it since."""
    c = st.runtime.controller
    ceiling = c.ceiling
    # a pin or the battery cap holds until someone acts: no time to retry after can be given, and no operator
    # needs paging. A floor above the battery cap is the battery's refusal whatever load does below the cap.
    # Once one is lifted the ceiling comes back within a calm spell: a retry soon is served, and still no
    # overload pages (it did, as load's refusal).
    battery = c.battery_limit
    capped, soon = True, False
    if c.mode == "pinned":
        limit, why, then = ceiling, "an operator has pinned alpha at", "retry once the pin is released"
    elif battery is not None and floor > battery:
        limit, why, then = battery, "on low battery the service serves alpha", "retry once the battery charges"
    elif c.mode == "recovering" and c.held_by in ("pin", "battery"):
        # a pin released or the battery charging: the ceiling comes back within a calm spell, by no overload
        after = "an operator's pin" if c.held_by == "pin" else "the low-battery cap"
        limit, why, then = ceiling, f"returning to full quality after {after}, the service serves alpha", "retry"
        soon = True
    else:  # load: the ceiling comes back as the load passes
        limit, why, then = ceiling, "under current load the service serves alpha", "retry later"
        capped, soon = False, True
    st.metrics.shed.labels("min_quality_capped" if capped else "min_quality").inc()
    return ApiError(
        429,
        f"{why} <= {limit:g}, below min_quality {floor_req:g}; {then} or lower min_quality",
        {"Retry-After": retry_after(st.settings)} if soon else {},
        kind="min_quality unavailable",
    )


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
        raise ApiError(503, NOT_READY, {"Retry-After": "1"})
    want = _alpha(hint.quality, 1.0)
    floor_req = _alpha(hint.min_quality, 0.0)
    if floor_req - want >= SAME_ALPHA:  # one alpha spelt two ways (0.7 - 0.2 and 0.5) is no contradiction
        raise ApiError(422, f"min_quality ({floor_req:g}) is above quality ({want:g}); lower min_quality")
    target = rt.grid.down(want)
    floor = rt.grid.up(floor_req)
    if floor is None or floor > target:
        raise ApiError(
            422,
            f"no served alpha lies between min_quality {floor_req:g} and quality {want:g}; "
            f"served alphas: {rt.grid.alphas}",
        )
    retry = retry_after(st.settings)
    if floor > rt.controller.ceiling:
        raise _below_min_quality(st, floor, floor_req)
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
        detail = late_detail(wait, budget, left=deadline - now)
        if (cheapest := rt.controller.predicted_wait(queued, depth)) is not None and cheapest <= deadline - now:
            detail += f", or lower min_quality ({floor_req:g}): at the cheapest alpha it would be in time"
        raise ApiError(429, detail, {"Retry-After": retry})
    x = x_raw * rt.scale + rt.shift
    receive = state.get("receive")
    left = functools.partial(client_left, receive) if receive is not None else None
    job = Job(x, target, floor, deadline, now, arrived=arrived, left=left)
    try:
        fut = st.batcher.submit(job)
    except QueueFull:
        st.metrics.shed.labels("queue_full").inc()
        raise ApiError(429, queue_full_detail(st.settings.queue_max), {"Retry-After": retry}) from None
    except Draining:
        st.metrics.shed.labels("not_ready").inc()
        raise ApiError(503, "the service is shutting down", {"Retry-After": "1"}) from None
    st.requests.arrived(int(x.shape[0]))
    st.inflight += 1
    try:
        res = await asyncio.shield(fut)
    except Draining:  # still queued when the drain deadline passed
        st.metrics.shed.labels("not_ready").inc()
        raise ApiError(503, "the service shut down before this request ran; retry", {"Retry-After": "1"}) from None
    except Capped:  # a pin or the battery cap fell below its floor while it was queued
        raise _below_min_quality(st, floor, floor_req) from None
    except ClientLeft:  # an answer no one reads (Observe counts it as 499 too)
        raise ApiError(499, "the client left before its batch ran", kind="client closed request") from None
    finally:
        st.inflight -= 1
    st.metrics.queue_wait.observe(res.queue_seconds)
    st.metrics.alpha.observe(res.alpha)
    # NaN: weights that overflow at an alpha the start-up self-check did not run. Checked per request (1.2 us), so
    # that only the requests it spoils fail, and before the answer: orjson would write it as null
    if not math.isfinite(res.outputs.sum()):
        raise ApiError(500, f"the model gave non-finite outputs at alpha {res.alpha:g}; the checkpoint is broken there")
    return res.outputs, res, rt.accuracy.get(res.alpha)  # accuracy None: not measured at that alpha


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
    reads = Reads()  # the inference bodies being read: a drain's deadline ends them
    preloaded, given = runtime, executor

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reads.ended = False  # an app served again after a shutdown (a test's second client) reads bodies again
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
                log.info(
                    "draining (SIGTERM): new inference requests get 503; %d in flight, %d queued, answered for "
                    "up to LCS_DRAIN_SECONDS=%g",
                    st.inflight,
                    st.batcher.depth,
                    s.drain_seconds,
                )
                loop.call_soon_threadsafe(  # a signal handler must not touch the loop's internals directly
                    lambda: tasks.append(loop.create_task(_drain_then(st, reads, lambda: previous(signum, frame))))
                )

            with contextlib.suppress(ValueError):  # not in the main thread (e.g. TestClient)
                signal.signal(signal.SIGTERM, on_term)
        try:
            yield
        finally:
            st.runtime.stopping.set()  # a warm-up still running stops at its next step
            st.start_draining()
            left = s.drain_seconds if st.drain_deadline is None else max(0.0, st.drain_deadline - time.monotonic())
            if not await st.batcher.drain(left):
                log.warning("drain timed out with work left; refused %d queued requests", st.batcher.abandon())
            for t in tasks:
                t.cancel()
            if st.fleet is not None:
                await st.fleet.aclose()
            st.executor.shutdown(wait=False, cancel_futures=True)
            st.decoder.shutdown(wait=False, cancel_futures=True)

    app = Edge(
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
                    paths=INFERENCE_ROUTES,
                    binary=_V2_INFER,
                    state=lambda scope: getattr(scope["app"].state, "lcs", None),
                    body_timeout=s.body_timeout_seconds,
                    check=lambda scope, st: _model(
                        st, scope["path_params"].get("name", st.runtime.name), scope["path_params"].get("version")
                    ),
                    capacity=lambda st: (st.settings.max_inputs, _values_per_image(st.runtime.meta.input)),
                    reads=reads,
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
        return internal_error_response(request.scope)

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
        read = functools.partial(
            decode,
            body.inputs,
            rt.meta.input,
            max_inputs=st.settings.max_inputs,
            max_pixels=st.settings.max_image_pixels,
        )
        # Encoded images decode on State.decoder (Pillow releases the GIL while it decodes and resizes), so a
        # request of large images does not stall the event loop: 64 blank 4096x4096 PNGs (4 MB of base64) held
        # every other request and /healthz for 11 s when they decoded on it. Arrays stay on the loop: ~0.03 ms for
        # one image, ~1.4 ms for 64, all of it holding the GIL, so a thread would not free the loop for it.
        if has_images(body.inputs):
            x = await asyncio.get_running_loop().run_in_executor(st.decoder, read)
        else:
            # where the text holds no true or false, decode skips the check for them (~20 us an image)
            x = read(booleans=may_hold_booleans(await request.body()))  # the body as Lane read it
        probs, res, acc = await _infer(st, request.scope["state"], x, body)
        k = body.top_k or st.settings.top_k
        classes = rt.meta.classes
        preds = []
        for ps in probs.tolist():  # in Python: numpy's per-call cost outweighs ten values (7 us against 14)
            ix = _ranked(ps, k)
            top = [{"label": classes[i], "index": i, "probability": round(ps[i], 6)} for i in ix]
            preds.append({**top[0], "top": top})
        # a Response skips re-validating our own output against PredictResponse (kept for the docs)
        return FastJSONResponse(
            {
                "predictions": preds,
                "model": rt.name,
                **_served(rt, res, acc),
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
        request: Request,
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
            st.wrong_key(request.client.host if request.client else "an unknown address", time.monotonic())
            raise ApiError(403, "admin endpoint: wrong API key")

    async def _json_content(
        content_type: Annotated[str, Header()] = "", content_encoding: Annotated[str, Header()] = ""
    ) -> None:
        require_json(content_type)  # FastAPI itself would read any content type as JSON, or answer 422
        require_uncompressed(content_encoding)

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
        return {"name": "lcs-serve", "version": VERSION, "extensions": ["binary_tensor_data", "classification"]}

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
            "outputs": [{"name": _V2_OUTPUT, "datatype": "FP32", "shape": [-1, len(rt.meta.classes)]}],
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

    # the JSON alone, or followed by the outputs asked for as binary data (the binary tensor extension)
    v2_binary: dict[str, Any] = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    v2_answers = {**_infer_errors, 200: {"content": v2_binary}}

    # Lane checks each inference route is declared
    @app.post("/v2/models/{name}/infer", response_model=V2InferResponse, responses=v2_answers)
    async def v2_infer(name: str, body: V2InferRequest, st: StateDep, request: Request) -> Response:
        """OIP v2 inference; `parameters` may carry quality, min_quality and deadline_ms. The probabilities, or
        the top classes where the output asks (classification extension), come as JSON data, or as binary data
        after the JSON where asked (binary tensor extension)."""
        rt = st.runtime
        asked = _v2_output(body)
        t = body.inputs[0]
        booleans = t.data is None or may_hold_booleans(await request.body())  # as /predict's
        x = _v2_images(t, request.scope["state"].get("binary"), rt.meta.input, st.settings.max_inputs, booleans)
        parameters = body.parameters or V2Parameters()
        probs, res, acc = await _infer(st, request.scope["state"], x, parameters)
        output: dict[str, object] = {"name": _V2_OUTPUT, "datatype": "FP32", "shape": list(probs.shape)}
        strings = None  # the classification extension's values, where asked
        if asked.classification is not None:
            k = min(asked.classification, probs.shape[1])  # more than the model has: all of them, as Triton's
            strings = _classified(probs, rt.meta.classes, k)
            output.update(datatype="BYTES", shape=[len(probs), k])
        answer = {
            "model_name": rt.name,
            "model_version": _VERSION,
            "id": body.id or uuid.uuid4().hex,
            "parameters": _served(rt, res, acc),
            "outputs": [output],
        }
        if not (parameters.binary_data_output if asked.binary_data is None else asked.binary_data):
            output["data"] = probs.reshape(-1).tolist() if strings is None else strings
            return FastJSONResponse(answer)
        # the extension's layouts: FP32 little-endian, row-major; BYTES each value's length, then the value
        raw = np.ascontiguousarray(probs, dtype="<f4").tobytes() if strings is None else _bytes_tensor(strings)
        output["parameters"] = {"binary_data_size": len(raw)}
        head = orjson.dumps(answer)
        return Response(head + raw, media_type="application/octet-stream", headers={BINARY_HEADER: str(len(head))})

    @app.post("/v2/models/{name}/versions/{version}/infer", response_model=V2InferResponse, responses=v2_answers)
    async def v2_infer_version(
        name: str, version: str, body: V2InferRequest, st: StateDep, request: Request
    ) -> Response:
        """OIP v2 inference at the model's one version, "1": the same as without a version."""
        return await v2_infer(name, body, st, request)

    return app


_VERSION = "1"  # OIP v2: the one version of the one model a server serves
_V2_INPUT = "input"  # the name of its one input tensor
_V2_OUTPUT = "probabilities"  # and of its one output


def _v2_output(body: V2InferRequest) -> V2OutputParameters:
    """What the request asks of the one output: binary_data (unset: the request's binary_data_output decides) and
    classification. An output named twice is answered once, as its first entry asks, as Triton does; 422 for an
    output this model does not produce."""
    unknown = [o.name for o in body.outputs or [] if o.name != _V2_OUTPUT]
    if unknown:
        raise ApiError(422, f"outputs: {shown(unknown)} not produced; this model's one output is {_V2_OUTPUT!r}")
    first = body.outputs[0] if body.outputs else None
    return first.parameters if first is not None and first.parameters is not None else V2OutputParameters()


def _ranked(ps: list[float], k: int) -> list[int]:
    """The indices of the k largest of `ps`, largest first (all of them where k is more); stable: ties keep class
    order."""
    return sorted(range(len(ps)), key=ps.__getitem__, reverse=True)[:k]


def _classified(probs: np.ndarray, classes: list[str], k: int) -> list[str]:
    """The classification extension's values, flat: each image's top k classes as "<probability>:<index>:<label>",
    the probability written as Triton writes it (C++ std::to_string, printf's %f: 0.912345)."""
    return [f"{ps[i]:f}:{i}:{classes[i]}" for ps in probs.tolist() for i in _ranked(ps, k)]


def _bytes_tensor(values: list[str]) -> bytes:
    """BYTES values as binary data (binary tensor extension): each its length in 4 bytes, little-endian, then its
    UTF-8 bytes."""
    return b"".join(len(b).to_bytes(4, "little") + b for b in (v.encode() for v in values))


def _v2_images(
    t: V2Tensor, binary: memoryview | None, i: InputSpec, max_inputs: int, booleans: bool = True
) -> np.ndarray:
    """A v2 input tensor, its values as JSON `data` or the body's `binary` part, as images [N, C, H, W] of pixel
    values; InputError naming what is wrong otherwise. `booleans`: whether the JSON may hold true or false
    (`service.inputs.decode`)."""
    if t.name != _V2_INPUT:
        raise InputError(
            f"inputs[0].name {shown(t.name)} is not an input of this model; its one input is {_V2_INPUT!r}"
        )
    if t.datatype not in _BINARY_DTYPES:  # the datatypes this route reads, as JSON data or binary
        raise InputError(
            f"inputs[0].datatype {shown(t.datatype)} is not supported; use one of {', '.join(_BINARY_DTYPES)}"
        )
    if any(d < 1 for d in t.shape):
        raise InputError(f"inputs[0].shape {shown(t.shape)}: every dimension must be a positive number")
    per = _values_per_image(i)
    n = t.shape[0] if t.shape else 0
    if binary is not None and not len(binary):  # the whole body is JSON
        binary = None
    if t.data is not None and binary is not None:
        raise InputError("inputs[0]: send the values either in data or as binary data, not both")
    if t.data is None and binary is None:
        raise InputError(f"inputs[0] has no data: send data, or binary_data_size with the {BINARY_HEADER} header")
    flat = None  # the data, if nested (the first value says it; an array later on: numbers() names it)
    if t.data and isinstance(t.data[0], list):
        flat = nested_numbers(t.data, t.shape, "inputs[0].data", booleans=booleans)
    values = flat.size if flat is not None else len(t.data) if t.data is not None else None
    if n < 1 or math.prod(t.shape) != n * per or (values is not None and values != n * per):
        raise InputError(
            f"inputs[0]: shape {shown(t.shape)} with {values if values is not None else 'binary'} values does not "
            f"hold whole {i.channels}x{i.height}x{i.width} images",
        )
    channels_last = _channels_last(t.shape, i)
    check_count(n, max_inputs, "inputs[0]")
    if t.data is not None:
        x = flat if flat is not None else numbers(t.data, "inputs[0].data", booleans=booleans)
    elif binary is not None:  # always, by the checks above: one of the two holds the values
        x = _binary_tensor(binary, t, n * per)
    if channels_last:
        x = x.reshape(n, i.height, i.width, i.channels).transpose(0, 3, 1, 2)
    else:
        x = x.reshape(n, i.channels, i.height, i.width)
    check_range(x, "inputs[0].data" if t.data is not None else "inputs[0]")
    if t.datatype in _INTEGER_DTYPES and t.data is not None and (x != np.floor(x)).any():
        raise InputError(f"inputs[0].data: {t.datatype} values must be whole numbers")
    return x


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
        "batch_images": res.batch_images,
    }


def _values_per_image(spec: InputSpec) -> int:
    """Numbers in one image of the model's input: C x H x W."""
    return spec.channels * spec.height * spec.width


def _model(st: State, name: str, version: str | None = None) -> Runtime:
    """The runtime serving model `name` (at `version`, if given), or 404 (checked before an inference body is
    read, `Lane`)."""
    if name != st.runtime.name:
        raise ApiError(404, f"model {shown(name)} not found; this server serves {st.runtime.name!r}")
    if version is not None and version != _VERSION:
        raise ApiError(404, f"model {shown(name)} has no version {shown(version)}; its one version is {_VERSION!r}")
    return st.runtime


_BINARY_DTYPES = {"UINT8": "u1", "FP32": "<f4", "FP64": "<f8", "INT32": "<i4", "INT64": "<i8"}
_INTEGER_DTYPES = {"UINT8", "INT32", "INT64"}


def _channels_last(shape: list[int], i: InputSpec) -> bool:
    """Whether a v2 input's images are laid out [H, W, C] (numpy's and PIL's order, transposed here as
    /predict does) rather than [C, H, W] or flat; any other layout of the same size is refused, not read as
    scrambled pixels."""
    tail = tuple(shape[1:])
    if tail in ((i.channels, i.height, i.width), (_values_per_image(i),)):
        return False
    if i.channels == 1 and tail == (i.height, i.width):
        return False
    if tail == (i.height, i.width, i.channels):
        return True
    grey = f", [N, {i.height}, {i.width}]" if i.channels == 1 else ""
    raise InputError(
        f"inputs[0].shape {shown(shape)}: lay the images out as [N, {i.channels}, {i.height}, {i.width}] "
        f"(N, C, H, W), [N, {i.height}, {i.width}, {i.channels}] (N, H, W, C){grey} or flat "
        f"[N, {_values_per_image(i)}]"
    )


def _binary_tensor(binary: memoryview, t: V2Tensor, count: int) -> np.ndarray:
    """`count` little-endian values of t.datatype from the binary part of the body, as float32."""
    size = (t.parameters or {}).get("binary_data_size")
    if isinstance(size, bool) or not isinstance(size, int) or size != len(binary):
        raise InputError(
            f"inputs[0].parameters.binary_data_size must be the {len(binary)} bytes after the JSON, got {shown(size)}"
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
    except WarmUpStopped:  # shutting down (this task is usually cancelled first)
        pass
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
        rt, built = st.runtime, sorted(st.runtime.prebuild)
        cached = rt.cache.cached()
        kept = "all cached" if cached == built else f"{cached} cached (LCS_CACHE_BYTES)"
        log.info(
            "ready: %s (%s; %s, %d thread%s), alphas %s built and profiled, %s",
            rt.name,
            st.settings.checkpoint,
            st.settings.backend,
            st.settings.threads,
            "" if st.settings.threads == 1 else "s",
            built,
            kept,
        )
        return
    if stop is not None:
        stop()


async def _drain_then(st: State, reads: Reads, stop: Callable[[], None]) -> None:
    """After SIGTERM: wait until every accepted request is answered (at most until the deadline), then stop.
    Requests still queued at the deadline, or whose body is still arriving, get 503 + Retry-After rather than
    a dropped connection (or uvicorn's 500, when it cancels what is left)."""
    assert st.drain_deadline is not None
    try:
        if not await st.batcher.drain(max(0.0, st.drain_deadline - time.monotonic())):
            queued, arriving = st.batcher.abandon(), reads.end()
            st.metrics.shed.labels("not_ready").inc(arriving)  # those abandoned are counted as their routes answer
            log.warning("drain deadline reached; refused %d queued requests and %d still arriving", queued, arriving)
        else:
            since = time.monotonic() - (st.draining_since or time.monotonic())
            log.info("drained: every accepted request answered, %.1f s after SIGTERM", since)
    finally:  # whatever went wrong above, the server still shuts down
        stop()


async def _control_loop(st: State) -> None:
    """A control step every LCS_CONTROL_INTERVAL_SECONDS. One that fails keeps the last ceiling; a failure
    that lasts is logged with its traceback once, then once a minute, and its end once (a signal read that
    kept raising wrote 1,440 lines a minute)."""
    interval = st.settings.control_interval_seconds
    per_minute = max(1, round(60.0 / interval))
    failures = 0
    while True:
        await asyncio.sleep(interval)
        try:
            await st.control_step(time.monotonic())
        except Exception as e:
            failures += 1
            if failures == 1:
                log.exception("control step failed; keeping the last ceiling")
            elif failures % per_minute == 0:
                log.warning("control steps still failing (%d in a row, %s: %s)", failures, type(e).__name__, e)
        else:
            if failures:
                log.info("control steps work again after %d failed", failures)
            failures = 0
        if st.fleet is not None:
            st.fleet.poll()  # in the background: read by the next step, never awaited here
