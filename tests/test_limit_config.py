"""`rate_limits:` and route `rate_limit:`: the values loaded, and every error exactly as users see it."""

from __future__ import annotations

import textwrap

import pytest

from tests.configcheck import config_errors
from txgateway.config.schema import ConfigError, parse_config
from txgateway.config.units import Rate
from txgateway.filters.ratelimit.config import LimitsConfig, RouteLimit, Tier

RATE = 'expected "N/second|minute|hour|day", got'
RATE_ZERO = 'expected "N/second|minute|hour|day" with N above zero, got'

# Line numbers matter: routes are lines 5-6, rate_limits starts at line 7.
ROUTES = """\
listen: [{endpoint: "tcp:8080"}]
upstreams:
  u: {targets: ["http://127.0.0.1:3001"]}
routes:
  - {prefix: /a, upstream: u, rate_limit: %s}
  - {prefix: /b, upstream: u}
"""
LIMITS = """\
rate_limits:
  tiers:
    free: {rate: 100/hour}
    pro: {rate: 5000/hour, burst: 50}
  default_tier: free
"""


def config(route_limit: str = "{key: ip}", limits: str = LIMITS):
    return parse_config(ROUTES % route_limit + textwrap.dedent(limits), "c.yaml")


def errors(route_limit: str = "{key: ip}", limits: str = LIMITS) -> list[str]:
    return config_errors(ROUTES % route_limit + textwrap.dedent(limits))


# --- what loads ---------------------------------------------------------------------------

def test_tiers_default_tier_and_defaults():
    c = config()
    assert c.rate_limits == LimitsConfig(
        tiers={"free": Tier("free", Rate(100, 3600, "100/hour"), 100),
               "pro": Tier("pro", Rate(5000, 3600, "5000/hour"), 50)},
        default_tier="free", backend="local", max_buckets=100_000)
    assert c.routes[0].policies.get("rate_limit") == RouteLimit(key="ip")
    assert c.routes[1].policies.get("rate_limit") is None


def test_a_single_tier_is_the_default_and_max_buckets_is_read():
    c = config(limits="rate_limits:\n  backend: local\n  tiers: {basic: {rate: 10/second}}\n  max_buckets: 100\n")
    assert (c.rate_limits.default_tier, c.rate_limits.max_buckets) == ("basic", 100)


@pytest.mark.parametrize(("text", "expected"), [
    ("{key: user}", RouteLimit(key="user")),
    ("{key: api_key}", RouteLimit(key="api_key")),
    ("{}", RouteLimit(key="ip")),
    ("{key: 'header:X-Client-Id'}", RouteLimit(key="header", header=b"x-client-id")),
    ("{key: ip, rate: 100/minute, burst: 20}", RouteLimit(key="ip", rate=Rate(100, 60, "100/minute"), burst=20)),
    ("{rate: 5/second}", RouteLimit(key="ip", rate=Rate(5, 1, "5/second"))),
    ("{key: user, scope: orders.v2_x-1}", RouteLimit(key="user", scope="orders.v2_x-1")),
])
def test_route_rate_limit_values(text, expected):
    assert config(text).routes[0].policies.get("rate_limit") == expected


def test_a_route_with_its_own_rate_needs_no_rate_limits_section():
    c = config("{rate: 10/minute}", limits="")
    assert c.rate_limits is None
    assert c.routes[0].policies.get("rate_limit").rate == Rate(10, 60, "10/minute")


# --- rates and bursts ---------------------------------------------------------------------

@pytest.mark.parametrize(("value", "message"), [
    ("0/minute", f'{RATE_ZERO} "0/minute"'),
    ("abc", f'{RATE} "abc"'),
    ("100", f'{RATE} "100"'),
    ("-1/second", f'{RATE} "-1/second"'),
    ("1.5/second", f'{RATE} "1.5/second"'),
    ("10/minutes", f'{RATE} "10/minutes"'),
    ("10 per minute", f'{RATE} "10 per minute"'),
])
def test_bad_rates_in_a_tier_and_in_a_route(value, message):
    limits = LIMITS.replace("rate: 100/hour", f"rate: {value}")
    assert errors(limits=limits) == [f"c.yaml:9: rate_limits.tiers.free.rate: {message}"]
    assert errors(f"{{rate: {value}}}") == [f"c.yaml:5: routes[0].rate_limit.rate: {message}"]


@pytest.mark.parametrize("value", ["0", "-3", "2.5", "lots", "true"])
def test_bad_bursts(value):
    shown = {"0": "0", "-3": "-3", "2.5": "2.5", "lots": "'lots'", "true": "True"}[value]
    assert errors(limits=LIMITS.replace("burst: 50", f"burst: {value}")) == [
        f"c.yaml:10: rate_limits.tiers.pro.burst: expected an integer >= 1, got {shown}"]
    assert errors(f"{{rate: 1/second, burst: {value}}}") == [
        f"c.yaml:5: routes[0].rate_limit.burst: expected an integer >= 1, got {shown}"]


