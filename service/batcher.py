"""Dynamic batching: a bounded queue of requests, served in batches of one alpha each, off the event loop.

How a batch's alpha is chosen: every request carries a *target* grid alpha (its `quality`, snapped
down to the grid) and a *floor* (its `min_quality`, snapped up). The batch is the oldest request plus
the queued requests with the same target, in arrival order, up to `max_batch` images. The batch then
runs at `controller.batch_alpha(target, max floor, images, slack, requests)`: the target capped by the
ceiling, lowered further only as far as the most urgent deadline needs (and only where the model, not
request handling, is the slower stage for the batch), never below any floor. The slack counts to each
request's *due* time: its deadline less a reserve, a share (`reserve`) of its time budget kept for
requests that arrive while the batch runs, for prediction error and for the response path. It is the
tighter of two: the earliest due time in the batch, and the earliest due time still queued behind it
less the time the queue behind needs at its cheapest (so a batch served slowly does not make the
requests after it late); requests received but still being read count as queued behind, sized like
the batch's and due no earlier. No request is ever served more accurately than it asked.

A model that is not built (never prebuilt, or dropped by the cache under memory pressure or evicted)
takes 35-300 ms to build (a float model built before, 10-34 ms: `Runtime._build`), and the slack counts
that: if the alpha chosen is not built, the batch runs at the alpha chosen with each unbuilt alpha's
build time added to its predicted time (the same alpha where the slack affords the build, which the
batch then does; otherwise the largest lower one whose time, its build included, fits; where none
fits, the alpha done soonest, which may be above a dropped floor). The capped target is then built on
the inference thread once the queue is empty and it has been wanted for `settle` seconds, unless the
ceiling has fallen below it meanwhile or a drain has begun. So no batch waits for a build it has no
time for, and the alpha the load allows comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

log = logging.getLogger("lcs.service")

# how often an empty queue with a wanted build looks again while a request is still being read
PENDING_POLL_SECONDS = 0.01


class QueueFull(Exception):
    """The bounded queue is full: answer 429 with Retry-After."""


class Draining(Exception):
    """The service is shutting down and takes no new work."""


class ClientLeft(Exception):
    """The job's client disconnected while it was queued: dropped, not computed (no one would read it)."""


class Capped(Exception):
    """An operator's pin or the low-battery cap fell below the job's floor while it was queued: refused as it
    would have been on arrival, since its batch would run above the cap (with every request batched with it)."""


@dataclass(eq=False)  # identity equality: deque.remove() must not compare tensors field by field
class Job:
    x: np.ndarray  # [n, C, H, W] normalised float32 (numpy: no torch work on the event loop, see service.inputs)
    target: float  # grid alpha asked for (quality capped by nothing yet)
    floor: float  # lowest grid alpha acceptable
    deadline: float | None  # absolute time.monotonic() by which the answer is due, if any
    enqueued: float = field(default_factory=time.monotonic)
    future: asyncio.Future[Result] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    arrived: float | None = None  # when the request arrived, from which its budget counts (default: enqueued)
    left: Callable[[], bool] | None = None  # whether its client has disconnected, asked without waiting
    images: int = field(init=False)

    def __post_init__(self) -> None:
        self.images = int(self.x.shape[0])

    def due(self, reserve: float) -> float | None:
        """The time to aim for: the deadline less `reserve` (a share) of the request's whole time budget,
        counted from its arrival (from its enqueueing, the reserve shrank by the time spent parsing)."""
        if self.deadline is None:
            return None
        start = self.enqueued if self.arrived is None else self.arrived
        return self.deadline - reserve * (self.deadline - start)


@dataclass(frozen=True)
class Result:
    outputs: np.ndarray  # [n, ...]: this request's rows of the batch's output (`finish`ed: the probabilities)
    alpha: float
    queue_seconds: float
    compute_seconds: float
    batch_images: int


class Models(Protocol):
    """What the batcher asks of the model cache (`service.cache.ModelCache`)."""

    # alpha's model if it is built, without building it; `touch`: counted as used now (a batch will run it)
    def peek(self, alpha: float, *, touch: bool = False) -> object | None: ...

    def wait(self, alpha: float) -> float: ...  # seconds before alpha can run: 0 if built, else its build time

    # builds alpha's model if it is not built; counted: a hit or a miss in the cache's figures
    def get(self, alpha: float, *, counted: bool = True) -> object: ...


