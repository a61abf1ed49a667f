"""Latency profile: measured seconds per batch at each (alpha, batch size), and predictions between them."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass
class LatencyProfile:
    """seconds[alpha][batch] measured at start-up; predict() interpolates linearly in batch size."""

    seconds: dict[float, dict[int, float]] = field(default_factory=dict)

    def add(self, alpha: float, batch: int, seconds: float) -> None:
        self.seconds.setdefault(alpha, {})[batch] = seconds

    def profiled(self, alpha: float) -> bool:
        return bool(self.seconds.get(alpha))

    def predict(self, alpha: float, batch: int) -> float | None:
        """Predicted compute seconds for `batch` images at `alpha`, or None if alpha was not profiled."""
        if not self.profiled(alpha):
            return None
        row = self.seconds[alpha]
        sizes = sorted(row)
        if batch <= sizes[0]:
            return row[sizes[0]]
        if batch >= sizes[-1]:
            return row[sizes[-1]] * batch / sizes[-1]
        i = bisect.bisect_left(sizes, batch)
        lo, hi = sizes[i - 1], sizes[i]
        f = (batch - lo) / (hi - lo)
        return row[lo] + f * (row[hi] - row[lo])

    def per_image(self, alpha: float, batch: int) -> float | None:
        p = self.predict(alpha, batch)
        return None if p is None else p / batch

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {
            f"{a:g}": {str(b): round(s * 1000, 4) for b, s in sorted(r.items())}
            for a, r in sorted(self.seconds.items())
        }
