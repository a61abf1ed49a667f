"""service.signals: request statistics (rate, images per request, windowed p99) and the machine probe."""

from __future__ import annotations

import logging
import math
import types
from pathlib import Path

import psutil
import pytest

from service.signals import MachineProbe, RequestStats


def test_arrival_rate_is_an_ewma_with_the_given_half_life() -> None:
    stats = RequestStats(half_life=1.0)
    t0 = stats._last  # the clock the stats started from
    for _ in range(10):
        stats.arrived(1)
    rate, per_request, _, _ = stats.tick(t0 + 1.0)
    assert rate == pytest.approx(0.5 * 10)  # one half-life: halfway from 0 to 10/s
    assert per_request == pytest.approx(1.0)
    rate, _, _, _ = stats.tick(t0 + 2.0)  # nothing arrived in the next second
    assert rate == pytest.approx(0.5 * 5)


def test_images_per_request_weighs_requests_by_their_age() -> None:
    stats = RequestStats(half_life=1.0)
    t0 = stats._last
    assert stats.tick(t0 + 0.5)[1] == 1.0  # nothing seen yet
    stats.arrived(4)
    stats.arrived(6)
    _, per_request, _, _ = stats.tick(t0 + 1.0)
    assert per_request == pytest.approx(5.0)  # the first requests seen say it all: 1 was no observation
    _, unchanged, _, _ = stats.tick(t0 + 2.0)  # no arrivals: keep the last estimate
    assert unchanged == pytest.approx(5.0)
    for _ in range(2):
        stats.arrived(16)
    _, per_request, _, _ = stats.tick(t0 + 3.0)  # the first two are two half-lives old: a quarter's weight
    assert per_request == pytest.approx((0.25 * 10 + 32) / (0.25 * 2 + 2))


def test_a_step_in_request_size_after_a_quiet_spell_is_read_at_once() -> None:
    """Single images, a minute idle, then 16-image requests: the old requests' weight has decayed away."""
    stats = RequestStats(half_life=1.0)
    t0 = stats._last
    for _ in range(100):
        stats.arrived(1)
    stats.tick(t0 + 1.0)
    stats.tick(t0 + 60.0)
    for _ in range(5):
        stats.arrived(16)
    assert stats.tick(t0 + 60.5)[1] == pytest.approx(16.0, rel=1e-6)


def test_a_long_quiet_spell_keeps_the_last_estimate() -> None:
    """Idle, the decayed sums sink into subnormals: their ratio read 1.0 after about 18 minutes."""
    stats = RequestStats(half_life=1.0)
    t0 = stats._last
    for n in (16, 8, 12):
        stats.arrived(n)
    stats.tick(t0 + 0.5)
    estimates = {round(stats.tick(t0 + 0.5 * k)[1], 9) for k in range(2, 6000)}  # 50 minutes, 0.5 s intervals
    assert estimates == {12.0}


def test_p99_needs_enough_samples_and_forgets_old_ones() -> None:
    stats = RequestStats(window_seconds=5.0)
    t0 = stats._last
    for i in range(19):
        stats.finished(0.01 * (i + 1), now=t0 + 0.5)
    assert stats.tick(t0 + 1.0)[2] is None  # 19 samples: too few for a p99
    stats.finished(1.0, now=t0 + 0.5)
    assert stats.tick(t0 + 1.0)[2] == 1.0  # the slowest of 20
    for _ in range(30):
        stats.finished(0.002, now=t0 + 6.0)
    p99 = stats.tick(t0 + 6.0)[2]  # samples from t0 + 0.5 are out of the 5 s window
    assert p99 == 0.002


def test_the_interval_p99_counts_only_requests_answered_since_the_last_tick() -> None:
    stats = RequestStats(window_seconds=2.0)
    t0 = stats._last
    for _ in range(30):
        stats.finished(0.08, now=t0 + 0.1)  # a slow spell
    assert stats.tick(t0 + 0.5)[2:] == (0.08, 0.08)
    stats.finished(0.03, now=t0 + 0.7)  # one request, the slowest of the interval: its p99
    stats.finished(0.01, now=t0 + 0.8)
    assert stats.tick(t0 + 1.0)[2:] == (0.08, 0.03)  # the window still holds the spell
    assert stats.tick(t0 + 1.5)[2:] == (0.08, None)  # none answered
    assert stats.tick(t0 + 2.5)[2] is None  # the spell left the window: 2 samples are too few


def test_machine_probe_reports_shares() -> None:
    probe = MachineProbe()
    assert 0.0 <= probe.cpu_other() <= 1.0
    assert 0.0 < probe.memory_available() <= 1.0
    percent, on_battery = probe.battery()
    assert percent is None or 0.0 <= percent <= 100.0
    assert isinstance(on_battery, bool)
    assert not (percent is None and on_battery)
    assert math.isfinite(probe.cpu_other())


@pytest.mark.parametrize(("plugged", "on_battery"), [(True, False), (False, True), (None, False)])
def test_a_plug_state_psutil_cannot_tell_is_not_on_battery(
    monkeypatch: pytest.MonkeyPatch, plugged: bool | None, on_battery: bool
) -> None:
    # psutil says None with no AC supply listed and the battery "Not charging" or "Unknown" (a charge limit):
    # read as on battery, it capped alpha on a plugged-in machine below the low mark
    battery = types.SimpleNamespace(percent=15.0, power_plugged=plugged, secsleft=None)
    monkeypatch.setattr(psutil, "sensors_battery", lambda: battery, raising=False)
    assert MachineProbe().battery() == (15.0, on_battery)


