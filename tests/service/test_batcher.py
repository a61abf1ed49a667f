"""service.batcher, driven directly with a fake model whose output rows say which input they came from."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from service.batcher import Batcher, Draining, Job, QueueFull, Result
from tests.service.service_support import until

MAX_BATCH = 8
Wait = Callable[[float], float] | None  # Controller.batch_alpha's build waits


def run_async(scenario: Callable[[], Awaitable[None]], timeout: float = 20.0) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(scenario(), timeout)

    asyncio.run(bounded())


@dataclass
class FakeModel:
    """run(alpha, x) -> [n, 2]: column 0 is the input's id (x is filled with it), column 1 the alpha.

    Records every batch; can be held (the first call waits for `gate`) and made to fail."""

    hold_first: bool = False
    fail_when: Callable[[int, float], bool] = lambda call, alpha: False
    gate: threading.Event = field(default_factory=threading.Event)
    batches: list[tuple[float, list[float]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, alpha: float, x: np.ndarray) -> np.ndarray:
        with self.lock:
            call = len(self.batches)
            self.batches.append((alpha, x[:, 0, 0, 0].tolist()))
        if self.hold_first and call == 0:
            assert self.gate.wait(10), "the test never released the model"
        if self.fail_when(call, alpha):
            raise RuntimeError(f"model failed on batch {call}")
        return np.stack([x[:, 0, 0, 0], np.full(len(x), alpha, dtype=np.float32)], axis=1)


def choose_target(
    target: float, floor: float, images: int, slack: float | None, requests: int, wait: Wait = None
) -> float:
    return target


def job(
    ident: float, *, images: int = 1, target: float = 1.0, floor: float = 0.0, deadline: float | None = None
) -> Job:
    """A job whose images are all filled with `ident` (+ 0.01 * i for its i-th image)."""
    x = np.stack([np.full((1, 2, 2), ident + 0.01 * i, dtype=np.float32) for i in range(images)])
    return Job(x, target, floor, deadline)


def make_batcher(
    model: FakeModel,
    choose: Callable[[float, float, int, float | None, int, Wait], float] = choose_target,
    *,
    max_batch: int = MAX_BATCH,
    queue_max: int = 1000,
    max_wait: float = 0.0,
    **options: Any,  # behind, reserve, pending
) -> tuple[Batcher, ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=1)
    batcher = Batcher(model, choose, executor, max_batch=max_batch, max_wait=max_wait, queue_max=queue_max, **options)
    return batcher, executor


@dataclass
class SlackProbe:
    """A `choose` that records each batch's slack (and keeps the target), and a `behind` that records
    what the queue behind a batch was asked to cost and answers `behind_seconds`."""

    behind_seconds: float = 0.0
    seen: list[float | None] = field(default_factory=list)
    asked: list[tuple[int, int]] = field(default_factory=list)

    def choose(
        self, target: float, floor: float, images: int, slack: float | None, requests: int, wait: Wait = None
    ) -> float:
        self.seen.append(slack)
        return target

    def behind(self, images: int, requests: int) -> float:
        self.asked.append((images, requests))
        return self.behind_seconds


async def started(batcher: Batcher) -> asyncio.Task[None]:
    task = asyncio.create_task(batcher.run_forever())
    await asyncio.sleep(0)
    return task


async def stop(task: asyncio.Task[None], executor: ThreadPoolExecutor) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    executor.shutdown(wait=True)


def ids(result: Result) -> list[float]:
    return [round(v, 4) for v in result.outputs[:, 0].tolist()]


# -----------------------------------------------------------------------------------------------


def test_concurrent_requests_each_get_their_own_rows() -> None:
    async def scenario() -> None:
        model = FakeModel(hold_first=True)
        batcher, executor = make_batcher(model)
        task = await started(batcher)
        first = batcher.submit(job(100.0))
        await until(lambda: len(model.batches) == 1, what="the first batch to start")
        # while the model is busy, 30 requests of 1-3 images arrive
        jobs = [job(float(i), images=1 + i % 3) for i in range(30)]
        futures = [batcher.submit(j) for j in jobs]
        assert batcher.depth == 30
        model.gate.set()
        results = await asyncio.gather(first, *futures)
        await stop(task, executor)

        assert ids(results[0]) == [100.0]
        for j, r in zip(jobs, results[1:], strict=True):
            ident = float(j.x[0, 0, 0, 0])
            assert ids(r) == [round(ident + 0.01 * k, 4) for k in range(j.images)]
            assert r.outputs.shape == (j.images, 2)
        sizes = [len(rows) for _, rows in model.batches]
        assert max(sizes) <= MAX_BATCH
        assert max(sizes) > 1  # they were actually batched
        assert sum(sizes) == 1 + sum(j.images for j in jobs)
        # every result knows the size of the batch it rode in
        for r in results[1:]:
            assert r.batch_images in sizes and r.batch_images <= MAX_BATCH

    run_async(scenario)


def test_requests_with_different_targets_are_never_batched_together() -> None:
    async def scenario() -> None:
        model = FakeModel(hold_first=True)
        batcher, executor = make_batcher(model)
        task = await started(batcher)
        head = batcher.submit(job(-1.0, target=0.25))
        await until(lambda: len(model.batches) == 1, what="the first batch to start")
        targets = [1.0, 0.5, 0.5, 1.0, 0.25, 1.0, 0.5, 0.5, 1.0, 1.0, 0.25, 0.5]
        jobs = [job(float(i), target=t) for i, t in enumerate(targets)]
        futures = [batcher.submit(j) for j in jobs]
        model.gate.set()
        results = await asyncio.gather(head, *futures)
        await stop(task, executor)

        by_id = {float(j.x[0, 0, 0, 0]): j.target for j in jobs} | {-1.0: 0.25}
        for alpha, rows in model.batches:
            assert {by_id[r] for r in rows} == {alpha}, (alpha, rows)
        for j, r in zip(jobs, results[1:], strict=True):
            assert r.alpha == j.target
            assert r.outputs[0, 1] == j.target
        # the oldest request goes first, and same-target requests keep their arrival order
        assert model.batches[1] == (1.0, [0.0, 3.0, 5.0, 8.0, 9.0])
        assert model.batches[2] == (0.5, [1.0, 2.0, 6.0, 7.0, 11.0])
        assert model.batches[3] == (0.25, [4.0, 10.0])

    run_async(scenario)


def test_batches_are_filled_up_to_max_batch_in_arrival_order() -> None:
    async def scenario() -> None:
        model = FakeModel()
        batcher, executor = make_batcher(model, max_batch=4)
        jobs = [job(float(i), images=n) for i, n in enumerate([2, 1, 2, 3, 1, 4])]
        futures = [batcher.submit(j) for j in jobs]  # all queued before the batcher starts
        task = await started(batcher)
        await asyncio.gather(*futures)
        await stop(task, executor)
        # 2+1 fit and the next 2 does not; 2 then 3 does not fit; 3+1 fit and 4 does not; 4
        assert [[int(v) for v in rows] for _, rows in model.batches] == [[0, 0, 1], [2, 2], [3, 3, 3, 4], [5] * 4]

    run_async(scenario)


async def head_then_two_batches(batcher: Batcher, model: FakeModel) -> list[Result | BaseException]:
    """What each of seven requests gets: one the model holds (`hold_first`), then three at alpha 0.5 and
    three at 1, queued behind it, so that each three make one batch."""
    head = batcher.submit(job(-1.0))
    await until(lambda: len(model.batches) == 1, what="the first batch to start")
    doomed = [batcher.submit(job(float(i), target=0.5)) for i in range(3)]
    fine = [batcher.submit(job(float(10 + i), target=1.0)) for i in range(3)]
    model.gate.set()
    return await asyncio.gather(head, *doomed, *fine, return_exceptions=True)


def test_a_failing_batch_fails_only_its_requests_and_the_batcher_keeps_serving() -> None:
    async def scenario() -> None:
        model = FakeModel(hold_first=True, fail_when=lambda call, alpha: alpha == 0.5)
        batcher, executor = make_batcher(model)
        task = await started(batcher)
        outcomes = await head_then_two_batches(batcher, model)
        assert isinstance(outcomes[0], Result)
        for o in outcomes[1:4]:
            assert isinstance(o, RuntimeError) and "model failed" in str(o)
        assert [ids(o) for o in outcomes[4:]] == [[10.0], [11.0], [12.0]]  # type: ignore[arg-type]
        later = await batcher.submit(job(42.0))  # still alive after the failure
        assert ids(later) == [42.0]
        assert batcher.running == 0 and batcher.depth == 0
        await stop(task, executor)

    run_async(scenario)


def test_finish_runs_once_per_batch_on_the_loop_and_its_error_fails_only_that_batch() -> None:
    """`finish` (the service's softmax) takes a whole batch's outputs once, not each request's rows."""
    finished: list[tuple[int, bool]] = []
    loop_thread = threading.get_ident()

    def finish(out: np.ndarray) -> np.ndarray:
        finished.append((len(out), threading.get_ident() == loop_thread))
        if (out[:, 1] == 0.5).any():  # FakeModel's second column: the batch's alpha
            raise ValueError("not finite")
        return out * 10

    async def scenario() -> None:
        model = FakeModel(hold_first=True)
        batcher, executor = make_batcher(model, finish=finish)
        task = await started(batcher)
        outcomes = await head_then_two_batches(batcher, model)
        assert ids(outcomes[0]) == [-10.0]  # type: ignore[arg-type]
        assert all(isinstance(o, ValueError) for o in outcomes[1:4])
        assert [ids(o) for o in outcomes[4:]] == [[100.0], [110.0], [120.0]]  # type: ignore[arg-type]
        await stop(task, executor)

    run_async(scenario)
    assert finished == [(1, True), (3, True), (3, True)]


def test_choose_gets_the_highest_floor_and_the_tightest_slack() -> None:
    seen: list[tuple[float, float, int, float | None, int]] = []

    def choose(
        target: float, floor: float, images: int, slack: float | None, requests: int, wait: Wait = None
    ) -> float:
        seen.append((target, floor, images, slack, requests))
        return floor

    async def scenario() -> None:
        batcher, executor = make_batcher(FakeModel(), choose)
        now = time.monotonic()
        futures = [
            batcher.submit(job(1.0, target=1.0, floor=0.25, deadline=now + 5.0)),
            batcher.submit(job(2.0, images=2, target=1.0, floor=0.5, deadline=now + 1.0)),
            batcher.submit(job(3.0, target=1.0, floor=0.0)),
        ]
        task = await started(batcher)
        results = await asyncio.gather(*futures)
        await stop(task, executor)
        assert len(seen) == 1  # one batch of all three
        target, floor, images, slack, requests = seen[0]
        assert (target, floor, images, requests) == (1.0, 0.5, 4, 3)
        assert slack is not None and 0.0 < slack <= 1.0  # the 1 s deadline, not the 5 s one
        assert all(r.alpha == 0.5 for r in results)  # the batch runs at what choose said

    run_async(scenario)  # (it was never run: a batch's floor taken from its first request passed)


def test_the_queue_behind_a_batch_tightens_its_slack() -> None:
    """A batch must leave time for the requests queued after it: its slack is the earliest deadline behind
    it less what the queue behind needs (here 5 s for 3 images in 2 requests). Seconds are tens: the checks
    allow for a machine that stalls the batcher a tenth of a second or more (seen here)."""
    probe = SlackProbe(5.0)

    async def scenario() -> None:
        batcher, executor = make_batcher(FakeModel(), probe.choose, max_batch=2, behind=probe.behind)
        now = time.monotonic()
        futures = [
            batcher.submit(job(1.0, images=2, deadline=now + 50.0)),  # the first batch (2 images)
            batcher.submit(job(2.0, images=2, deadline=now + 10.0)),  # behind it, due in 10 s
            batcher.submit(job(3.0, deadline=now + 90.0)),
        ]
        task = await started(batcher)
        await asyncio.gather(*futures)
        await stop(task, executor)
        seen = probe.seen
        assert probe.asked[0] == (3, 2)
        assert seen[0] is not None and 3.0 < seen[0] <= 5.0  # 10 s - 5 s, not the batch's own 50 s
        assert seen[-1] is not None and seen[-1] > 80.0  # the last batch has nothing behind it

    run_async(scenario)


def test_the_slack_keeps_a_share_of_each_budget_in_reserve() -> None:
    """With a reserve of 0.25, a request queued with 10 s to its deadline gives its batch 7.5 s of slack,
    and one queued behind it with 20 s leaves 15 s less what the queue behind needs (seconds in tens, as
    above)."""
    probe = SlackProbe(1.0)

    async def scenario() -> None:
        batcher, executor = make_batcher(FakeModel(), probe.choose, max_batch=1, behind=probe.behind, reserve=0.25)
        now = time.monotonic()
        first, second = job(1.0), job(2.0)
        first.enqueued = second.enqueued = now
        first.deadline, second.deadline = now + 10.0, now + 20.0
        futures = [batcher.submit(first), batcher.submit(second)]
        task = await started(batcher)
        await asyncio.gather(*futures)
        await stop(task, executor)
        assert first.due(0.25) == pytest.approx(now + 7.5, abs=1e-9) and job(3.0).due(0.25) is None
        seen = probe.seen
        assert seen[0] is not None and 6.5 < seen[0] <= 7.5  # min(7.5, 15 - 1)
        assert seen[1] is not None and 14.0 < seen[1] <= 15.0

    run_async(scenario)


def test_requests_still_being_read_count_as_queued_behind() -> None:
    """Nothing queued, but 3 requests received and still being read: the batch of 2 images in 1 request
    leaves room for 3 more like it (6 images), due no earlier than its own deadline (seconds in tens, as above)."""
    probe = SlackProbe(3.0)

    async def scenario() -> None:
        batcher, executor = make_batcher(FakeModel(), probe.choose, behind=probe.behind, pending=lambda: 3)
        fut = batcher.submit(job(1.0, images=2, deadline=time.monotonic() + 10.0))
        task = await started(batcher)
        await fut
        await stop(task, executor)
        assert probe.asked == [(6, 3)]
        assert probe.seen[0] is not None and 6.0 < probe.seen[0] <= 7.0  # 10 s - 3 s

    run_async(scenario)


def test_no_deadline_means_no_slack() -> None:
    probe = SlackProbe()

    async def scenario() -> None:
        batcher, executor = make_batcher(FakeModel(), probe.choose)
        fut = batcher.submit(job(1.0))
        task = await started(batcher)
        await fut
        await stop(task, executor)

    run_async(scenario)
    assert probe.seen == [None]


def test_full_queue_refuses_and_accepts_again_once_drained() -> None:
    async def scenario() -> None:
        model = FakeModel(hold_first=True)
        batcher, executor = make_batcher(model, queue_max=2)
        task = await started(batcher)
        running = batcher.submit(job(0.0))
        await until(lambda: len(model.batches) == 1, what="the first batch to start")
        queued = [batcher.submit(job(1.0)), batcher.submit(job(2.0))]  # the one running does not count
        with pytest.raises(QueueFull):
            batcher.submit(job(3.0))
        assert batcher.depth == 2
        model.gate.set()
        await asyncio.gather(running, *queued)
        assert ids(await batcher.submit(job(4.0))) == [4.0]
        await stop(task, executor)

    run_async(scenario)


def test_queued_images_counts_what_waits_through_submit_batch_and_abandon() -> None:
    async def scenario() -> None:
        model = FakeModel(hold_first=True)
        batcher, executor = make_batcher(model)
        task = await started(batcher)
        running = batcher.submit(job(0.0, images=3))
        await until(lambda: len(model.batches) == 1, what="the first batch to start")
        assert batcher.queued_images == 0  # the running batch is not queued
        futures = [batcher.submit(job(1.0, images=2)), batcher.submit(job(2.0, images=5, target=0.5))]
        futures.append(batcher.submit(job(3.0, images=4)))
        assert batcher.queued_images == 11
        model.gate.set()
        await running
        await until(lambda: len(model.batches) >= 2, what="the next batch")
        left = batcher.queued_images
        assert left == sum(j.images for j in batcher._queue) < 11
        batcher.abandon()
        assert batcher.depth == batcher.queued_images == 0
        await asyncio.gather(*futures, return_exceptions=True)
        await stop(task, executor)

    run_async(scenario)


def test_cancelled_requests_are_dropped_before_running() -> None:
    async def scenario() -> None:
        model = FakeModel(hold_first=True)
        batcher, executor = make_batcher(model)
        task = await started(batcher)
        head = batcher.submit(job(0.0))
        await until(lambda: len(model.batches) == 1, what="the first batch to start")
        gone = batcher.submit(job(1.0))
        kept = batcher.submit(job(2.0))
        gone.cancel()  # the client went away while queued
        model.gate.set()
        await asyncio.gather(head, kept)
        await stop(task, executor)
        assert [rows for _, rows in model.batches] == [[0.0], [2.0]]

    run_async(scenario)


def test_a_job_whose_client_left_is_dropped_when_its_batch_forms_and_frees_its_place() -> None:
    """Asked once, when the batch would take it: it fails with ClientLeft, is not computed, and counts neither
    against max_batch nor as queued; the batch takes its alpha from the first job still wanted."""

    async def scenario() -> None:
        model = FakeModel(hold_first=True)
        batcher, executor = make_batcher(model, max_batch=4)
        task = await started(batcher)
        head = batcher.submit(job(0.0))
        await until(lambda: len(model.batches) == 1, what="the first batch to start")
        asked: list[float] = []

        def leaving(ident: float, gone: bool, **kw: Any) -> Job:
            def left() -> bool:
                asked.append(ident)
                return gone

            j = job(ident, **kw)
            j.left = left
            return j

        futures = [
            batcher.submit(leaving(1.0, True, images=3, target=0.5)),  # the oldest, gone: its alpha is not used
            batcher.submit(leaving(2.0, False, images=3)),
            batcher.submit(leaving(3.0, True, images=1)),
            batcher.submit(leaving(4.0, False, images=1)),
        ]
        assert batcher.queued_images == 8
        model.gate.set()
        results = await asyncio.gather(head, *futures, return_exceptions=True)
        await stop(task, executor)
        assert [type(r).__name__ for r in results[1:]] == ["ClientLeft", "Result", "ClientLeft", "Result"]
        rows = [[round(v, 2) for v in batch] for _, batch in model.batches]
        assert rows == [[0.0], [2.0, 2.01, 2.02, 4.0]]  # 3 + 1 images: the two that left took no place
        assert results[2].alpha == 1.0  # type: ignore[union-attr]
        assert sorted(asked) == [1.0, 2.0, 3.0, 4.0] and batcher.queued_images == 0

    run_async(scenario)


def test_drain_finishes_all_work_including_requests_still_arriving_then_closes() -> None:
    """Which requests may still submit during a drain is the app's call (those received before SIGTERM);
    the drain waits for them (`pending`: received, not yet queued) and for everything queued or running."""

    async def scenario() -> None:
        model = FakeModel(hold_first=True)
        arriving = [1]  # one request whose body is still being read
        batcher, executor = make_batcher(model, pending=lambda: arriving[0])
        task = await started(batcher)
        accepted = [batcher.submit(job(float(i))) for i in range(3)]
        await until(lambda: len(model.batches) == 1, what="the first batch to start")
        drain = asyncio.create_task(batcher.drain(timeout=10.0))
        await asyncio.sleep(0)
        model.gate.set()
        await asyncio.gather(*accepted)
        await asyncio.sleep(0.05)
        assert not drain.done()  # the request still arriving has not been queued yet
        arriving[0] = 0
        accepted.append(batcher.submit(job(9.0)))  # it arrives and is queued, during the drain
        assert await drain is True
        assert all(f.done() and not f.cancelled() and f.exception() is None for f in accepted)
        with pytest.raises(Draining):  # closed once the drain is over
            batcher.submit(job(10.0))
        await stop(task, executor)

    run_async(scenario)


def test_drain_times_out_when_work_is_stuck() -> None:
    async def scenario() -> None:
        model = FakeModel(hold_first=True)
        batcher, executor = make_batcher(model)
        task = await started(batcher)
        fut = batcher.submit(job(0.0))
        await until(lambda: len(model.batches) == 1, what="the first batch to start")
        assert await batcher.drain(timeout=0.05) is False
        model.gate.set()
        await fut
        await stop(task, executor)

    run_async(scenario)


def test_drain_times_out_while_a_request_is_still_being_received() -> None:
    """Nothing queued or running, but a request still being read at the deadline: the drain did not
    finish (the app logs it), and that request is refused when it tries to queue."""

    async def scenario() -> None:
        batcher, executor = make_batcher(FakeModel(), pending=lambda: 1)
        task = await started(batcher)
        assert await batcher.drain(timeout=0.05) is False
        with pytest.raises(Draining):
            batcher.submit(job(0.0))
        await stop(task, executor)

    run_async(scenario)


def test_a_queue_abandoned_while_a_partial_batch_waits_is_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    """With max_wait, the batcher sleeps before taking a partial batch; a drain that times out may empty the
    queue meanwhile (`abandon`). It used to take from the empty queue: IndexError, logged as a batcher error."""

    async def scenario() -> None:
        batcher, executor = make_batcher(FakeModel(), max_wait=0.2)
        task = await started(batcher)
        fut = batcher.submit(job(0.0))
        await asyncio.sleep(0.02)  # the batcher is waiting for company
        assert batcher.abandon() == 1
        with pytest.raises(Draining):
            await fut
        await asyncio.sleep(0.3)  # past the wait
        await stop(task, executor)

    with caplog.at_level(logging.ERROR):
        run_async(scenario)
    assert "batcher error" not in caplog.text


def test_the_reserve_is_a_share_of_the_whole_budget_counted_from_arrival() -> None:
    """100 ms budget, reserve 0.4: due 40 ms before the deadline however long the body took to parse (it
    was 40 / 28 / 16 / 4 ms for 0 / 30 / 60 / 90 ms of parsing, counted from the enqueueing)."""

    async def scenario() -> None:
        for parsed_after in (0.0, 0.03, 0.06, 0.09):
            j = Job(np.zeros((1, 1, 2, 2), np.float32), 1.0, 0.0, 100.1, 100.0 + parsed_after, arrived=100.0)
            assert j.due(0.4) == pytest.approx(100.1 - 0.04)
        legacy = Job(np.zeros((1, 1, 2, 2), np.float32), 1.0, 0.0, 100.1, 100.0)  # no arrival given
        assert legacy.due(0.4) == pytest.approx(100.1 - 0.04)

    run_async(scenario)


@dataclass
class FakeModels:
    """The model cache as the batcher sees it: which alphas are built, what a build would take, building."""

    built: set[float]
    build_seconds: float
    log: list[tuple[str, float]]
    hits: int = 0
    misses: int = 0
    touched: list[float] = field(default_factory=list)  # the built alphas a batch chose, as used

    def peek(self, alpha: float, *, touch: bool = False) -> object | None:
        if touch and alpha in self.built:
            self.touched.append(alpha)
        return alpha if alpha in self.built else None

    def wait(self, alpha: float) -> float:
        return 0.0 if alpha in self.built else self.build_seconds

    def get(self, alpha: float, *, counted: bool = True) -> object:
        if alpha not in self.built:
            self.log.append(("build", alpha))
            self.built.add(alpha)
            self.misses += counted
        else:
            self.hits += counted
        return object()


def choose_built_if_short(
    target: float, floor: float, images: int, slack: float | None, requests: int, wait: Wait = None
) -> float:
    """The target, or the floor where a build would not fit the slack (a stand-in for the slack rule)."""
    return target if wait is None or slack is None or wait(target) <= slack else floor


@pytest.mark.parametrize("build_seconds", [0.001, 60.0])
def test_a_batch_never_waits_for_a_build_it_has_no_time_for(build_seconds: float) -> None:
    """The target alpha is not built: a build that fits the slack the batch does itself; one that does not
    runs the batch at a built alpha, and the wanted one is built once the queue is empty, not before (a
    queued request is served first), after which the target is served."""
    log: list[tuple[str, float]] = []
    models = FakeModels({0.0}, build_seconds, log)

    class Logged(FakeModel):
        def __call__(self, alpha: float, x: np.ndarray) -> np.ndarray:
            log.append(("run", alpha))
            models.built.add(alpha)  # as the runtime's model call does, through the cache
            return super().__call__(alpha, x)

    async def scenario() -> None:
        model = Logged(hold_first=True)
        batcher, executor = make_batcher(model, choose_built_if_short, models=models)
        task = await started(batcher)
        deadline = time.monotonic() + 10.0
        first = batcher.submit(job(1.0, target=1.0, deadline=deadline))
        await until(lambda: batcher.running == 1, what="the first batch running")
        second = batcher.submit(job(2.0, target=0.0, deadline=deadline))  # queued behind it
        model.gate.set()
        assert (await first).alpha == (1.0 if build_seconds < 1 else 0.0)
        assert (await second).alpha == 0.0
        await until(lambda: 1.0 in models.built, what="alpha 1 built")
        assert (await batcher.submit(job(3.0, target=1.0, deadline=time.monotonic() + 10.0))).alpha == 1.0
        await stop(task, executor)

    run_async(scenario)
    if build_seconds < 1:  # the first batch built it, before its model ran
        assert log == [("build", 1.0), ("run", 1.0), ("run", 0.0), ("run", 1.0)]
    else:
        assert log == [("run", 0.0), ("run", 0.0), ("build", 1.0), ("run", 1.0)]
    # a batch that chose a built model marked it used, so memory relief does not drop it before the batch runs
    assert models.touched == ([0.0, 1.0] if build_seconds < 1 else [0.0, 0.0, 1.0])


def test_a_wanted_build_waits_for_a_request_being_read_but_not_for_one_never_queued() -> None:
    """The wanted alpha has settled while a request is being read: the build waits for it, and that request
    is then refused (a 4xx on its body, say) and never queued, so no submit wakes the batcher. The build
    still happens (it used to wait for that wake, and an idle service kept serving below the ceiling)."""
    models = FakeModels({0.0}, 60.0, [])
    pending = [0]

    async def scenario() -> None:
        batcher, executor = make_batcher(
            FakeModel(), choose_built_if_short, models=models, settle=0.05, pending=lambda: pending[0]
        )
        task = await started(batcher)
        assert (await batcher.submit(job(1.0, target=1.0, deadline=time.monotonic() + 10.0))).alpha == 0.0
        assert batcher.wanted == 1.0
        pending[0] = 1
        await asyncio.sleep(0.2)  # settled, but a request is being read
        assert 1.0 not in models.built
        pending[0] = 0  # refused: it never reaches the queue
        await until(lambda: 1.0 in models.built, timeout=2.0, what="alpha 1 built")
        await stop(task, executor)

    run_async(scenario)


def test_a_wanted_alpha_the_ceiling_has_fallen_below_is_not_built() -> None:
    """Alpha 1 is wanted, then the load rises and the ceiling falls to 0.5, which is built: batches run at it
    and no longer want alpha 1, and the empty queue does not build it (it would hold the inference thread
    for a model no batch may run while the load that lowered the ceiling arrives)."""
    models = FakeModels({0.0, 0.5}, 60.0, [])
    ceiling = [1.0]

    def choose(
        target: float, floor: float, images: int, slack: float | None, requests: int, wait: Wait = None
    ) -> float:
        return choose_built_if_short(min(target, ceiling[0]), floor, images, slack, requests, wait)

    async def scenario() -> None:
        batcher, executor = make_batcher(FakeModel(), choose, models=models, settle=0.05)
        task = await started(batcher)
        assert (await batcher.submit(job(1.0, target=1.0, deadline=time.monotonic() + 10.0))).alpha == 0.0
        assert batcher.wanted == 1.0
        ceiling[0] = 0.5
        assert (await batcher.submit(job(2.0, target=1.0, deadline=time.monotonic() + 10.0))).alpha == 0.5
        await until(lambda: batcher.wanted is None, what="the wanted alpha settled")
        await asyncio.sleep(0.05)
        assert 1.0 not in models.built and not models.log
        await stop(task, executor)

    run_async(scenario)


def test_a_drain_builds_no_wanted_alpha() -> None:
    """SIGTERM: the batch still served runs at a built alpha, and the alpha it wanted is not built after it
    (the build would only delay the exit, and no batch would run at it)."""
    models = FakeModels({0.0}, 60.0, [])

    async def scenario() -> None:
        model = FakeModel(hold_first=True)
        batcher, executor = make_batcher(model, choose_built_if_short, models=models, settle=0.0)
        task = await started(batcher)
        answer = batcher.submit(job(1.0, target=1.0, deadline=time.monotonic() + 10.0))
        await until(lambda: batcher.running == 1, what="the batch running")
        drained = asyncio.create_task(batcher.drain(5.0))
        await asyncio.sleep(0)
        model.gate.set()
        assert (await answer).alpha == 0.0 and batcher.wanted == 1.0
        assert await drained
        await asyncio.sleep(0.05)
        assert not models.log  # nothing built
        await stop(task, executor)

    run_async(scenario)


def test_on_batch_reports_alpha_and_size() -> None:
    reports: list[tuple[float, int]] = []

    async def scenario() -> None:
        executor = ThreadPoolExecutor(max_workers=1)
        batcher = Batcher(
            FakeModel(),
            choose_target,
            executor,
            max_batch=MAX_BATCH,
            max_wait=0.0,
            queue_max=10,
            on_batch=lambda alpha, images, seconds, handoff: reports.append((alpha, images)),
        )
        futures = [batcher.submit(job(1.0, images=2, target=0.5)), batcher.submit(job(2.0, images=3, target=0.5))]
        task = await started(batcher)
        await asyncio.gather(*futures)
        await stop(task, executor)

    run_async(scenario)
    assert reports == [(0.5, 5)]


def test_results_report_the_queue_wait_and_on_batch_the_hand_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request queued 5 s before its batch starts reports 5 s of queue time (queue_ms); a batch taking 2.25 s
    of which its model ran 2 reports the other 0.25 s to on_batch as hand-off. A fake clock, the batcher's own."""
    mono, perf = [100.0], [0.0]
    monkeypatch.setattr(
        "service.batcher.time", SimpleNamespace(monotonic=lambda: mono[0], perf_counter=lambda: perf[0])
    )
    reports: list[tuple[float, float]] = []

    class Timed(FakeModel):
        def __call__(self, alpha: float, x: np.ndarray) -> np.ndarray:
            perf[0] += 2.0
            mono[0] += 2.25
            return super().__call__(alpha, x)

    async def scenario() -> None:
        batcher, executor = make_batcher(
            Timed(), on_batch=lambda alpha, images, seconds, handoff: reports.append((seconds, handoff))
        )
        queued = job(1.0)
        queued.enqueued = 95.0
        answer = batcher.submit(queued)
        task = await started(batcher)
        result = await answer
        await stop(task, executor)
        assert (result.queue_seconds, result.compute_seconds) == (5.0, 2.25)

    run_async(scenario)
    assert reports == [(2.0, 0.25)]


def test_a_build_the_batch_makes_first_is_not_reported_as_model_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch whose alpha is not built (dropped, evicted) builds it, then runs: the controller must hear the
    run's seconds alone. (A 60 ms rebuild read as alpha 1 at 20x its profile: the ceiling fell to 0 and, no
    batch at alpha 1 running any more, stayed there.) A fake clock: the build takes 60 s of it, the run 2 s."""
    clock = [0.0]
    monkeypatch.setattr("service.batcher.time.perf_counter", lambda: clock[0])
    reports: list[tuple[float, float]] = []

    class Slow(FakeModels):
        def get(self, alpha: float, *, counted: bool = True) -> object:
            clock[0] += 0.0 if alpha in self.built else 60.0
            return super().get(alpha, counted=counted)

    models = Slow({0.0}, 60.0, [])

    class Timed(FakeModel):
        def __call__(self, alpha: float, x: np.ndarray) -> np.ndarray:
            models.get(alpha, counted=False)  # as the runtime's model call does, through the cache
            clock[0] += 2.0
            return super().__call__(alpha, x)

    async def scenario() -> None:
        batcher, executor = make_batcher(
            Timed(), models=models, on_batch=lambda alpha, images, seconds, handoff: reports.append((alpha, seconds))
        )
        task = await started(batcher)
        for target in (1.0, 1.0):  # the first builds alpha 1, the second finds it built
            await batcher.submit(job(1.0, target=target))
        await stop(task, executor)

    run_async(scenario)
    assert reports == [(1.0, 2.0), (1.0, 2.0)]
    # one counted lookup per batch: the first a miss that built, the second a hit (a batch that built counted a
    # miss and then a hit; before that, every batch two hits)
    assert models.log == [("build", 1.0)] and (models.misses, models.hits) == (1, 1)


def test_an_unexpected_error_outside_the_model_fails_its_batch_and_the_loop_survives() -> None:
    async def scenario() -> None:
        model = FakeModel()
        calls: list[float] = []

        def choose(
            target: float, floor: float, images: int, slack: float | None, requests: int, wait: Wait = None
        ) -> float:
            calls.append(target)
            if target == 0.5:
                raise KeyError("controller bug")
            return target

        batcher, executor = make_batcher(model, choose)
        task = await started(batcher)
        with pytest.raises(KeyError, match="controller bug"):
            await batcher.submit(job(1.0, target=0.5))
        after = await batcher.submit(job(2.0, target=1.0))  # the loop is still serving
        assert ids(after) == [2.0] and calls == [0.5, 1.0]
        await stop(task, executor)

    run_async(scenario)
