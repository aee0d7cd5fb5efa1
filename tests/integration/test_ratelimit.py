"""Rate limiting over real sockets: what clients get, what reaches the upstream, what is logged.

Each gateway runs on a `task.Clock`, so refill happens only when a test advances it: the
counts and header values below are exact. Requests reach the gateway from 127.0.0.1; other
client addresses come through `X-Forwarded-For` with 127.0.0.1 as a trusted proxy.
"""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
import pytest_twisted
from twisted.internet.task import Clock

from tests.conftest import ALICE_KEY, BOB_KEY, SECRET, Response, assert_envelope, free_port, parse_responses, raw

ISSUER = "https://auth.test"
LIMIT_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "ratelimit-policy", "ratelimit")


def request(path: str, headers: list[tuple[str, str]] | None = None, method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: api.test", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def get(gw: Any, path: str, headers: list[tuple[str, str]] | None = None, token: str | None = None,
              ip: str | None = None) -> Response:
    all_headers = list(headers or [])
    if token is not None:
        all_headers.append(("Authorization", f"Bearer {token}"))
    if ip is not None:
        all_headers.append(("X-Forwarded-For", ip))
    (r,) = parse_responses(await raw(gw.port, request(path, all_headers)))
    return r


async def statuses(gw: Any, path: str, n: int, **kw: Any) -> list[int]:
    return [(await get(gw, path, **kw)).status for _ in range(n)]


def limits(r: Response) -> dict[str, str | None]:
    return {name: r.header(name) for name in LIMIT_HEADERS}


def expected(label: str, limit: int, window: int, remaining: int, reset: int) -> dict[str, str]:
    return {
        "x-ratelimit-limit": str(limit), "x-ratelimit-remaining": str(remaining), "x-ratelimit-reset": str(reset),
        "ratelimit-policy": f'"{label}";q={limit};w={window}', "ratelimit": f'"{label}";r={remaining};t={reset}',
    }


def routes_config(upstream: str, routes: str, limits_section: str = "", top: str = "") -> str:
    return f"""
{top}
{limits_section}
upstreams:
  u: {{targets: ["{upstream}"], timeout: 2s}}
routes:
{routes}
"""


TIERS = """
rate_limits:
  tiers:
    free: {rate: 2/minute}
    pro: {rate: 5/minute}
  default_tier: free
"""


# --- burst, 429, refill ------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_exactly_burst_requests_pass_then_429_with_envelope_retry_after_and_headers(reactor, echo, gateway):
    clock = Clock()
    gw = await gateway(routes_config(echo.url, "  - {prefix: /api, upstream: u, rate_limit: {key: ip, rate: 3/minute}}"),
                       clock=clock)
    for remaining in (2, 1, 0):
        r = await get(gw, "/api/x")
        assert r.status == 200, r.body
        assert limits(r) == expected("/api", 3, 60, remaining, 60 - 20 * remaining)
        assert r.header("retry-after") is None
    r = await get(gw, "/api/x")
    err = assert_envelope(r, 429, "RATE_LIMITED")
    assert err["message"] == "rate limit exceeded; retry later"
    assert r.header("retry-after") == "20"
    assert limits(r) == expected("/api", 3, 60, 0, 60)
    assert len(echo.requests) == 3                     # the 429 never reached the upstream

    clock.advance(19)                                  # 0.95 tokens: still refused, one second to go
    r = await get(gw, "/api/x")
    assert (r.status, r.header("retry-after")) == (429, "1")
    assert limits(r) == expected("/api", 3, 60, 0, 41)
    clock.advance(1)                                   # exactly Retry-After later: one token
    r = await get(gw, "/api/x")
    assert r.status == 200 and limits(r) == expected("/api", 3, 60, 0, 60)
    assert (await get(gw, "/api/x")).status == 429
    clock.advance(600)                                 # long idle: back to the burst, not more
    assert await statuses(gw, "/api/x", 4) == [200, 200, 200, 429]
    assert len(echo.requests) == 7


@pytest_twisted.ensureDeferred
async def test_rejected_requests_cost_nothing(reactor, echo, gateway):
    clock = Clock()
    gw = await gateway(routes_config(echo.url, "  - {prefix: /api, upstream: u, rate_limit: {rate: 1/minute}}"),
                       clock=clock)
    assert (await get(gw, "/api")).status == 200
    clock.advance(30)
    assert await statuses(gw, "/api", 10) == [429] * 10
    clock.advance(30)                                  # a minute after the first: admitted all the same
    assert (await get(gw, "/api")).status == 200


