"""The alpha convention and the alpha -> compression-level schedule, written once.

alpha is a float in [0, 1]. alpha = 1 is the least compressed, most accurate model;
alpha = 0 the most compressed. Every other module asks this one what alpha means.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal, get_args

Kind = Literal["unstructured", "structured", "quantized"]
SubspaceType = Literal["point", "line"]
KINDS: tuple[str, ...] = get_args(Kind)
SUBSPACES: tuple[str, ...] = get_args(SubspaceType)

ALPHA_CONVENTION = "alpha in [0, 1]; 1 = least compressed (most accurate), 0 = most compressed"

# What Level.value measures for each kind: its name (the service's level_name) and its label on a plot axis
LEVEL_NAMES: dict[str, str] = {"unstructured": "sparsity", "structured": "width", "quantized": "bits"}
LEVEL_LABELS: dict[str, str] = {
    "unstructured": "sparsity of pruned layers",
    "structured": "width fraction",
    "quantized": "bits",
}


# Two alphas closer than this are one alpha spelt twice (a setting's 0.50000001 is a checkpoint's 0.5, a
# sum's 0.30000000000000004 is 0.3); grids keep their alphas at least this far apart so none is ambiguous.
SAME_ALPHA = 1e-6


def spelled(alpha: float, names: Sequence[float]) -> float | None:
    """`alpha` as `names` spell it (within SAME_ALPHA), or None if it is none of them."""
    return next((n for n in names if abs(alpha - n) < SAME_ALPHA), None)


def is_grid(alphas: Sequence[float]) -> bool:
    """Strictly increasing alphas, neighbours at least SAME_ALPHA apart (each a distinct alpha)."""
    return all(b - a >= SAME_ALPHA for a, b in itertools.pairwise(alphas))


def check_alpha(alpha: float) -> float:
    """Return alpha as a float, or raise ValueError if it is outside [0, 1] or not finite."""
    a = float(alpha)
    if not (0.0 <= a <= 1.0):  # also rejects NaN
        raise ValueError(f"alpha must be in [0, 1] ({ALPHA_CONVENTION}); got {alpha!r}")
    return a


@dataclass(frozen=True)
class Level:
    """The compression applied at one alpha. Exactly one field is meaningful per kind."""

    kind: Kind
    keep: float = 1.0  # unstructured: fraction of weights kept in each pruned layer
    width: float = 1.0  # structured: fraction of channels kept in each sliced layer
    bits: int = 32  # quantized: weight/activation bits

    @property
    def value(self) -> float:
        """The level as reported, the quantity LEVEL_NAMES names for the kind (a fraction, or bits)."""
        if self.kind == "unstructured":
            return round(1.0 - self.keep, 6)
        if self.kind == "structured":
            return round(self.width, 6)
        return float(self.bits)


@dataclass(frozen=True)
class Schedule:
    """Maps alpha to a compression level for one kind (README.md, "The method, as implemented")."""

    kind: Kind
    keep_min: float = 0.025  # unstructured: up to 97.5 % sparsity at alpha = 0 (reference)
    width_min: float = 0.25  # structured: a quarter of the channels at alpha = 0 (reference)
    bits_min: int = 3
    bits_max: int = 8

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}; got {self.kind!r}")
        if not 0.0 < self.keep_min <= 1.0:
            raise ValueError(f"keep_min must be in (0, 1]; got {self.keep_min}")
        if not 0.0 < self.width_min <= 1.0:
            raise ValueError(f"width_min must be in (0, 1]; got {self.width_min}")
        for name in ("bits_min", "bits_max"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise TypeError(f"{name} must be a whole number; got {getattr(self, name)!r}")
        if not 1 <= self.bits_min <= self.bits_max <= 16:
            raise ValueError(f"need 1 <= bits_min <= bits_max <= 16; got {self.bits_min}..{self.bits_max}")

    def level(self, alpha: float) -> Level:
        a = check_alpha(alpha)
        if self.kind == "unstructured":
            return Level(self.kind, keep=self.keep_min + (1.0 - self.keep_min) * a)
        if self.kind == "structured":
            return Level(self.kind, width=self.width_min + (1.0 - self.width_min) * a)
        steps = self.bits_max - self.bits_min  # 5 for 3..8 bits: b = 3 + min(5, floor(6 * alpha))
        return Level(self.kind, bits=self.bits_min + min(steps, math.floor((steps + 1) * a)))

    def to_dict(self) -> dict[str, object]:
        return asdict(self)
