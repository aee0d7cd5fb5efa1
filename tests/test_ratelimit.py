"""Token buckets, the local store and the limit step's headers, driven by `task.Clock`.

Exact arithmetic (fractions) is the oracle where floats could hide an off-by-one: a client
that waits exactly `Retry-After` seconds must get its token, and the whole seconds shown
in headers must be the exact ones, rounded as README.md says.
"""

from __future__ import annotations

import json
import math
import random
from fractions import Fraction
from typing import Any

import pytest
from twisted.internet.task import Clock

from txgateway.config.schema import parse_config
from txgateway.core.pipeline import RequestContext
from txgateway.filters.auth.tokens import Identity
from txgateway.filters.ratelimit.filter import Decision, LocalStore, take
from txgateway.testing import RouteFilters, make_ctx, respond, route_filters

PER_MINUTE_10 = 10 / 60       # one token every 6 s


def store(clock: Clock, max_buckets: int = 100_000) -> LocalStore:
    return LocalStore(clock, max_buckets)


# --- take(): one decision -----------------------------------------------------------------

def test_take_admits_while_a_token_is_there_and_refuses_below_one():
    assert take(1.0, 0.0, 0.0, 1.0, 5) == (True, 0.0)
    assert take(0.5, 0.0, 0.0, 1.0, 5) == (False, 0.5)
    assert take(0.5, 0.0, 0.5, 1.0, 5) == (True, 0.0)        # refilled to 1.0 in half a second


def test_take_refill_is_capped_at_burst_and_a_clock_going_back_refills_nothing():
    assert take(0.0, 0.0, 1e6, 1.0, 5) == (True, 4.0)
    assert take(2.0, 10.0, 5.0, 1.0, 5) == (True, 1.0)       # now < updated: no refill, no loss


# --- LocalStore: burst, refill, rejected requests ----------------------------------------

