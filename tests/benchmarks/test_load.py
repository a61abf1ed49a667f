"""benchmarks.load: the noisy-neighbour reaction read from a controller timeline; the settings its servers get."""

from __future__ import annotations

from benchmarks.load import neighbour_reaction, server_settings


def test_neighbour_reaction_reports_the_drop_the_first_return_and_the_return_for_good() -> None:
    # a 12 s trace: the neighbour runs from 4 s to 8 s
    ceilings = {0.0: 1.0, 4.5: 0.0, 9.5: 1.0, 10.5: 0.5, 11.0: 1.0}
    timeline = []
    for i in range(48):  # polled every 0.25 s
        t = 0.25 * i
        timeline.append({"t": t, "ceiling": next(c for s, c in sorted(ceilings.items(), reverse=True) if t >= s)})
    reaction = neighbour_reaction(timeline, 12.0)
    assert reaction == {
        "ceiling_drop_after_start_s": 0.5,
        "full_quality_first_after_stop_s": 1.5,
        "full_quality_after_stop_s": 3.0,
    }


def test_neighbour_reaction_without_a_return_says_none() -> None:
    timeline = [{"t": 0.25 * i, "ceiling": 1.0 if i < 18 else 0.5} for i in range(48)]
    assert neighbour_reaction(timeline, 12.0) == {
        "ceiling_drop_after_start_s": 0.5,
        "full_quality_first_after_stop_s": None,
        "full_quality_after_stop_s": None,
    }


def test_the_callers_service_settings_reach_every_server_but_not_those_the_benchmark_sets() -> None:
    environ = {"LCS_THREADS": "2", "LCS_BACKEND": "torchscript", "LCS_PORT": "9000", "LCS_POLICY": "aimd", "HOME": "/"}
    assert server_settings(environ, "lcs") == {
        "LCS_THREADS": "2",
        "LCS_BACKEND": "torchscript",
        "LCS_QUEUE_MAX": "64",
        "LCS_API_KEY": "bench",
        "LCS_POLICY": "lcs",
    }
