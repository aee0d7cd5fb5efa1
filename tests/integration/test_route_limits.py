"""Per-route max_body_size, timeout and connect_timeout through real sockets: a large-upload
route next to small JSON routes, each held to its own limit, and the next request served."""

from __future__ import annotations

import json
import socket

import pytest_twisted
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from tests.conftest import TIMEOUT, assert_envelope, parse_responses, raw, raw_request
from tests.integration.test_http2 import cert, h2_requests, listeners, port_of, routes  # noqa: F401 (cert: a fixture)
from tests.integration.test_resilience import Signal

ROUTES = """
limits: {{max_body_size: 1KiB}}
upstreams:
  users: {{targets: ["{url}"], timeout: 2s}}
routes:
  - {{prefix: /api/uploads, upstream: users, max_body_size: 64KiB}}
  - {{prefix: /api/json, upstream: users, max_body_size: 100}}
  - {{prefix: /api/users, upstream: users}}
"""


def post(path: bytes, body: bytes, close: bool = False) -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path, len(body), b"Connection: close\r\n" if close else b"", body))


def chunked(path: bytes, chunks: int, size: int, end: bool) -> list[bytes]:
    piece = b"%x\r\n%s\r\n" % (size, b"x" * size)
    return [b"POST %s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" % path,
            *[piece] * chunks, *([b"0\r\n\r\n"] if end else [])]


@pytest_twisted.ensureDeferred
async def test_each_route_holds_bodies_to_its_own_limit_and_routes_without_one_to_the_global(reactor, echo, gateway):
    gw = await gateway(ROUTES.format(url=echo.url))
    upload = b"u" * 50_000
    (r,) = parse_responses(await raw(gw.port, post(b"/api/uploads/a", upload, close=True)))
    assert r.status == 200 and r.json()["body_bytes"] == 50_000
    # Over the route's own limit, the global one, and the small route's: 413 before the body is read.
    for path, size in ((b"/api/uploads/b", 70_000), (b"/api/users/1", 5_000), (b"/api/json/1", 101)):
        (r,) = parse_responses(await raw(gw.port, b"POST %s HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n"
                                                  b"Expect: 100-continue\r\n\r\n" % (path, size)))
        assert_envelope(r, 413, "PAYLOAD_TOO_LARGE")
    assert len(echo.requests) == 1
    assert [x["status"] for x in gw.log[-3:]] == [413, 413, 413]
    # Over the largest route limit: refused before routing; the others by their route's limit.
    assert [x["route"] for x in gw.log[-3:]] == [None, "/api/users", "/api/json"]
    # Within each limit, on one keep-alive connection: all served.
    ok = parse_responses(await raw(gw.port, post(b"/api/json/2", b"j" * 100) + post(b"/api/users/2", b"g" * 1024)
                                   + post(b"/api/uploads/c", b"u" * 2048, close=True)))
    assert [(x.status, x.json()["body_bytes"]) for x in ok] == [(200, 100), (200, 1024), (200, 2048)]
    assert len(echo.requests) == 4


@pytest_twisted.ensureDeferred
async def test_a_chunked_body_is_cut_at_its_routes_limit(reactor, echo, gateway):
    gw = await gateway(ROUTES.format(url=echo.url))
    # Never ended: the limit must answer, not the end of the body.
    (r,) = parse_responses(await raw(gw.port, chunked(b"/api/uploads/big", 2, 40 * 1024, end=False), pause=0.05))
    assert_envelope(r, 413, "PAYLOAD_TOO_LARGE")
    (r,) = parse_responses(await raw(gw.port, chunked(b"/api/users/small", 2, 1024, end=False), pause=0.05))
    assert_envelope(r, 413, "PAYLOAD_TOO_LARGE")
    (r,) = parse_responses(await raw(gw.port, chunked(b"/api/uploads/fine", 2, 20 * 1024, end=True)))
    assert r.status == 200 and r.json()["body_bytes"] == 40 * 1024