def test_exactly_burst_requests_pass_then_refusal():
    clock = Clock()
    s = store(clock)
    decisions = [s.take("k", PER_MINUTE_10, 5) for _ in range(7)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 2
    assert [d.remaining for d in decisions] == [4.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0]


def test_refill_is_continuous_and_fractional():
    clock = Clock()
    s = store(clock)
    for _ in range(5):
        assert s.take("k", PER_MINUTE_10, 5).allowed
    clock.advance(3)                                   # half a token
    d = s.take("k", PER_MINUTE_10, 5)
    assert not d.allowed and d.remaining == pytest.approx(0.5)
    clock.advance(2.9)                                 # 0.983 tokens: still no
    assert not s.take("k", PER_MINUTE_10, 5).allowed
    clock.advance(0.1)                                 # 1 token, 6 s after the bucket emptied
    d = s.take("k", PER_MINUTE_10, 5)
    assert d.allowed and d.remaining == pytest.approx(0.0)
    clock.advance(15)                                  # 2.5 tokens
    assert [s.take("k", PER_MINUTE_10, 5).allowed for _ in range(3)] == [True, True, False]
    assert s.peek("k") == pytest.approx(0.5)


def test_never_above_capacity():
    clock = Clock()
    s = store(clock)
    s.take("k", PER_MINUTE_10, 5)
    clock.advance(86400 * 30)
    assert s.peek("k") == 5.0
    assert [s.take("k", PER_MINUTE_10, 5).allowed for _ in range(6)] == [True] * 5 + [False]


def test_a_rejected_request_costs_nothing():
    """Kong's users complain that retries while limited keep them limited: here they do not."""
    clock = Clock()
    s = store(clock)
    for _ in range(5):
        s.take("k", PER_MINUTE_10, 5)
    clock.advance(3)
    for _ in range(100):                               # hammering while empty...
        d = s.take("k", PER_MINUTE_10, 5)
        assert not d.allowed and d.remaining == pytest.approx(0.5)
    clock.advance(3)                                   # ...does not delay the next token
    assert s.take("k", PER_MINUTE_10, 5).allowed


def test_buckets_are_independent_per_key():
    clock = Clock()
    s = store(clock)
    assert [s.take("a", 1.0, 2).allowed for _ in range(3)] == [True, True, False]
    assert [s.take("b", 1.0, 2).allowed for _ in range(3)] == [True, True, False]


# --- Retry-After and Reset ----------------------------------------------------------------

@pytest.mark.parametrize(("count", "window", "remaining", "expected"), [
    (3, 60, 0.0, 20),             # exact: 20 s per token
    (7, 60, 0.0, 9),              # 8.57 s rounds up
    (100, 3600, 0.0, 36),         # README.md's free tier
    (5000, 3600, 0.0, 1),         # 0.72 s rounds up to 1
    (100, 1, 0.0, 1),             # 0.01 s: never 0
    (10, 60, 0.5, 3),             # half a token missing: 3 s
    (10, 60, 0.99, 1),            # 0.06 s: at least 1
    (1, 86400, 0.0, 86400),
])
def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one(count, window, remaining, expected):
    assert Decision(False, remaining, count / window, count).retry_after == expected


@pytest.mark.parametrize(("count", "window", "burst", "remaining", "expected"), [
    (100, 3600, 100, 99.0, 36),       # one token short of full
    (100, 3600, 100, 0.0, 3600),      # empty: a whole window
    (10, 60, 5, 0.0, 30),             # burst below the count: 5 tokens at 6 s
    (7, 60, 7, 6.0, 9),               # 8.57 s rounds up
    (10, 60, 5, 5.0, 0),              # already full
])
def test_reset_is_whole_seconds_until_full(count, window, burst, remaining, expected):
    assert Decision(True, remaining, count / window, burst).reset == expected


def test_after_reset_seconds_the_bucket_is_full_and_not_a_second_earlier():
    clock = Clock()
    s = store(clock)
    for _ in range(3):
        d = s.take("k", 7 / 60, 7)
    assert d.reset == 26                               # 3 tokens at 8.57 s = 25.7 s
    clock.advance(d.reset - 1)
    assert s.peek("k") < 7
    clock.advance(1)
    assert s.peek("k") == 7


def _model(seed: int) -> list[tuple[Any, ...]]:
    """Random integer-second traffic against LocalStore and against exact fractions; the
    differences (allowed, remaining shown, Retry-After, Reset, waiting Retry-After works)."""
    rng = random.Random(seed)
    wrong: list[tuple[Any, ...]] = []
    for _ in range(300):
        count = rng.choice([1, 2, 3, 5, 7, 10, 49, 98, 100, 103, 1000, 5000])
        window = rng.choice([1, 60, 3600])
        burst = rng.choice([count, max(1, count // 3), 1, 20])
        rate = Fraction(count, window)
        clock = Clock()
        s = store(clock)
        tokens, updated = Fraction(burst), 0
        for _ in range(40):
            now = int(clock.seconds())
            d = s.take("k", count / window, burst)
            tokens, updated = min(Fraction(burst), tokens + (now - updated) * rate), now
            allowed = tokens >= 1
            tokens -= allowed
            case = (count, window, burst, float(tokens))
            if d.allowed != allowed:
                wrong.append(("allowed", *case, d.allowed))
                break
            if math.floor(d.remaining + 1e-9) != math.floor(tokens):
                wrong.append(("remaining", *case, d.remaining))
            if d.reset != math.ceil((burst - tokens) / rate):
                wrong.append(("reset", *case, d.reset))
            if not allowed:
                exact = max(1, math.ceil((1 - tokens) / rate))
                if d.retry_after != exact:
                    wrong.append(("retry_after", *case, d.retry_after, exact))
                # A client that waits exactly Retry-After from this bucket state gets a token.
                if not take(d.remaining, now, now + d.retry_after, count / window, burst)[0]:
                    wrong.append(("waited retry_after", *case, d.retry_after))
            clock.advance(rng.choice([0, 1, 2, 5, 12, 20, 36]))
    return wrong


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_bucket_arithmetic_matches_exact_fractions(seed):
    """Float refill sums land a few ulps off (3/minute from 0.1 tokens after 18 s summed to
    0.9999999999999999): no refusal, Retry-After or Reset may be off by one because of it."""
    assert _model(seed) == []


# --- LocalStore: bounded memory -----------------------------------------------------------

def test_sweep_forgets_full_buckets_and_keeps_the_others():
    clock = Clock()
    s = store(clock)
    s.take("fast", 1.0, 2)                             # full again after 1 s
    s.take("slow", PER_MINUTE_10, 2)                   # full again after 6 s
    clock.advance(1)
    s.sweep()
    assert set(s.buckets) == {"slow"}
    clock.advance(5)
    s.sweep()
    assert s.buckets == {}
    # A forgotten bucket was full: starting over from full changes nothing.
    assert [s.take("fast", 1.0, 2).allowed for _ in range(3)] == [True, True, False]


def test_beyond_max_buckets_the_least_recently_used_bucket_goes_first():
    """A client that keeps hitting its limit must not get a fresh burst because it was seen
    first: dropping the oldest-created bucket would hand the busiest key a full one."""
    clock = Clock()
    s = store(clock, max_buckets=100)
    assert [s.take("abuser", 1.0, 5).allowed for _ in range(6)] == [True] * 5 + [False]
    for i in range(1000):                              # many other clients, none of them full
        s.take(f"client-{i}", 1.0, 5)
        assert len(s.buckets) <= 100
        if i % 50 == 0:
            assert not s.take("abuser", 1.0, 5).allowed
    assert not s.take("abuser", 1.0, 5).allowed
    assert "client-0" not in s.buckets and "client-999" in s.buckets   # the idle ones went


def test_the_sweeper_runs_on_the_injected_clock_until_stopped():
    clock = Clock()
    s = LocalStore(clock, sweep_every=10.0)
    s.start()
    s.take("k", 1.0, 5)
    clock.advance(9.9)
    assert "k" in s.buckets                            # full since 1 s, no sweep yet
    clock.advance(0.1)
    assert s.buckets == {}
    s.stop()
    s.take("k", 1.0, 5)
    clock.advance(100)
    assert "k" in s.buckets
    assert clock.getDelayedCalls() == []


def test_max_buckets_bounds_memory_under_a_flood_of_new_keys():
    clock = Clock()
    s = store(clock, max_buckets=100)
    for i in range(5000):
        assert s.take(f"k{i}", PER_MINUTE_10, 1).allowed   # every key a fresh, now empty bucket
        assert len(s.buckets) <= 100
    assert "k4999" in s.buckets and "k0" not in s.buckets


def test_eviction_forgets_full_buckets_before_busy_ones():
    clock = Clock()
    s = store(clock, max_buckets=100)
    for i in range(50):
        s.take(f"busy{i}", PER_MINUTE_10, 1)             # empty for 6 s
    for i in range(50):
        s.take(f"idle{i}", 1.0, 1)                       # full again after 1 s
    clock.advance(1)
    s.take("new", 1.0, 1)
    assert {k for k in s.buckets if k.startswith("busy")} == {f"busy{i}" for i in range(50)}
    assert not any(k.startswith("idle") for k in s.buckets)
    assert not s.take("busy0", PER_MINUTE_10, 1).allowed    # its state survived


# --- the limit step: headers, 429, keys ---------------------------------------------------

LIMITED = """\
listen: [{endpoint: "tcp:0"}]
rate_limits:
  tiers:
    free: {rate: 100/hour}
    pro: {rate: 10/minute, burst: 3}
    'odd"tier\\': {rate: 1/second}
  default_tier: free
upstreams:
  u: {targets: ["http://127.0.0.1:1"]}
routes:
  - {prefix: /tiered, upstream: u, rate_limit: {key: ip}}
  - {prefix: /own, upstream: u, rate_limit: {key: ip, rate: 100/minute, burst: 20}}
  - {prefix: /scoped-a, upstream: u, rate_limit: {key: ip, rate: 2/minute, scope: free}}
  - {prefix: /scoped-b, upstream: u, rate_limit: {key: ip, rate: 5/minute, scope: free-b}}
  - {prefix: /header, upstream: u, rate_limit: {key: "header:X-Client"}}
  - {prefix: /free, upstream: u}
"""


def limiter(clock: Clock, text: str = LIMITED, store: Any = None) -> tuple[RouteFilters, Any]:
    """The rate-limit filter of every route of `text`, over in-process buckets (or `store`)."""
    config = parse_config(text, "t.yaml")
    return route_filters(config, "rate_limit", clock, limiter=store or LocalStore(clock)), config


def request(config: Any, prefix: str, ip: str = "10.0.0.1", identity: Identity | None = None,
            headers: list[tuple[bytes, bytes]] | None = None) -> RequestContext:
    return make_ctx(config, prefix, client_ip=ip, identity=identity, headers=headers or ())


def rate_headers(f: RouteFilters, ctx: RequestContext) -> dict[str, str]:
    return respond(f.get(ctx), ctx)


def test_headers_exact_for_the_readme_free_tier():
    clock = Clock()
    f, config = limiter(clock)
    ctx = request(config, "/tiered")
    assert f.on_request(ctx) is None
    assert rate_headers(f, ctx) == {
        "x-ratelimit-limit": "100", "x-ratelimit-remaining": "99", "x-ratelimit-reset": "36",
        "ratelimit-policy": '"free";q=100;w=3600', "ratelimit": '"free";r=99;t=36',
    }
    clock.advance(10)
    ctx = request(config, "/tiered")
    f.on_request(ctx)                                  # 99.278 tokens -> 98.278 left, 62 s to full
    assert rate_headers(f, ctx) == {
        "x-ratelimit-limit": "100", "x-ratelimit-remaining": "98", "x-ratelimit-reset": "62",
        "ratelimit-policy": '"free";q=100;w=3600', "ratelimit": '"free";r=98;t=62',
    }


def test_a_refusal_is_429_with_the_envelope_retry_after_and_the_headers():
    clock = Clock()
    f, config = limiter(clock)
    pro = Identity("alice", "user", "pro")
    for remaining in (2, 1, 0):
        ctx = request(config, "/tiered", identity=pro)
        assert f.on_request(ctx) is None
        assert rate_headers(f, ctx)["ratelimit"] == f'"pro";r={remaining};t={(3 - remaining) * 6}'
    ctx = request(config, "/tiered", identity=pro)
    local = f.on_request(ctx)
    assert local.status == 429
    assert json.loads(local.body) == {"error": {
        "code": "RATE_LIMITED", "message": "rate limit exceeded; retry later", "status": 429,
        "correlation_id": "cid-1"}}
    assert local.headers == [(b"content-type", b"application/json"), (b"retry-after", b"6")]
    assert ctx.error_code == "RATE_LIMITED"
    assert rate_headers(f, ctx) == {
        "x-ratelimit-limit": "10", "x-ratelimit-remaining": "0", "x-ratelimit-reset": "18",
        "ratelimit-policy": '"pro";q=10;w=60', "ratelimit": '"pro";r=0;t=18',
    }


def test_a_route_rate_overrides_the_tier_and_is_labelled_by_its_prefix():
    clock = Clock()
    f, config = limiter(clock)
    ctx = request(config, "/own", identity=Identity("alice", "user", "pro"))
    f.on_request(ctx)
    assert rate_headers(f, ctx) == {
        "x-ratelimit-limit": "100", "x-ratelimit-remaining": "19", "x-ratelimit-reset": "1",
        "ratelimit-policy": '"/own";q=100;w=60', "ratelimit": '"/own";r=19;t=1',
    }


def test_a_scope_named_like_a_tier_does_not_change_that_tiers_headers():
    """/scoped-a has its own 2/minute in scope "free"; the free tier's routes still say 100/hour."""
    clock = Clock()
    f, config = limiter(clock)
    scoped = request(config, "/scoped-a")
    f.on_request(scoped)
    assert rate_headers(f, scoped)["ratelimit-policy"] == '"free";q=2;w=60'
    other = request(config, "/scoped-b")
    f.on_request(other)
    assert rate_headers(f, other)["ratelimit-policy"] == '"free-b";q=5;w=60'
    tiered = request(config, "/tiered")
    f.on_request(tiered)
    headers = rate_headers(f, tiered)
    assert headers["x-ratelimit-limit"] == "100"
    assert headers["ratelimit-policy"] == '"free";q=100;w=3600'


def test_remaining_shown_is_what_the_next_request_finds():
    """At 10/minute, burst 5, requests at 0, 0, 1, 4 and 6 s leave exactly one token, which
    floats sum to 0.9999999999999998: the header must say 1, since the next request passes."""
    clock = Clock()
    f, config = limiter(clock, LIMITED.replace("rate: 100/minute, burst: 20", "rate: 10/minute, burst: 5"))
    for at in (0, 0, 1, 4, 6):
        clock.advance(at - clock.seconds())
        ctx = request(config, "/own")
        assert f.on_request(ctx) is None
    headers = rate_headers(f, ctx)
    assert (headers["x-ratelimit-remaining"], headers["ratelimit"]) == ("1", '"/own";r=1;t=24')
    assert f.on_request(request(config, "/own")) is None


def test_tier_names_are_escaped_as_structured_field_strings():
    clock = Clock()
    f, config = limiter(clock)
    ctx = request(config, "/tiered", identity=Identity("bob", None, 'odd"tier\\'))
    f.on_request(ctx)
    assert rate_headers(f, ctx)["ratelimit-policy"] == '"odd\\"tier\\\\";q=1;w=1'


def test_unknown_or_missing_tiers_use_the_default_tier():
    clock = Clock()
    f, config = limiter(clock)
    for n, identity in enumerate((None, Identity("carol", None, None), Identity("dave", None, "platinum"))):
        ctx = request(config, "/tiered", ip=f"10.1.0.{n}", identity=identity)
        f.on_request(ctx)
        assert rate_headers(f, ctx)["ratelimit-policy"] == '"free";q=100;w=3600'


def test_no_headers_on_routes_without_rate_limit():
    clock = Clock()
    f, config = limiter(clock)
    ctx = request(config, "/free")
    assert f.on_request(ctx) is None and ctx.get_state("rate_limit") is None
    assert rate_headers(f, ctx) == {}


def test_header_keys_are_bounded_and_hashed_when_long_or_binary():
    clock = Clock()
    f, config = limiter(clock)
    for value in (b"a" * 10_000, bytes(range(256)), b"client-7"):
        ctx = request(config, "/header", headers=[(b"x-client", value)])
        assert f.on_request(ctx) is None
    keys = sorted(f.resources.limiter.buckets)
    assert all(len(k) < 120 for k in keys), keys
    assert all("\x00" not in k and "aaaa" not in k for k in keys)
    assert sum("|h#" in k for k in keys) == 2 and sum(k.endswith("|h:client-7") for k in keys) == 1