@pytest_twisted.ensureDeferred
async def test_limit_headers_on_every_limited_response_and_none_elsewhere(reactor, echo, gateway):
    clock = Clock()
    routes = """\
  - {prefix: /api/limited, upstream: u, rate_limit: {key: ip}}
  - {prefix: /api/down, upstream: down, rate_limit: {key: ip}}
  - {prefix: /api/public, upstream: u}
"""
    text = routes_config(echo.url, routes, TIERS).replace(
        "upstreams:\n", f'upstreams:\n  down: {{targets: ["http://127.0.0.1:{free_port()}"], connect_timeout: 1s}}\n')
    gw = await gateway(text, clock=clock)
    r = await get(gw, "/api/limited", headers=[("X-RateLimit-Remaining", "999")])  # request headers are no answer
    assert r.status == 200 and limits(r) == expected("free", 2, 60, 1, 30)
    r = await get(gw, "/api/down")                     # the gateway's own error on a limited route
    assert_envelope(r, 502, "BAD_GATEWAY")
    assert limits(r) == expected("free", 2, 60, 1, 30)
    r = await get(gw, "/api/limited")
    assert r.status == 200 and limits(r) == expected("free", 2, 60, 0, 60)
    for path in ("/api/public", "/nowhere"):
        r = await get(gw, path)
        assert r.status in (200, 404)
        assert limits(r) == dict.fromkeys(LIMIT_HEADERS)
    assert (await get(gw, "/api/limited")).status == 429
    assert (await get(gw, "/api/public")).status == 200


@pytest_twisted.ensureDeferred
async def test_the_gateways_limit_headers_replace_an_upstreams_own(reactor, raw_upstream, gateway):
    """An upstream with its own limiter must not give clients two conflicting Remaining values."""
    def answer(server: Any, data: bytes) -> None:
        if b"\r\n\r\n" in server.buffer:
            server.buffer = b""
            server.transport.write(b"HTTP/1.1 200 OK\r\nX-RateLimit-Limit: 1000\r\nX-RateLimit-Remaining: 999\r\n"
                                   b"X-RateLimit-Reset: 1\r\nRateLimit-Policy: \"up\";q=1000;w=1\r\n"
                                   b"RateLimit: \"up\";r=999;t=1\r\nX-Other: kept\r\nContent-Length: 2\r\n\r\nok")
    up = await raw_upstream(answer)
    gw = await gateway(routes_config(up.url, "  - {prefix: /api, upstream: u, rate_limit: {rate: 3/minute}}"),
                       clock=Clock())
    r = await get(gw, "/api")
    assert r.status == 200 and r.body == b"ok"
    for name in LIMIT_HEADERS:
        assert [v for k, v in r.headers if k.lower() == name] == [expected("/api", 3, 60, 2, 20)[name]], name
    assert r.header("x-other") == "kept"


@pytest_twisted.ensureDeferred
async def test_a_429_keeps_the_connection_and_the_gateway_serves_everyone_else(reactor, echo, gateway):
    gw = await gateway(routes_config(echo.url, """\
  - {prefix: /api/limited, upstream: u, rate_limit: {rate: 2/minute}}
  - {prefix: /api/public, upstream: u}
""", top="trusted_proxies: [127.0.0.1/32]"), clock=Clock())
    pipelined = b"".join(b"GET /api/limited HTTP/1.1\r\nHost: a\r\n\r\n" for _ in range(4))
    pipelined += b"GET /api/public HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    rs = parse_responses(await raw(gw.port, pipelined))
    assert [r.status for r in rs] == [200, 200, 429, 429, 200]
    assert [r.header("retry-after") for r in rs] == [None, None, "30", "30", None]
    assert (await get(gw, "/api/limited", ip="198.51.100.9")).status == 200    # another client
    assert (await get(gw, "/api/limited")).status == 429
    assert len(gw.gateway.factory.connections) <= 1


@pytest_twisted.ensureDeferred
async def test_expect_100_continue_is_not_answered_when_the_bucket_is_empty(reactor, echo, gateway):
    gw = await gateway(routes_config(echo.url, "  - {prefix: /api, upstream: u, rate_limit: {rate: 1/minute}}"),
                       clock=Clock())
    assert (await get(gw, "/api")).status == 200
    data = await raw(gw.port, b"POST /api HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
                     read_timeout=1.0)
    assert data.startswith(b"HTTP/1.1 429 "), data[:100]
    assert b"100 Continue" not in data
    assert len(echo.requests) == 1


