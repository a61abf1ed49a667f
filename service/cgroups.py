"""What the machine grants this process: CPUs (its affinity, capped by a cgroup CPU quota) and memory (a
cgroup memory limit). In a container (`docker run --cpus 2 --memory 1g`) or a pod with limits on a bigger
node, the machine-wide figures psutil and os give are the node's; these are the process's own.

cgroup v2 keeps every controller in one hierarchy (`0::/path` in /proc/self/cgroup), v1 one per controller
(`4:cpu,cpuacct:/path`). Limits nest: the tightest from the process's cgroup up to the root applies. A
container sees its own cgroup at the root of the mount, where the path /proc/self/cgroup names (the host's)
may not exist: every directory from that path up is read, and those missing are skipped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

CGROUPS = Path("/sys/fs/cgroup")
MEMBERSHIP = Path("/proc/self/cgroup")
T = TypeVar("T")


def cpu_share(cgroups: Path = CGROUPS, membership: Path = MEMBERSHIP) -> float:
    """CPUs this process may use at once: those it may run on (its affinity mask where the OS has one, as
    Linux does), capped by a CPU quota on its cgroup, as a fraction (a pod's 500m limit: 0.5)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota(cgroups, membership)
    return float(n) if quota is None else min(n, quota)


def usable_cpus(cgroups: Path = CGROUPS, membership: Path = MEMBERSHIP) -> int:
    """`cpu_share` rounded up to whole threads (a container's `--cpus 2` or a pod's CPU limit of 2 on a
    64-core node is 2: the affinity mask alone said 64, and 63 inference threads shared 2 CPUs)."""
    return max(1, math.ceil(cpu_share(cgroups, membership) - 1e-9))


def inference_threads() -> int:
    """LCS_THREADS's default: one per usable CPU, less one for the event loop (HTTP, parsing, answers), at
    least 1. Measured on 2 cores with eager models: 1 thread served 196 / 439 requests/s (16 images, alpha
    1 / 0) where 2 served 185 / 372, the loop starved; single images on ONNX Runtime, 1,678-1,910 against
    1,470-1,657 (`benchmarks.http`, README)."""
    return max(1, usable_cpus() - 1)


def default_bodies_max_bytes() -> int:
    """LCS_BODIES_MAX_BYTES's default: a quarter of the memory granted, the cgroup limit or else the machine's.
    256 bodies at the 8 MiB limit, as many as the queue takes, were read at once and OOM-killed a pod with 1
    GiB (64 bodies of 7.5 MiB did; 32 peaked at 843 MiB over the model's 480)."""
    limit = memory_limit()
    if limit is None:
        try:
            limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (OSError, ValueError):
            limit = 4 * 2**30  # a platform that cannot tell: as if 4 GiB
    return max(2**20, limit // 4)


def cpu_quota(cgroups: Path = CGROUPS, membership: Path = MEMBERSHIP) -> float | None:
    """The tightest CPU quota (in CPUs) on this process's cgroup or any above it, or None without one.
    v2: `cpu.max` ("QUOTA PERIOD", "max PERIOD" for none); v1: `cpu.cfs_quota_us` (-1 for none) over
    `cpu.cfs_period_us`."""
    return min(_read_up("cpu", cgroups, membership, _v2_cpu, _v1_cpu), default=None)


def memory_headroom(cgroups: Path = CGROUPS, membership: Path = MEMBERSHIP) -> float | None:
    """The memory still available under the cgroup limits on this process (or above it) as a share of the
    tightest limit, 0..1, or None without a limit: what is left is the least any level has left (a
    container's 256 of 512 MiB free inside a pod with 1 GiB of 10 free is 256 MiB, 0.5). Used memory is
    the working set: usage less the inactive file cache, which the kernel reclaims before it runs out (as
    the kubelet counts it). v2: `memory.max`, `memory.current`, `memory.stat`'s inactive_file; v1:
    `memory.limit_in_bytes` (a huge number for none), `memory.usage_in_bytes`, `memory.stat`'s
    total_inactive_file."""
    levels = _memory_levels(cgroups, membership)
    if not levels:
        return None
    left = min(limit - used for limit, used in levels)
    return min(1.0, max(0.0, left / min(limit for limit, _ in levels)))


def memory_limit(cgroups: Path = CGROUPS, membership: Path = MEMBERSHIP) -> int | None:
    """The tightest cgroup memory limit on this process (or above it) in bytes, or None without one."""
    return min((limit for limit, _ in _memory_levels(cgroups, membership)), default=None)


def _memory_levels(cgroups: Path, membership: Path) -> list[tuple[int, int]]:
    """(limit, working set) of each cgroup level on the way up that sets a memory limit."""
    return list(_read_up("memory", cgroups, membership, _v2_memory, _v1_memory))


def _read_up(
    controller: str,
    cgroups: Path,
    membership: Path,
    v2: Callable[[Path], T | None],
    v1: Callable[[Path], T | None],
) -> Iterator[T]:
    """`v2(d)` or `v1(d)` for each cgroup directory `d` of `controller` from this process's up to the root,
    where it gives a value."""
    try:
        lines = membership.read_text().splitlines()
    except (OSError, ValueError):  # a cgroup's name may be any bytes: not UTF-8, it stopped start-up
        return
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2, the unified hierarchy
            mount, read = cgroups, v2
        elif controller in controllers.split(","):
            mount = next((m for m in (cgroups / controllers, cgroups / controller) if m.is_dir()), cgroups)
            read = v1
        else:
            continue
        here = mount / path.lstrip("/")
        for d in (here, *here.parents):
            if d == mount.parent:
                break
            if (value := read(d)) is not None:
                yield value


def _v2_cpu(d: Path) -> float | None:
    try:
        quota, period = (d / "cpu.max").read_text().split()
        return None if quota == "max" or int(period) <= 0 else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_cpu(d: Path) -> float | None:
    try:
        quota, period = int((d / "cpu.cfs_quota_us").read_text()), int((d / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


NO_LIMIT = 1 << 60  # v1 writes "no limit" as the largest page-aligned 64-bit number (9223372036854771712)


def _v2_memory(d: Path) -> tuple[int, int] | None:
    return _limit_and_used(d, "memory.max", "memory.current", "inactive_file")


def _v1_memory(d: Path) -> tuple[int, int] | None:
    return _limit_and_used(d, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def _limit_and_used(d: Path, limit_file: str, usage_file: str, inactive_key: str) -> tuple[int, int] | None:
    """(limit, working set) in bytes at cgroup directory `d`, or None where it sets no limit."""
    try:
        raw = (d / limit_file).read_text().strip()
        if raw == "max" or int(raw) >= NO_LIMIT or int(raw) <= 0:
            return None
        limit, usage = int(raw), int((d / usage_file).read_text())
    except (OSError, ValueError):
        return None
    inactive = 0
    try:
        for line in (d / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                inactive = int(value)
    except (OSError, ValueError):
        pass  # no stat: count the cache as used (pessimistic)
    return limit, max(0, usage - inactive)