class Batcher:
    def __init__(
        self,
        run: Callable[[float, np.ndarray], np.ndarray],
        # (target, floor, images, slack, requests, wait) -> alpha: see Controller.batch_alpha
        choose: Callable[[float, float, int, float | None, int, Callable[[float], float] | None], float],
        executor: Executor,
        *,
        max_batch: int,
        max_wait: float,
        queue_max: int,
        # (alpha, images, model seconds, hand-off seconds) after each batch
        on_batch: Callable[[float, int, float, float], None] | None = None,
        behind: Callable[[int, int], float | None] | None = None,
        reserve: float = 0.0,
        pending: Callable[[], int] | None = None,
        models: Models | None = None,
        settle: float = 0.0,
        finish: Callable[[np.ndarray], np.ndarray] | None = None,
        cap: Callable[[], float | None] | None = None,
    ) -> None:
        self._run = run  # (alpha, x) -> outputs; called in the executor
        # outputs -> what each request gets its rows of; once per batch, on the event loop; if it raises, every
        # request in the batch gets the error
        self._finish = finish
        self._cap = cap  # () -> the alpha a pin or the battery holds batches to whatever the load, or None
        self._choose = choose
        self._executor = executor
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.queue_max = queue_max
        self._queue: deque[Job] = deque()
        self._queued_images = 0  # kept, not summed: admission reads it for every request
        self._wake = asyncio.Event()
        self._on_batch = on_batch
        self._behind = behind  # (images, requests) queued -> seconds to serve them at the cheapest alpha
        self.reserve = reserve  # share of each request's time budget kept out of the slack
        self._pending = pending  # requests received but not yet queued (being read or decoded)
        self._models = models  # None: every alpha counts as built
        self.wanted: float | None = None  # an alpha to build once the queue is empty, wanted since `_wanted_at`
        self._wanted_at = 0.0
        self.settle = settle  # seconds an alpha must stay wanted before it is built (see `_alpha`)
        self.closed = False  # set when a drain ends: no job is taken after it
        self.draining = False  # set when a drain starts: no wanted model is built after it
        self.running = 0  # jobs in the batch being computed
        self._current: list[Job] = []  # the batch being served, failed as a whole on an unexpected error

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def submit(self, job: Job) -> asyncio.Future[Result]:
        if self.closed:
            raise Draining
        if len(self._queue) >= self.queue_max:
            raise QueueFull
        self._queue.append(job)
        self._queued_images += job.images
        self._wake.set()
        return job.future

    def _take(self) -> list[Job]:
        """The next batch: the oldest job and those after it that ask for its alpha, up to max_batch images.
        A job it would take that its caller cancelled, or whose client has left (`ClientLeft`), is dropped
        instead: its answer would be read by no one, and under overload those are the requests whose clients
        gave up waiting. So is one whose floor a pin or the battery cap has fallen below since it was queued
        (`Capped`): the batch would run at its floor, above the cap, with every request taken with it."""
        target: float | None = None
        batch: list[Job] = []
        images = 0
        cap = self._cap() if self._cap is not None else None
        for job in list(self._queue):
            if target is not None and job.target != target:
                continue
            if batch and images + job.images > self.max_batch:
                break
            gone = job.future.done()  # its caller cancelled it
            if not gone and job.left is not None and job.left():
                job.future.set_exception(ClientLeft())
                gone = True
            if not gone and cap is not None and job.floor > cap:
                job.future.set_exception(Capped())
                gone = True
            if gone:
                self._queue.remove(job)
                self._queued_images -= job.images
                continue
            target = job.target
            batch.append(job)
            images += job.images
        for job in batch:
            self._queue.remove(job)
        self._queued_images -= images
        return batch

    async def run_forever(self) -> None:
        """Serve batches until cancelled. An unexpected error fails the batch in hand, never the loop."""
        while True:
            try:
                await self._serve_next()
            except Exception as e:
                log.exception("batcher error; failing the current batch and carrying on")
                for j in self._current:
                    if not j.future.done():
                        j.future.set_exception(e)
            finally:
                self._current = []

    async def _serve_next(self) -> None:
        loop = asyncio.get_running_loop()
        if not self._queue:
            self._wake.clear()
            if self.wanted is None or self.draining:  # a build would only delay the exit
                await self._wake.wait()
                return
            settled = self._wanted_at + self.settle - time.monotonic()
            if settled <= 0 and self._pending is not None and self._pending():
                # a request is being read: serve it first. It may never be queued (a 4xx on its body, a 429
                # once decoded), and then no submit wakes the batcher: look again shortly instead
                settled = PENDING_POLL_SECONDS
            if settled > 0:  # wake for a request, or to build once it has settled
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), settled)
                return
            await self._build_wanted(loop)
            return
        head = self._queue[0]
        wait = head.enqueued + self.max_wait - time.monotonic()
        if wait > 0 and self.queued_images < self.max_batch:
            await asyncio.sleep(wait)  # give a partial batch a moment to fill
            if not self._queue:  # a drain that timed out abandoned it meanwhile
                return
        batch = self._take()
        self._current = batch
        if not batch:
            return
        images = sum(j.images for j in batch)
        now = time.monotonic()
        due = [d for j in batch if (d := j.due(self.reserve)) is not None]
        slack = min(due) - now if due else None
        later = [d for j in self._queue if (d := j.due(self.reserve)) is not None]
        pending = self._pending() if self._pending is not None else 0
        if pending and due:  # received, not yet queued: due no earlier than this batch, sized like it
            later.append(min(due))
        if later and self._behind is not None:
            extra = math.ceil(pending * images / len(batch))
            rest = self._behind(self.queued_images + extra, len(self._queue) + pending)
            if rest is not None:
                behind = min(later) - now - rest
                slack = behind if slack is None else min(slack, behind)
        alpha = self._alpha(batch[0].target, max(j.floor for j in batch), images, slack, len(batch))
        x = np.concatenate([j.x for j in batch]) if len(batch) > 1 else batch[0].x
        self.running = len(batch)
        t0 = time.monotonic()
        try:
            out, model_seconds, build_seconds = await loop.run_in_executor(self._executor, self._timed, alpha, x)
            if self._finish is not None:
                out = self._finish(out)
        except Exception as e:  # the model failed: every request in the batch gets the error
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(e)
            return
        finally:
            self.running = 0
        compute = time.monotonic() - t0
        if self._on_batch:
            self._on_batch(alpha, images, model_seconds, compute - model_seconds - build_seconds)
        i = 0
        for j in batch:
            if not j.future.done():
                j.future.set_result(Result(out[i : i + j.images], alpha, t0 - j.enqueued, compute, images))
            i += j.images

    def _alpha(self, target: float, floor: float, images: int, slack: float | None, requests: int) -> float:
        """The batch's alpha (see the module's doc): the one chosen as if every model were built, if it is;
        else the one chosen counting the time to build each that is not. Where that runs the batch lower,
        the capped target (the ceiling's alpha, where the load is going) is wanted if it is not built, and
        built once it has been wanted for `settle` seconds: as load rises the ceiling steps down an alpha an
        interval, and building each (about 0.1 s, every request arriving meanwhile waiting) stalled the
        service into the next step (one-off, 64-image requests at 1.5x capacity: builds at four ceilings in
        2 s, 94 % within the SLO). The alphas the slack rule picks batch by batch are not built for later."""
        alpha = self._choose(target, floor, images, slack, requests, None)
        # touched: memory relief, on another thread, drops models idle for a while, and this one is about to run
        if self._models is None or self._models.peek(alpha, touch=True) is not None:
            return alpha
        served = self._choose(target, floor, images, slack, requests, self._models.wait)
        self._models.peek(served, touch=True)  # chosen as built, most likely (its wait counted as none)
        if served == alpha:
            return served
        top = self._choose(target, floor, images, None, requests, None)
        if top != self.wanted and self._models.peek(top) is None:
            self.wanted, self._wanted_at = top, time.monotonic()
        return served

    async def _build_wanted(self, loop: asyncio.AbstractEventLoop) -> None:
        """Build the alpha a batch wanted and ran below (the queue is empty), unless the ceiling has fallen
        below it since: batches capped lower, at a built alpha, no longer want it, and building it would hold
        the inference thread for nothing while the load that lowered the ceiling arrives. A failure is
        logged: the batch that next chooses the alpha builds it itself and gets the error."""
        alpha, self.wanted = self.wanted, None
        if self._models is None or alpha is None or self._models.peek(alpha) is not None:
            return
        if self._choose(alpha, 0.0, 1, None, 1, None) != alpha:  # with no slack: alpha capped by the ceiling
            return
        try:
            await loop.run_in_executor(self._executor, functools.partial(self._models.get, alpha, counted=False))
        except Exception:
            log.exception("building alpha %g while the queue was empty failed", alpha)

    def _timed(self, alpha: float, x: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Run the model and time it in the worker thread: (logits, model seconds, build seconds). The time a
        batch spends handed between threads (waiting for the GIL while the event loop holds it) is the same at
        every alpha, so it must not count as model time; nor a build this batch makes first (its alpha dropped
        under memory pressure, evicted, or never built): a build is not the machine's pace (a 60 ms rebuild read
        as alpha 1 at 20x its profile, and the ceiling, no longer letting alpha 1 run, never learned better)."""
        t0 = time.perf_counter()
        if self._models is not None:
            self._models.get(alpha)  # the batch's one counted lookup: a hit, or a miss that builds it first
        t1 = time.perf_counter()
        out = self._run(alpha, x)
        return out, time.perf_counter() - t1, t1 - t0

    def abandon(self) -> int:
        """Fail every queued (not yet running) job with Draining, so each still gets an answer; returns how many."""
        n = 0
        while self._queue:
            job = self._queue.popleft()
            self._queued_images -= job.images
            if not job.future.done():
                job.future.set_exception(Draining())
                n += 1
        return n

    async def drain(self, timeout: float) -> bool:
        """Wait (up to `timeout` s) until every job is answered, those still being received (`pending`)
        included, then close: `submit` refuses from then on. Which requests may still submit meanwhile is
        the caller's to decide (the app: those received before SIGTERM). True if nothing was left, nor
        still being received."""

        def left() -> bool:
            return bool(self._queue or self.running or (self._pending is not None and self._pending()))

        self.draining = True
        end = time.monotonic() + timeout
        while left() and time.monotonic() < end:
            await asyncio.sleep(0.01)
        self.closed = True
        return not left()
