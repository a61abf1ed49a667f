"""Observed signals for the controller: request statistics kept by the app, and the machine (psutil)."""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Collection, Sequence
from pathlib import Path

import psutil

from service.cgroups import cpu_share, memory_headroom

log = logging.getLogger("lcs.service")


class RequestStats:
    """Arrival rate (EWMA) and a sliding window of latencies, updated on the event loop."""

    # a 2 s window: with 5 s, one burst kept the p99 over 70 % of the SLO, and so the ceiling down, for 5 s
    def __init__(self, window_seconds: float = 2.0, half_life: float = 1.0) -> None:
        self.window = window_seconds
        self.half_life = half_life
        self._latencies: deque[tuple[float, float]] = deque()  # (finished at, seconds)
        self._rate = 0.0
        self._images = 1.0
        self._weighed = (0.0, 0.0)  # (images, requests) arrived, each decayed as the rate is
        self._last = time.monotonic()
        self._count = 0
        self._image_count = 0

    @property
    def images_per_request(self) -> float:
        """The mean images per request (1 until requests have been seen): the images arrived over the
        requests arrived, both decayed as the rate is, so the rate times this is the smoothed image rate.
        Evidence ages, not intervals: after a quiet spell the first busy interval says what requests hold
        now. Smoothed per interval from 1 (0.2 of each interval's mean), a step of 16-image requests onto
        an idle service read as 4, 6.4, 8.3 images over its first 1.5 s, and the ceiling stayed at 1 for
        2.6 s of it (1.1-1.6 s now: benchmarks/results/runs/load-ab-session30.json)."""
        return self._images

    def arrived(self, images: int) -> None:
        self._count += 1
        self._image_count += images

    def finished(self, seconds: float, now: float | None = None) -> None:
        self._latencies.append((now or time.monotonic(), seconds))

    def tick(self, now: float) -> tuple[float, float, float | None, float | None]:
        """(arrival rate per s, images per request, p99 of the window or None, p99 of the requests answered
        since the last tick or None); call once per interval. The window's p99 needs 20 samples; the
        interval's is its slowest under 100, and None only when none was answered."""
        since = self._last
        dt = max(1e-6, now - self._last)
        decay = math.exp(-dt * math.log(2) / self.half_life)
        self._rate = decay * self._rate + (1 - decay) * (self._count / dt)
        images, requests = self._weighed
        self._weighed = decay * images + self._image_count, decay * requests + self._count
        if self._count:  # idle, the sums decay into subnormals, whose ratio is noise (1 after about 18 min)
            self._images = self._weighed[0] / self._weighed[1]
        self._count = self._image_count = 0
        self._last = now
        while self._latencies and self._latencies[0][0] < now - self.window:
            self._latencies.popleft()
        lat = sorted(s for _, s in self._latencies)
        recent = sorted(s for at, s in self._latencies if at > since)
        return self._rate, self._images, _p99(lat) if len(lat) >= 20 else None, _p99(recent) if recent else None


def _p99(ascending: Sequence[float]) -> float:
    return ascending[min(len(ascending) - 1, int(0.99 * len(ascending)))]


class LoopCost:
    """CPU seconds the event-loop thread spends per request (HTTP, parsing, decoding, responses): the
    part of a request's cost that no alpha removes. Construct, count and tick on the event-loop thread."""

    def __init__(self) -> None:
        self._cpu = time.thread_time()
        self._wall = time.monotonic()
        self._n = 0
        self.value: float | None = None
        self.busy: float | None = None  # share of wall time the loop thread was on a CPU (smoothed)
        self.rate: float | None = None  # inference requests counted per second (smoothed), refused included

    def count(self) -> None:
        self._n += 1

    def tick(self) -> float | None:
        cpu, wall = time.thread_time(), time.monotonic()
        spent, self._cpu = cpu - self._cpu, cpu
        elapsed, self._wall = max(1e-6, wall - self._wall), wall
        busy = min(1.0, spent / elapsed)
        self.busy = busy if self.busy is None else 0.5 * self.busy + 0.5 * busy
        rate = self._n / elapsed
        self.rate = rate if self.rate is None else 0.5 * self.rate + 0.5 * rate
        if self._n >= 5:  # too few requests say nothing
            v = spent / self._n
            self.value = v if self.value is None else 0.7 * self.value + 0.3 * v
        self._n = 0
        return self.value


ONLINE = Path("/sys/devices/system/cpu/online")