# --- tiers and keys -----------------------------------------------------------------------

def auth_section(secret_file: str, keys_file: str | None = None) -> str:
    keys = f"  api_keys: {{header: X-API-Key, file: {keys_file}}}\n" if keys_file else ""
    return (f"trusted_proxies: [127.0.0.1/32]\nauth:\n  jwt:\n    algorithms: [HS256]\n"
            f"    secret_file: {secret_file}\n    issuer: {ISSUER}\n    audience: api\n{keys}")


def now_clock() -> Clock:
    clock = Clock()
    clock.advance(time.time())
    return clock


def token(clock: Clock, sub: str, tier: str | None) -> str:
    now = int(clock.seconds())
    claims = {"sub": sub, "role": "user", "iss": ISSUER, "aud": "api", "iat": now, "exp": now + 3600}
    if tier is not None:
        claims["tier"] = tier
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest_twisted.ensureDeferred
async def test_tiers_from_the_jwt_tier_claim_else_the_default_tier(reactor, echo, gateway, secret_file):
    clock = now_clock()
    gw = await gateway(routes_config(echo.url, "  - {prefix: /api, upstream: u, auth: optional, rate_limit: {key: user}}",
                                     TIERS, auth_section(secret_file)), clock=clock)
    alice = token(clock, "alice", "pro")
    r = await get(gw, "/api", token=alice)
    assert r.status == 200 and limits(r) == expected("pro", 5, 60, 4, 12)
    assert await statuses(gw, "/api", 5, token=alice) == [200] * 4 + [429]
    # Unknown tier and no tier claim: the default tier, each user its own bucket.
    for sub, tier in (("bob", "platinum"), ("carol", None)):
        t = token(clock, sub, tier)
        r = await get(gw, "/api", token=t)
        assert r.status == 200 and limits(r) == expected("free", 2, 60, 1, 30), sub
        assert await statuses(gw, "/api", 2, token=t) == [200, 429]
    # Anonymous: the default tier, by ip.
    r = await get(gw, "/api", ip="203.0.113.5")
    assert limits(r) == expected("free", 2, 60, 1, 30)
    assert (await get(gw, "/api", token=alice)).status == 429      # alice is still limited
    clock.advance(12)
    assert (await get(gw, "/api", token=alice)).status == 200


@pytest_twisted.ensureDeferred
async def test_one_user_under_two_tiers_has_a_bucket_in_each(reactor, echo, gateway, secret_file):
    """A user's bucket key is kept per policy: the same sub with another tier claim is another bucket."""
    clock = now_clock()
    gw = await gateway(routes_config(echo.url, "  - {prefix: /api, upstream: u, auth: optional, rate_limit: {key: user}}",
                                     TIERS, auth_section(secret_file)), clock=clock)
    pro, free = token(clock, "alice", "pro"), token(clock, "alice", None)
    assert await statuses(gw, "/api", 6, token=pro) == [200] * 5 + [429]
    r = await get(gw, "/api", token=free)
    assert r.status == 200 and limits(r) == expected("free", 2, 60, 1, 30)
    assert await statuses(gw, "/api", 2, token=free) == [200, 429]
    assert (await get(gw, "/api", token=pro)).status == 429


@pytest_twisted.ensureDeferred
async def test_key_user_falls_back_to_the_client_ip_when_anonymous(reactor, echo, gateway, secret_file):
    clock = now_clock()
    gw = await gateway(routes_config(echo.url, "  - {prefix: /api, upstream: u, auth: optional, rate_limit: {key: user}}",
                                     TIERS, auth_section(secret_file)), clock=clock)
    assert await statuses(gw, "/api", 3, ip="203.0.113.1") == [200, 200, 429]
    assert await statuses(gw, "/api", 3, ip="203.0.113.2") == [200, 200, 429]    # another address
    # A user behind the same address as an exhausted anonymous client has their own bucket,
    # and one user is one bucket from any address.
    dave = token(clock, "dave", None)
    assert (await get(gw, "/api", token=dave, ip="203.0.113.1")).status == 200
    assert (await get(gw, "/api", token=dave, ip="203.0.113.77")).status == 200
    assert (await get(gw, "/api", token=dave, ip="203.0.113.78")).status == 429


