"""Fleet signals from Prometheus: request rate per replica and p99 latency across every replica.

One replica only sees its own requests. Prometheus already scrapes every replica, so the controller asks it
for the fleet's figures (HTTP API, `GET /api/v1/query`), shows them (`GET /controller`, `lcs_signal`) and
lets the fleet's p99 stand in for this replica's where it answered too few requests to measure one. The
ceiling is sized from this replica's own arrival rate: the fleet's is a rate() over the window, which lags
a burst's start and end by up to the window (`Controller.utilisation`).

    rate per replica = sum(rate(lcs_requests_total{INFERENCE,status="200"}[W])) / count(lcs_build_info)
    p99              = histogram_quantile(0.99, sum by (le) (rate(lcs_request_duration_seconds_bucket
                                                                  {INFERENCE,status="200"}[W])))

where INFERENCE matches the inference routes: /predict and the OIP v2 infer paths. Both count answered
requests only: a few 408s (stalled uploads, refused after the body timeout) put every replica's fleet p99
over the SLO.

`lcs_build_info` is exported by every replica from start-up, so the count includes idle ones.

Prometheus must never slow the request path down: a refresh runs as its own asyncio task with an
overall timeout, errors of any kind (down, slow, garbage) give None, and values are kept for at most
`max_age` seconds (the app sets 1.5 control intervals), after which the controller falls back to local
signals. The source going down is logged once, as a warning, and its coming back once, at info; each
failed query only at debug level (a refresh runs every control interval). A selector that matches no
replica gives empty answers, as no traffic does: until `count(lcs_build_info{SELECTOR})` has answered a
number once, it is asked too, and if its answers stay empty for `selector_grace` seconds (counted again after
Prometheus fails to answer: a Prometheus that has just started has scraped nothing yet), that is logged
once, as a warning naming the selector. A scrape that renamed the service's `endpoint` label (a target label
of the same name wins unless the scrape honours the service's labels: the Prometheus operator adds
`endpoint="<port name>"` to every ServiceMonitor target) also gives empty answers for good: until the rate
query has answered a number, Prometheus is asked whether it holds `exported_endpoint` series under the
selector, and if it does that is logged once, as a warning naming the fix.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from service.settings import redact_url

log = logging.getLogger("lcs.fleet")


@dataclass(frozen=True)
class FleetFigures:
    rate: float | None  # requests/s per replica, fleet-wide average; None: unknown
    p99: float | None  # seconds, fleet-wide; None: unknown (e.g. no traffic in the window)


def queries(selector: str, window_seconds: float) -> dict[str, str]:
    """The PromQL the fleet source sends. `selector`: extra label matchers, e.g. 'job="lcs"'."""
    w = f"{max(1, round(window_seconds))}s"
    extra = f",{selector}" if selector else ""
    only = f"{{{selector}}}" if selector else ""
    return {
        "rate": f'sum(rate(lcs_requests_total{{{INFERENCE},status="200"{extra}}}[{w}])) / count(lcs_build_info{only})',
        "p99": "histogram_quantile(0.99, sum by (le) "
        f'(rate(lcs_request_duration_seconds_bucket{{{INFERENCE},status="200"{extra}}}[{w}])))',
    }


INFERENCE = 'endpoint=~"/predict|/v2/models/.+/infer"'
"""The inference routes (`service.metrics.INFERENCE_ROUTES`, labelled by route template); the deploy rules
use the same regex, and tests/deploy checks that it selects those routes and no other. Until session 12 the
queries read /predict alone, so a fleet serving OIP v2 clients read as idle and its zero rate stood in for
the local one; the rate counts answered requests (200), as the local arrival rate counts admitted ones,
not the refused."""


def one_line(text: str, limit: int = 300) -> str:
    """`text` with every run of whitespace (line breaks too) as one space, cut to `limit` characters: a
    server's error text in the log cannot forge a line of its own (a 500's error field did, 2,145
    characters long)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def parse_value(payload: object) -> float | None:
    """The single number of an instant-query answer, or None for an empty, NaN or malformed one."""
    try:
        assert isinstance(payload, dict) and payload.get("status") == "success"
        data = payload["data"]
        if data["resultType"] == "scalar":
            raw = data["result"][1]
        elif data["resultType"] == "vector":
            result = data["result"]
            if len(result) != 1:
                return None  # no series (no traffic yet) or an ambiguous answer
            raw = result[0]["value"][1]
        else:
            return None
        value = float(raw)
    except (AssertionError, KeyError, IndexError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value >= 0 else None


class PrometheusFleet:
    """Reads fleet figures from a Prometheus server without ever blocking or raising.

    `poll()` starts a refresh in the background (at most one at a time) and returns at once;
    `current(now)` returns the last good values younger than `max_age` seconds, else None values.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        max_age: float,
        window_seconds: float,
        selector: str = "",
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        selector_grace: float = 60.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.max_age = max_age
        self.queries = queries(selector, window_seconds)
        self.selector = selector
        self._replicas = f"count(lcs_build_info{{{selector}}})" if selector else "count(lcs_build_info)"
        self._matched = False  # the replicas query has answered a number: the selector matches a replica
        self._renamed = f'count(lcs_requests_total{{exported_endpoint!=""{"," + selector if selector else ""}}})'
        self._labels_known = False  # the rate query has answered a number, or the renamed label was reported
        self._empty_since: float | None = None  # when it first answered with nothing
        self._grace = selector_grace
        self._clock = clock
        self._down_said: float | None = None  # when the last "did not answer" warning was said
        self._down_unsaid = 0  # outages begun since then (a minute between warnings), the current one included
        self._outage_said = False  # the current (or last) outage was said: its return is said too
        self._client = httpx.AsyncClient(base_url=self.url, timeout=timeout, transport=transport)
        self._good: dict[str, tuple[float, float]] = {}  # name -> (value, monotonic time it was read)
        self._task: asyncio.Task[FleetFigures] | None = None
        self.up = True  # whether the last refresh had every query answered (an answer may hold no value)
        self._shown = redact_url(self.url)  # as logged

    async def _query(self, promql: str) -> float | None:
        """The query's value, or None where the answer holds none (e.g. no traffic yet); raises where there
        is no answer: Prometheus down, refusing, an error status, or something else answering."""
        r = await self._client.get("/api/v1/query", params={"query": promql})
        try:
            payload = r.json()
        except ValueError:  # a 404 page, a proxy's HTML: not Prometheus's API at this URL
            kind = r.headers.get("content-type", "no content type")
            raise ValueError(f"HTTP {r.status_code} {kind}, not Prometheus's query API; check the URL") from None
        if not isinstance(payload, dict) or payload.get("status") != "success":
            error = payload.get("error") if isinstance(payload, dict) else None
            raise ValueError(f"HTTP {r.status_code}: {error or 'not a Prometheus query answer'}")
        return parse_value(payload)

    async def refresh(self) -> FleetFigures:
        """Query every figure at once, bounded by `timeout` overall; never raises."""
        names = list(self.queries)
        checks = ([] if self._matched else [self._replicas]) + ([] if self._labels_known else [self._renamed])
        promql = [self.queries[n] for n in names] + checks
        asked = self._clock()  # a value's age counts from the question, not the answer (below)
        answers: list[float | BaseException | None]
        try:
            async with asyncio.timeout(self.timeout):
                answers = await asyncio.gather(*map(self._query, promql), return_exceptions=True)
        except TimeoutError:
            answers = [TimeoutError(f"no answer within LCS_PROMETHEUS_TIMEOUT_SECONDS={self.timeout:g}")] * len(promql)
        self._note(next((a for a in answers if isinstance(a, BaseException)), None))
        now = self._clock()
        answers, checked = answers[: len(names)], answers[len(names) :]
        if not self._matched:
            self._check_selector(checked.pop(0), now)
        values = [None if isinstance(a, BaseException) else a for a in answers]
        if not self._labels_known:
            # a rate that answers is read through the endpoint label: it is there, whatever else is renamed
            self._labels_known = values[names.index("rate")] is not None
            self._check_labels(checked.pop(0))
        for name, value in zip(names, values, strict=True):
            if value is not None:
                # stamped when it answered, a slow answer (half an interval or more) outlived the failure of
                # the refresh after it and served two steps; stamped when asked, it serves one
                self._good[name] = (value, asked)
        return self.current(now)

    def _check_selector(self, replicas: float | BaseException | None, now: float) -> None:
        """Warn once if Prometheus answers but has no replica under the selector for `selector_grace` s."""
        if isinstance(replicas, BaseException):
            self._empty_since = None  # no answer: the source is down (_note reports it); the grace restarts
            return
        if replicas is not None and replicas > 0:
            self._matched = True
            return
        if self._empty_since is None:
            self._empty_since = now
        elif now - self._empty_since >= self._grace:
            self._matched = True  # said once; not asked again
            which = f"LCS_PROMETHEUS_SELECTOR={self.selector}" if self.selector else "no LCS_PROMETHEUS_SELECTOR"
            log.warning(
                "fleet signals: Prometheus at %s answers, but with %s it has no lcs_build_info series after "
                "%g s: no replica of this service matches, so the fleet figures stay unknown and the controller "
                "uses this replica's own signals; check the selector against the labels of this service's "
                "series in Prometheus (and that Prometheus scrapes it)",
                self._shown,
                which,
                self._grace,
            )

    def _check_labels(self, renamed: float | BaseException | None) -> None:
        """Warn once if Prometheus keeps this service's endpoint label as exported_endpoint."""
        if not self._labels_known and isinstance(renamed, float) and renamed > 0:
            self._labels_known = True  # said once; not asked again
            log.warning(
                "fleet signals: Prometheus at %s stores this service's endpoint label as exported_endpoint: "
                "its scrape adds an endpoint label of its own (the Prometheus operator does, per ServiceMonitor "
                "port), so the fleet queries, which select the inference routes by endpoint, find nothing and "
                "the controller uses this replica's own signals; scrape with honor_labels: true (a "
                "ServiceMonitor's honorLabels: true, as deploy/k8s/base/servicemonitor.yaml sets)",
                self._shown,
            )

    def _note(self, problem: BaseException | None) -> None:
        """Log the source going down (a warning) and coming back (info), not every failed query, and at most
        one outage a minute: answers that straddle the timeout went down and up every second or two (41
        lines a minute); the next warning counts the outages between."""
        if problem is not None:
            # down, refused, bad URL, not JSON: the controller falls back to local signals
            log.debug("prometheus query failed: %r", problem)
            now = self._clock()
            if self.up:  # an outage begins
                self._down_unsaid += 1
                self._outage_said = False
            # said once the minute since the last warning has passed, if it lasts that long
            if not self._outage_said and (self._down_said is None or now - self._down_said >= 60.0):
                others = self._down_unsaid - 1
                since = (
                    f"; {others} shorter outage{'s' if others != 1 else ''} since the last such warning (answers "
                    "near LCS_PROMETHEUS_TIMEOUT_SECONDS?)"
                    if others
                    else ""
                )
                log.warning(
                    "fleet signals: Prometheus at %s did not answer (%s: %s); the controller uses this "
                    "replica's own signals until it does%s",
                    self._shown,
                    type(problem).__name__,
                    one_line(str(problem)),  # its error text is the server's: no line breaks, bounded
                    since,
                )
                self._down_said, self._down_unsaid, self._outage_said = now, 0, True
        elif not self.up and self._outage_said:  # the return of the outage the last warning said
            log.info("fleet signals: Prometheus at %s answers again", self._shown)
        self.up = problem is None

    def poll(self) -> None:
        """Start a background refresh unless one is still running; returns at once (needs a running loop)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.refresh(), name="prometheus-fleet")

    def current(self, now: float | None = None) -> FleetFigures:
        now = self._clock() if now is None else now

        def fresh(name: str) -> float | None:
            got = self._good.get(name)
            return got[0] if got is not None and now - got[1] <= self.max_age else None

        return FleetFigures(rate=fresh("rate"), p99=fresh("p99"))

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        await self._client.aclose()
