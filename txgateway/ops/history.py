"""The last 15 minutes, sampled every 2 s, for the status page's charts (GET /status/history).

Every EVERY seconds of the injected clock the sampler reads the counters the request path
already keeps, every worker's with --workers (ops/workerstats.py; ops/stats.py: requests by route and status, duration histograms by route and
by upstream) and stores what changed since the last sample: requests (and per second) by status
class, p50/p95/p99 latency (interpolated in the histogram's buckets, as Prometheus's
histogram_quantile does) and the error rate (5xx / all), for the whole gateway, each route
and each upstream (an upstream's requests: those of the routes to it). It also notes breaker
state changes, ejections, and each target's newest error with the time it was first seen.
Memory is bounded: KEEP samples, MAX_EVENTS events. Nothing runs on the request path, and
only a gateway with an admin listener samples.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from txgateway.core.periodic import Periodic
from txgateway.ops.stats import BUCKETS
from txgateway.ops.workerstats import whole_gateway

__all__ = ["EVERY", "KEEP", "History", "quantile"]

EVERY = 2.0                  # seconds between samples
KEEP = 450                   # samples kept: 15 minutes
MAX_EVENTS = 200             # breaker changes and ejections kept
QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))


def quantile(q: float, counts: list[int]) -> float | None:
    """The q-quantile in seconds of per-bucket counts over BUCKETS (+Inf last), linear within a
    bucket; None without observations. Above the last bound it is that bound."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i == len(BUCKETS):
                return BUCKETS[-1]
            low = BUCKETS[i - 1] if i else 0.0
            return low + (BUCKETS[i] - low) * (rank - seen) / count
        seen += count
    return BUCKETS[-1]


def _series(classes: dict[str, int], counts: list[int] | None, seconds: float) -> dict[str, Any]:
    total = sum(classes.values())
    out: dict[str, Any] = {"rps": {k: round(v / seconds, 3) for k, v in sorted(classes.items())},
                           "requests": total,
                           "error_rate": round(classes.get("5xx", 0) / total, 4) if total else None}
    for name, q in QUANTILES:
        value = quantile(q, counts) if counts is not None else None
        out[name] = round(value * 1000, 3) if value is not None else None     # milliseconds
    return out


class History:
    """Samples of one gateway's counters; `snapshot()` is what GET /status/history answers."""

    def __init__(self, gateway: Any, clock: Any) -> None:
        self.gateway = gateway
        self.clock = clock
        self.samples: deque[dict[str, Any]] = deque(maxlen=KEEP)
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.last_errors: dict[str, dict[str, Any]] = {}      # "upstream target" -> {error, at}
        self._requests: dict[tuple[str, bytes, int], int] = {}
        self._durations: dict[str, list[int]] = {}
        self._upstream_durations: dict[str, list[int]] = {}
        self._breakers: dict[str, str] = {}
        self._ejected: set[str] = set()
        self._last = clock.seconds()
        self._periodic = Periodic(clock, EVERY, self.sample)
        self._observe_upstreams(record=False)

    def start(self) -> None:
        self._last = self.clock.seconds()
        self._periodic.start()

    def stop(self) -> None:
        self._periodic.stop()

    def sample(self) -> None:
        """One sample: what changed since the previous one, over every worker under --workers
        (their counters summed, as /metrics has them)."""
        stats = whole_gateway(self.gateway)[0]
        now = self.clock.seconds()
        seconds = max(now - self._last, 0.001)      # EVERY, unless the reactor was late
        self._last = now
        upstream_of = {r.prefix: r.upstream for r in self.gateway.config.routes}
        classes: dict[str, dict[str, int]] = {"gateway": {}}
        current = dict(stats.requests)
        for key, count in current.items():
            delta = count - self._requests.get(key, 0)
            if delta <= 0:
                continue
            route, _, status = key
            name = f"{status // 100}xx"
            scopes = ["gateway", f"route {route}"]
            if upstream_of.get(route):
                scopes.append(f"upstream {upstream_of[route]}")
            for scope in scopes:
                by_class = classes.setdefault(scope, {})
                by_class[name] = by_class.get(name, 0) + delta
        self._requests = current
        route_counts = _deltas(stats.durations, self._durations)
        upstream_counts = _deltas(stats.upstream_durations(), self._upstream_durations)
        everything = [sum(c) for c in zip(*route_counts.values(), strict=True)] if route_counts else None
        series = {"gateway": _series(classes["gateway"], everything, seconds)}
        for route in sorted(set(upstream_of) | {k[6:] for k in classes if k.startswith("route ")}):
            series[f"route {route}"] = _series(classes.get(f"route {route}", {}), route_counts.get(route), seconds)
        for name in sorted(self.gateway.proxy.groups):
            series[f"upstream {name}"] = _series(classes.get(f"upstream {name}", {}),
                                                   upstream_counts.get(name), seconds)
        self.samples.append({"t": round(now, 3), "series": series})
        self._observe_upstreams(record=True)

    def _observe_upstreams(self, record: bool) -> None:
        """Breaker state changes, new ejections and new target errors since the last look."""
        now = self.clock.seconds()
        ejected = set()
        for name, group in self.gateway.proxy.groups.items():
            breaker = group.breaker
            if breaker is not None:
                state = breaker.state
                before = self._breakers.get(name)
                if record and before is not None and before != state:
                    self.events.append({"t": round(now, 3), "kind": "breaker", "upstream": name,
                                        "from": before, "to": state})
                self._breakers[name] = state
            for member in group.balancer.members:
                key = f"{name} {member.url}"
                if member.ejected_until > now:
                    ejected.add(key)
                    if record and key not in self._ejected:
                        self.events.append({"t": round(now, 3), "kind": "ejected", "upstream": name,
                                            "target": member.url, "for_s": round(member.ejected_until - now, 1)})
                if member.last_error and self.last_errors.get(key, {}).get("error") != member.last_error:
                    self.last_errors[key] = {"upstream": name, "target": member.url, "error": member.last_error,
                                             "at": round(now, 3)}
        self._ejected = ejected

    def snapshot(self) -> dict[str, Any]:
        return {"every_s": EVERY, "keep": KEEP, "now": round(self.clock.seconds(), 3),
                "samples": list(self.samples), "events": list(self.events),
                "last_errors": sorted(self.last_errors.values(), key=lambda e: -e["at"])}


def _deltas(histograms: dict[str, Any], previous: dict[str, list[int]]) -> dict[str, list[int]]:
    """Per-bucket counts added since `previous` (which is updated), by name; only changed ones."""
    out = {}
    for name, histogram in list(histograms.items()):
        counts = list(histogram.counts)
        before = previous.get(name)
        previous[name] = counts
        delta = counts if before is None else [a - b for a, b in zip(counts, before, strict=True)]
        if any(delta):
            out[name] = delta
    return out