def online_cpus(path: Path = ONLINE) -> list[int] | None:
    """The ids of the online CPUs ("0-2,4" -> [0, 1, 2, 4]), the order /proc/stat and so psutil lists them
    in; None where the file is missing or unreadable."""
    try:
        spans = [part.split("-") for part in path.read_text().strip().split(",")]
        return [c for span in spans for c in range(int(span[0]), int(span[-1]) + 1)]
    except (OSError, ValueError):
        return None


def cpu_taken(
    busy: Sequence[float], mine: float, allowed: Collection[int], usable: float, listed: Sequence[int] | None = None
) -> float:
    """The share of the CPUs this process may use that other processes take, 0..1. `busy`: each core's busy
    share since the last look (0..1); `mine`: cores this process kept busy meanwhile (1.5: one and a half);
    `allowed`: the cores it may run on (its affinity); `usable`: how many it may use at once (fewer under a
    CPU quota, and fractional with one: rounded up, a pod's 500m limit read the half core its neighbours
    left idle as half its CPU taken). Only the allowed cores count, and other processes take from this one only what
    leaves it fewer than `usable` idle: on a machine that is all its own (this one: 2 of 2) that is their
    share of the machine, but in a container limited to 2 CPUs on a 64-core node the node's other 30 busy
    cores read as 47 % taken, and the controller, pricing the model 1.9x slower, gave accuracy away."""
    # psutil lists the online CPUs in order of id: `listed`, those ids (`online_cpus`), picks the allowed
    # ones where a CPU below them is offline. Without it (or where it does not match the list: lxcfs numbers a
    # container's CPUs from 0), ids are positions, unless one is past the list: then every core listed counts
    if listed is not None and len(listed) == len(busy) and allowed and set(allowed) <= set(listed):
        cores = [b for b, c in zip(busy, listed, strict=True) if c in allowed]
    elif allowed and max(allowed) < len(busy):
        cores = [busy[c] for c in allowed]
    else:
        cores = list(busy)
    usable = min(usable, len(cores))
    others = max(0.0, sum(cores) - mine)
    free = min(usable, len(cores) - others)
    return min(1.0, max(0.0, 1.0 - free / max(1e-9, usable)))


class MachineProbe:
    """CPU other processes take from this one, available memory and battery, from psutil."""

    def __init__(self) -> None:
        self._me = psutil.Process()
        cores = range(psutil.cpu_count() or 1)
        self._allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(cores)
        self._usable = cpu_share()  # as a fraction: not usable_cpus, which rounds up to whole threads
        self._listed = online_cpus()
        self._battery_failed = False  # unreadable at the last read (its start and end are logged)
        psutil.cpu_percent(None, percpu=True)
        self._me.cpu_percent(None)

    def cpu_other(self) -> float:
        """cpu_taken since the last call."""
        busy = [p / 100.0 for p in psutil.cpu_percent(None, percpu=True)]
        return cpu_taken(busy, self._me.cpu_percent(None) / 100.0, self._allowed, self._usable, self._listed)

    @staticmethod
    def memory_available() -> float:
        """The share of memory still available to this process: the machine's, or, under a cgroup memory
        limit (a container's `--memory`, a pod's limit), the limit's if that is less (the machine's alone
        read 97 % free in a pod 100 MB from being killed for memory)."""
        vm = psutil.virtual_memory()
        machine = vm.available / vm.total
        limited = memory_headroom()
        return machine if limited is None else min(machine, limited)

    def battery(self) -> tuple[float | None, bool]:
        """(percent, on battery); (None, False) where there is no battery or it cannot be read."""
        try:
            b = psutil.sensors_battery()
            reading = None if b is None else (float(b.percent), b.power_plugged is False)
        except Exception as e:  # psutil raises TypeError or ValueError on garbage in sysfs, RuntimeError on
            # macOS and BSD: it stopped every control step (load, p99 and memory went unread with it)
            if not self._battery_failed:  # said when it starts failing and when it reads again, not every step
                log.warning(
                    "cannot read the battery (%s: %s); going on without it: LCS_BATTERY_LOW_PERCENT's cap is not "
                    "applied until it reads again",
                    type(e).__name__,
                    e,
                )
            self._battery_failed = True
            return None, False
        if self._battery_failed:
            self._battery_failed = False
            log.info("the battery reads again")
        if reading is None or not math.isfinite(reading[0]):
            return None, False
        return reading  # power_plugged None: psutil cannot tell, which is not "on battery"
