"""Prometheus metrics (prefix lcs_, base units, histograms with a bucket at the SLO). One registry per
app, so tests and several apps in one process never share counters."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.cache import ModelCache

INFERENCE_ROUTES = ("/predict", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")
"""The inference routes, as the `endpoint` label spells them (route templates). Queries over them (the
fleet's, the deploy rules') match them with one regex; tests/deploy checks it selects exactly these."""


def latency_buckets(slo: float) -> list[float]:
    base = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
    return sorted({*base, slo})


class _CacheCollector(Collector):
    """Cache figures read from the cache itself at scrape time (the cache is their only owner)."""

    def __init__(self, cache: ModelCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        cache = self._cache
        st = cache.stats
        for name, doc, value in [
            ("lcs_cache_hits", "Batches that found their alpha's model built.", st.hits),
            ("lcs_cache_misses", "Batches that built their alpha's model first, or waited for its build.", st.misses),
            (
                "lcs_cache_evictions",
                "Models evicted from the cache to stay under its byte bound, or dropped under memory pressure.",
                st.evictions,
            ),
            ("lcs_cache_builds", "Models built: at start-up, ahead of need, or for a batch that missed.", st.builds),
            ("lcs_cache_build_seconds", "Seconds spent materialising models.", st.build_seconds),
        ]:
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily("lcs_cache_bytes", "Resident bytes of cached models.", value=cache.bytes)
        yield GaugeMetricFamily("lcs_cache_max_bytes", "Byte bound of the model cache.", value=cache.max_bytes)
        yield GaugeMetricFamily("lcs_cache_entries", "Models in the cache.", value=len(cache))


class Metrics:
    def __init__(self, slo: float, alphas: list[float], cache: ModelCache) -> None:
        """`alphas`: the grid the service serves, each a bucket of lcs_served_alpha beside fixed ones every 0.05
        (fixed, so that replicas with other grids add up, and quantiles interpolate within narrow buckets)."""
        self.registry = r = CollectorRegistry()
        buckets = latency_buckets(slo)
        self.requests = Counter(
            "lcs_requests", "Requests by endpoint and status code.", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "lcs_request_duration_seconds",
            "Request latency, arrival to response.",
            ["endpoint", "status"],
            buckets=buckets,
            registry=r,
        )
        self.queue_wait = Histogram(
            "lcs_queue_wait_seconds", "Time a request waited for its batch.", buckets=buckets, registry=r
        )
        self.compute = Histogram("lcs_batch_compute_seconds", "Model time per batch.", buckets=buckets, registry=r)
        self.batch_size = Histogram(
            "lcs_batch_size_images", "Images per batch.", buckets=[1, 2, 4, 8, 16, 32, 64, 128, 256], registry=r
        )
        self.alpha = Histogram(
            "lcs_served_alpha",
            "Alpha that served each request (1 = most accurate).",
            buckets=sorted({*(round(i / 20, 2) for i in range(21)), *alphas}),
            registry=r,
        )
        self.queue_depth = Gauge("lcs_queue_depth_requests", "Requests waiting for a batch.", registry=r)
        self.inflight = Gauge("lcs_inflight_requests", "Requests admitted and not yet answered.", registry=r)
        self.ceiling = Gauge("lcs_alpha_ceiling", "Current controller ceiling on alpha.", registry=r)
        self.deficit = Gauge(
            "lcs_quality_deficit_ratio",
            "Share of the quality range the ceiling gives up: (grid top - ceiling) / (grid top - fastest alpha).",
            registry=r,
        )
        self.shed = Counter("lcs_shed", "Requests refused with 429/503, by reason.", ["reason"], registry=r)
        self.ceiling_changes = Counter("lcs_alpha_ceiling_changes", "Ceiling moves, by reason.", ["reason"], registry=r)
        self.signal = Gauge("lcs_signal", "Signals the controller observes (GET /controller).", ["signal"], registry=r)
        self.ready = Gauge("lcs_ready", "1 when the service is ready for traffic.", registry=r)
        self.info = Info("lcs_build", "Service and model build information.", registry=r)
        r.register(_CacheCollector(cache))
        self._by_route: dict[tuple[str, int], tuple[Counter, Histogram]] = {}

    def request_done(self, endpoint: str, status: int, seconds: float) -> None:
        """Counts one answered request and its latency. The labelled children are kept: on the hot path
        `labels()` (string conversion, validation and a lock per call) costs more than the update itself."""
        children = self._by_route.get((endpoint, status))
        if children is None:
            children = (self.requests.labels(endpoint, str(status)), self.latency.labels(endpoint, str(status)))
            self._by_route[endpoint, status] = children
        children[0].inc()
        children[1].observe(seconds)