def test_a_route_burst_without_the_routes_own_rate():
    assert errors("{key: ip, burst: 20}") == [
        "c.yaml:5: routes[0].rate_limit.burst: a route's burst needs the route's own rate"]


def test_a_route_rate_limit_without_a_rate_and_without_a_rate_limits_section():
    assert errors("{key: user}", limits="") == [
        "c.yaml:5: routes[0].rate_limit: needs a rate here or a rate_limits: section with tiers"]


# --- keys and scopes ----------------------------------------------------------------------

@pytest.mark.parametrize(("key", "message"), [
    ("cookie", 'expected ip, user, api_key or header:NAME, got "cookie"'),
    ("IP", 'expected ip, user, api_key or header:NAME, got "IP"'),
    ("'Header:X-Client'", 'expected ip, user, api_key or header:NAME, got "Header:X-Client"'),
    ("'header:'", 'expected header:NAME with a header name, got "header:"'),
    ("'header:X Client'", 'expected header:NAME with a header name, got "header:X Client"'),
    ("'header:X-Client:1'", 'expected header:NAME with a header name, got "header:X-Client:1"'),
    ("'header:X-Clïent'", 'expected header:NAME with a header name, got "header:X-Clïent"'),
    ("5", "expected a string, got 5"),
    ("[ip]", "expected a single value, got a list"),
])
def test_bad_keys(key, message):
    assert errors(f"{{key: {key}}}") == [f"c.yaml:5: routes[0].rate_limit.key: {message}"]


@pytest.mark.parametrize(("scope", "message"), [
    ("'a b'", 'expected 1-64 of [A-Za-z0-9_.-], got "a b"'),
    ("''", 'expected 1-64 of [A-Za-z0-9_.-], got ""'),
    ("a/b", 'expected 1-64 of [A-Za-z0-9_.-], got "a/b"'),
    ("'a|b'", 'expected 1-64 of [A-Za-z0-9_.-], got "a|b"'),
    ("x" * 65, f'expected 1-64 of [A-Za-z0-9_.-], got "{"x" * 65}"'),
    ("7", "expected a string, got 7"),
])
def test_bad_scopes(scope, message):
    assert errors(f"{{scope: {scope}}}") == [f"c.yaml:5: routes[0].rate_limit.scope: {message}"]


def test_a_64_character_scope_is_fine():
    assert config("{scope: " + "x" * 64 + "}").routes[0].policies.get("rate_limit").scope == "x" * 64


def test_route_rate_limit_shape_and_unknown_keys():
    assert errors("ip") == ["c.yaml:5: routes[0].rate_limit: expected a mapping, got 'ip'"]
    assert errors("{kee: user}") == [
        "c.yaml:5: routes[0].rate_limit.kee: unknown key (expected one of: burst, key, rate, scope)"]


def test_every_problem_of_a_route_rate_limit_is_reported_at_once():
    assert errors("{key: cookie, rate: abc, burst: 0, scope: 'a b'}") == [
        'c.yaml:5: routes[0].rate_limit.key: expected ip, user, api_key or header:NAME, got "cookie"',
        f'c.yaml:5: routes[0].rate_limit.rate: {RATE} "abc"',
        "c.yaml:5: routes[0].rate_limit.burst: expected an integer >= 1, got 0",
        'c.yaml:5: routes[0].rate_limit.scope: expected 1-64 of [A-Za-z0-9_.-], got "a b"',
    ]


# --- tiers and default_tier ---------------------------------------------------------------

def test_default_tier_naming_an_unknown_tier():
    assert errors(limits=LIMITS.replace("default_tier: free", "default_tier: gold")) == [
        'c.yaml:11: rate_limits.default_tier: no tier named "gold" (defined: free, pro)']


def test_default_tier_missing_with_several_tiers():
    assert errors(limits=LIMITS.replace("  default_tier: free\n", "")) == [
        "c.yaml:8: rate_limits.default_tier: missing: which of free, pro applies without a tier"]


def test_missing_and_empty_tiers():
    assert errors(limits="rate_limits:\n  default_tier: free\n") == [
        "c.yaml:8: rate_limits.tiers: missing (required): e.g. {free: {rate: 100/hour}}"]
    assert errors(limits="rate_limits:\n  tiers: {}\n") == ["c.yaml:8: rate_limits.tiers: expected at least one tier"]
    assert errors(limits="rate_limits:\n  tiers: [free]\n") == [
        "c.yaml:8: rate_limits.tiers: expected a mapping, got a list"]
    assert errors(limits="rate_limits:\n") == ["c.yaml:7: rate_limits: expected a mapping, got ''"]


def test_tier_shape_errors():
    assert errors(limits=LIMITS.replace("free: {rate: 100/hour}", "free: 100/hour")) == [
        "c.yaml:9: rate_limits.tiers.free: expected a mapping, got '100/hour'"]
    assert errors(limits=LIMITS.replace("free: {rate: 100/hour}", "free: {burst: 5}")) == [
        'c.yaml:9: rate_limits.tiers.free.rate: missing (required): e.g. "100/hour"']
    assert errors(limits=LIMITS.replace("free: {rate: 100/hour}", "free: {rate: 100/hour, brust: 5}")) == [
        "c.yaml:9: rate_limits.tiers.free.brust: unknown key (expected one of: burst, rate)"]
    assert errors(limits=LIMITS.replace("default_tier: free", "default_tier: 5")) == [
        "c.yaml:11: rate_limits.default_tier: expected a string, got 5"]


