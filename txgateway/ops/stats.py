"""What the gateway has done, counted on the request path and exported to Prometheus on scrape.

Updating prometheus_client metrics per request (label lookup, a lock) would cost several
microseconds a request; here the request path only bumps plain dicts and lists (`record`
runs once per request, after the response), and `MetricsCollector` turns them into metric
families when `/metrics` is scraped. Names and labels are those README.md lists for `/metrics`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client.core import HistogramMetricFamily

    from txgateway.core.pipeline import RequestContext

__all__ = ["MetricsCollector", "Stats"]

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"TRACE", b"CONNECT"})
_STATES = {"closed": 0, "open": 1, "half_open": 2}


class _Histogram:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)   # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


class Stats:
    """Counters the request path updates; read by /metrics, /status and the Manhole.

    A filter of every chain with only a finish phase: `started` is counted by the pipeline."""

    name = "stats"
    on_request = None
    on_response_head = None
    on_response_body = None

    def __init__(self, clock: Any) -> None:
        self.started_at = clock.seconds()
        self.started = 0                                   # requests handed to the pipeline
        self.finished = 0                                  # ... and logged
        self.requests: dict[tuple[str, bytes, int], int] = {}   # (route prefix, method, status)
        self.durations: dict[str, _Histogram] = {}
        self.upstream_durations: dict[str, _Histogram] = {}
        self.rejected: dict[str, int] = {}                 # rate limit 429s by route

    @property
    def in_flight(self) -> int:
        return self.started - self.finished

    def on_finished(self, ctx: RequestContext) -> None:
        now = ctx.end
        self.finished += 1
        route = ctx.route.prefix if ctx.route is not None else ""
        key = (route, ctx.method, ctx.status)          # labels are made on scrape, not here
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        histogram = self.durations.get(route)
        if histogram is None:
            histogram = self.durations[route] = _Histogram()
        histogram.observe(now - ctx.start)
        if ctx.upstream_ms is not None and ctx.upstream is not None:
            self.observe_upstream(ctx.upstream, ctx.upstream_ms / 1000.0)
        if ctx.status == 429 and ctx.error_code == "RATE_LIMITED":
            self.rejected[route] = self.rejected.get(route, 0) + 1

    def observe_upstream(self, upstream: str, seconds: float) -> None:
        """An upstream's time to its response head (a proxied request's, a composed call's)."""
        histogram = self.upstream_durations.get(upstream)
        if histogram is None:
            histogram = self.upstream_durations[upstream] = _Histogram()
        histogram.observe(seconds)

    def by_status_class(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (_, _, status), count in self.requests.items():
            name = f"{status // 100}xx"
            out[name] = out.get(name, 0) + count
        return out


class MetricsCollector:
    """A prometheus_client collector over one gateway's Stats, breakers and Redis link."""

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[Any]:
        # Imported on scrape: only configs with an admin listener pay for prometheus_client (memory).
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.gateway.stats
        requests = CounterMetricFamily("txgateway_requests", "Requests answered, by route, method and status",
                                       labels=["route", "method", "status"])
        counts: dict[tuple[str, str, str], int] = {}
        for (route, method, status), count in list(stats.requests.items()):
            labels = (route, method.decode("ascii") if method in _METHODS else "OTHER", str(status))
            counts[labels] = counts.get(labels, 0) + count
        for labels, count in sorted(counts.items()):
            requests.add_metric(list(labels), count)
        yield requests
        yield _histograms("txgateway_request_duration_seconds", "Time from request head to the end of the response",
                          "route", stats.durations)
        yield _histograms("txgateway_upstream_duration_seconds", "Time from sending to the upstream to its response head",
                          "upstream", stats.upstream_durations)
        rejected = CounterMetricFamily("txgateway_ratelimit_rejected", "Requests answered 429 by the rate limiter",
                                       labels=["route"])
        for route, count in sorted(stats.rejected.items()):
            rejected.add_metric([route], count)
        yield rejected
        circuit = GaugeMetricFamily("txgateway_circuit_state", "Circuit breaker state: 0 closed, 1 open, 2 half_open",
                                    labels=["upstream"])
        trips = CounterMetricFamily("txgateway_circuit_trips", "Times the breaker opened", labels=["upstream"])
        for name, breaker in sorted(self.gateway.breakers.items()):
            circuit.add_metric([name], _STATES[breaker.state])
            trips.add_metric([name], breaker.trips)
        yield circuit
        yield trips
        redis = self.gateway.redis
        yield CounterMetricFamily("txgateway_redis_errors", "Redis calls that failed or timed out",
                                  value=redis.errors if redis is not None else 0)
        yield GaugeMetricFamily("txgateway_redis_up", "1 when Redis answers (or is not used), 0 while it is down",
                                value=0 if redis is not None and not redis.up else 1)
        yield GaugeMetricFamily("txgateway_inflight_requests", "Requests in the pipeline now", value=stats.in_flight)
        healthy = GaugeMetricFamily("txgateway_upstream_target_up", "1 when a target is in rotation",
                                    labels=["upstream", "target"])
        now = self.gateway.clock.seconds()
        for name, group in sorted(self.gateway.proxy.groups.items()):
            for member in group.balancer.members:
                healthy.add_metric([name, member.url], 0 if member.down or member.ejected_until > now else 1)
        yield healthy
        yield from _cache_metrics(self.gateway.durable.get("cache"))


def _cache_metrics(store: Any) -> Iterator[Any]:
    """The response cache's counters per route (filters/cache/store.py), when a route caches."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    if store is None:
        return
    families = {name: CounterMetricFamily(f"txgateway_cache_{name}", doc, labels=["route"]) for name, doc in (
        ("hits", "Responses served fresh from the cache"), ("misses", "Cacheable requests sent upstream"),
        ("stale", "Stale responses served (stale-while-revalidate, stale-if-error, serve_stale, max-stale)"),
        ("revalidated", "Stored responses the upstream confirmed with a 304"))}
    stored = GaugeMetricFamily("txgateway_cache_stored_bytes", "Bytes the cache holds, by route", labels=["route"])
    for route, counts in sorted(store.routes.items()):
        for name, family in families.items():
            family.add_metric([route], getattr(counts, name))
        stored.add_metric([route], counts.bytes)
    yield from families.values()
    yield stored
    yield CounterMetricFamily("txgateway_cache_evictions", "Stored responses evicted to stay under max_memory",
                              value=store.evictions)


def _histograms(name: str, documentation: str, label: str, histograms: dict[str, _Histogram]) -> HistogramMetricFamily:
    from prometheus_client.core import HistogramMetricFamily  # on scrape, as in collect()

    family = HistogramMetricFamily(name, documentation, labels=[label])
    for value, histogram in sorted(histograms.items()):
        family.add_metric([value], histogram.cumulative(), histogram.total)
    return family