@pytest.mark.parametrize("error", [TypeError("can't multiply sequence"), ValueError("capacity"), RuntimeError("IOKit")])
def test_a_battery_psutil_cannot_read_is_no_battery_said_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: Exception
) -> None:
    """psutil raises TypeError or ValueError on garbage in sysfs (an empty energy_now), RuntimeError on macOS:
    it escaped the probe and stopped every control step, so load and memory went unread too."""

    def broken() -> None:
        raise error

    monkeypatch.setattr(psutil, "sensors_battery", broken, raising=False)
    probe = MachineProbe()
    with caplog.at_level(logging.INFO, "lcs.service"):
        assert probe.battery() == probe.battery() == (None, False)
        # it reads again, then fails again: each change is said (a second spell, on battery at 10 %, lifted
        # the cap with no line)
        battery = types.SimpleNamespace(percent=10.0, power_plugged=False, secsleft=None)
        monkeypatch.setattr(psutil, "sensors_battery", lambda: battery, raising=False)
        assert probe.battery() == probe.battery() == (10.0, True)
        monkeypatch.setattr(psutil, "sensors_battery", broken, raising=False)
        assert probe.battery() == (None, False)
    failed = (
        f"cannot read the battery ({type(error).__name__}: {error}); going on without it: LCS_BATTERY_LOW_PERCENT's "
        "cap is not applied until it reads again"
    )
    assert [r.getMessage() for r in caplog.records] == [failed, "the battery reads again", failed]


def test_a_battery_percent_that_is_not_finite_is_no_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    battery = types.SimpleNamespace(percent=float("nan"), power_plugged=False, secsleft=None)
    monkeypatch.setattr(psutil, "sensors_battery", lambda: battery, raising=False)
    assert MachineProbe().battery() == (None, False)


@pytest.mark.parametrize(
    ("busy", "mine", "allowed", "usable", "taken"),
    [
        # a machine all its own (this one): the other processes' share of it, as before
        ([0.9, 0.7], 0.6, {0, 1}, 2, 0.5),
        ([0.3, 0.3], 0.6, {0, 1}, 2, 0.0),
        ([1.0, 1.0], 0.0, {0, 1}, 2, 1.0),
        # a pod limited to 2 CPUs on a 64-core node: 30 busy cores elsewhere take nothing from it (was 0.47);
        # a full node leaves it one core (0.5)
        ([1.0] * 30 + [0.0] * 34, 0.0, set(range(64)), 2, 0.0),
        ([1.0] * 64, 1.0, set(range(64)), 2, 0.5),
        # pinned to cores 0 and 1: the other cores' load is not its concern
        ([0.5, 0.5, 1.0, 1.0], 0.2, {0, 1}, 2, 0.4),
        ([0.2, 0.2], 0.9, {0, 1}, 2, 0.0),  # its own time counted a little high: never below 0
        # ids that are not positions in psutil's list: every listed core counts (an idle machine read as
        # 0.5 and 0.33 taken, and the controller priced the model 2x and 1.5x slower)
        ([0.0] * 4, 0.0, {2, 3, 4, 5}, 4, 0.0),  # lxcfs numbers a cpuset's CPUs from 0
        ([0.0] * 3, 0.0, {0, 1, 3}, 3, 0.0),  # CPU 2 offline: /proc/stat skips it
        # fractional CPU limits (a pod's 500m, a container's --cpus 1.5): rounded up to 1 and 2, a neighbour
        # leaving the quota idle read as 0.5 and 0.25 taken
        ([1.0, 0.5], 0.0, {0, 1}, 0.5, 0.0),
        ([1.0, 1.0], 0.5, {0, 1}, 0.5, 0.0),
        ([0.75, 0.75], 1.0, {0, 1}, 1.5, 0.0),
        ([1.0, 1.0], 0.25, {0, 1}, 0.5, 0.5),  # it got half its half core
    ],
)
def test_cpu_taken_counts_only_what_leaves_this_process_short(
    busy: list[float], mine: float, allowed: set[int], usable: float, taken: float
) -> None:
    from service.signals import cpu_taken

    assert cpu_taken(busy, mine, allowed, usable) == pytest.approx(taken)


@pytest.mark.parametrize(
    ("listed", "taken"),
    [
        ([0, 2, 3], 0.5),  # CPU 1 offline: the busy one is CPU 2, allowed (as a position, CPU 3 was read)
        ([0, 1, 2], 0.0),  # all online: positions are ids, and CPU 2 is idle
        ([0, 1, 2, 3], 0.0),  # a list that does not match psutil's: ids taken as positions, as without one
    ],
)
def test_cpu_taken_finds_the_allowed_cpus_by_id_where_one_below_is_offline(listed: list[int], taken: float) -> None:
    from service.signals import cpu_taken

    assert cpu_taken([0.0, 1.0, 0.0], 0.0, {0, 2}, 2, listed) == pytest.approx(taken)


@pytest.mark.parametrize(
    ("text", "ids"), [("0-3\n", [0, 1, 2, 3]), ("0,2-3,5\n", [0, 2, 3, 5]), ("7", [7]), ("x-1", None), (None, None)]
)
def test_online_cpus_reads_the_kernels_cpu_list(tmp_path: Path, text: str | None, ids: list[int] | None) -> None:
    from service.signals import online_cpus

    path = tmp_path / "online"
    if text is not None:
        path.write_text(text)
    assert online_cpus(path) == ids
