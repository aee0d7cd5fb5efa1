"""The status page's ring buffer of 2 s samples (ops/history.py), on a task.Clock."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.task import Clock

from tests.conftest import with_defaults
from txgateway.config.schema import parse_config
from txgateway.ops.history import EVERY, KEEP, quantile
from txgateway.ops.stats import BUCKETS
from txgateway.service.gateway import Gateway
from txgateway.testing import make_ctx

CONFIG = """
admin: {endpoint: "tcp:0:interface=127.0.0.1"}
upstreams:
  users: {targets: ["http://127.0.0.1:9"], circuit_breaker: {consecutive_failures: 3, open_for: 30s},
          passive_health: {consecutive_failures: 2, eject_for: 60s}}
routes:
  - {prefix: /api/users, upstream: users}
  - {prefix: /local, respond: {status: 200, body: ok}}
"""


@pytest.fixture
def gw() -> Any:
    clock = Clock()
    clock.advance(1_000_000.0)
    return Gateway(parse_config(with_defaults(CONFIG), "test.yaml"), reactor, clock)


def answer(gw: Any, path: str, status: int, seconds: float, upstream_ms: float | None = None) -> None:
    ctx = make_ctx(gw.config, path, start=gw.clock.seconds() - seconds)
    ctx.status, ctx.end, ctx.upstream_ms = status, gw.clock.seconds(), upstream_ms
    gw.stats.on_finished(ctx)


def test_quantile_interpolates_within_buckets_and_caps_at_the_last_bound() -> None:
    counts = [0] * (len(BUCKETS) + 1)
    assert quantile(0.5, counts) is None
    counts[BUCKETS.index(0.01)] = 10                 # all ten in (0.005, 0.01]
    assert quantile(0.5, counts) == pytest.approx(0.0075)
    assert quantile(0.99, counts) == pytest.approx(0.00995)
    counts[-1] = 90                                  # 90 above 10 s
    assert quantile(0.99, counts) == BUCKETS[-1]


def test_a_sample_holds_what_changed_per_scope_every_2_s(gw: Any) -> None:
    history = gw.history
    history.start()
    gw.clock.advance(EVERY - 0.1)
    for _ in range(8):
        answer(gw, "/api/users/1", 200, 0.004, upstream_ms=3.0)
    answer(gw, "/api/users/1", 502, 0.02, upstream_ms=20.0)
    answer(gw, "/api/users/1", 404, 0.004, upstream_ms=3.0)
    answer(gw, "/local", 200, 0.0001)
    assert history.snapshot()["samples"] == []                  # nothing sampled before 2 s have passed
    gw.clock.advance(0.1)
    (second,) = history.snapshot()["samples"]
    g = second["series"]["gateway"]
    assert g["requests"] == 11 and g["rps"] == {"2xx": 4.5, "4xx": 0.5, "5xx": 0.5}
    assert g["error_rate"] == round(1 / 11, 4)
    assert 2.5 <= g["p50"] <= 5.0 and 10.0 <= g["p99"] <= 25.0          # milliseconds
    users = second["series"]["upstream users"]
    assert users["requests"] == 10 and users["rps"] == {"2xx": 4.0, "4xx": 0.5, "5xx": 0.5}
    assert second["series"]["route /local"]["rps"] == {"2xx": 0.5}
    assert second["t"] == 1_000_000.0 + EVERY

    gw.clock.advance(EVERY)                                      # nothing happened: zeros, no latency
    quiet = history.snapshot()["samples"][-1]["series"]["gateway"]
    assert quiet == {"rps": {}, "requests": 0, "error_rate": None, "p50": None, "p95": None, "p99": None}
    history.stop()


def test_memory_is_bounded_to_15_minutes(gw: Any) -> None:
    gw.history.start()
    for _ in range(KEEP + 50):
        answer(gw, "/local", 200, 0.001)
        gw.clock.advance(EVERY)
    samples = gw.history.snapshot()["samples"]
    assert len(samples) == KEEP == 450
    assert samples[-1]["t"] - samples[0]["t"] == (KEEP - 1) * EVERY == 898.0
    gw.history.stop()


def test_breaker_changes_ejections_and_last_errors_are_noted_with_their_time(gw: Any) -> None:
    history = gw.history
    history.start()
    member = gw.proxy.groups["users"].balancer.members[0]
    gw.clock.advance(EVERY)
    opened = gw.clock.seconds() + 0.5
    gw.clock.advance(0.5)
    gw.breakers.trip("users")
    member.ejected_until = gw.clock.seconds() + 60.0
    member.last_error = "connection refused"
    gw.clock.advance(EVERY - 0.5)
    at = gw.clock.seconds()
    events = history.snapshot()["events"]
    assert events == [{"t": at, "kind": "breaker", "upstream": "users", "from": "closed", "to": "open"},
                      {"t": at, "kind": "ejected", "upstream": "users", "target": member.url, "for_s": 58.5}]
    assert opened < at                                            # noted at the next sample
    gw.clock.advance(EVERY)                                       # still open, still ejected: nothing new
    assert len(history.snapshot()["events"]) == 2
    assert history.snapshot()["last_errors"] == [{"upstream": "users", "target": member.url,
                                                  "error": "connection refused", "at": at}]
    gw.breakers.reset("users")
    gw.clock.advance(EVERY)
    assert history.snapshot()["events"][-1]["to"] == "closed"
    history.stop()
