"""service.profile: the measured latency table and predictions between its points."""

from __future__ import annotations

import pytest

from service.profile import LatencyProfile


def table() -> LatencyProfile:
    p = LatencyProfile()
    p.add(1.0, 1, 0.002)
    p.add(1.0, 8, 0.009)
    p.add(1.0, 32, 0.032)
    p.add(0.5, 8, 0.004)
    return p


def test_measured_points_are_returned_as_is() -> None:
    p = table()
    assert p.predict(1.0, 1) == 0.002
    assert p.predict(1.0, 8) == 0.009
    assert p.predict(0.5, 8) == 0.004


def test_between_points_is_linear_in_batch_size() -> None:
    p = table()
    assert p.predict(1.0, 20) == pytest.approx(0.009 + (20 - 8) / (32 - 8) * (0.032 - 0.009))
    assert p.predict(1.0, 4) == pytest.approx(0.002 + 3 / 7 * 0.007)


def test_beyond_the_largest_batch_scales_per_image_and_below_the_smallest_is_flat() -> None:
    p = table()
    assert p.predict(1.0, 64) == pytest.approx(0.064)
    assert p.predict(0.5, 16) == pytest.approx(0.008)
    assert p.predict(0.5, 1) == 0.004  # a batch of 1 is assumed no cheaper than the smallest measured


def test_unprofiled_alpha_has_no_prediction() -> None:
    p = table()
    assert p.predict(0.25, 8) is None
    assert p.per_image(0.25, 32) is None
    assert p.profiled(1.0) and not p.profiled(0.25)


def test_per_image() -> None:
    assert table().per_image(1.0, 32) == pytest.approx(0.001)


def test_as_dict_is_milliseconds_keyed_by_strings() -> None:
    assert table().as_dict() == {"0.5": {"8": 4.0}, "1": {"1": 2.0, "8": 9.0, "32": 32.0}}


def test_add_overwrites_a_measurement() -> None:
    p = LatencyProfile()
    p.add(1.0, 8, 0.5)
    p.add(1.0, 8, 0.25)
    assert p.predict(1.0, 8) == 0.25
