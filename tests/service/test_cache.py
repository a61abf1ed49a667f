"""service.cache: grid snapping, a byte-bounded LRU, hit/miss/eviction counts and single-flight builds."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import pytest
from torch import nn

from lcs.alpha import Level
from service.cache import Grid, ModelCache
from service.materialize import Compiled
from tests.service.service_support import wait_for

GRID = Grid([0.0, 0.25, 0.5, 1.0])


def fake(alpha: float, resident_bytes: int = 100, reclaimable: bool = True) -> Compiled:
    level = Level("structured", width=alpha)
    return Compiled(alpha, level, nn.Identity(), "fake", resident_bytes, 0, 0.01, False, reclaimable)


class Builder:
    """Records the alphas it is asked to build; sizes per alpha are chosen by the test."""

    def __init__(self, sizes: dict[float, int] | None = None) -> None:
        self.sizes = sizes or {}
        self.calls: list[float] = []

    def __call__(self, alpha: float) -> Compiled:
        self.calls.append(alpha)
        return fake(alpha, self.sizes.get(alpha, 100))


# -- the grid -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alpha", "down", "up"),
    [
        (0.0, 0.0, 0.0),
        (0.1, 0.0, 0.25),
        (0.25, 0.25, 0.25),
        (0.2500000000001, 0.25, 0.25),  # float noise does not skip a grid point
        (0.2499999999999, 0.25, 0.25),
        (0.2499995, 0.25, 0.25),  # within SAME_ALPHA: 0.25 spelt otherwise, as everywhere else alphas are compared
        (0.2499985, 0.0, 0.25),  # beyond it: another alpha
        (0.7, 0.5, 1.0),
        (1.0, 1.0, 1.0),
    ],
)
def test_grid_snaps_down_and_up(alpha: float, down: float, up: float) -> None:
    assert GRID.down(alpha) == down
    assert GRID.up(alpha) == up


def test_grid_edges() -> None:
    g = Grid([0.5, 1.0])
    assert g.down(0.2) == 0.5  # below the grid: its lowest alpha
    assert g.up(1.01) is None  # above it: nothing qualifies
    assert Grid([1.0, 0.0, 0.5, 0.5]).alphas == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="empty"):
        Grid([])
    with pytest.raises(ValueError, match="two alphas closer than 1e-06"):
        Grid([0.5, 0.5000001])


# -- the cache ------------------------------------------------------------------------------------


def test_get_snaps_down_and_counts_hits_and_misses() -> None:
    builder = Builder()
    cache = ModelCache(builder, GRID, max_bytes=10_000)
    first = cache.get(0.7)
    assert first.alpha == 0.5
    assert cache.get(0.5) is first
    assert cache.get(0.99) is first  # still snaps to 0.5: never more accurate than asked
    assert cache.get(1.0).alpha == 1.0
    assert builder.calls == [0.5, 1.0]
    assert (cache.stats.hits, cache.stats.misses, cache.stats.builds, cache.stats.evictions) == (2, 2, 2, 0)
    assert cache.cached() == [0.5, 1.0]
    assert cache.bytes == 200 and len(cache) == 2
    assert cache.peek(0.6) is first and cache.peek(0.0) is None


def test_least_recently_used_is_evicted_under_the_byte_bound() -> None:
    builder = Builder()
    cache = ModelCache(builder, GRID, max_bytes=250)  # room for two 100-byte models
    cache.get(0.0)
    cache.get(0.5)
    cache.get(0.0)  # 0.0 is now more recent than 0.5
    cache.get(1.0)  # does not fit: evict the least recently used, 0.5
    assert cache.cached() == [0.0, 1.0]
    assert cache.stats.evictions == 1
    assert cache.bytes == 200 <= cache.max_bytes
    cache.get(0.5)  # rebuilt, evicting 0.0 (used before 1.0)
    assert builder.calls == [0.0, 0.5, 1.0, 0.5]
    assert cache.cached() == [0.5, 1.0]
    assert cache.stats.evictions == 2


def test_eviction_frees_enough_bytes_for_a_large_model() -> None:
    builder = Builder({0.0: 50, 0.25: 50, 0.5: 50, 1.0: 120})
    cache = ModelCache(builder, GRID, max_bytes=200)
    for a in (0.0, 0.25, 0.5):
        cache.get(a)
    assert cache.bytes == 150
    cache.get(1.0)  # 270 bytes: one eviction is not enough (220), two are (170)
    assert cache.cached() == [0.5, 1.0]
    assert cache.bytes == 170
    assert cache.stats.evictions == 2


def test_drop_idle_evicts_what_was_not_asked_for_lately_but_the_newest_and_the_unreclaimable() -> None:
    """Memory pressure: the models no batch asked for since a moment go, whatever the byte bound."""
    now = [0.0]
    sizes = {0.0: 10, 0.25: 20, 0.5: 40, 1.0: 80}
    cache = ModelCache(lambda a: fake(a, sizes[a], reclaimable=a != 0.25), GRID, max_bytes=10_000, clock=lambda: now[0])
    for t, alpha in enumerate([0.0, 0.25, 0.5, 1.0]):
        now[0] = float(t)
        cache.get(alpha)
    now[0] = 4.0
    cache.get(0.0)  # a hit counts as asked for
    assert cache.drop_idle(since=2.5) == (1, 40)  # 0.5 (asked for at 2); 0.25 cannot be reclaimed
    assert cache.cached() == [0.0, 0.25, 1.0] and cache.stats.evictions == 1
    assert cache.drop_idle(since=9.0) == (1, 80)  # 1.0; 0.0 was the last asked for: the service must answer
    assert cache.cached() == [0.0, 0.25] and cache.bytes == 30
    assert cache.drop_idle(since=9.0) == (0, 0)
    cache.get(0.5)  # asked for again: built again
    assert cache.stats.builds == 5


def test_a_model_the_batcher_chose_is_not_dropped_as_idle_before_its_batch_runs() -> None:
    """The batcher's look at an alpha it will run (`touch`) counts as asked for: memory relief between the
    choice and the run dropped it, and the batch waited for a build it had not counted on. A plain look does not."""
    now = [0.0]
    cache = ModelCache(lambda a: fake(a), GRID, max_bytes=10_000, clock=lambda: now[0])
    for alpha in (0.25, 0.5, 1.0):
        cache.get(alpha)
    now[0] = 5.0
    assert cache.peek(0.25) is not None and cache.peek(0.5, touch=True) is not None
    assert cache.drop_idle(since=4.0) == (2, 200)  # 0.25 and 1.0, no longer the most recently used
    assert cache.cached() == [0.5]
    assert cache.peek(0.0, touch=True) is None and cache.cached() == [0.5]  # not built: nothing to mark


def test_drop_idle_spares_what_the_cache_keeps() -> None:
    now = [0.0]
    cache = ModelCache(lambda a: fake(a), GRID, max_bytes=10_000, clock=lambda: now[0])
    cache.keep = frozenset({0.0})
    for alpha in (0.0, 0.5, 1.0):
        cache.get(alpha)
    now[0] = 20.0
    assert cache.drop_idle(since=10.0) == (1, 100)  # 0.5; 1.0 is the newest
    assert cache.cached() == [0.0, 1.0]


def test_the_byte_bound_spares_what_the_cache_keeps() -> None:
    """The fastest model, which a load rise falls back on, is not the least recently used to go."""
    builder = Builder()
    cache = ModelCache(builder, GRID, max_bytes=250)  # room for two 100-byte models
    cache.keep = frozenset({0.0})
    for alpha in (0.0, 0.5, 1.0):  # 1.0 does not fit: 0.0 is the least recently used, 0.5 goes
        cache.get(alpha)
    assert cache.cached() == [0.0, 1.0] and cache.stats.evictions == 1
    cache.get(0.5)  # 1.0 goes
    assert cache.cached() == [0.0, 0.5] and builder.calls == [0.0, 0.5, 1.0, 0.5]
    small = ModelCache(Builder(), GRID, max_bytes=1)  # a bound no model fits: the kept one and the newest stay
    small.keep = frozenset({0.0})
    for alpha in (0.0, 0.5, 1.0):
        small.get(alpha)
    assert small.cached() == [0.0, 1.0]


def test_wait_is_what_a_build_would_take() -> None:
    """0 for a built alpha; what building it again takes once dropped (less than its first build, which also
    timed its padding); the mean build for one never built."""
    took = {0.0: 0.02, 0.5: 0.05, 1.0: 0.11}
    again = {0.5: 0.015}

    def builder(a: float) -> Compiled:
        return replace(fake(a), build_seconds=took[a], rebuild_seconds=again.get(a))

    cache = ModelCache(builder, GRID, max_bytes=10_000)
    assert cache.wait(1.0) == 0.0  # nothing built yet: nothing known
    for alpha in (0.5, 1.0):
        cache.get(alpha)
    assert cache.wait(1.0) == 0.0 and cache.wait(0.7) == 0.0  # built (0.7 snaps down to 0.5)
    assert cache.wait(0.0) == pytest.approx(0.08)  # never built: the mean of 0.05 and 0.11
    assert cache.drop_idle(since=float("inf")) == (1, 100)  # 0.5 (1.0 is the newest)
    assert cache.wait(0.5) == 0.015
    cache.get(0.5)  # built again: now the newest
    assert cache.drop_idle(since=float("inf")) == (1, 100)  # 1.0
    assert cache.wait(1.0) == 0.11  # no shorter rebuild known: as long as its build


def test_one_entry_is_kept_even_over_the_bound() -> None:
    cache = ModelCache(Builder({0.5: 500, 1.0: 500}), GRID, max_bytes=100)
    cache.get(1.0)
    assert cache.cached() == [1.0]  # the service must still be able to answer
    cache.get(0.5)
    assert cache.cached() == [0.5]
    assert cache.stats.evictions == 1


def test_models_whose_memory_cannot_be_freed_count_but_are_never_evicted() -> None:
    """A traced network's memory stays with the process (pytorch#35600): evicting it would free nothing and
    rebuilding it would hold that memory twice, so the cache evicts the others around it."""
    pinned = {0.0, 0.5}
    cache = ModelCache(lambda a: fake(a, 100, reclaimable=a not in pinned), GRID, max_bytes=250)
    cache.get(0.0)
    cache.get(0.25)
    cache.get(0.5)  # 300 bytes: 0.0 is the least recently used, but cannot be freed; 0.25 goes
    assert cache.cached() == [0.0, 0.5] and cache.stats.evictions == 1
    cache.get(1.0)  # nothing evictable but the newest: all three stay, over the bound
    assert cache.cached() == [0.0, 0.5, 1.0] and cache.bytes == 300
    cache.get(0.25)  # 1.0 goes now; 0.0 and 0.5 still stay
    assert cache.cached() == [0.0, 0.25, 0.5] and cache.stats.evictions == 2


def test_zero_byte_bound_keeps_only_the_latest() -> None:
    cache = ModelCache(Builder(), GRID, max_bytes=0)
    for a in GRID.alphas:
        cache.get(a)
    assert cache.cached() == [1.0] and cache.stats.evictions == 3


def _concurrent(cache: ModelCache, n: int, alpha: float) -> list[Future[Compiled]]:
    """n threads call cache.get(alpha) at once; their futures."""
    pool = ThreadPoolExecutor(max_workers=n)
    futures = [pool.submit(cache.get, alpha) for _ in range(n)]
    pool.shutdown(wait=False)
    return futures


def test_single_flight_concurrent_requests_build_once() -> None:
    n = 8
    release = threading.Event()
    calls: list[float] = []

    def slow_builder(alpha: float) -> Compiled:
        calls.append(alpha)
        assert release.wait(10), "never released"
        return fake(alpha)

    cache = ModelCache(slow_builder, GRID, max_bytes=10_000)
    results = _concurrent(cache, n, 0.6)
    # every thread has missed (and all but the builder wait on its future) before the build may finish
    wait_for(lambda: cache.stats.misses == n, what="all threads to miss")
    release.set()
    got = [r.result(timeout=10) for r in results]
    assert calls == [0.5]
    assert all(g is got[0] for g in got)
    assert (cache.stats.builds, cache.stats.misses, cache.stats.hits) == (1, n, 0)
    assert cache.get(0.5) is got[0] and cache.stats.hits == 1


def test_build_failure_reaches_every_waiter_and_the_next_get_retries() -> None:
    n = 6
    release = threading.Event()
    calls: list[float] = []

    def failing_once(alpha: float) -> Compiled:
        calls.append(alpha)
        if len(calls) == 1:
            assert release.wait(10), "never released"
            raise RuntimeError("out of memory while building")
        return fake(alpha)

    cache = ModelCache(failing_once, GRID, max_bytes=10_000)
    results = _concurrent(cache, n, 1.0)
    wait_for(lambda: cache.stats.misses == n, what="all threads to miss")
    release.set()
    errors = []
    for r in results:
        with pytest.raises(RuntimeError, match="out of memory") as e:
            r.result(timeout=10)
        errors.append(e.value)
    assert len(errors) == n
    assert cache.cached() == [] and cache.stats.builds == 0
    retried = cache.get(1.0)  # the failure is not cached: the next request builds again
    assert retried.alpha == 1.0 and calls == [1.0, 1.0]
    assert cache.stats.builds == 1


def test_different_alphas_build_independently() -> None:
    release = threading.Event()
    started: list[float] = []

    def builder(alpha: float) -> Compiled:
        started.append(alpha)
        if alpha == 1.0:
            assert release.wait(10)
        return fake(alpha)

    cache = ModelCache(builder, GRID, max_bytes=10_000)
    (slow,) = _concurrent(cache, 1, 1.0)
    wait_for(lambda: started == [1.0], what="the slow build to start")
    assert cache.get(0.0).alpha == 0.0  # not blocked behind the build of another alpha
    release.set()
    assert slow.result(timeout=10).alpha == 1.0
    assert sorted(cache.cached()) == [0.0, 1.0]