@pytest_twisted.ensureDeferred
async def test_key_api_key_with_each_keys_tier(reactor, echo, gateway, secret_file, keys_file):
    clock = now_clock()
    gw = await gateway(routes_config(echo.url, "  - {prefix: /api, upstream: u, auth: required, rate_limit: {key: api_key}}",
                                     TIERS, auth_section(secret_file, keys_file)), clock=clock)
    alice = [("X-API-Key", ALICE_KEY)]
    r = await get(gw, "/api", headers=alice)
    assert r.status == 200 and limits(r) == expected("pro", 5, 60, 4, 12)
    assert await statuses(gw, "/api", 5, headers=alice) == [200] * 4 + [429]
    bob = [("X-API-Key", BOB_KEY)]
    assert await statuses(gw, "/api", 3, headers=bob) == [200, 200, 429]        # free, own bucket
    assert limits(await get(gw, "/api", headers=bob)) == expected("free", 2, 60, 0, 60)
    # The same key from another address is the same bucket.
    assert (await get(gw, "/api", headers=alice, ip="198.51.100.3")).status == 429
    # A JWT caller on an api_key route is limited by ip, at its own tier.
    erin = token(clock, "erin", "pro")
    assert await statuses(gw, "/api", 6, token=erin, ip="198.51.100.4") == [200] * 5 + [429]
    r = await get(gw, "/api", headers=[("X-API-Key", "not-a-key-0123456789")])
    assert_envelope(r, 401, "UNAUTHORIZED")


@pytest.mark.parametrize("value", [
    pytest.param("v" * 10_240, id="10KB"),
    pytest.param(bytes(range(0x80, 0x100)).decode("latin-1") * 4, id="binary"),
    pytest.param("\t a b\t", id="whitespace"),
])
@pytest_twisted.ensureDeferred
async def test_key_header_with_a_huge_or_binary_value_is_bounded_hashed_and_limited(reactor, echo, gateway, value):
    gw = await gateway(routes_config(echo.url, "  - {prefix: /api, upstream: u, rate_limit: {key: 'header:X-Client', rate: 2/minute}}"),
                       clock=Clock())
    client = [("X-Client", value)]
    rs = [await get(gw, "/api", headers=client) for _ in range(3)]
    assert [r.status for r in rs] == [200, 200, 429]
    assert limits(rs[1]) == expected("/api", 2, 60, 0, 60)
    other = [("X-Client", value[:-1] + ("w" if value[-1] != "w" else "x"))]
    assert (await get(gw, "/api", headers=other)).status == 200                  # another value, another bucket
    keys = list(gw.gateway.limiter.buckets)
    assert len(keys) == 2 and all(len(k) <= 100 for k in keys), keys
    assert all(k.isascii() and k.isprintable() for k in keys), keys
    # Without the header: by ip.
    assert await statuses(gw, "/api", 3) == [200, 200, 429]


@pytest_twisted.ensureDeferred
async def test_key_header_with_plain_values_and_the_ip_fallback(reactor, echo, gateway):
    gw = await gateway(routes_config(echo.url, "  - {prefix: /api, upstream: u, rate_limit: {key: 'header:X-Client', rate: 1/minute}}"),
                       clock=Clock())
    for client in ("team-a", "team-b", "ip:127.0.0.1"):
        assert await statuses(gw, "/api", 2, headers=[("X-Client", client)]) == [200, 429], client
    assert await statuses(gw, "/api", 2) == [200, 429]      # "ip:127.0.0.1" above is not the ip bucket


@pytest_twisted.ensureDeferred
async def test_key_header_host_keys_by_the_requested_host(reactor, echo, gateway):
    gw = await gateway(routes_config(echo.url, "  - {prefix: /api, upstream: u, rate_limit: {key: 'header:Host', rate: 1/minute}}"),
                       clock=Clock())
    for host in (b"a.test", b"b.test"):   # Host is consumed by the HTTP layer; the limiter uses ctx.host
        one = b"GET /api HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
        rs = parse_responses(await raw(gw.port, one + one[:-2] + b"Connection: close\r\n\r\n"))
        assert [r.status for r in rs] == [200, 429], host


# --- routes: overrides and scopes ---------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_routes_own_rate_and_burst_override_the_tier(reactor, echo, gateway):
    clock = Clock()
    gw = await gateway(routes_config(echo.url, """\
  - {prefix: /api/tiered, upstream: u, rate_limit: {key: ip}}
  - {prefix: /api/search, upstream: u, rate_limit: {key: ip, rate: 100/minute, burst: 3}}
""", TIERS), clock=clock)
    r = await get(gw, "/api/search")
    assert limits(r) == expected("/api/search", 100, 60, 2, 1)
    assert await statuses(gw, "/api/search", 3) == [200, 200, 429]
    r = await get(gw, "/api/tiered")                  # its own bucket, at the tier's rate
    assert r.status == 200 and limits(r) == expected("free", 2, 60, 1, 30)
    clock.advance(0.6)                                # 100/minute: one token per 0.6 s
    assert await statuses(gw, "/api/search", 2) == [200, 429]


