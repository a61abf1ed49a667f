"""service.fleet against a fake Prometheus (httpx.MockTransport): ok, down, slow, garbage, staleness.

(Kept beside the deploy tests, where the same source is read from a real Prometheus.)
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Coroutine

import httpx
import pytest

from service.fleet import INFERENCE, FleetFigures, PrometheusFleet, parse_value, queries
from tests.service.service_support import until

Handler = Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]


def vector(value: str) -> dict[str, object]:
    return {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1.0, value]}]}}


def answering(rate: str = "12.5", p99: str = "0.042") -> Handler:
    async def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/query"
        q = request.url.params["query"]
        return httpx.Response(200, json=vector(p99 if q.startswith("histogram_quantile") else rate))

    return handle


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def fleet(handler: Handler, clock: Clock | None = None, timeout: float = 0.2) -> PrometheusFleet:
    return PrometheusFleet(
        "http://prometheus:9090/",
        timeout=timeout,
        max_age=0.75,
        selector='job="lcs"',
        window_seconds=30,
        transport=httpx.MockTransport(handler),
        clock=clock or time.monotonic,
    )


def refresh(f: PrometheusFleet) -> FleetFigures:
    async def go() -> FleetFigures:
        try:
            return await f.refresh()
        finally:
            await f.aclose()

    return asyncio.run(go())


def test_reads_rate_per_replica_and_p99() -> None:
    assert refresh(fleet(answering())) == FleetFigures(rate=12.5, p99=0.042)


def test_queries_carry_the_selector_and_window() -> None:
    q = queries('job="lcs"', 30)
    inference = INFERENCE
    assert q["rate"] == (
        f'sum(rate(lcs_requests_total{{{inference},status="200",job="lcs"}}[30s])) / count(lcs_build_info{{job="lcs"}})'
    )
    # answered requests only, as this replica's own p99 (RequestStats) counts them: a few 408s after a 10 s
    # body timeout put every replica's fleet p99 far over the SLO
    assert f'lcs_request_duration_seconds_bucket{{{inference},status="200",job="lcs"}}[30s]' in q["p99"]
    assert "{}" not in queries("", 30)["rate"]  # no empty matcher braces without a selector


def test_prometheus_down_gives_none() -> None:
    async def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    f = fleet(down)
    assert refresh(f) == FleetFigures(None, None)
    assert not f.up


def test_slow_prometheus_is_cut_off_at_the_timeout() -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200, json=vector("1"))

    t0 = time.monotonic()
    assert refresh(fleet(slow, timeout=0.05)) == FleetFigures(None, None)
    assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize(
    "body",
    [
        b"<html>502 Bad Gateway</html>",
        json.dumps({"status": "error", "errorType": "bad_data", "error": "parse error"}).encode(),
        json.dumps({"status": "success", "data": {"resultType": "vector", "result": []}}).encode(),  # no traffic
        json.dumps(vector("NaN")).encode(),  # histogram_quantile over zero rates
        json.dumps(vector("not a number")).encode(),
        json.dumps({"status": "success", "data": {"resultType": "matrix", "result": []}}).encode(),
        json.dumps([1, 2, 3]).encode(),
    ],
)
def test_garbage_gives_none(body: bytes) -> None:
    async def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body)

    assert refresh(fleet(handle)) == FleetFigures(None, None)


def test_scalar_answers_are_read() -> None:
    assert parse_value({"status": "success", "data": {"resultType": "scalar", "result": [1.0, "3"]}}) == 3.0


def test_last_good_values_last_at_most_max_age() -> None:
    clock = Clock()
    up = True

    async def flaky(request: httpx.Request) -> httpx.Response:
        if not up:
            return httpx.Response(503, text="unavailable")
        return await answering()(request)

    f = fleet(flaky, clock)

    async def go() -> None:
        assert await f.refresh() == FleetFigures(12.5, 0.042)
        nonlocal up
        up = False
        clock.t += 0.5
        assert await f.refresh() == FleetFigures(12.5, 0.042)  # failed, but the last values are 0.5 s old
        clock.t += 0.5
        assert f.current() == FleetFigures(None, None)  # 1.0 s > max_age 0.75: dropped, never stale
        await f.aclose()

    asyncio.run(go())


def test_a_slow_answer_serves_one_step_not_two() -> None:
    """Control steps 0.5 s apart (max_age 0.75). A refresh asked at step 0 and answered 0.3 s later serves
    step 1; if the refresh after it fails, step 2 must fall back to local signals. Stamped when it
    answered, the value was 0.7 s old at step 2 and still served."""
    clock = Clock()
    start = clock.t
    up = True

    async def slow(request: httpx.Request) -> httpx.Response:
        if not up:
            raise httpx.ConnectError("down", request=request)
        clock.t = max(clock.t, start + 0.3)  # answered 0.3 s after the question
        return await answering()(request)

    f = fleet(slow, clock, timeout=0.4)

    async def go() -> None:
        nonlocal up
        await f.refresh()  # asked at step 0
        clock.t = start + 0.5
        assert f.current() == FleetFigures(12.5, 0.042)  # step 1
        up = False
        await f.refresh()  # asked after step 1: fails
        clock.t = start + 1.0
        assert f.current() == FleetFigures(None, None)  # step 2: local signals
        await f.aclose()

    asyncio.run(go())


def test_poll_never_waits_for_prometheus() -> None:
    release = asyncio.Event()
    calls = 0

    async def stuck(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        await release.wait()
        return httpx.Response(200, json=vector("1"))

    async def go() -> None:
        f = fleet(stuck, timeout=0.3)
        f.poll()
        f.poll()  # a refresh is still running: no second one
        # poll returned without yielding to the loop, so nothing has asked Prometheus yet: it cannot have waited
        assert calls == 0 and f.current() == FleetFigures(None, None)
        # one refresh: the two figures and, until it has matched a replica and read a rate, the selector's
        # count and the renamed-label check; waits of 5 s: a slow machine's margin over the 0.3 s timeout
        await until(lambda: calls == 4, timeout=5.0, what="the refresh's four queries")
        # the handler never answers until released: a refresh that ends has given up by itself, at the timeout
        await until(lambda: f._task is not None and f._task.done(), timeout=5.0, what="the refresh to give up")
        assert calls == 4
        release.set()
        await f.aclose()

    asyncio.run(go())


def test_a_bad_url_gives_none_not_an_error() -> None:
    f = PrometheusFleet("prometheus:9090", timeout=0.2, max_age=1.0, window_seconds=30)  # no scheme
    assert refresh(f) == FleetFigures(None, None)


def test_going_down_is_a_warning_once_and_coming_back_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Failed queries were logged at debug level only, so a Prometheus that went away (or a selector it
    refuses) left no trace at the default level. Now: one warning when the source goes down, whatever
    the number of refreshes that fail, and one info line when it answers again. An answer without a
    value (no traffic yet) is an answer: the source is up."""
    state = "up"

    async def handle(request: httpx.Request) -> httpx.Response:
        if state == "down":
            raise httpx.ConnectError("connection refused", request=request)
        if state == "refusing":  # a selector Prometheus cannot parse
            return httpx.Response(400, json={"status": "error", "errorType": "bad_data", "error": "parse error"})
        if state == "idle":
            return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector", "result": []}})
        return await answering()(request)

    clock = Clock()
    f = fleet(handle, clock)

    async def go() -> None:
        nonlocal state
        for now in ["up", "idle", "down", "down", "down", "up", "refusing", "refusing", "idle"]:
            state = now
            await f.refresh()
            clock.t += 30.0
        await f.aclose()

    caplog.set_level("DEBUG", logger="lcs.fleet")
    asyncio.run(go())
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelname != "DEBUG"]
    assert [level for level, _ in logged] == ["WARNING", "INFO", "WARNING", "INFO"], logged
    assert "Prometheus at http://prometheus:9090 did not answer (ConnectError: connection refused)" in logged[0][1]
    assert "this replica's own signals" in logged[0][1]
    assert logged[1][1] == "fleet signals: Prometheus at http://prometheus:9090 answers again"
    assert "HTTP 400: parse error" in logged[2][1]
    assert sum(r.levelname == "DEBUG" for r in caplog.records) >= 4  # each failed refresh, at debug level


