"""What the gateway has done, counted on the request path and exported to Prometheus on scrape.

Updating prometheus_client metrics per request (label lookup, a lock) would cost several
microseconds a request; here the request path only bumps plain dicts and lists (`record`
runs once per request, after the response), and `MetricsCollector` turns them into metric
families when `/metrics` is scraped. Names and labels are those README.md lists for `/metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from prometheus_client.core import HistogramMetricFamily

    from txgateway.core.pipeline import RequestContext

__all__ = ["MetricsCollector", "Stats", "gauges"]

BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_METHODS: Final = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"TRACE", b"CONNECT"})
_STATES: Final = {"closed": 0, "open": 1, "half_open": 2}


def _bucket(seconds: float) -> int:
    """bisect_left(BUCKETS, seconds) as a compiled loop: most requests stop at the first
    buckets, cheaper than the call into bisect. (BUCKETS is not Final: compiled, a Final
    tuple of floats is unboxed and boxed again, 13 floats, at every loop over it.)"""
    i = 0
    for bound in BUCKETS:
        if seconds <= bound:
            return i
        i += 1
    return i


class _Histogram:
    __slots__ = ("counts", "total", "exemplars")

    def __init__(self, exemplars: bool = False) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)   # the last one is +Inf
        self.total = 0.0
        # per bucket, the last request's (traceparent, seconds, time): OpenMetrics exemplars
        self.exemplars: list[tuple[bytes, float, float] | None] | None = [None] * len(self.counts) if exemplars else None

    def observe(self, seconds: float) -> None:
        self.counts[_bucket(seconds)] += 1
        self.total += seconds

    def observe_traced(self, seconds: float, trace: bytes | None, now: float) -> None:
        index = _bucket(seconds)
        self.counts[index] += 1
        self.total += seconds
        if trace is not None and self.exemplars is not None:
            self.exemplars[index] = (trace, seconds, now)

    def add(self, counts: list[int], total: float, exemplars: list[Any] | None = None) -> None:
        for i, count in enumerate(counts):
            self.counts[i] += count
        self.total += total
        if exemplars is not None and self.exemplars is not None:
            for i, exemplar in enumerate(exemplars):
                mine = self.exemplars[i]
                if exemplar is not None and (mine is None or exemplar[2] > mine[2]):
                    self.exemplars[i] = (exemplar[0].encode("latin-1"), exemplar[1], exemplar[2])

    def dump(self) -> list[Any]:
        """JSON-able, for `add` in another process."""
        exemplars = None if self.exemplars is None else [
            None if e is None else [e[0].decode("latin-1"), e[1], e[2]] for e in self.exemplars]
        return [self.counts, self.total, exemplars]

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


class _Target:
    """One upstream target's requests (by status class of the answer) and latency."""

    __slots__ = ("classes", "latency")

    def __init__(self) -> None:
        self.classes = [0] * 6           # by status // 100: [1] 1xx ... [5] 5xx
        self.latency = _Histogram()


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
        self.durations: dict[str, _Histogram] = {}         # by route, with exemplars
        self.transferred: dict[str, list[int]] = {}        # by route: [request bytes, response bytes]
        self.targets: dict[str, dict[str, _Target]] = {}   # upstream -> target URL -> its counts
        self.retries: dict[str, int] = {}                  # attempts after the first, by upstream
        self.rejected: dict[str, int] = {}                 # rate limit 429s by route
        self.decisions: dict[str, dict[str, int]] = {}     # rate limit outcomes (access log's rate_limit) by route

    @property
    def in_flight(self) -> int:
        return self.started - self.finished

    def on_finished(self, ctx: RequestContext) -> None:
        now = ctx.end
        self.finished += 1
        route = ctx.route.prefix if ctx.route is not None else ""
        status = ctx.status
        key = (route, ctx.method, status)          # labels are made on scrape, not here
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        histogram = self.durations.get(route)
        if histogram is None:
            histogram = self.durations[route] = _Histogram(exemplars=True)
            self.transferred[route] = [0, 0]
        histogram.observe_traced(now - ctx.start, ctx.traceparent, now)
        transferred = self.transferred[route]
        transferred[0] += ctx.bytes_in
        transferred[1] += ctx.bytes_out
        if ctx.upstream is not None and ctx.target_url is not None:
            self.observe_upstream(ctx)
        outcome = ctx.rate_limit
        if outcome is not None:
            decisions = self.decisions.get(route)
            if decisions is None:
                decisions = self.decisions[route] = {}
            decisions[outcome] = decisions.get(outcome, 0) + 1
        if status == 429 and ctx.error_code == "RATE_LIMITED":
            self.rejected[route] = self.rejected.get(route, 0) + 1

    def observe_upstream(self, ctx: RequestContext) -> None:
        """An upstream exchange's counts by target: a proxied request's, a composed call's."""
        upstream: str = ctx.upstream  # type: ignore[assignment]   # callers check it is set
        url: str = ctx.target_url  # type: ignore[assignment]
        targets = self.targets.get(upstream)
        if targets is None:
            targets = self.targets[upstream] = {}
        target = targets.get(url)
        if target is None:
            target = targets[url] = _Target()
        status = ctx.status
        target.classes[status // 100 if status < 600 else 5] += 1
        if ctx.upstream_ms is not None:
            target.latency.observe(ctx.upstream_ms / 1000.0)
        if ctx.retries:
            self.retries[upstream] = self.retries.get(upstream, 0) + ctx.retries

    def upstream_durations(self) -> dict[str, _Histogram]:
        """Each upstream's latency: its targets' summed."""
        out = {}
        for upstream, targets in self.targets.items():
            total = out[upstream] = _Histogram()
            for target in targets.values():
                total.add(target.latency.counts, target.latency.total)
        return out

    def snapshot(self) -> dict[str, Any]:
        """The counters as JSON-able data, for another process to `add` (--workers)."""
        return {
            "started": self.started, "finished": self.finished,
            "requests": [[route, method.decode("latin-1"), status, count]
                         for (route, method, status), count in self.requests.items()],
            "durations": {k: h.dump() for k, h in self.durations.items()},
            "transferred": self.transferred,
            "targets": {upstream: {url: [t.classes, t.latency.dump()] for url, t in targets.items()}
                        for upstream, targets in self.targets.items()},
            "retries": self.retries,
            "rejected": self.rejected,
            "decisions": self.decisions,
        }

    def add(self, snapshot: dict[str, Any]) -> None:
        """Count what another Stats' `snapshot` counted on top of these counters."""
        self.started += snapshot["started"]
        self.finished += snapshot["finished"]
        requests = self.requests
        for route, method, status, count in snapshot["requests"]:
            key = (route, method.encode("latin-1"), status)
            requests[key] = requests.get(key, 0) + count
        for route, (counts, total, exemplars) in snapshot["durations"].items():
            histogram = self.durations.get(route)
            if histogram is None:
                histogram = self.durations[route] = _Histogram(exemplars=True)
                self.transferred[route] = [0, 0]
            histogram.add(counts, total, exemplars)
        for route, (bytes_in, bytes_out) in snapshot["transferred"].items():
            transferred = self.transferred[route]
            transferred[0] += bytes_in
            transferred[1] += bytes_out
        for upstream, targets in snapshot["targets"].items():
            mine = self.targets.setdefault(upstream, {})
            for url, (classes, (counts, total, _)) in targets.items():
                target = mine.get(url)
                if target is None:
                    target = mine[url] = _Target()
                for i, count in enumerate(classes):
                    target.classes[i] += count
                target.latency.add(counts, total)
        _add_counts(self.retries, snapshot["retries"])
        _add_counts(self.rejected, snapshot["rejected"])
        for route, outcomes in snapshot["decisions"].items():
            _add_counts(self.decisions.setdefault(route, {}), outcomes)

    def by_status_class(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (_, _, status), count in self.requests.items():
            name = f"{status // 100}xx"
            out[name] = out.get(name, 0) + count
        return out


def _add_counts(mine: dict[str, int], theirs: dict[str, int]) -> None:
    for key, count in theirs.items():
        mine[key] = mine.get(key, 0) + count


def gauges(gateway: Any) -> dict[str, Any]:
    """What one process reports as it is now (JSON-able): in-flight requests, breakers, targets
    and their health checks, reloads, certificates, JWKS, Redis. With --workers each worker's
    are shown with a `worker` label, as are the counters these objects keep (breaker trips,
    health checks, reloads, Redis errors): a restarted worker starts those at 0."""
    now = gateway.clock.seconds()
    redis = gateway.redis
    jwks = gateway.jwks
    return {
        "in_flight": gateway.stats.in_flight,
        "breakers": [[name, breaker.state, breaker.trips] for name, breaker in sorted(gateway.breakers.items())],
        "targets": [[name, member.url, "down" if member.down else "ejected" if member.ejected_until > now else "up",
                     member.checks_passed, member.checks_failed]
                    for name, group in sorted(gateway.proxy.groups.items()) for member in group.balancer.members],
        "redis_up": 0 if redis is not None and not redis.up else 1,
        "redis_errors": redis.errors if redis is not None else 0,
        "reloads": [gateway.reloads["success"], gateway.reloads["failure"], gateway.last_reload_success],
        "certificates": [[gateway.config.listen[index].endpoint, certificate.cert, certificate.not_after.timestamp()]
                         for index, tls in sorted(gateway.server_tls.items()) for certificate in tls.config.certificates],
        "jwks": [len(jwks.keys), jwks.fetched_at] if jwks is not None else None,
        "tracing": gateway.tracing.counts if gateway.tracing is not None else None,
    }


class MetricsCollector:
    """A prometheus_client collector over the gateway's counters (`Stats`, summed over the
    workers with --workers) and each process's `gauges`.

    `source()` gives (the Stats to export, [(worker label or None, gauges)]); `clock` the
    time certificates' expiry counts from; `cache()` the response cache's store, if any."""

    def __init__(self, source: Callable[[], tuple[Stats, list[tuple[str | None, dict[str, Any]]]]],
                 clock: Any, cache: Callable[[], Any]) -> None:
        self.source = source
        self.clock = clock
        self.cache = cache      # the response cache's store (this process's), or None

    def collect(self) -> Iterator[Any]:
        # Imported on scrape: only configs with an admin listener pay for prometheus_client (memory).
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from txgateway import __version__

        stats, processes = self.source()
        build = GaugeMetricFamily("txgateway_build_info", "The running txgateway's version", labels=["version"])
        build.add_metric([__version__], 1)
        yield build
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
                          ["route"], {(k,): h for k, h in stats.durations.items()})
        request_bytes = CounterMetricFamily("txgateway_request_bytes", "Request body bytes received, by route",
                                            labels=["route"])
        response_bytes = CounterMetricFamily("txgateway_response_bytes", "Response body bytes sent, by route",
                                             labels=["route"])
        for route, (bytes_in, bytes_out) in sorted(stats.transferred.items()):
            request_bytes.add_metric([route], bytes_in)
            response_bytes.add_metric([route], bytes_out)
        yield request_bytes
        yield response_bytes
        yield _histograms("txgateway_upstream_duration_seconds", "Time from sending to the upstream to its response head",
                          ["upstream"], {(k,): h for k, h in stats.upstream_durations().items()})
        yield _histograms("txgateway_upstream_target_duration_seconds",
                          "Time from sending to a target to its response head",
                          ["upstream", "target"], {(upstream, url): t.latency for upstream, targets in stats.targets.items()
                                                   for url, t in targets.items()})
        by_target = CounterMetricFamily("txgateway_upstream_target_requests",
                                        "Requests whose last attempt went to a target, by the class of the answer "
                                        "(5xx: errors, the upstream's or the gateway's 502/504)",
                                        labels=["upstream", "target", "class"])
        for upstream, targets in sorted(stats.targets.items()):
            for url, target in sorted(targets.items()):
                for i, count in enumerate(target.classes):
                    if count:
                        by_target.add_metric([upstream, url, f"{i}xx"], count)
        yield by_target
        retries = CounterMetricFamily("txgateway_upstream_retries", "Attempts after the first, by upstream",
                                      labels=["upstream"])
        for upstream, count in sorted(stats.retries.items()):
            retries.add_metric([upstream], count)
        yield retries
        rejected = CounterMetricFamily("txgateway_ratelimit_rejected", "Requests answered 429 by the rate limiter",
                                       labels=["route"])
        for route, count in sorted(stats.rejected.items()):
            rejected.add_metric([route], count)
        yield rejected
        decisions = CounterMetricFamily("txgateway_ratelimit_decisions", "Rate-limit decisions, by route and outcome",
                                        labels=["route", "outcome"])
        for route, outcomes in sorted(stats.decisions.items()):
            for outcome, count in sorted(outcomes.items()):
                decisions.add_metric([route, outcome], count)
        yield decisions
        yield from self._per_process(processes)

    def _per_process(self, processes: list[tuple[str | None, dict[str, Any]]]) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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
        state = GaugeMetricFamily("txgateway_upstream_target_state",
                                  "1 for a target's state: up, down (active health check) or ejected (live failures)",
                                  labels=["upstream", "target", "state", *worker])
        checks = CounterMetricFamily("txgateway_health_checks", "Active health checks, by result (pass, fail)",
                                     labels=["upstream", "target", "result", *worker])
        reloads = CounterMetricFamily("txgateway_reloads", "Config reloads (SIGHUP), by result (success, failure)",
                                      labels=["result", *worker])
        last_reload = GaugeMetricFamily("txgateway_reload_last_success_timestamp_seconds",
                                        "When the config was last loaded or reloaded (Unix time)", labels=worker)
        expiry = GaugeMetricFamily("txgateway_tls_certificate_expiry_seconds",
                                   "Seconds until a listener's certificate expires (negative: expired)",
                                   labels=["listener", "certificate", *worker])
        jwks_fetch = GaugeMetricFamily("txgateway_jwks_last_success_timestamp_seconds",
                                       "When the JWKS was last fetched successfully (Unix time)", labels=worker)
        jwks_keys = GaugeMetricFamily("txgateway_jwks_keys", "Keys in the JWKS last fetched", labels=worker)
        spans = CounterMetricFamily("txgateway_tracing_spans", "Spans handed to the OTLP collector, by result "
                                    "(exported; dropped: the collector did not take them)", labels=["result", *worker])
        now = self.clock.seconds()
        for label, current in processes:
            w = [label] if label is not None else []
            for name, breaker_state, count in current["breakers"]:
                circuit.add_metric([name, *w], _STATES[breaker_state])
                trips.add_metric([name, *w], count)
            redis_errors.add_metric(w, current["redis_errors"])
            redis_up.add_metric(w, current["redis_up"])
            in_flight.add_metric(w, current["in_flight"])
            for name, url, target_state, passed, failed in current["targets"]:
                healthy.add_metric([name, url, *w], 1 if target_state == "up" else 0)
                for each in ("up", "down", "ejected"):
                    state.add_metric([name, url, each, *w], 1 if each == target_state else 0)
                checks.add_metric([name, url, "pass", *w], passed)
                checks.add_metric([name, url, "fail", *w], failed)
            success, failure, last_success = current["reloads"]
            reloads.add_metric(["success", *w], success)
            reloads.add_metric(["failure", *w], failure)
            last_reload.add_metric(w, last_success)
            for listener, cert, not_after in current["certificates"]:
                expiry.add_metric([listener, cert, *w], not_after - now)
            if current["jwks"] is not None:
                keys, fetched_at = current["jwks"]
                jwks_keys.add_metric(w, keys)
                if fetched_at is not None:
                    jwks_fetch.add_metric(w, fetched_at)
            if current.get("tracing") is not None:
                exported, dropped = current["tracing"]
                spans.add_metric(["exported", *w], exported)
                spans.add_metric(["dropped", *w], dropped)
        yield from (circuit, trips, redis_errors, redis_up, in_flight, healthy, state, checks, reloads, last_reload,
                    expiry, jwks_fetch, jwks_keys, spans)
        cache = self.cache()
        if cache is not None:
            yield from _cache_metrics(cache)


def _cache_metrics(store: Any) -> Iterator[Any]:
    """The response cache's counters per route (filters/cache/store.py), when a route caches."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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


def _histograms(name: str, documentation: str, labels: list[str],
                histograms: dict[tuple[str, ...], _Histogram]) -> HistogramMetricFamily:
    """A histogram family; buckets carry their exemplar (trace_id) where the histogram keeps them."""
    from prometheus_client.core import Exemplar, HistogramMetricFamily  # on scrape, as in collect()

    family = HistogramMetricFamily(name, documentation, labels=labels)
    for values, histogram in sorted(histograms.items()):
        buckets: list[Any] = histogram.cumulative()
        if histogram.exemplars is not None:
            buckets = [(bound, count, Exemplar({"trace_id": e[0][3:35].decode("latin-1")}, e[1], e[2])) if e is not None else (bound, count)
                       for (bound, count), e in zip(buckets, histogram.exemplars, strict=True)]
        family.add_metric(list(values), buckets, histogram.total)
    return family
