"""One line a minute for an event that repeats, with a count of the rest: how the service logs what could
come once a request (a guess at the admin key, a malformed request) without letting a client flood the log."""

from __future__ import annotations

import math


class Throttle:
    """Lets one event through per `every` seconds and counts those it holds back in between."""

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self._passed = -math.inf
        self._held = 0

    def passes(self, now: float) -> int | None:
        """None: this one is held back (and counted). Else it passes, and this is how many were held back
        since the last that passed."""
        if now - self._passed < self.every:
            self._held += 1
            return None
        held, self._passed, self._held = self._held, now, 0
        return held
