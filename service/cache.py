"""A bounded, thread-safe LRU of materialised models, keyed by grid alpha, with single-flight builds.

Requested alphas snap *down* to the grid (never more accurate than asked). The bound is in bytes of
resident model memory; the least recently used entries are evicted when a new one does not fit. Some
are never evicted, even over the bound: the newest (so the service can answer), those in `keep` (the
service keeps the fastest there, which a load rise falls back on while the alpha it wants is built
again: see service.batcher), and those whose memory dropping would not free (`Compiled.reclaimable`:
networks torch traced, int8 among them; evicting one would free nothing, and building it again would
hold its memory a second time). Under memory pressure the service drops the other models no batch has
asked for lately (`drop_idle`), whatever the bound.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lcs.alpha import SAME_ALPHA, is_grid

if TYPE_CHECKING:  # the grid and the controller that reads it import no torch (the load generator uses them)
    from service.materialize import Compiled


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    builds: int = 0
    build_seconds: float = 0.0


class Grid:
    """The alphas the service serves, ascending."""

    def __init__(self, alphas: list[float]) -> None:
        if not alphas:
            raise ValueError("the alpha grid is empty")
        self.alphas = sorted(set(alphas))
        if not is_grid(self.alphas):
            raise ValueError(f"the alpha grid {self.alphas} has two alphas closer than {SAME_ALPHA:g}")

    def down(self, alpha: float) -> float:
        """Largest grid alpha <= alpha (the lowest grid alpha if alpha is below all of them)."""
        i = bisect.bisect_right(self.alphas, alpha + SAME_ALPHA) - 1
        return self.alphas[max(0, i)]

    def up(self, alpha: float) -> float | None:
        """Smallest grid alpha >= alpha, or None if alpha is above the grid."""
        i = bisect.bisect_left(self.alphas, alpha - SAME_ALPHA)
        return self.alphas[i] if i < len(self.alphas) else None


class ModelCache:
    def __init__(
        self,
        builder: Callable[[float], Compiled],
        grid: Grid,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._builder = builder
        self.grid = grid
        self.max_bytes = max_bytes
        self._entries: OrderedDict[float, Compiled] = OrderedDict()
        self._clock = clock
        self._used: dict[float, float] = {}  # grid alpha -> when it was last asked for, by the clock
        self._took: dict[float, float] = {}  # grid alpha -> seconds building it again takes (kept when dropped)
        self._building: dict[float, Future[Compiled]] = {}
        self.keep: frozenset[float] = frozenset()  # grid alphas evicted by neither the bound nor drop_idle
        self._lock = threading.Lock()
        self.stats = CacheStats()

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(c.resident_bytes for c in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def cached(self) -> list[float]:
        with self._lock:
            return sorted(self._entries)

    def peek(self, alpha: float, *, touch: bool = False) -> Compiled | None:
        """grid.down(alpha)'s model if it is built, without building it or counting a lookup. `touch`: used now,
        as by `get` (the batcher's choice, which a batch runs next: `drop_idle` between the choice and the run
        made the batch wait for a build it had not counted on)."""
        key = self.grid.down(alpha)
        with self._lock:
            found = self._entries.get(key)
            if found is not None and touch:
                self._touch_locked(key)
            return found

    def snapshot(self) -> dict[float, Compiled]:
        """Every cached model by grid alpha, ascending, as of one moment (`cached` then `peek` could disagree)."""
        with self._lock:
            return dict(sorted(self._entries.items()))

    def wait(self, alpha: float) -> float:
        """Seconds before grid.down(alpha) can run: 0 if built; else what building it again takes (its last
        build, less what only a first build does: `Compiled.rebuild_seconds`), or the mean of the builds so
        far for one never built."""
        key = self.grid.down(alpha)
        with self._lock:
            if key in self._entries:
                return 0.0
            mean = self.stats.build_seconds / self.stats.builds if self.stats.builds else 0.0
            return self._took.get(key, mean)

    def get(self, alpha: float, *, counted: bool = True) -> Compiled:
        """The model for grid.down(alpha); builds it once however many threads ask at the same time.
        `counted`: a hit or a miss in `stats`. The service counts one lookup per batch (`service.batcher`);
        its other lookups (start-up, a model built ahead of need, the model call after the batch's lookup)
        pass False, so lcs_cache_hits_total / misses_total are batches that found their alpha built or not."""
        key = self.grid.down(alpha)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._touch_locked(key)
                if counted:
                    self.stats.hits += 1
                return hit
            if counted:
                self.stats.misses += 1
            fut = self._building.get(key)
            owner = fut is None
            if owner:
                fut = Future()
                self._building[key] = fut
        assert fut is not None
        if not owner:
            return fut.result()
        try:
            compiled = self._builder(key)
        except BaseException as e:
            with self._lock:
                del self._building[key]
            fut.set_exception(e)
            raise
        with self._lock:
            del self._building[key]
            self.stats.builds += 1
            self.stats.build_seconds += compiled.build_seconds
            self._took[key] = compiled.build_seconds if compiled.rebuild_seconds is None else compiled.rebuild_seconds
            self._entries[key] = compiled
            self._used[key] = self._clock()
            self._evict_locked()
        fut.set_result(compiled)
        return compiled

    def _touch_locked(self, key: float) -> None:
        """`key`'s model is used now: the most recently used, not idle (`drop_idle`)."""
        self._entries.move_to_end(key)
        self._used[key] = self._clock()

    def _evict_locked(self) -> None:
        total = sum(c.resident_bytes for c in self._entries.values())
        newest = next(reversed(self._entries))
        for key, entry in list(self._entries.items()):  # least recently used first
            if total <= self.max_bytes:
                break
            if not self._spared_locked(key, entry, newest):
                self._drop_locked(key)
                total -= entry.resident_bytes

    def _spared_locked(self, key: float, entry: Compiled, newest: float | None) -> bool:
        """Never evicted, by the bound or by drop_idle: the newest entry, those in `keep`, and those whose
        memory dropping would not free."""
        return key == newest or key in self.keep or not entry.reclaimable

    def _drop_locked(self, key: float) -> None:
        del self._entries[key]
        self._used.pop(key, None)
        self.stats.evictions += 1

    def drop_idle(self, since: float) -> tuple[int, int]:
        """Evict every evictable model not asked for since `since` (by the cache's clock): what memory pressure
        asks of the cache. Returns (models dropped, their bytes); the caller hands the freed heap back to the
        system."""
        with self._lock:
            newest = next(reversed(self._entries), None)
            idle = [
                (k, e)
                for k, e in self._entries.items()
                if not self._spared_locked(k, e, newest) and self._used[k] < since
            ]
            for key, _ in idle:
                self._drop_locked(key)
        return len(idle), sum(e.resident_bytes for _, e in idle)
