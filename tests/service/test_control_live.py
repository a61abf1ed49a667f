"""A short live run of the controller inside the running app: load drives the ceiling down, and it
comes back to full quality after the load stops.

Real requests go through the whole app (parsing, queue, batcher, model, metrics) and the real control
loop runs every 50 ms. Two test doubles keep it independent of how fast and how busy this machine is:
the latency profile says alpha = 1 costs 15x what alpha = 0 costs, and the CPU probe reports no other
processes (background jobs on a developer's machine would otherwise count as CPU pressure).
"""

from __future__ import annotations

import threading
import time

from tests.service.service_support import TinyCheckpoint, app_state, make_settings, random_images, serve


def test_load_lowers_the_ceiling_and_it_recovers_after(structured: TinyCheckpoint) -> None:
    settings = make_settings(structured.path, control_interval_seconds=0.05, max_batch=8, queue_max=1024)
    with serve(settings) as client:
        st = app_state(client)
        st.probe.cpu_other = lambda: 0.0  # type: ignore[method-assign]
        st.runtime.profile.seconds = {  # per batch of 1 and 8 images: alpha 1 is 15x alpha 0
            0.0: {1: 0.0005, 8: 0.002},
            0.5: {1: 0.002, 8: 0.012},
            1.0: {1: 0.004, 8: 0.030},
        }
        body = {"inputs": random_images(4, seed=1).squeeze(1).tolist()}
        stop = threading.Event()
        lowest_seen = [1.0]
        statuses: list[int] = []  # asserted here: an assertion in a thread is only a warning

        def load() -> None:
            while not stop.is_set():
                statuses.append(client.post("/predict", json=body).status_code)

        def watch() -> None:
            while not stop.is_set():
                lowest_seen[0] = min(lowest_seen[0], st.runtime.controller.ceiling)
                time.sleep(0.01)

        threads = [threading.Thread(target=load) for _ in range(4)] + [threading.Thread(target=watch)]
        for t in threads:
            t.start()
        end = time.monotonic() + 10.0
        while lowest_seen[0] >= 1.0 and time.monotonic() < end:
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(10)
        assert lowest_seen[0] < 1.0, "the ceiling never dropped under load"
        assert statuses and set(statuses) <= {200, 429}, sorted(set(statuses))
        reasons = {d["reason"] for d in client.get("/controller").json()["decisions"]}
        assert "queueing estimate over target" in reasons

        end = time.monotonic() + 15.0  # load gone: the smoothed rate decays, then one grid step per 4 calm steps
        while st.runtime.controller.ceiling < 1.0 and time.monotonic() < end:
            time.sleep(0.05)
        state = client.get("/controller").json()
        assert state["ceiling"] == 1.0 and state["mode"] == "full", state
        assert any(d["reason"] == "headroom: recovering" for d in state["decisions"])
        metrics = client.get("/metrics").text
        assert 'lcs_alpha_ceiling_changes_total{reason="queueing estimate over target"}' in metrics