@pytest_twisted.ensureDeferred
async def test_a_routes_timeout_replaces_the_upstreams(reactor, raw_upstream, echo, gateway):
    arrived = Signal(reactor)
    up = await raw_upstream(lambda server, data: arrived.fire())      # accepts, never answers
    clock = Clock()
    gw = await gateway(f"""
    upstreams:
      users: {{targets: ["{up.url}"], timeout: 2s}}
      fine: {{targets: ["{echo.url}"]}}
    routes:
      - {{prefix: /api/reports, upstream: users, timeout: 30s}}
      - {{prefix: /api/users, upstream: users}}
      - {{prefix: /api/fine, upstream: fine}}
    """, clock=clock)
    get = b"GET /api/reports/1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    pending = deferToThread(raw_request, gw.port, get, read_timeout=TIMEOUT)
    await arrived.reached(1)
    clock.advance(2.5)
    assert gw.log == [], "the upstream's 2s applied to a route with its own timeout"
    clock.advance(27.6)
    assert_envelope(parse_responses(await pending)[0], 504, "GATEWAY_TIMEOUT")
    assert gw.log[-1]["detail"] == "response timeout"
    # The other route of the same upstream keeps the upstream's 2s.
    pending = deferToThread(raw_request, gw.port, get.replace(b"/api/reports/1", b"/api/users/1"),
                            read_timeout=TIMEOUT)
    await arrived.reached(2)
    clock.advance(2.1)
    assert_envelope(parse_responses(await pending)[0], 504, "GATEWAY_TIMEOUT")
    (r,) = parse_responses(await raw(gw.port, b"GET /api/fine/1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"))
    assert r.status == 200


@pytest_twisted.ensureDeferred
async def test_a_routes_connect_timeout_replaces_the_upstreams(reactor, echo, gateway):
    # A listener whose accept queue is full (backlog 0, one connection never accepted): a new
    # connection attempt hangs, as to a host that drops SYNs, until the gateway's deadline.
    dark = socket.socket()
    dark.bind(("127.0.0.1", 0))
    dark.listen(0)
    filler = socket.create_connection(dark.getsockname(), timeout=TIMEOUT)
    clock = Clock()
    gw = await gateway(f"""
    upstreams:
      dark: {{targets: ["http://127.0.0.1:{dark.getsockname()[1]}"], connect_timeout: 1s}}
      fine: {{targets: ["{echo.url}"]}}
    routes:
      - {{prefix: /api/patient, upstream: dark, connect_timeout: 20s}}
      - {{prefix: /api/fine, upstream: fine}}
    """, clock=clock)
    get = b"GET /api/patient/1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    pending = deferToThread(raw_request, gw.port, get, read_timeout=TIMEOUT)
    await _until_connecting(reactor, gw)
    clock.advance(1.5)
    assert gw.log == [], "the upstream's connect_timeout applied to a route with its own"
    clock.advance(19)
    (r,) = parse_responses(await pending)
    assert_envelope(r, 504, "GATEWAY_TIMEOUT")
    assert gw.log[-1]["detail"] == "connect timeout"
    (r,) = parse_responses(await raw(gw.port, b"GET /api/fine/1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"))
    assert r.status == 200
    filler.close()
    dark.close()


async def _until_connecting(reactor, gw) -> None:
    """Wait (bounded) until the request is in the proxy, waiting for its connection."""
    from twisted.internet.task import deferLater
    group = gw.gateway.switch.pipeline.terminals["proxy"].groups["dark"]
    for _ in range(500):
        if group.balancer.members[0].in_flight:
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("the request never reached the proxy")


@pytest_twisted.ensureDeferred
async def test_route_body_limits_hold_over_http2(reactor, echo, gateway, cert):  # noqa: F811
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(echo.url, top="limits: {max_body_size: 1KiB}\n",
                                                                  extra_routes=UPLOAD_ROUTE))
    port = await port_of(gw, 1)
    small, big, huge = b"s" * 2000, b"b" * 50_000, b"h" * 70_000
    answers = await h2_requests(port, cert.cert, {"path": "/api/uploads/1", "method": "POST", "body": big},
                                {"path": "/api/users/1", "method": "POST", "body": small},
                                {"path": "/api/uploads/2", "method": "POST", "body": huge},
                                {"path": "/api/users/2", "method": "POST", "body": b"ok"})
    assert [a.status for a in answers] == [200, 413, 413, 200]
    assert json.loads(answers[0].body)["body_bytes"] == 50_000
    assert json.loads(answers[1].body)["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert len(echo.requests) == 2


UPLOAD_ROUTE = "  - {prefix: /api/uploads, upstream: users, max_body_size: 64KiB}\n"