def test_the_logged_url_carries_no_credentials(caplog: pytest.LogCaptureFixture) -> None:
    async def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    f = PrometheusFleet(
        "https://lcs:s3cret@prometheus:9090",
        timeout=0.2,
        max_age=1.0,
        window_seconds=30,
        transport=httpx.MockTransport(down),
    )
    refresh(f)
    assert "Prometheus at https://prometheus:9090 did not answer" in caplog.text and "s3cret" not in caplog.text


def test_a_selector_that_matches_no_replica_is_a_warning_once(caplog: pytest.LogCaptureFixture) -> None:
    """A well-formed selector that matches nothing (job="lcs-serve" where the series say job="lcs") gave
    empty answers, as no traffic does, for good and without a word; now Prometheus is asked how many
    replicas the selector matches until it names one, and an empty answer for selector_grace is logged."""
    asked: list[str] = []
    empty = {"status": "success", "data": {"resultType": "vector", "result": []}}

    async def no_match(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.params["query"])
        return httpx.Response(200, json=empty)

    clock = Clock()
    f = fleet(no_match, clock)

    async def go() -> None:
        for _ in range(4):  # 0, 30, 60, 90 s after the first answer
            await f.refresh()
            clock.t += 30
        await f.aclose()

    with caplog.at_level("WARNING", logger="lcs.fleet"):
        asyncio.run(go())
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and 'LCS_PROMETHEUS_SELECTOR=job="lcs"' in warnings[0], warnings
    assert "no lcs_build_info series after 60 s" in warnings[0]
    assert asked.count('count(lcs_build_info{job="lcs"})') == 3  # not asked again once said
    assert f.up  # Prometheus itself answers: not "down"