@pytest_twisted.ensureDeferred
async def test_routes_sharing_a_scope_share_buckets_and_routes_without_do_not(reactor, echo, gateway):
    """Traefik's bug was one limit silently shared by 102 routes: here sharing is asked for by name."""
    gw = await gateway(routes_config(echo.url, """\
  - {prefix: /api/a, upstream: u, rate_limit: {rate: 3/minute, scope: shared}}
  - {prefix: /api/b, upstream: u, rate_limit: {rate: 3/minute, scope: shared}}
  - {prefix: /api/c, upstream: u, rate_limit: {rate: 3/minute}}
  - {prefix: /api/d, upstream: u, rate_limit: {rate: 3/minute}}
  - {prefix: /api/e, upstream: u, rate_limit: {scope: tiered}}
  - {prefix: /api/f, upstream: u, rate_limit: {scope: tiered}}
  - {prefix: /api/g, upstream: u, rate_limit: {}}
  - {prefix: /api/h, upstream: u, rate_limit: {}}
""", TIERS), clock=Clock())
    assert [(await get(gw, p)).status for p in ("/api/a", "/api/b", "/api/a", "/api/b", "/api/a")] == [
        200, 200, 200, 429, 429]
    r = await get(gw, "/api/b")
    assert limits(r) == expected("shared", 3, 60, 0, 60)
    assert await statuses(gw, "/api/c", 4) == [200, 200, 200, 429]
    assert await statuses(gw, "/api/d", 4) == [200, 200, 200, 429]
    assert [(await get(gw, p)).status for p in ("/api/e", "/api/f", "/api/e")] == [200, 200, 429]
    assert await statuses(gw, "/api/g", 3) == [200, 200, 429]
    assert await statuses(gw, "/api/h", 3) == [200, 200, 429]


# --- addresses, log -----------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_x_forwarded_for_from_a_trusted_proxy_keys_by_the_real_client(reactor, echo, gateway):
    gw = await gateway(routes_config(echo.url, "  - {prefix: /api, upstream: u, rate_limit: {rate: 1/minute}}",
                                     top="trusted_proxies: [127.0.0.1/32, 10.0.0.0/8]"), clock=Clock())
    assert await statuses(gw, "/api", 2, ip="198.51.100.1") == [200, 429]
    assert await statuses(gw, "/api", 2, ip="198.51.100.2") == [200, 429]
    # A client cannot get a fresh bucket by prepending addresses: the first untrusted hop from
    # the right is the client, and trusted proxies in between are skipped.
    assert (await get(gw, "/api", ip="1.2.3.4, 198.51.100.1")).status == 429
    assert (await get(gw, "/api", ip="5.6.7.8, 198.51.100.2, 10.1.2.3")).status == 429
    assert gw.log[-1]["client_ip"] == "198.51.100.2"
    assert sorted(gw.gateway.limiter.buckets) == ["route:/api|/api|ip:198.51.100.1", "route:/api|/api|ip:198.51.100.2"]


@pytest_twisted.ensureDeferred
async def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(reactor, echo, gateway):
    gw = await gateway(routes_config(echo.url, "  - {prefix: /api, upstream: u, rate_limit: {rate: 1/minute}}"),
                       clock=Clock())
    assert (await get(gw, "/api", ip="198.51.100.1")).status == 200
    assert (await get(gw, "/api", ip="198.51.100.2")).status == 429          # same peer, same bucket


@pytest_twisted.ensureDeferred
async def test_the_access_log_records_the_decision(reactor, echo, gateway):
    gw = await gateway(routes_config(echo.url, """\
  - {prefix: /api/limited, upstream: u, rate_limit: {rate: 1/minute}}
  - {prefix: /api/public, upstream: u}
"""), clock=Clock())
    await get(gw, "/api/limited")
    await get(gw, "/api/limited")
    await get(gw, "/api/public")
    await get(gw, "/nowhere")
    assert [(rec["route"], rec["status"], rec["rate_limit"], rec["error"]) for rec in gw.log] == [
        ("/api/limited", 200, "allowed", None),
        ("/api/limited", 429, "rejected", "RATE_LIMITED"),
        ("/api/public", 200, None, None),
        (None, 404, None, "NO_ROUTE"),
    ]
