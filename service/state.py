"""The service's state: what the routes and the HTTP layers share, created in lifespan, and its words for a
refusal under load."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

from fastapi import Depends, Request

from service.batcher import Batcher
from service.cgroups import usable_cpus
from service.controller import Signals
from service.fleet import PrometheusFleet
from service.materialize import release_freed_heap
from service.metrics import Metrics
from service.runtime import Runtime, softmax
from service.settings import Settings
from service.signals import LoopCost, MachineProbe, RequestStats
from service.throttle import Throttle

log = logging.getLogger("lcs.service")

# under memory pressure (LCS_MEMORY_LOW) the cache drops the models not asked for in this long: the alphas the
# controller moves between stay, the rest of the prebuilt grid goes (a float model is rebuilt in 10-34 ms if
# wanted again)
IDLE_MODEL_SECONDS = 10.0


class State:
    """Everything the routes need, created in lifespan (nothing at import time)."""

    def __init__(self, settings: Settings, runtime: Runtime, executor: ThreadPoolExecutor) -> None:
        self.settings = settings
        self.runtime = runtime
        self.metrics = Metrics(settings.slo_p99_seconds, runtime.grid.alphas, runtime.cache)
        self.metrics.ceiling.set(runtime.controller.ceiling)
        self.metrics.deficit.set_function(runtime.controller.deficit)  # read when scraped
        self.executor = executor  # the inference thread: all torch work runs on it
        # Encoded images decode here, one at a time per CPU this process may use. Decoding is CPU-bound, so
        # more threads add nothing but memory: on asyncio's default pool (min(32, the node's CPUs + 4)
        # threads) 24 concurrent requests of one 4096x4096 16-bit PNG (~164 MiB each while it decodes)
        # peaked at 1,277-1,495 MiB on a 2-CPU machine, 746 on this pool. A request waiting here is still
        # counted by the pre-body gate (`parsing`), so a backlog of decodes turns new work away as a queue would.
        self.decoder = ThreadPoolExecutor(max_workers=usable_cpus(), thread_name_prefix="lcs-decode")
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
            models=runtime.cache,
            # an alpha a batch could not wait for is built once wanted as long as the ceiling takes to rise
            settle=runtime.controller.raise_after * settings.control_interval_seconds,
            finish=softmax,
            cap=runtime.controller.cap,
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
        self.body_bytes = 0  # what their bodies may hold: each one's Content-Length (LCS_BODIES_MAX_BYTES)
        self._computed = 0.0  # model seconds since the last control step
        self._computed_since = time.monotonic()
        self._exported: set[str] = set()  # signals with an lcs_signal series
        # memory relief: drops said at most once a minute (a client moving between alphas every 2 s under low
        # memory had a warning every 2 s), the rest counted into the next line; the spell's end said once
        self._relief_said = -math.inf
        self._relief_unsaid = (0, 0)  # models dropped and bytes freed since the last line
        self._memory_low_said = False
        self._wrong_keys = Throttle()  # wrong admin keys: a warning at most once a minute, counting the rest
        # SIGTERM (or shutdown) time: requests received before it are still served, later ones get 503
        self.draining_since: float | None = None
        self.failure: str | None = None  # why the warm-up failed: the service never becomes ready
        self.drain_deadline: float | None = None  # set by SIGTERM: monotonic time by which to be done
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
        if self.fleet is not None and settings.prometheus_timeout_seconds >= settings.control_interval_seconds:
            log.warning(
                "LCS_PROMETHEUS_TIMEOUT_SECONDS=%g is not below LCS_CONTROL_INTERVAL_SECONDS=%g: an answer that "
                "slow comes after the control step that asked for it, and a figure is kept for 1.5 intervals, "
                "so slow answers steer the controller late or not at all; set the timeout below the interval",
                settings.prometheus_timeout_seconds,
                settings.control_interval_seconds,
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

    def refusal_before_body(self, size: int) -> tuple[str, str] | None:
        """(reason, message) if an inference request whose body may hold `size` bytes must be refused before
        its body is read: the queue is full, the bodies being read would hold more than LCS_BODIES_MAX_BYTES
        with this one (unless it is the only one), or what is queued would already take longer than the SLO
        (the deadline of a request that names none) with this request at its smallest, one image. Requests
        already past this gate and still being read count as queued, with the mean images per request: under
        overload hundreds arrive while the queue is momentarily empty, and each would be parsed only to be
        refused. None: read the body."""
        depth = self.batcher.depth + self.parsing
        if depth >= self.settings.queue_max:
            return "queue_full", queue_full_detail(self.settings.queue_max)
        if self.body_bytes and self.body_bytes + size > self.settings.bodies_max_bytes:
            return "bodies_memory", (
                f"the request bodies being read hold {self.body_bytes} bytes, and this one's {size} would pass "
                f"the {self.settings.bodies_max_bytes}-byte bound (LCS_BODIES_MAX_BYTES); retry after a moment"
            )
        if depth > 0:
            slo = self.settings.slo_p99_seconds
            images = self.batcher.queued_images + self.parsing * self.requests.images_per_request + 1
            wait = self.runtime.controller.predicted_wait(math.ceil(images), depth + 1)
            if wait is not None and wait > slo:
                return "predicted_late", late_detail(wait, slo)
        return None

    def parsing_begins(self, scope_state: dict[str, Any], size: int) -> None:
        """The request passed the gate: its body, which may hold `size` bytes, is read and decoded next."""
        self.parsing += 1
        self.body_bytes += size
        scope_state["lcs_parsing"] = size

    def parsed(self, scope_state: dict[str, Any]) -> None:
        """The request's body is read and decoded: it leaves the gate's count (once)."""
        size = scope_state.pop("lcs_parsing", None)
        if size is not None:
            self.parsing -= 1
            self.body_bytes -= size

    def _on_batch(self, alpha: float, images: int, seconds: float, handoff: float) -> None:
        self._computed += seconds
        self.metrics.batch_size.observe(images)
        self.metrics.compute.observe(seconds)
        self.runtime.controller.observe_batch(alpha, images, seconds, handoff)

    def signals(self, now: float) -> Signals:
        rate, per_request, p99, interval_p99 = self.requests.tick(now)
        battery, on_battery = self.probe.battery()
        fleet = self.fleet.current(now) if self.fleet is not None else None
        return Signals(
            now=now,
            queue_depth=self.batcher.depth,
            queued_images=self.batcher.queued_images,
            inflight=self.inflight,
            arrival_rate=rate,
            images_per_request=per_request,
            p99=p99,
            interval_p99=interval_p99,
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
        c = self.runtime.controller
        before, was = c.ceiling, c.pinned
        c.pin(alpha, time.monotonic())
        self._export_ceiling(before)
        if c.pinned is not None:
            log.info("alpha pinned at %g by an operator (PUT /admin/pin)", c.pinned)
        elif was is not None:
            log.info("the pin at %g released by an operator: the controller sets the ceiling again", was)

    def wrong_key(self, client: str, now: float) -> None:
        """A wrong API key on an admin endpoint: said at most once a minute, with how many since the last such
        line (none was logged: 2,000 wrong keys left no trace; a line each would let a guesser flood the log).
        The key itself is never logged."""
        held = self._wrong_keys.passes(now)
        if held is not None:
            more = f" ({held + 1} since the last such line)" if held else ""
            log.warning("admin endpoint: a wrong API key from %s%s", client, more)

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

    async def control_step(self, now: float) -> None:
        """Signals in, the ceiling and the metrics out; where memory is short, the idle models dropped off the
        event loop (dropping 20 models and trimming the heap took 12-34 ms: every request would wait), on the
        loop's default executor (on the decoder pool it waited behind queued images: steps 1.3-4 s apart)."""
        c = self.runtime.controller
        before, capped = c.ceiling, c.battery_limit
        s = self.signals(now)
        c.update(s)
        self._export_ceiling(before)
        if c.battery_limit is not None and capped is None:
            log.warning(
                "on battery at %.0f %%, under LCS_BATTERY_LOW_PERCENT %g: alpha capped at %g (LCS_BATTERY_ALPHA_CAP)",
                s.battery_percent,
                self.settings.battery_low_percent,
                c.battery_limit,
            )
        elif c.battery_limit is None and capped is not None:
            log.info("the battery cap is lifted (charging, back over LCS_BATTERY_LOW_PERCENT, or unreadable)")
        self._export_signals(s)
        if s.memory_available < self.settings.memory_low and self.runtime.ready:  # not what warm-up is building
            await asyncio.get_running_loop().run_in_executor(None, self._relieve_memory, s.memory_available, now)
        elif s.memory_available >= self.settings.memory_low and (self._memory_low_said or self._relief_unsaid[0]):
            unsaid = self._relief_unsaid[0]
            log.info(
                "memory back: %.0f %% available, at or over LCS_MEMORY_LOW %.0f %%%s; idle models stay cached again",
                100 * s.memory_available,
                100 * self.settings.memory_low,
                f" ({unsaid} more model{'s' if unsaid != 1 else ''} dropped since the last line)" if unsaid else "",
            )
            self._memory_low_said, self._relief_unsaid = False, (0, 0)

    def _export_signals(self, s: Signals) -> None:
        for name in SIGNAL_NAMES:  # every signal, from the one definition of what they are
            v = getattr(s, name)
            if v is not None:
                self.metrics.signal.labels(name).set(float(v))
                self._exported.add(name)
            elif name in self._exported:  # unknown now (p99 of a quiet window, fleet figures without
                # Prometheus): no stale value; only a series there is (prometheus-client < 0.22 raises otherwise)
                self.metrics.signal.remove(name)
                self._exported.discard(name)

    def _relieve_memory(self, available: float, now: float) -> None:
        """Memory is short: drop the cached models no batch asked for lately, and hand what they held back to
        the system (a process killed for memory loses every request it holds). The fastest model stays (the
        cache keeps it: Runtime.warm_up): batches that want a dropped alpha run at a built one while the queue
        keeps the inference thread busy, and it is rebuilt when the queue empties."""
        dropped, freed = self.runtime.cache.drop_idle(since=now - IDLE_MODEL_SECONDS)
        if dropped:
            release_freed_heap()
        dropped, freed = dropped + self._relief_unsaid[0], freed + self._relief_unsaid[1]
        if dropped and now - self._relief_said >= 60.0:
            log.warning(
                "memory low (%.0f %% available, under LCS_MEMORY_LOW %.0f %%): dropped %d cached model%s not "
                "asked for in %g s (%.1f MiB)%s; each is built again if asked for",
                100 * available,
                100 * self.settings.memory_low,
                dropped,
                "" if dropped == 1 else "s",
                IDLE_MODEL_SECONDS,
                freed / 2**20,
                " since the last such line" if self._memory_low_said else "",
            )
            self._relief_said, self._memory_low_said, dropped, freed = now, True, 0, 0
        self._relief_unsaid = (dropped, freed)


# async: FastAPI runs a plain `def` dependency in its thread pool, a thread hop on every request
async def get_state(request: Request) -> State:
    return request.app.state.lcs  # type: ignore[no-any-return]


StateDep = Annotated[State, Depends(get_state)]


SIGNAL_NAMES = [f.name for f in dataclasses.fields(Signals) if f.name != "now"]  # lcs_signal{signal}


def late_detail(wait: float, budget: float, left: float | None = None) -> str:
    """`left`: what remains of the budget after reading the request (the wait is compared with it)."""
    over = f"this request's {budget * 1000:.0f} ms budget"
    if left is not None and round(left * 1000) < round(budget * 1000):
        over = f"the {left * 1000:.0f} ms left of {over}"
    return f"the queue would take about {wait * 1000:.0f} ms, over {over}; retry after a moment"


NOT_READY = "the service is starting or shutting down; retry shortly"


def queue_full_detail(queue_max: int) -> str:
    return f"the queue is full ({queue_max} request{'s' if queue_max != 1 else ''}); retry after a moment"


def retry_after(settings: Settings) -> str:
    return str(max(1, round(settings.control_interval_seconds * 2)))
