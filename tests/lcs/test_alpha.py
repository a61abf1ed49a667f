"""The alpha convention and the alpha -> level schedule (README.md, "The method, as implemented")."""

from __future__ import annotations

import itertools
import math

import pytest

from lcs.alpha import KINDS, LEVEL_LABELS, LEVEL_NAMES, Level, Schedule, check_alpha

ALPHAS = [i / 40 for i in range(41)]
BAD_ALPHAS = [float("nan"), -0.1, 1.1, float("inf"), -float("inf")]


@pytest.mark.parametrize("alpha", ALPHAS)
def test_unstructured_keep_formula(alpha: float) -> None:
    level = Schedule("unstructured").level(alpha)
    assert level.keep == pytest.approx(0.025 + (1 - 0.025) * alpha)
    assert level.value == pytest.approx(1 - level.keep, abs=1e-6)  # reported as sparsity


@pytest.mark.parametrize("alpha", ALPHAS)
def test_structured_width_formula(alpha: float) -> None:
    level = Schedule("structured").level(alpha)
    assert level.width == pytest.approx(0.25 + (1 - 0.25) * alpha)
    assert level.value == pytest.approx(level.width, abs=1e-6)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_quantized_bits_formula(alpha: float) -> None:
    level = Schedule("quantized").level(alpha)
    assert level.bits == 3 + min(5, math.floor(6 * alpha))
    assert level.value == float(level.bits)


def test_ends_of_the_range() -> None:
    assert Schedule("unstructured").level(0.0).keep == pytest.approx(0.025)
    assert Schedule("unstructured").level(1.0).keep == 1.0
    assert Schedule("structured").level(0.0).width == 0.25
    assert Schedule("structured").level(1.0).width == 1.0
    assert Schedule("quantized").level(0.0).bits == 3
    assert Schedule("quantized").level(1.0).bits == 8
    # every bit width 3..8 is reachable
    assert {Schedule("quantized").level(a).bits for a in ALPHAS} == set(range(3, 9))


def test_custom_minimums() -> None:
    assert Schedule("unstructured", keep_min=0.1).level(0.5).keep == pytest.approx(0.55)
    assert Schedule("structured", width_min=0.5).level(0.5).width == pytest.approx(0.75)
    assert Schedule("quantized", bits_min=2, bits_max=4).level(0.0).bits == 2
    assert Schedule("quantized", bits_min=2, bits_max=4).level(1.0).bits == 4
    # in between, thirds of alpha per bit (a formula fixed at the default's six steps passed before)
    assert [Schedule("quantized", bits_min=2, bits_max=4).level(a).bits for a in (0.3, 0.5, 0.7)] == [2, 3, 4]


@pytest.mark.parametrize("kind", ["unstructured", "structured", "quantized"])
def test_monotonic_less_compression_as_alpha_grows(kind: str) -> None:
    sched = Schedule(kind)  # type: ignore[arg-type]
    levels = [sched.level(a) for a in ALPHAS]
    amount = [(lv.keep, lv.width, lv.bits) for lv in levels]  # each grows (or stays) with alpha
    assert all(a <= b for a, b in itertools.pairwise(amount))
    assert amount[0] < amount[-1]


@pytest.mark.parametrize("kind", ["unstructured", "structured", "quantized"])
@pytest.mark.parametrize("alpha", BAD_ALPHAS)
def test_invalid_alpha_raises(kind: str, alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha must be in"):
        Schedule(kind).level(alpha)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        check_alpha(alpha)


def test_check_alpha_accepts_the_closed_interval() -> None:
    assert check_alpha(0) == 0.0 and isinstance(check_alpha(0), float)
    assert check_alpha(1) == 1.0
    assert check_alpha("0.5") == 0.5  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "bogus"},
        {"kind": "unstructured", "keep_min": 0.0},
        {"kind": "unstructured", "keep_min": 1.5},
        {"kind": "structured", "width_min": 0.0},
        {"kind": "quantized", "bits_min": 0},
        {"kind": "quantized", "bits_min": 6, "bits_max": 4},
        {"kind": "quantized", "bits_max": 17},
    ],
)
def test_invalid_schedule_raises(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Schedule(**kwargs)  # type: ignore[arg-type]


def test_schedule_round_trips_through_dict() -> None:
    sched = Schedule("unstructured", keep_min=0.05)
    assert Schedule(**sched.to_dict()) == sched  # type: ignore[arg-type]


def test_level_value_per_kind() -> None:
    assert Level("unstructured", keep=0.1).value == pytest.approx(0.9)
    assert Level("structured", width=0.5).value == 0.5
    assert Level("quantized", bits=4).value == 4.0


def test_level_names_and_labels_of_every_kind() -> None:
    """lcs owns them: the service's level_name is LEVEL_NAMES, training's plot axis LEVEL_LABELS."""
    assert set(LEVEL_NAMES) == set(LEVEL_LABELS) == set(KINDS)
    assert LEVEL_NAMES == {"unstructured": "sparsity", "structured": "width", "quantized": "bits"}
    assert LEVEL_LABELS["unstructured"].startswith("sparsity") and LEVEL_LABELS["structured"] == "width fraction"
    assert LEVEL_LABELS["quantized"] == "bits"
