"""What the gateway has done, counted on the request path and exported to Prometheus on scrape.

Updating prometheus_client metrics per request (label lookup, a lock) would cost several
microseconds a request; here the request path only bumps plain dicts and lists (`record`
runs once per request, after the response), and `MetricsCollector` turns them into metric
families when `/metrics` is scraped. Names and labels are those README.md lists for `/metrics`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client.core import HistogramMetricFamily

    from txgateway.core.pipeline import RequestContext

__all__ = ["MetricsCollector", "Stats", "gauges"]

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

    def add(self, counts: list[int], total: float) -> None:
        for i, count in enumerate(counts):
            self.counts[i] += count
        self.total += total

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
            histogram = self.upstream_durations.get(ctx.upstream)
            if histogram is None:
                histogram = self.upstream_durations[ctx.upstream] = _Histogram()
            histogram.observe(ctx.upstream_ms / 1000.0)
        if ctx.status == 429 and ctx.error_code == "RATE_LIMITED":
            self.rejected[route] = self.rejected.get(route, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """The counters as JSON-able data, for another process to `add` (--workers)."""
        return {
            "started": self.started, "finished": self.finished,
            "requests": [[route, method.decode("latin-1"), status, count]
                         for (route, method, status), count in self.requests.items()],
            "durations": {k: [h.counts, h.total] for k, h in self.durations.items()},
            "upstream_durations": {k: [h.counts, h.total] for k, h in self.upstream_durations.items()},
            "rejected": self.rejected,
        }

    def add(self, snapshot: dict[str, Any]) -> None:
        """Count what another Stats' `snapshot` counted on top of these counters."""
        self.started += snapshot["started"]
        self.finished += snapshot["finished"]
        requests = self.requests
        for route, method, status, count in snapshot["requests"]:
            key = (route, method.encode("latin-1"), status)
            requests[key] = requests.get(key, 0) + count
        for mine, theirs in ((self.durations, snapshot["durations"]),
                             (self.upstream_durations, snapshot["upstream_durations"])):
            for name, (counts, total) in theirs.items():
                histogram = mine.get(name)
                if histogram is None:
                    histogram = mine[name] = _Histogram()
                histogram.add(counts, total)
        for route, count in snapshot["rejected"].items():
            self.rejected[route] = self.rejected.get(route, 0) + count

    def by_status_class(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (_, _, status), count in self.requests.items():
            name = f"{status // 100}xx"
            out[name] = out.get(name, 0) + count
        return out


def gauges(gateway: Any) -> dict[str, Any]:
    """What one process reports as it is now (JSON-able): in-flight requests, breakers, targets
    in rotation, Redis. With --workers each worker's are shown with a `worker` label, as are
    the breaker trips and Redis errors these objects count (a restarted worker starts them at 0)."""
    now = gateway.clock.seconds()
    redis = gateway.redis
    return {
        "in_flight": gateway.stats.in_flight,
        "breakers": [[name, breaker.state, breaker.trips] for name, breaker in sorted(gateway.breakers.items())],
        "targets": [[name, member.url, 0 if member.down or member.ejected_until > now else 1]
                    for name, group in sorted(gateway.proxy.groups.items()) for member in group.balancer.members],
        "redis_up": 0 if redis is not None and not redis.up else 1,
        "redis_errors": redis.errors if redis is not None else 0,
    }


class MetricsCollector:
    """A prometheus_client collector over the gateway's counters (`Stats`, summed over the
    workers with --workers) and each process's `gauges`.

    `source()` gives (the Stats to export, [(worker label or None, gauges)])."""

    def __init__(self, source: Callable[[], tuple[Stats, list[tuple[str | None, dict[str, Any]]]]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Any]:
        # Imported on scrape: only configs with an admin listener pay for prometheus_client (memory).
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats, processes = self.source()
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
        worker = ["worker"] if processes and processes[0][0] is not None else []
        circuit = GaugeMetricFamily("txgateway_circuit_state", "Circuit breaker state: 0 closed, 1 open, 2 half_open",
                                    labels=["upstream", *worker])
        trips = CounterMetricFamily("txgateway_circuit_trips", "Times the breaker opened", labels=["upstream", *worker])
        redis_errors = CounterMetricFamily("txgateway_redis_errors", "Redis calls that failed or timed out",
                                           labels=worker)
        redis_up = GaugeMetricFamily("txgateway_redis_up", "1 when Redis answers (or is not used), 0 while it is down",
                                     labels=worker)
        in_flight = GaugeMetricFamily("txgateway_inflight_requests", "Requests in the pipeline now", labels=worker)
        healthy = GaugeMetricFamily("txgateway_upstream_target_up", "1 when a target is in rotation",
                                    labels=["upstream", "target", *worker])
        for label, now in processes:
            w = [label] if label is not None else []
            for name, state, count in now["breakers"]:
                circuit.add_metric([name, *w], _STATES[state])
                trips.add_metric([name, *w], count)
            redis_errors.add_metric(w, now["redis_errors"])
            redis_up.add_metric(w, now["redis_up"])
            in_flight.add_metric(w, now["in_flight"])
            for name, url, up in now["targets"]:
                healthy.add_metric([name, url, *w], up)
        yield from (circuit, trips, redis_errors, redis_up, in_flight, healthy)


def _histograms(name: str, documentation: str, label: str, histograms: dict[str, _Histogram]) -> HistogramMetricFamily:
    from prometheus_client.core import HistogramMetricFamily  # on scrape, as in collect()

    family = HistogramMetricFamily(name, documentation, labels=[label])
    for value, histogram in sorted(histograms.items()):
        family.add_metric([value], histogram.cumulative(), histogram.total)
    return family
