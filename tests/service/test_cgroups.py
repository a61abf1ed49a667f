"""service.cgroups: the CPUs and memory a cgroup grants this process, read from fake hierarchies (v1, v2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import cgroups
from service.cgroups import cpu_quota, default_bodies_max_bytes, memory_headroom, memory_limit, usable_cpus


def hierarchy(tmp_path: Path, membership: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup mount holding `files` (path under the mount -> text) and a /proc/self/cgroup saying
    `membership`: the two paths service.cgroups reads."""
    root = tmp_path / "cgroup"
    root.mkdir()
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "self").write_text(membership)
    return root, tmp_path / "self"


@pytest.mark.parametrize(
    ("membership", "files", "quota"),
    [
        # cgroup v2: the container's own cgroup at the mount's root (its path from /proc/self/cgroup is the host's)
        ("0::/\n", {"cpu.max": "200000 100000\n"}, 2.0),
        ("0::/kubepods/pod1/c1\n", {"cpu.max": "150000 100000\n"}, 1.5),
        ("0::/\n", {"cpu.max": "max 100000\n"}, None),
        # nested: the tightest quota on the way up counts
        ("0::/a/b\n", {"a/cpu.max": "100000 100000\n", "a/b/cpu.max": "max 100000\n"}, 1.0),
        ("0::/a/b\n", {"a/cpu.max": "400000 100000\n", "a/b/cpu.max": "50000 100000\n"}, 0.5),
        # cgroup v1, the cpu controller mounted alone or with cpuacct; -1: no quota
        (
            "4:cpu,cpuacct:/docker/x\n",
            {"cpu,cpuacct/cpu.cfs_quota_us": "300000", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
            3.0,
        ),
        ("1:cpu:/\n0::/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
        ("2:memory:/x\n", {"memory/cpu.max": "100000 100000"}, None),  # not the cpu controller
        ("", {}, None),
        ("garbage\n0::/\n", {"cpu.max": "oops\n"}, None),
        ("0::/\n", {"cpu.max": "100000 0\n"}, None),  # a period of 0: no quota, not a ZeroDivisionError
    ],
)
def test_the_cpu_quota_of_the_processs_cgroup(
    tmp_path: Path, membership: str, files: dict[str, str], quota: float | None
) -> None:
    assert cpu_quota(*hierarchy(tmp_path, membership, files)) == quota


def test_a_membership_file_that_is_not_utf8_is_read_as_no_limits(tmp_path: Path) -> None:
    """A cgroup's name may be any bytes: read as text, it raised UnicodeDecodeError out of LCS_THREADS'
    default, so the service did not start, and out of every control step's memory reading."""
    root, membership = hierarchy(tmp_path, "", {"a/cpu.max": "100000 100000\n", "a/memory.max": "100\n"})
    membership.write_bytes(b"0::/a\xff\n")
    assert cpu_quota(root, membership) is None and memory_headroom(root, membership) is None


def test_usable_cpus_are_capped_by_the_quota_rounded_up(tmp_path: Path) -> None:
    """A container's `--cpus 1.5` on a bigger machine is 2 usable CPUs (LCS_THREADS defaults to one fewer)."""
    import os

    mine = len(os.sched_getaffinity(0))
    (tmp_path / "self").write_text("0::/\n")
    assert usable_cpus(tmp_path, tmp_path / "self") == mine  # no cpu.max: the affinity mask
    for text, cpus in (("150000 100000", 2), ("100000 100000", 1), ("20000 100000", 1), ("6400000 100000", mine)):
        (tmp_path / "cpu.max").write_text(text)
        assert usable_cpus(tmp_path, tmp_path / "self") == min(mine, cpus)
    assert usable_cpus(tmp_path, tmp_path / "missing") == mine  # no /proc/self/cgroup (not Linux)


GiB = 1 << 30


@pytest.mark.parametrize(
    ("membership", "files", "headroom"),
    [
        # v2: 1 GiB limit, 768 MiB used of which 256 MiB is inactive file cache (reclaimable): half left
        (
            "0::/\n",
            {
                "memory.max": f"{GiB}\n",
                "memory.current": f"{3 * GiB // 4}\n",
                "memory.stat": f"anon 1\ninactive_file {GiB // 4}\n",
            },
            0.5,
        ),
        ("0::/\n", {"memory.max": "max\n", "memory.current": "123\n"}, None),  # no limit
        ("0::/\n", {"memory.max": f"{GiB}\n", "memory.current": f"{GiB}\n"}, 0.0),  # no stat: cache counts as used
        # nested: the least any level has left, over the tightest limit: 256 MiB free in the container's
        # 512 MiB, inside a pod with 1 GiB of 10 GiB free, is 0.5 (the pod's share alone said 0.1)
        (
            "0::/pod/c\n",
            {
                "pod/memory.max": f"{10 * GiB}\n",
                "pod/memory.current": f"{9 * GiB}\n",
                "pod/c/memory.max": f"{GiB // 2}\n",
                "pod/c/memory.current": f"{GiB // 4}\n",
            },
            0.5,
        ),
        # nested: the tighter of the pod's and the container's
        (
            "0::/pod/c\n",
            {
                "pod/memory.max": f"{GiB}\n",
                "pod/memory.current": f"{GiB // 2}\n",
                "pod/c/memory.max": f"{2 * GiB}\n",
                "pod/c/memory.current": f"{GiB // 4}\n",
            },
            0.5,
        ),
        # v1: 9223372036854771712 (no limit) at the root, a 2 GiB limit on the container
        ("4:memory:/docker/x\n", {"memory/memory.limit_in_bytes": "9223372036854771712\n"}, None),
        (
            "4:memory:/docker/x\n",
            {
                "memory/memory.limit_in_bytes": f"{2 * GiB}\n",
                "memory/memory.usage_in_bytes": f"{GiB}\n",
                "memory/memory.stat": f"cache 5\ntotal_inactive_file {GiB // 2}\n",
            },
            0.75,
        ),
        ("1:cpu:/\n", {"cpu/memory.limit_in_bytes": "1"}, None),  # not the memory controller
    ],
)
def test_the_memory_headroom_under_the_processs_cgroup_limit(
    tmp_path: Path, membership: str, files: dict[str, str], headroom: float | None
) -> None:
    got = memory_headroom(*hierarchy(tmp_path, membership, files))
    assert got == (None if headroom is None else pytest.approx(headroom))


def test_the_probe_reports_the_tighter_of_the_machine_and_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from service import signals

    monkeypatch.setattr(signals.psutil, "virtual_memory", lambda: SimpleNamespace(available=60, total=100))
    monkeypatch.setattr(signals, "memory_headroom", lambda: 0.03)  # a pod 3 % from its limit on a roomy node
    assert signals.MachineProbe.memory_available() == 0.03
    monkeypatch.setattr(signals, "memory_headroom", lambda: 0.9)  # a loose limit: the machine is tighter
    assert signals.MachineProbe.memory_available() == 0.6
    monkeypatch.setattr(signals, "memory_headroom", lambda: None)  # no limit: the machine's share
    assert signals.MachineProbe.memory_available() == 0.6


def test_the_bodies_read_at_once_default_to_a_quarter_of_the_memory_granted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LCS_BODIES_MAX_BYTES's default: a pod's 1 GiB limit, nested under a looser one, gives 256 MiB; without a
    limit, a quarter of the machine's memory."""
    files = {"memory.max": "4294967296\n", "memory.current": "0\n", "a/memory.max": "1073741824\n"}
    files["a/memory.current"] = "0\n"
    found = hierarchy(tmp_path, "0::/a\n", files)
    assert memory_limit(*found) == 2**30
    monkeypatch.setattr(cgroups, "memory_limit", lambda: memory_limit(*found))
    assert default_bodies_max_bytes() == 2**28
    monkeypatch.setattr(cgroups, "memory_limit", lambda: None)
    machine = cgroups.os.sysconf("SC_PAGE_SIZE") * cgroups.os.sysconf("SC_PHYS_PAGES")
    assert default_bodies_max_bytes() == machine // 4
