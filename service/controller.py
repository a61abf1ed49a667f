"""The control law: a pure component fed signals and a clock (no sleeps, no I/O), so it is tested
by simulation. It owns two decisions:

1. the *ceiling*, updated every control interval: the largest alpha on the frontier (alphas that run
   faster than every alpha above them) whose predicted utilisation (queueing estimate from the latency
   profile, each alpha's measured ratio to it, the measured per-request handling cost and the CPU left
   by other processes; of the slower stage where the model has cores of its own beside the event loop,
   of both together where they share) stays under a target, corrected by feedback on observed p99
   against the SLO, raised (to the largest alpha that fits) only after `raise_after` calm intervals
   (hysteresis), capped on low battery, and overridden by a manual pin. Alpha is lowered only when that
   relieves the bottleneck: only if the lowest alpha would cut at least 20 % of the time an average
   request takes at the top of the grid (model and request handling run in parallel; the slower sets the
   pace). Where it would not (request handling is the slower), or alpha is already at the bottom, and
   the load offered (refused requests included) would overload even the lowest alpha, the ceiling stays,
   the mode is `shedding`, and admission sheds the excess.
2. each batch's alpha: the largest grid alpha <= min(requested, ceiling) whose predicted batch time
   fits the slack of the batch's most urgent request, never below the batch's floor. The same "is
   alpha the lever?" test applies per batch, to the batch's images and requests; where it fails, or
   while shedding, the batch runs at the capped target (a cheaper batch would not make room for more
   requests, only give accuracy away).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from lcs.alpha import SAME_ALPHA
from service.cache import Grid
from service.profile import LatencyProfile

TARGET_UTILISATION = 0.8  # the ceiling: the largest alpha whose predicted busy share stays at or under this
CALM_CPU_OTHER = 0.1  # other processes' share of the CPU under which batch times teach an alpha's calm ratio
# a batch counts at most this many times slower than expected (its alpha's calm ratio, or the machine's drift):
# one stalled batch (a KVM pause: 5.5x its prediction) then moves an estimate by 5 %, not 45 %, while a lasting
# slowdown still comes through, 5 % a batch compounded (2x in 15 batches, a fraction of a second under load)
SPIKE_LIMIT = 1.5
# an alpha above the ceiling whose calm ratio was not learned again for this long (seconds) has it clamped to
# its profile's pace, where it was slower (`_learn_calm`)
CALM_RATIO_TTL = 10.0
# a batch's hand-off (its wall time outside the model) counts at most SPIKE_LIMIT times the estimate, or this many
# seconds where that is less: a process paused between the threads (60 s) otherwise made the estimate 6 s, every
# batch's predicted time missed its slack and admission refused every queued request, for some 50 batches
HANDOFF_SPIKE_FLOOR = 0.001
# the defaults of LCS_POLICY, LCS_BATTERY_LOW_PERCENT and LCS_BATTERY_ALPHA_CAP (service.settings)
POLICY = "lcs"
BATTERY_LOW_PERCENT = 20.0  # charge, %, under which a machine on battery caps the ceiling
BATTERY_ALPHA_CAP = 0.5  # the ceiling while on battery below the low mark


@dataclass(frozen=True)
class Signals:
    now: float  # seconds, monotonic
    queue_depth: int = 0  # requests waiting
    queued_images: int = 0  # the images those requests hold
    inflight: int = 0  # requests admitted and not yet answered
    arrival_rate: float = 0.0  # requests per second, smoothed
    images_per_request: float = 1.0  # smoothed
    p99: float | None = None  # observed latency p99 over the last window, seconds
    interval_p99: float | None = None  # p99 of the requests answered since the last interval (None: none were)
    cpu_other: float = 0.0  # share of the CPUs this process may use that other processes take, 0..1
    memory_available: float = 1.0  # share of memory available to this process (a cgroup limit's if tighter), 0..1
    battery_percent: float | None = None  # None: no battery
    on_battery: bool = False
    fleet_rate: float | None = None  # fleet-wide requests/s from Prometheus, per replica (shown, not controlled on)
    fleet_p99: float | None = None  # fleet-wide p99 of answered requests, from Prometheus (stands in for p99)
    request_cost: float | None = None  # measured event-loop CPU seconds per request (None: the default)
    offered_rate: float | None = None  # inference requests per second arriving, refused ones included
    loop_busy: float | None = None  # share of the interval the event-loop thread was on a CPU, 0..1
    model_busy: float | None = None  # share of the interval the model was computing, 0..1


def parse_policy(text: str) -> tuple[str, float]:
    """'lcs' (ours), 'fixed:<alpha>', 'step' or 'aimd' -> (name, argument)."""
    name, _, arg = text.partition(":")
    if name == "fixed":
        try:
            a = float(arg)
        except ValueError:
            a = -1.0
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"policy {text!r}: use fixed:<alpha in [0, 1]>, e.g. fixed:0.5")
        return name, a
    if name in ("lcs", "step", "aimd") and not arg:
        return name, 0.0
    raise ValueError(f"unknown policy {text!r}; use lcs, fixed:<alpha>, step or aimd")


@dataclass(frozen=True)
class Decision:
    at: float
    ceiling: float
    reason: str


class Controller:
    def __init__(
        self,
        grid: Grid,
        profile: LatencyProfile,
        *,
        slo_seconds: float,
        max_batch: int,
        request_cost_seconds: float = 0.001,
        raise_after: int = 4,
        battery_low_percent: float = BATTERY_LOW_PERCENT,
        battery_alpha_cap: float = BATTERY_ALPHA_CAP,
        policy: str = POLICY,
        overlap: bool = True,
    ) -> None:
        self.grid = grid
        self.profile = profile
        self.slo = slo_seconds
        self.max_batch = max_batch
        self.request_cost = request_cost_seconds
        self.raise_after = raise_after
        self.battery_low = battery_low_percent
        self.battery_cap = battery_alpha_cap
        self.policy = parse_policy(policy)
        # the model runs on cores of its own (LCS_THREADS < CPUs), beside the event loop: the two stages
        # overlap and the slower sets the pace; otherwise they share the cores and their times add up
        self.overlap = overlap
        # measured / profiled batch time, in two factors. The profile is taken back to back on an idle
        # machine; in service each alpha runs at its own ratio to it (0.61-0.80 at alpha 0 against
        # 0.83-0.95 at alpha 1 in the controller timelines of benchmarks.load on b409f09), so a single
        # ratio measured at one alpha is wrong for the others. `calm_ratio` is each alpha's ratio
        # while no other process takes the CPU (EWMA, learned in service); `drift` is how much slower the
        # model runs now than its calm self, whichever alpha runs (EWMA): the machine's factor, for all.
        self.calm_ratio: dict[float, float] = {}
        self._calm_at: dict[float, float] = {}  # when each calm ratio was last learned (Signals.now)
        self.drift = 1.0
        self._judged_drift = 1.0  # the drift at the end of the last interval
        self._unjudged: list[tuple[float, float]] = []  # (alpha, ratio) of batches since the last interval
        self.handoff = 0.0  # seconds per batch outside the model: between threads, waiting for the GIL (EWMA)
        self._shapes_seen: set[tuple[float, int]] = set()  # (alpha, batch size) pairs run at least once
        self.ceiling = grid.alphas[-1]
        self.pinned: float | None = None
        # the battery cap while it applies (on battery, below the low mark), None otherwise: a ceiling load lifts
        # only this far, whatever mode load puts the controller in
        self.battery_limit: float | None = None
        # what last put the ceiling below the top ("load", "pin" or "battery"; None at the top): while it comes
        # back after a pin or the cap, a refusal is neither load's nor the lifted cap's (app._infer)
        self.held_by: str | None = None
        self.mode = "full"
        self._calm = 0
        self.last_signals: Signals | None = None
        self.decisions: deque[Decision] = deque(maxlen=50)

    # -- the ceiling -------------------------------------------------------------------------------

    def utilisation(self, alpha: float, s: Signals) -> float:
        """Predicted busy share of the pipeline's slower stage at this alpha for the demand this replica sees. Its
        own arrival rate, not the fleet's per replica (`fleet_rate`): that is a rate() over the Prometheus window
        (30 s), which lags a burst's start and end by up to the window; standing in for the local rate it held
        the ceiling at 1 through the first seconds of a burst and below 1 for 17-19.5 s after a 30 s burst
        ended, against 1.5-2.5 s on the local rate (simulated, one replica, session 35's review)."""
        model = self._model_seconds(alpha, s.images_per_request, s)
        if model is None:
            return 0.0
        return s.arrival_rate * self._pace(model, self._request_cost(s))

    def _pace(self, model_seconds: float, handling_seconds: float) -> float:
        """Seconds per unit of work through the two stages, model and request handling."""
        if self.overlap:
            return max(model_seconds, handling_seconds)
        return model_seconds + handling_seconds

    def observe_batch(self, alpha: float, images: int, seconds: float, handoff: float = 0.0) -> None:
        """Feed back a measured batch: `seconds` of model time (timed in the inference thread), so
        predictions follow what the machine delivers now, and `handoff`, the rest of its wall time (between
        threads, waiting for the GIL), which is the same at every alpha and is added per batch. The first
        batch of each (alpha, size) is left out: it creates that shape's kernels (1.5-3x the steady time),
        which says nothing about the machine, and a spread of alphas and sizes meets many first batches."""
        if (alpha, images) not in self._shapes_seen:
            self._shapes_seen.add((alpha, images))
            return
        spike = max(SPIKE_LIMIT * self.handoff, HANDOFF_SPIKE_FLOOR)
        self.handoff = 0.9 * self.handoff + 0.1 * min(max(0.0, handoff), spike)
        predicted = self.profile.predict(alpha, images)
        if not predicted:
            return
        ratio = min(20.0, max(0.5, seconds / predicted))
        self._unjudged.append((alpha, ratio))
        self.drift = self._drifted(self.drift, ratio, self.calm_ratio.get(alpha))

    @staticmethod
    def _drifted(drift: float, ratio: float, calm: float | None) -> float:
        """The drift after a batch that ran at `ratio` to its profile, where its alpha's calm ratio is `calm`
        (None: not learned yet). Each estimate takes the ratio winsorised at SPIKE_LIMIT times its own
        expectation."""
        return 0.9 * drift + 0.1 * min(ratio / (calm or 1.0), SPIKE_LIMIT * drift)

    def _learn_calm(self, s: Signals) -> None:
        """Teach each alpha its calm ratio from the batches run since the last interval, if the CPU other
        processes took over that interval (which is what `s.cpu_other` measures) was low. Judged at the end
        of the interval, not the start: the batches run in the half second after a neighbour starts would
        otherwise count as calm (measured: alpha 1 learned 1.24 instead of ~0.9). A slowdown no probe sees
        is learned here too, per alpha, and so the drift of a calm interval is measured again against the
        calm ratios as they learn, batch by batch: measured against the ratios from before the interval, a
        change of pace counted twice, in the ratio and in the drift (a 1.3x slowdown predicted at 1.63x at
        the interval's end, which lowered the ceiling on steady load with the model 57 % busy).

        An alpha above the ceiling does not run, so nothing corrects its ratio: one not learned again for
        CALM_RATIO_TTL seconds is clamped to its profile (1.0) where it was above it, in a calm interval. Kept,
        a slowdown at alpha 1 that lowered the ceiling stayed in alpha 1's ratio once the pace came back (the
        ceiling stayed below 1 for good at 0.6x load, simulated, 1.6x for 10 s). Alphas at or under the ceiling
        keep their ratios (the slack rule runs them, so they learn), and so does every ratio under 1: deleting
        stale ratios instead lost the lower alphas' calm speed-ups while alpha 1 ran, and a noisy neighbour then
        kept them from being learned again (predicted 1.2-1.5x slow, session 35's review). Carrying each change
        of pace over to the alphas that did not run, tried first, moved alpha 1's ratio with alpha 0's 1.2-1.7x
        after a noisy neighbour stopped (the model 8 % busy there): not back in 6 s in one of three seeds, back
        in 3.95 s in another (session 35)."""
        if s.cpu_other <= CALM_CPU_OTHER:
            drift = self._judged_drift
            for alpha, ratio in self._unjudged:
                calm = self.calm_ratio.get(alpha)
                drift = self._drifted(drift, ratio, calm)
                # an alpha with no calm ratio yet has no expectation (calm ratios range 0.6-1.45 between
                # alphas), so its first ratio stands
                self.calm_ratio[alpha] = ratio if calm is None else 0.9 * calm + 0.1 * min(ratio, SPIKE_LIMIT * calm)
                self._calm_at[alpha] = s.now
            for alpha, at in self._calm_at.items():
                if alpha > self.ceiling and s.now - at > CALM_RATIO_TTL:
                    self.calm_ratio[alpha] = min(self.calm_ratio[alpha], 1.0)
            self.drift = drift
        self._judged_drift = self.drift
        self._unjudged.clear()

    def predicted_wait(self, images: int, requests: int, *, own: int = 0, floor: float = 0.0) -> float | None:
        """Seconds until `images` queued images (in `requests` requests) are answered, at the lowest alpha
        this policy may use for them (ours: the grid's lowest profiled alpha, via the slack rule, where alpha
        is the lever for them and not shedding, else the ceiling, where their batches run; others: the
        ceiling). The last `own` of those images (the request being admitted) run at `floor` (its min_quality
        on the grid) or above: a batch never runs below a floor of its requests. The model's time and the
        event loop's are paced as in the utilisation (`_pace`): where the model has cores of its own the
        slower sets the wait. (Bursty trace, seeds 8-15: 99 % / 1 % held in 7 of 8 runs with this, 5 of 8
        with the sum, which counted the loop's time for requests already parsed as if it came after the
        model's.)"""
        # the slack rule lowers alpha only where that relieves the batch (`batch_alpha`): where alpha is not the
        # lever, batches run at the ceiling, and so the wait is predicted there (predicted at the bottom, an
        # unstructured model's alpha 0, at dense speed but with no calm ratio learned, admitted requests
        # that were then late: 11.9 % of the bursty trace's against 7.6-8.8 % for fixed alphas)
        lever = self.policy[0] == "lcs" and self.mode != "shedding" and self._relieves(images, requests, self.max_batch)
        alpha = self.bottom() if lever else self._profiled_from(self.ceiling)
        s = self.last_signals
        model = self._model_seconds(alpha, images - own, s)
        if model is None:
            return None
        own_model = self._model_seconds(max(alpha, floor), own, s)  # None: the floor is not profiled
        model += own_model if own_model is not None else self._model_seconds(alpha, own, s) or 0.0
        batches = min(requests, -(-images // self.max_batch))  # at least one batch per max_batch images
        return self._pace(model + batches * self.handoff, requests * self._request_cost(s))

    def _profiled_from(self, alpha: float) -> float:
        """The lowest profiled grid alpha at or above `alpha` (else the bottom): what a ceiling that was never
        profiled (LCS_PREBUILD short of the grid, then a pin or the battery cap there) is predicted at. Predicted
        at the ceiling itself the wait was None, which admission reads as "admit": predicted-late shedding was
        off for as long as the pin or the cap held."""
        found = next((a for a in self.grid.alphas if a >= alpha - SAME_ALPHA and self.profile.profiled(a)), None)
        return self.bottom() if found is None else found  # bottom() only when needed: this runs per admission

    def bottom(self) -> float:
        """The grid's lowest profiled alpha, what the cheapest work is predicted at. With LCS_PREBUILD short
        of the grid's bottom, the bottom has no profile: predicted at it, waits were None, which admission
        reads as "admit" (requests bound to be late were served late), and alpha looked like the lever for
        any load, so overload from request handling was never shed."""
        return next((a for a in self.grid.alphas if self.profile.profiled(a)), self.grid.alphas[0])

    def least_seconds(self, images: int, floor: float) -> float | None:
        """The profile's time (an idle machine's) for `images` images at the cheapest alpha a request with
        this floor may run at: a bound that no queue, load or slowdown lowers. None: not profiled."""
        return self.profile.predict(max(self.bottom(), floor), images)

    def _model_seconds(self, alpha: float, images: float, s: Signals | None) -> float | None:
        """Predicted model time for `images` images at `alpha` in full batches (None: not profiled)."""
        per_image = self.profile.per_image(alpha, self.max_batch)
        return None if per_image is None else images * per_image * self._slowdown(alpha, s)

    def _slowdown(self, alpha: float, s: Signals | None) -> float:
        """Model time at `alpha` against the profile: its calm ratio, times the machine's factor, which is
        the measured drift, or the share of CPU other processes leave if `s` is given and that is slower;
        never under 1, so a run of batches faster than calm at one alpha does not make others look cheap."""
        left = 1.0  # the share of CPU others leave, as a slowdown: above CALM_CPU_OTHER only, since calm
        if s is not None and s.cpu_other > CALM_CPU_OTHER:  # ratios are learned with up to that much taken
            left = 1.0 / max(0.1, 1.0 - s.cpu_other)
        machine = max(1.0, self.drift, left)
        return self.calm_ratio.get(alpha, 1.0) * machine

    def _request_cost(self, s: Signals | None) -> float:
        """Event-loop seconds per request: measured, or the configured default before a measurement."""
        return s.request_cost if s is not None and s.request_cost is not None else self.request_cost

    def frontier(self) -> list[float]:
        """The grid alphas a ceiling may sit at, ascending: those that profile faster at the full batch than
        every higher alpha (unprofiled alphas count as faster). The others are slower *and* less accurate
        than some alpha above them, so lowering the ceiling to one gives accuracy away for nothing: on ONNX
        Runtime, which works on blocks of 16 channels, neighbouring widths padded to the same counts tie
        (structured_line at 1 thread, batch 32: alphas 0.85-0.95 in 6.75-6.78 ms, alpha 1 in 6.74)."""
        keep, fastest = [], float("inf")
        for a in reversed(self.grid.alphas):
            t = self.profile.predict(a, self.max_batch)
            if t is None or t < fastest:
                keep.append(a)
                fastest = fastest if t is None else t
        return keep[::-1]

    def fastest(self) -> float:
        """The alpha a load rise falls back on: the frontier's lowest profiled alpha. The frontier counts an
        alpha not profiled (LCS_PREBUILD short of the grid) as fast, but it is not known to be, nor built at
        start-up."""
        frontier = self.frontier()
        return next((a for a in frontier if self.profile.profiled(a)), frontier[0])

    def deficit(self) -> float:
        """The share of its quality range the ceiling has given up, 0..1: (top - ceiling) / (top - fastest),
        from the grid's top to the alpha load falls back on. The HPA scales on it (lcs_quality_deficit_ratio):
        1 - ceiling, which it read before, topped out at 0.15 where the fastest alpha is 0.85 (quantized_line),
        under the HPA's target of 0.2, so a saturated fleet never scaled on it."""
        top, low = self.grid.alphas[-1], self.fastest()
        return 0.0 if top <= low else min(1.0, max(0.0, (top - self.ceiling) / (top - low)))

    def _fits(self, s: Signals, frontier: list[float]) -> float:
        """Largest profiled frontier alpha whose predicted utilisation stays under the target. An alpha with
        no profile (LCS_PREBUILD short of the grid) has no prediction and is not chosen by it: it used to
        count as fitting any load, so the ceiling never left an unprofiled top alpha."""
        known = [a for a in frontier if self.profile.profiled(a)] or frontier
        for a in reversed(known):
            if self.utilisation(a, s) <= TARGET_UTILISATION:
                return a
        return known[0]

    def _held_mode(self, ceiling: float) -> str:
        """The mode while the ceiling holds: the causes of "shedding", "battery" and "pinned" are re-judged
        every interval, so an interval that holds for another reason leaves them; "degraded" (by load) and
        "recovering" carry on until the ceiling is back at the top."""
        if ceiling >= self.grid.alphas[-1]:
            return "full"
        if self.mode in ("degraded", "recovering"):
            return self.mode
        return "recovering" if self.held_by in ("pin", "battery") else "degraded"

    def update(self, s: Signals) -> float:
        """One control interval: returns the new ceiling and records why it moved."""
        self.last_signals = s
        self._learn_calm(s)
        old = self.ceiling
        # kept while pinned too (the pin overrides it: `cap`), so that a release gives it back at once
        self.battery_limit = self._battery_limit(s) if self.policy[0] == "lcs" else None  # baselines: none
        if self.pinned is not None:
            self._calm = 0  # a calm spell counts from the release, not across the pin
            return self._set(self.pinned, "pinned", s.now, "pinned by an operator")
        if self.policy[0] != "lcs":
            return self._baseline_update(s)
        frontier = self.frontier()
        lowest = self.fastest()  # an unprofiled bottom predicts no load at all: the shedding test never held
        feasible = self._fits(s, frontier)
        # this replica's p99 (its alpha fixes its own latency, not other replicas'); the fleet's stands in
        # where it answered too few requests to measure one. Taken with the local one, the fleet's, over the
        # rate window (30 s), held the ceiling down for that window after a 1 s burst
        p99 = s.p99 if s.p99 is not None else s.fleet_p99
        # the latest interval's p99 (the window's where no request was answered in it)
        latest = p99 if s.interval_p99 is None else s.interval_p99
        # the load offered to this replica, refused requests included (the arrival rate counts those admitted)
        offered = replace(s, arrival_rate=s.offered_rate) if s.offered_rate is not None else s
        relieves = self._relieves(s.images_per_request, 1.0, self.max_batch)  # an average request
        queued = self._model_seconds(feasible, s.queued_images, s) or 0.0  # at `feasible`
        if self.utilisation(lowest, offered) > 1.0 and (not relieves or old == lowest):
            # the load offered (refused requests included) overloads even the lowest alpha, and alpha is
            # not the lever (or is spent): keep accuracy and let admission shed the excess
            new, reason, mode = old, "overload not relieved by alpha: shedding", "shedding"
            self._calm = 0  # an overloaded interval is not calm: a spell counts only unbroken calm
        elif relieves and feasible < old:
            new, reason, mode = feasible, "queueing estimate over target", "degraded"
        elif relieves and p99 is not None and p99 > self.slo and old > lowest:
            new, reason, mode = max((a for a in frontier if a < old), default=lowest), "p99 above SLO", "degraded"
        elif feasible > old and (latest is None or latest < 0.7 * self.slo) and queued <= 0.25 * self.slo:
            # calm: headroom by the estimate, the interval's p99 well inside the SLO, and no queue building up
            # (the rate estimate lags a burst's onset; a raise with 6-16 requests queued met one and missed
            # the SLO). The calm spell is the window: raise_after intervals in a row, each judged on its own
            # latencies. Judged on the 2 s window, each interval of the spell looked 2 s back, so a raise
            # waited for 2 s of latencies from before the slowdown ended, and then for the spell
            self._calm += 1
            if self._calm >= self.raise_after:
                # straight to what the estimate says fits: one grid step per calm spell took 40 s from
                # alpha 0 to 1 on a 21-alpha grid; the calm spell itself is the hysteresis
                new, reason = feasible, "headroom: recovering"
                mode = "full" if new >= self.grid.alphas[-1] else "recovering"
                self._calm = 0
            else:
                new, reason, mode = old, "headroom: waiting", self._held_mode(old)
        else:
            self._calm = 0
            new, reason, mode = old, "steady", self._held_mode(old)
        if new < old:
            self._calm = 0
        cap = self.battery_limit  # the mode says "battery" for as long as the cap binds
        capped = cap is not None and new >= cap
        if capped and cap is not None:
            reason = "low battery cap" if new > cap else reason
            # shedding stays the mode: it is what turns the slack rule off and predicts waits at the ceiling (a
            # cheaper batch would still not make room for more requests); the cap is in `battery_limit`
            new, mode = cap, mode if mode == "shedding" else "battery"
        return self._set(new, mode, s.now, reason, hold="battery" if capped else mode)

    def _relieves(self, images: float, requests: float, batch: int) -> bool:
        """Is alpha the lever for this work (`images` in `requests`, run in batches of `batch`): would the
        lowest alpha cut at least 20 % of its pace (`_pace`)? Where the model runs on its own cores
        (`LCS_THREADS` defaults to the CPUs less one) the slower of it and the event loop sets the pace, and
        alpha helps only as far as the model is the slower. Intrinsic costs are compared: the
        profiled model time (idle machine) and the measured event-loop CPU time, with no slowdown, since
        CPU taken by others slows both and the measured drift is mostly waiting for the GIL, the same at
        every alpha. Measured capacities (benchmarks.load): 64 binary images per request, 6.07x from alpha 1
        to 0 (the model is the slower); single JSON images 1.16-1.55x over runs (the loop is the slower,
        though with the load generator on the same two cores the model's CPU time slows it some, which this
        rule does not count: README, second mix)."""
        top, bottom = (self.profile.predict(a, batch) for a in (self.grid.alphas[-1], self.bottom()))
        if top is None or bottom is None:
            return True  # unprofiled: assume the model is the cost
        scale, handling = images / batch, requests * self._request_cost(self.last_signals)
        pace_top, pace_bottom = self._pace(top * scale, handling), self._pace(bottom * scale, handling)
        return pace_top - pace_bottom >= 0.2 * pace_top

    def _baseline_update(self, s: Signals) -> float:
        """The comparison policies of the load benchmark (not for production use)."""
        name, arg = self.policy
        if name == "fixed":
            return self._set(self.grid.down(arg), "fixed", s.now, "fixed policy")
        if name == "step":  # queue-threshold step controller: 1 / middle / lowest by queue depth
            mid = self.grid.down(0.5)
            if s.queue_depth < 2:
                new, band = self.grid.alphas[-1], "under 2"
            else:
                new, band = (mid, "2-7") if s.queue_depth < 8 else (self.grid.alphas[0], "8 or more")
            # the band, not the depth: the reason is a metric label, and each depth would be a series
            return self._set(new, "step", s.now, f"queue depth {band}")
        # aimd: halve on congestion (p99 over the SLO or a queue), else one grid step up
        congested = (s.p99 is not None and s.p99 > self.slo) or s.queue_depth >= 8
        up = self.grid.alphas[min(len(self.grid.alphas) - 1, self.grid.alphas.index(self.ceiling) + 1)]
        new = self.grid.down(self.ceiling * 0.5) if congested else up  # the plain grid, step by step
        return self._set(new, "aimd", s.now, "congestion: halve" if congested else "additive increase")

    def _set(self, ceiling: float, mode: str, now: float, reason: str, hold: str | None = None) -> float:
        """Move the ceiling; `hold`: the mode that holds it, for `_hold` (default `mode`)."""
        if ceiling != self.ceiling:
            self.decisions.append(Decision(now, ceiling, reason))
        self._hold(ceiling, hold or mode)
        self.ceiling = ceiling
        self.mode = mode
        return ceiling

    def pin(self, alpha: float | None, now: float) -> None:
        """Pin the ceiling at `alpha` (snapped down to the grid), or release the pin (None; without one, a
        no-op: the decisions record what happened)."""
        if alpha is None and self.pinned is None:
            return
        self.pinned = None if alpha is None else self.grid.down(alpha)
        # released above the low-battery cap of the last step (a pin overrides it): the cap binds again at once,
        # as admission and each batch (`cap`) read it, not from the next step
        limit = self.battery_limit
        capped = self.pinned is None and limit is not None and self.ceiling > limit
        if capped and limit is not None:
            self._hold(limit, "battery")
            self.ceiling = limit
        self._calm = 0  # a calm spell counts from the release, not across the pin: a pin and release between
        # two control steps carried the spell over it, and the next step raised the ceiling
        self.decisions.append(
            Decision(
                now,
                self.ceiling if self.pinned is None else self.pinned,
                "pinned" if alpha is not None else "pin released",
            )
        )
        if self.pinned is not None:
            self._hold(self.pinned, "pinned")
            self.ceiling = self.pinned
            self.mode = "pinned"
        elif self.mode == "pinned":
            self.mode = "battery" if capped else "recovering"

    def _battery_limit(self, s: Signals) -> float | None:
        """The low-battery cap these signals call for, or None: the largest frontier alpha within
        `battery_cap` (a grid alpha below it that is slower than one above would cost more CPU and accuracy
        both)."""
        if not (s.on_battery and s.battery_percent is not None and s.battery_percent < self.battery_low):
            return None
        return max((a for a in self.frontier() if a <= self.battery_cap + SAME_ALPHA), default=self.fastest())

    def cap(self) -> float | None:
        """What holds alpha down whatever the load: an operator's pin, else the low-battery cap; None if neither."""
        return self.pinned if self.pinned is not None else self.battery_limit

    def _hold(self, ceiling: float, mode: str) -> None:
        """Note what holds the ceiling below the top as it moves to `ceiling` in `mode`: a pin, the battery
        cap, or else load (nothing else lowers it); a hold or a rise keeps the cause."""
        if ceiling >= self.grid.alphas[-1]:
            self.held_by = None
        elif mode in ("pinned", "battery"):
            self.held_by = "pin" if mode == "pinned" else "battery"
        elif ceiling < self.ceiling:
            self.held_by = "load"

    # -- each batch --------------------------------------------------------------------------------

    def batch_alpha(
        self,
        target: float,
        floor: float,
        images: int,
        slack: float | None,
        requests: int = 1,
        wait: Callable[[float], float] | None = None,
    ) -> float:
        """Largest grid alpha in [floor, min(target, ceiling)] whose predicted time for `images` images fits
        `slack` seconds; the capped target where alpha is not the lever for this batch. `wait`: seconds
        before an alpha can run (building its model), counted against the slack too. Where none fits, the
        floor (served late); counting waits, the alpha done soonest, which is the floor unless its model was
        dropped: building it would make a batch already late later still by its build."""
        hi = self.grid.down(min(target, self.ceiling))
        if hi < floor:
            return floor
        if slack is None or self.policy[0] != "lcs" or self.mode == "shedding":  # the slack rule: ours only,
            return hi  # and not while request handling is the bottleneck
        if not self._relieves(images, requests, images):
            return hi  # even the lowest alpha would save under 20 % of the time these requests take
        soonest, least = floor, float("inf")
        for a in reversed(self.grid.alphas):
            if a > hi or a < floor:
                continue
            build = 0.0 if wait is None else wait(a)
            p = self.profile.predict(a, images)
            if p is None and not build:  # unprofiled (LCS_PREBUILD short of the grid): no prediction to check
                return a
            model = 0.0 if p is None else p * self._slowdown(a, None) + self.handoff  # measured slowdown only
            if model + build <= slack:
                return a
            if wait is not None and model + build < least:
                soonest, least = a, model + build
        return soonest

    def state(self) -> dict[str, object]:
        return {
            "policy": ":".join(str(p) for p in self.policy) if self.policy[0] == "fixed" else self.policy[0],
            "mode": self.mode,
            "ceiling": self.ceiling,
            "held_by": self.held_by,
            "pinned": self.pinned,
            "profile_drift": round(self.drift, 3),
            "calm_ratio": {f"{a:g}": round(r, 3) for a, r in sorted(self.calm_ratio.items())},
            "frontier": self.frontier(),  # the alphas the ceiling may sit at
            "batch_handoff_ms": round(1000 * self.handoff, 3),
            "signals": asdict(self.last_signals) if self.last_signals else None,
            "decisions": [asdict(d) for d in self.decisions][-20:],
        }