def test_the_selector_grace_restarts_after_prometheus_fails_to_answer(caplog: pytest.LogCaptureFixture) -> None:
    """Empty before its first scrape, then down for a while: the first empty answer after it came back was
    taken as 60 s of a selector matching nothing."""
    empty = {"status": "success", "data": {"resultType": "vector", "result": []}}
    down = False

    async def handle(request: httpx.Request) -> httpx.Response:
        if down:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json=empty)

    clock = Clock()
    f = fleet(handle, clock)

    async def go() -> None:
        nonlocal down
        await f.refresh()  # empty: nothing scraped yet
        down, clock.t = True, clock.t + 30
        await f.refresh()
        down, clock.t = False, clock.t + 60
        await f.refresh()  # back, 90 s after the first empty answer: the grace starts again here
        clock.t += 30
        await f.refresh()
        await f.aclose()

    with caplog.at_level("WARNING", logger="lcs.fleet"):
        asyncio.run(go())
    assert not [r for r in caplog.records if "no lcs_build_info series" in r.getMessage()]


def test_the_replica_count_is_asked_until_it_answers() -> None:
    asked: list[str] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.params["query"])
        return await answering()(request)

    f = fleet(handle)

    async def go() -> None:
        for _ in range(3):
            assert await f.refresh() == FleetFigures(rate=12.5, p99=0.042)
        await f.aclose()

    asyncio.run(go())
    # each asked once, in the first refresh, which matched a replica and read a rate
    assert asked.count('count(lcs_build_info{job="lcs"})') == 1 and len(asked) == 2 + 3 * 2
    assert asked.count('count(lcs_requests_total{exported_endpoint!="",job="lcs"})') == 1


def test_a_renamed_endpoint_label_is_a_warning_once(caplog: pytest.LogCaptureFixture) -> None:
    """The Prometheus operator labels each target endpoint="<port name>"; scraped without honor_labels, the
    service's endpoint label became exported_endpoint, and every fleet query, which selects the inference
    routes by endpoint, was empty for good without a word (found on a Prometheus configured as the operator
    configures one). Prometheus is asked for exported_endpoint series until a rate answers."""
    asked: list[str] = []
    empty = {"status": "success", "data": {"resultType": "vector", "result": []}}

    async def renamed(request: httpx.Request) -> httpx.Response:
        q = request.url.params["query"]
        asked.append(q)
        if q.startswith("count(lcs_build_info"):
            return httpx.Response(200, json=vector("2"))
        if "exported_endpoint" in q:
            return httpx.Response(200, json=vector("14"))
        return httpx.Response(200, json=empty)  # the figures: nothing carries endpoint="/predict"

    f = fleet(renamed)

    async def go() -> None:
        for _ in range(3):
            assert await f.refresh() == FleetFigures(None, None)
        await f.aclose()

    with caplog.at_level("WARNING", logger="lcs.fleet"):
        asyncio.run(go())
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "exported_endpoint" in warnings[0] and "honor_labels: true" in warnings[0]
    assert sum("exported_endpoint" in q for q in asked) == 1  # not asked again once said


