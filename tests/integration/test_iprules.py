"""IP rules through real sockets: `ip_allow`/`ip_deny` on routes and under `ip_rules:`, decided
on the client address `trusted_proxies` resolved, before auth."""

from __future__ import annotations

import pytest_twisted

from tests.conftest import assert_envelope, parse_responses, raw


def get(path: str, *headers: str, close: bool = False) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: a", *headers] + (["Connection: close"] if close else [])
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest_twisted.ensureDeferred
async def test_route_rules_refuse_with_403_and_the_next_request_is_served(gateway, echo):
    gw = await gateway(f"""
    upstreams:
      users: {{targets: ["{echo.url}"]}}
    routes:
      - {{prefix: /internal, upstream: users, ip_allow: ["10.0.0.0/8", "fd00::/8"]}}
      - {{prefix: /public, upstream: users, ip_deny: ["127.0.0.0/8"]}}
      - {{prefix: /open, upstream: users, ip_allow: ["127.0.0.1"], ip_deny: ["::1"]}}
    """)
    internal, public, open_ = parse_responses(await raw(gw.port, get("/internal/a") + get("/public/b")
                                                        + get("/open/c", close=True)))
    assert_envelope(internal, 403, "FORBIDDEN")
    assert_envelope(public, 403, "FORBIDDEN")
    assert open_.status == 200
    assert [r.path for r in echo.requests] == [b"/open/c"]
    assert [r.get("ip_rules") for r in gw.log] == ["refused", "refused", None]


@pytest_twisted.ensureDeferred
async def test_x_forwarded_for_from_an_untrusted_peer_cannot_spoof_an_allowed_address(gateway, echo):
    gw = await gateway(f"""
    upstreams:
      users: {{targets: ["{echo.url}"]}}
    routes:
      - {{prefix: /internal, upstream: users, ip_allow: ["10.1.2.3/32"]}}
    """)
    spoofed, = parse_responses(await raw(gw.port, get("/internal/a", "X-Forwarded-For: 10.1.2.3", close=True)))
    assert_envelope(spoofed, 403, "FORBIDDEN")
    assert echo.requests == []


@pytest_twisted.ensureDeferred
async def test_behind_a_trusted_proxy_the_forwarded_client_address_decides(gateway, echo):
    gw = await gateway(f"""
    trusted_proxies: [127.0.0.1/32]
    ip_rules: {{ip_deny: ["203.0.113.0/24", "2001:db8::/32"]}}
    upstreams:
      users: {{targets: ["{echo.url}"]}}
    routes:
      - {{prefix: /internal, upstream: users, ip_allow: ["10.0.0.0/8"]}}
      - {{prefix: /public, upstream: users}}
    """)
    replies = parse_responses(await raw(gw.port, (
        get("/internal/a", "X-Forwarded-For: 10.1.2.3")           # allowed by the route
        + get("/internal/b", "X-Forwarded-For: 192.0.2.9")        # not in the route's allow list
        + get("/public/c", "X-Forwarded-For: 203.0.113.7")        # denied everywhere
        + get("/public/d", "X-Forwarded-For: 2001:db8::1")        # IPv6, denied everywhere
        + get("/public/e", "X-Forwarded-For: not-an-address")     # unreadable: refused
        + get("/public/f", "X-Forwarded-For: 192.0.2.9", close=True))))
    assert [r.status for r in replies] == [200, 403, 403, 403, 403, 200]
    for refused in replies[1:5]:
        assert_envelope(refused, 403, "FORBIDDEN")
    assert [r.path for r in echo.requests] == [b"/internal/a", b"/public/f"]


@pytest_twisted.ensureDeferred
async def test_a_refused_address_is_refused_before_its_credentials_are_checked(gateway, echo, secret_file):
    gw = await gateway(f"""
    auth: {{jwt: {{algorithms: [HS256], secret_file: "{secret_file}"}}}}
    upstreams:
      users: {{targets: ["{echo.url}"]}}
    routes:
      - {{prefix: /admin, upstream: users, auth: required, ip_allow: ["10.0.0.0/8"]}}
      - {{prefix: /me, upstream: users, auth: required, ip_allow: ["127.0.0.0/8"]}}
    """)
    admin, me = parse_responses(await raw(gw.port, get("/admin/x") + get("/me/x", close=True)))
    assert_envelope(admin, 403, "FORBIDDEN")               # not 401: the address decided first
    assert admin.header("www-authenticate") is None
    assert_envelope(me, 401, "UNAUTHORIZED")               # allowed address: on to auth
