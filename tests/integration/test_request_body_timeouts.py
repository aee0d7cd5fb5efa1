"""A request body's pace is the client's, not the upstream's: `timeout` (until the response
head) starts once the body is sent; a client that stops sending gets 408 after idle_timeout,
and neither counts against the upstream's breaker or passive health."""

from __future__ import annotations

import pytest_twisted

from tests.conftest import assert_envelope, parse_responses, raw

CONFIG = """
limits: {{idle_timeout: 1s}}
upstreams:
  users:
    targets: ["{url}"]
    timeout: 500ms
    circuit_breaker: {{consecutive_failures: 1}}
routes:
  - {{prefix: /api/users, upstream: users}}
"""
HEAD = b"POST /api/users/1 HTTP/1.1\r\nHost: t\r\nContent-Length: 40\r\n\r\n"


@pytest_twisted.ensureDeferred
async def test_a_slow_upload_within_idle_timeout_is_not_a_gateway_timeout(echo, gateway):
    gw = await gateway(CONFIG.format(url=echo.url))
    # 4 pieces 0.4 s apart: 1.2 s of body in all, longer than the upstream's 500ms timeout.
    data = await raw(gw.port, [HEAD + b"x" * 10, b"x" * 10, b"x" * 10, b"x" * 10], pause=0.4)
    (resp,) = parse_responses(data)
    assert resp.status == 200 and b'"body_bytes": 40' in resp.body
    assert gw.gateway.breakers["users"].state == "closed"


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_sending_its_body_gets_408_and_the_upstream_is_not_blamed(echo, gateway):
    gw = await gateway(CONFIG.format(url=echo.url))
    data = await raw(gw.port, HEAD + b"x" * 10, read_timeout=4.0)
    (resp,) = parse_responses(data)
    assert_envelope(resp, 408, "REQUEST_TIMEOUT")
    breaker = gw.gateway.breakers["users"]
    (member,) = gw.gateway.proxy.groups["users"].balancer.members
    assert breaker.state == "closed" and member.failures == 0
    assert gw.log[-1]["detail"] == "client request body idle timeout"
    data = await raw(gw.port, b"GET /api/users/2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert parse_responses(data)[0].status == 200