def test_no_renamed_label_warning_once_a_rate_answers(caplog: pytest.LogCaptureFixture) -> None:
    """Asked until the rate answers (the endpoint label is then known to be there), and quiet meanwhile."""
    asked: list[str] = []
    empty = {"status": "success", "data": {"resultType": "vector", "result": []}}
    traffic = False

    async def handle(request: httpx.Request) -> httpx.Response:
        q = request.url.params["query"]
        asked.append(q)
        if q.startswith("count(lcs_build_info"):
            return httpx.Response(200, json=vector("1"))
        if traffic and "exported_endpoint" not in q:
            return await answering()(request)
        return httpx.Response(200, json=empty)

    f = fleet(handle)

    async def go() -> None:
        nonlocal traffic
        for i in range(4):
            traffic = i >= 2
            await f.refresh()
        await f.aclose()

    with caplog.at_level("WARNING", logger="lcs.fleet"):
        asyncio.run(go())
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert sum("exported_endpoint" in q for q in asked) == 3  # the two idle refreshes and the first with a rate


def test_a_servers_error_text_cannot_forge_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    """A 500's `error` field went into the warning verbatim: a newline in it wrote a line of its own."""
    forged = "bad\n2026-12-02 00:00:00,000 INFO lcs.service: fleet signals: Prometheus answers again" + "x" * 2000

    async def lying(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"status": "error", "error": forged})

    with caplog.at_level("WARNING", logger="lcs.fleet"):
        refresh(fleet(lying))
    (said,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "\n" not in said and len(said) < 600 and "HTTP 500: bad 2026-12-02" in said, said


def test_something_else_answering_is_named_by_its_status_not_a_json_error(caplog: pytest.LogCaptureFixture) -> None:
    """A wrong URL or path prefix answered 404 text, logged as "JSONDecodeError: Extra data: line 1 column 5"."""

    async def not_found(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, text="404 page not found", headers={"content-type": "text/plain"})

    with caplog.at_level("WARNING", logger="lcs.fleet"):
        refresh(fleet(not_found))
    assert "HTTP 404 text/plain, not Prometheus's query API; check the URL" in caplog.text, caplog.text


def outages(ups: list[bool], step: float, caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """The fleet's log lines (info and up) over refreshes `step` s apart, Prometheus answering where `ups` says."""
    clock = Clock()
    up = True

    async def handle(request: httpx.Request) -> httpx.Response:
        if not up:
            raise httpx.ConnectError("connection refused", request=request)
        return await answering()(request)

    f = fleet(handle, clock)

    async def go() -> None:
        nonlocal up
        for state in ups:
            up = state  # what handle answers
            await f.refresh()
            clock.t += step
        await f.aclose()

    with caplog.at_level("INFO", logger="lcs.fleet"):
        asyncio.run(go())
    return [(r.levelname, r.getMessage()) for r in caplog.records]


def test_answers_that_straddle_the_timeout_say_one_outage_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    """Answers of 0.1-0.3 s against a 0.2 s timeout went down and up every second or two: a warning and an
    info line each time, 41 lines a minute. Now one outage a minute is said, the next counting those between."""
    flapping = [k % 2 == 1 for k in range(120)]  # 60 s: down and up every half second
    logged = outages([*flapping, False], 0.5, caplog)  # then down a minute after the first warning
    assert [level for level, _ in logged] == ["WARNING", "INFO", "WARNING"], logged
    assert logged[2][1].endswith(
        "; 59 shorter outages since the last such warning (answers near LCS_PROMETHEUS_TIMEOUT_SECONDS?)"
    ), logged[2][1]


def test_an_outage_begun_within_the_minute_is_said_once_the_minute_is_past_and_so_is_its_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An outage begun 30 s after the last warning, and lasting an hour, went unsaid, and so did its end."""
    ups = [not (second < 1 or 30 <= second < 150) for second in range(200)]  # a blip, then down 30-150 s
    logged = outages(ups, 1.0, caplog)
    assert [level for level, _ in logged] == ["WARNING", "INFO", "WARNING", "INFO"], logged
    assert "shorter outage" not in logged[2][1]  # the one said is the one going on
