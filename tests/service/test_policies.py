"""The load benchmark's comparison policies and the policy setting."""

from __future__ import annotations

import pytest

from service.cache import Grid
from service.controller import Controller, Signals, parse_policy
from service.profile import LatencyProfile

GRID = Grid([0.0, 0.25, 0.5, 0.75, 1.0])


def _controller(policy: str) -> Controller:
    profile = LatencyProfile()
    for a in GRID.alphas:
        profile.add(a, 1, 0.001 + 0.004 * a)
        profile.add(a, 32, 0.004 + 0.03 * a)
    return Controller(GRID, profile, slo_seconds=0.1, max_batch=32, policy=policy)


@pytest.mark.parametrize(
    ("text", "parsed"), [("lcs", ("lcs", 0.0)), ("fixed:0.5", ("fixed", 0.5)), ("step", ("step", 0.0))]
)
def test_parse_policy(text: str, parsed: tuple[str, float]) -> None:
    assert parse_policy(text) == parsed


@pytest.mark.parametrize("bad", ["fixed", "fixed:2", "fixed:x", "pid", "lcs:1"])
def test_parse_policy_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="policy"):
        parse_policy(bad)


def test_fixed_policy_holds_its_alpha_under_any_load() -> None:
    c = _controller("fixed:0.5")
    for t, rate in enumerate([0.0, 10_000.0, 0.0]):
        assert c.update(Signals(now=float(t), arrival_rate=rate, queue_depth=50, p99=5.0)) == 0.5
    assert c.batch_alpha(1.0, 0.0, 32, slack=0.0001) == 0.5  # no slack rule for baselines


def test_step_policy_follows_queue_depth() -> None:
    c = _controller("step")
    assert c.update(Signals(now=0.0, queue_depth=0)) == 1.0
    assert c.update(Signals(now=1.0, queue_depth=4)) == 0.5
    assert c.update(Signals(now=2.0, queue_depth=20)) == 0.0
    assert c.update(Signals(now=3.0, queue_depth=1)) == 1.0
    assert c.update(Signals(now=4.0, queue_depth=57)) == 0.0
    # one reason per band (a metric label): not one per queue depth
    assert [d.reason for d in c.decisions] == [
        "queue depth 2-7",
        "queue depth 8 or more",
        "queue depth under 2",
        "queue depth 8 or more",
    ]


@pytest.mark.parametrize(("depth", "alpha"), [(0, 1.0), (1, 1.0), (2, 0.5), (7, 0.5), (8, 0.0), (9, 0.0)])
def test_step_policy_bands_start_at_2_and_at_8_queued(depth: int, alpha: float) -> None:
    """The bands are "under 2", "2-7" and "8 or more": each edge on both sides."""
    assert _controller("step").update(Signals(now=0.0, queue_depth=depth)) == alpha


@pytest.mark.parametrize(
    ("signals", "alpha"),
    [
        (Signals(now=0.0, queue_depth=7), 1.0),
        (Signals(now=0.0, queue_depth=8), 0.5),
        (Signals(now=0.0, p99=0.1), 1.0),
        (Signals(now=0.0, p99=0.1 + 1e-9), 0.5),
    ],
)
def test_aimd_congestion_is_8_queued_or_a_p99_over_the_slo(signals: Signals, alpha: float) -> None:
    """From alpha 1: 7 queued or a p99 at the SLO (0.1 s) climb (and stay at 1); 8 queued or a p99 past it
    halve."""
    assert _controller("aimd").update(signals) == alpha


def test_aimd_halves_on_congestion_and_climbs_one_step() -> None:
    c = _controller("aimd")
    assert c.update(Signals(now=0.0, p99=0.5)) == 0.5
    assert c.update(Signals(now=1.0, queue_depth=9)) == 0.25
    assert c.update(Signals(now=2.0)) == 0.5
    assert c.update(Signals(now=3.0)) == 0.75


def test_aimd_climbs_the_plain_grid_not_our_frontier() -> None:
    """The baseline stays the textbook one: additive steps over every grid alpha, even one that runs
    slower than the alpha above it (ours skips those)."""
    c = _controller("aimd")
    c.profile.add(0.75, 32, 0.05)  # slower than alpha 1 (34 ms)
    assert c.update(Signals(now=0.0, p99=0.5)) == 0.5
    assert [c.update(Signals(now=float(t))) for t in (1, 2)] == [0.75, 1.0]


def test_our_policy_uses_slack_but_baselines_do_not() -> None:
    ours, base = _controller("lcs"), _controller("fixed:1")
    # 32 images: alpha 1 takes 34 ms, alpha 0.25 takes 11.5 ms by the profile
    assert ours.batch_alpha(1.0, 0.0, 32, slack=0.012) == 0.25
    assert base.batch_alpha(1.0, 0.0, 32, slack=0.012) == 1.0


def test_settings_refuse_an_unknown_policy(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pydantic import ValidationError

    from service.settings import Settings

    ckpt = tmp_path / "x.safetensors"
    ckpt.write_bytes(b"")
    with pytest.raises(ValidationError, match="unknown policy"):
        Settings(checkpoint=ckpt, policy="pid")