def test_an_invalid_tier_is_reported_once_without_follow_up_errors():
    """The invalid default tier, or the only tier, must not also be 'unknown' or 'missing'."""
    assert errors(limits=LIMITS.replace("rate: 100/hour", "rate: 0/minute")) == [
        f'c.yaml:9: rate_limits.tiers.free.rate: {RATE_ZERO} "0/minute"']
    assert errors(limits="rate_limits:\n  tiers:\n    free: {rate: abc}\n") == [
        f'c.yaml:9: rate_limits.tiers.free.rate: {RATE} "abc"']
    two_bad = LIMITS.replace("rate: 100/hour", "rate: abc").replace("rate: 5000/hour", "rate: 0/day")
    assert errors(limits=two_bad.replace("  default_tier: free\n", "")) == [
        "c.yaml:8: rate_limits.default_tier: missing: which of free, pro applies without a tier",
        f'c.yaml:9: rate_limits.tiers.free.rate: {RATE} "abc"',
        f'c.yaml:10: rate_limits.tiers.pro.rate: {RATE_ZERO} "0/day"',
    ]


def test_max_buckets_and_backend_values():
    assert errors(limits=LIMITS + "  max_buckets: 99\n") == [
        "c.yaml:12: rate_limits.max_buckets: expected an integer >= 100, got 99"]
    assert errors(limits=LIMITS + "  backend: memcached\n") == [
        "c.yaml:12: rate_limits.backend: expected one of local, redis, hybrid, got 'memcached'"]
    assert errors(limits=LIMITS + "  tier: free\n") == [
        "c.yaml:12: rate_limits.tier: unknown key (expected one of: backend, default_tier, instances, "
        "max_buckets, on_redis_error, sync_interval, tiers)"]


# --- the redis-backed settings: later versions ---------------------------------------------

@pytest.mark.parametrize(("extra", "problem"), [
    ("  backend: redis\n", "c.yaml:12: rate_limits.backend: redis needs a redis: section (url or sentinel)"),
    ("  backend: hybrid\n", "c.yaml:12: rate_limits.backend: hybrid needs a redis: section (url or sentinel)"),
    ("  sync_interval: 100ms\n", "c.yaml:12: rate_limits.sync_interval: only used with backend: hybrid (backend is local)"),
    ("  on_redis_error: local\n",
     "c.yaml:12: rate_limits.on_redis_error: only used with backend: redis or hybrid (backend is local)"),
    ("  instances: 2\n", "c.yaml:12: rate_limits.instances: only used with backend: redis or hybrid (backend is local)"),
])
def test_redis_settings_need_a_redis_backend_and_section(extra, problem):
    assert errors(limits=LIMITS + extra) == [problem]


def test_redis_settings_with_a_redis_section_are_accepted():
    text = LIMITS + "  backend: hybrid\n  sync_interval: 50ms\n  on_redis_error: deny\n  instances: 3\n"
    text += 'redis:\n  url: "redis://127.0.0.1:6379/2"\n  timeout: 150ms\n'
    limits = config(limits=text).rate_limits
    assert (limits.backend, limits.sync_interval, limits.on_redis_error, limits.instances) == ("hybrid", 0.05, "deny", 3)


def test_errors_in_rate_limits_and_routes_are_reported_together():
    lines = errors("{key: cookie}", limits=LIMITS.replace("default_tier: free", "default_tier: gold") + "  instances: 2\n")
    assert lines == [
        'c.yaml:5: routes[0].rate_limit.key: expected ip, user, api_key or header:NAME, got "cookie"',
        'c.yaml:11: rate_limits.default_tier: no tier named "gold" (defined: free, pro)',
        "c.yaml:12: rate_limits.instances: only used with backend: redis or hybrid (backend is local)",
    ]


def test_a_header_the_http_layer_consumes_cannot_be_a_key():
    assert errors("{key: 'header:Content-Length'}") == [
        "c.yaml:5: routes[0].rate_limit.key: Content-Length is consumed by the HTTP layer and never reaches "
        "the limiter (header:Host works)"]
    assert config("{key: 'header:Host'}").routes[0].policies.get("rate_limit") == RouteLimit(key="header", header=b"host")


def test_routes_sharing_a_scope_must_agree_on_rate_and_burst():
    text = ROUTES.replace("  - {prefix: /b, upstream: u}",
                          "  - {prefix: /b, upstream: u, rate_limit: {rate: 5/minute, scope: s}}") % "{rate: 2/minute, scope: s}"
    with pytest.raises(ConfigError) as info:
        parse_config(text + textwrap.dedent(LIMITS), "c.yaml")
    assert str(info.value).splitlines() == [
        'c.yaml:6: routes[1].rate_limit: routes sharing scope "s" must share rate and burst (differs from routes[0])']
