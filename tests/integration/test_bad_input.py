"""Every kind of bad input the gateway refuses: exact status, envelope, and the next request works."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread

from tests.conftest import assert_envelope, free_port, parse_responses, raw, raw_request, simple_config

GOOD = b"GET /api/users/1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"


async def still_serves(gw, echo_seen=None):
    (r,) = parse_responses(await raw(gw.port, GOOD))
    assert r.status == 200, r.body
    return r


async def wait_for(reactor, predicate, timeout=5.0):
    waited = 0.0
    while not predicate():
        assert waited < timeout, "condition not reached"
        await deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


@pytest.mark.parametrize("request_bytes, code", [
    (b"GARBAGE\r\n\r\n", "BAD_REQUEST"),
    (b"GET /api/users HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", "BAD_REQUEST"),
    (b"POST /api/users HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", "BAD_REQUEST"),
    (b"GET /api/users HTTP/1.1\r\nHost: a\r\nX-Evil: a\rInjected: b\r\n\r\n", "BAD_REQUEST"),
    (b"GET /api/users HTTP/1.1\r\nHost: a\r\nX-Evil: a\nInjected: b\r\n\r\n", "BAD_REQUEST"),
    (b"GET /api/users HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", "BAD_REQUEST"),
    (b"GET /api/users HTTP/1.1\r\n\r\n", "BAD_REQUEST"),
    (b"GET /api/users HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "BAD_REQUEST"),
    (b"GET api/users HTTP/1.1\r\nHost: a\r\n\r\n", "BAD_REQUEST"),
    (b"GET /api/users HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", "BAD_REQUEST"),
    (b"POST /api/users HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
     "BAD_REQUEST"),
    (b"POST /api/users HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3\r\nabc\r\n0\r\n\r\n", "BAD_REQUEST"),
], ids=["request-line", "cl-and-te", "two-content-lengths", "cr-in-value", "lf-in-value", "unknown-te",
        "no-host", "two-hosts", "relative-target", "xchunked-te", "coding-under-chunked", "te-split-in-two"])
@pytest_twisted.ensureDeferred
async def test_malformed_requests_get_400_and_the_connection_closes(reactor, echo, gateway, request_bytes, code):
    gw = await gateway(simple_config(echo.url))
    (r,) = parse_responses(await raw(gw.port, request_bytes))
    assert_envelope(r, 400, code)
    assert r.header("connection") == "close"
    assert echo.requests == []
    await still_serves(gw)


@pytest_twisted.ensureDeferred
async def test_oversized_headers_get_431(reactor, echo, gateway):
    gw = await gateway(simple_config(echo.url, top="limits: {max_header_bytes: 4KiB}\n"))
    big = b"GET /api/users HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n"
    (r,) = parse_responses(await raw(gw.port, big))
    assert_envelope(r, 431, "HEADERS_TOO_LARGE")
    many = b"GET /api/users HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(600)) + b"\r\n"
    (r,) = parse_responses(await raw(gw.port, many))
    assert_envelope(r, 431, "HEADERS_TOO_LARGE")
    # A header line that never ends is cut off too, without waiting for its end.
    (r,) = parse_responses(await raw(gw.port, b"GET /api/users HTTP/1.1\r\nX-Endless: " + b"b" * 20000))
    assert_envelope(r, 431, "HEADERS_TOO_LARGE")
    await still_serves(gw)


@pytest_twisted.ensureDeferred
async def test_declared_oversized_body_gets_413_before_it_is_read(reactor, echo, gateway):
    gw = await gateway(simple_config(echo.url, top="limits: {max_body_size: 1KiB}\n"))
    (r,) = parse_responses(await raw(gw.port, b"POST /api/users HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n"
                                              b"Expect: 100-continue\r\n\r\n"))
    assert_envelope(r, 413, "PAYLOAD_TOO_LARGE")
    assert echo.requests == []
    await still_serves(gw)


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_the_limit_gets_413(reactor, raw_upstream, gateway):
    up = await raw_upstream(lambda server, data: None)  # never answers: the limit must answer first
    gw = await gateway(simple_config(up.url, top="limits: {max_body_size: 1KiB}\n"))
    chunk = b"400\r\n" + b"x" * 1024 + b"\r\n"
    resp = await raw(gw.port, [b"POST /api/users HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", chunk, chunk],
                     pause=0.05)
    (r,) = parse_responses(resp)
    assert_envelope(r, 413, "PAYLOAD_TOO_LARGE")


@pytest_twisted.ensureDeferred
async def test_slow_headers_get_408(reactor, echo, gateway):
    clock = Clock()
    gw = await gateway(simple_config(echo.url, top="limits: {header_timeout: 5s}\n"), clock=clock)
    pending = deferToThread(raw_request, gw.port, b"GET /api/users HTTP/1.1\r\nHost: a\r\n", read_timeout=5)
    await wait_for(reactor, lambda: any(c._parsing is not None for c in gw.gateway.factory.connections))
    clock.advance(4)
    await deferLater(reactor, 0.05, lambda: None)
    assert any(c._parsing is not None for c in gw.gateway.factory.connections), "closed too early"
    clock.advance(1.2)
    (r,) = parse_responses(await pending)
    assert_envelope(r, 408, "REQUEST_TIMEOUT")
    await still_serves(gw)


@pytest_twisted.ensureDeferred
async def test_unknown_route_gets_404(reactor, echo, gateway):
    gw = await gateway(simple_config(echo.url))
    (r,) = parse_responses(await raw(gw.port, b"GET /admin HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"))
    assert_envelope(r, 404, "NO_ROUTE")
    await still_serves(gw)


@pytest.mark.parametrize("path", [b"/api/users/../../admin", b"/api/users/%2e%2e/%2e%2e/admin", b"/api/users/../orders/1",
                                  b"/../etc/passwd"])
@pytest_twisted.ensureDeferred
async def test_traversal_out_of_the_prefix_gets_400(reactor, echo, gateway, path):
    gw = await gateway(simple_config(echo.url, extra_route="  - {prefix: /, upstream: users}\n"))
    (r,) = parse_responses(await raw(gw.port, b"GET " + path + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"))
    assert_envelope(r, 400, "BAD_REQUEST")
    assert echo.requests == []
    await still_serves(gw)


@pytest_twisted.ensureDeferred
async def test_forged_identity_and_gateway_headers_never_reach_the_upstream(reactor, echo, gateway):
    gw = await gateway(simple_config(echo.url))
    (r,) = parse_responses(await raw(gw.port, b"GET /api/users HTTP/1.1\r\nHost: a\r\nX-User-Id: admin\r\nx-user-role: admin\r\n"
                                              b"X-User-Tier: enterprise\r\nX-Gateway-Auth: ok\r\nConnection: close\r\n\r\n"))
    names = {k.lower() for k in r.json()["headers"]}
    assert not {n for n in names if n.startswith(("x-user-", "x-gateway-"))}


@pytest.mark.parametrize("cid", [b"a" * 300, b"<script>alert(1)</script>", b"", b"has space"])
@pytest_twisted.ensureDeferred
async def test_junk_correlation_ids_are_replaced(reactor, echo, gateway, cid):
    gw = await gateway(simple_config(echo.url))
    (r,) = parse_responses(await raw(gw.port, b"GET /api/users HTTP/1.1\r\nHost: a\r\nX-Correlation-ID: " + cid + b"\r\nConnection: close\r\n\r\n"))
    echoed = r.header("x-correlation-id")
    assert echoed != cid.decode() and len(echoed) == 36 and echoed.count("-") == 4
    assert r.json()["headers"]["X-Correlation-Id"] == echoed


@pytest_twisted.ensureDeferred
async def test_valid_correlation_id_is_kept_and_echoed(reactor, echo, gateway):
    gw = await gateway(simple_config(echo.url))
    (r,) = parse_responses(await raw(gw.port, b"GET /api/users HTTP/1.1\r\nHost: a\r\nX-Correlation-ID: req-42.a_b\r\nConnection: close\r\n\r\n"))
    assert r.header("x-correlation-id") == "req-42.a_b"
    assert r.json()["headers"]["X-Correlation-Id"] == "req-42.a_b"


@pytest_twisted.ensureDeferred
async def test_refused_upstream_gets_502(reactor, echo, gateway):
    gw = await gateway(simple_config(f"http://127.0.0.1:{free_port()}"))
    (r,) = parse_responses(await raw(gw.port, GOOD))
    err = assert_envelope(r, 502, "BAD_GATEWAY")
    assert "127.0.0.1" not in err["message"]
    assert gw.log[-1]["status"] == 502 and "connect failed" in gw.log[-1]["detail"]


@pytest_twisted.ensureDeferred
async def test_malformed_upstream_status_line_gets_502(reactor, raw_upstream, gateway):
    up = await raw_upstream(lambda server, data: server.transport.write(b"HTTP/1.1 OK-ish\r\n\r\n"))
    gw = await gateway(simple_config(up.url))
    (r,) = parse_responses(await raw(gw.port, GOOD))
    assert_envelope(r, 502, "BAD_GATEWAY")


@pytest_twisted.ensureDeferred
async def test_upstream_reset_before_answering_gets_502(reactor, raw_upstream, gateway):
    up = await raw_upstream(lambda server, data: server.transport.abortConnection())
    gw = await gateway(simple_config(up.url))
    (r,) = parse_responses(await raw(gw.port, GOOD))
    assert_envelope(r, 502, "BAD_GATEWAY")


@pytest_twisted.ensureDeferred
async def test_upstream_reset_mid_body_breaks_the_client_connection(reactor, raw_upstream, gateway):
    def script(server, data):
        server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        reactor.callLater(0.1, server.transport.abortConnection)
    up = await raw_upstream(script)
    gw = await gateway(simple_config(up.url))
    resp = await raw(gw.port, GOOD)
    head, _, body = resp.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert len(body.replace(b"<RESET>", b"")) < 100000  # the client sees a truncated body, not a fake success
    assert gw.log[-1]["detail"].startswith("upstream failed mid-response")


@pytest_twisted.ensureDeferred
async def test_hanging_upstream_gets_504_after_timeout(reactor, raw_upstream, gateway):
    clock = Clock()
    up = await raw_upstream(lambda server, data: None)
    gw = await gateway(simple_config(up.url), clock=clock)
    pending = deferToThread(raw_request, gw.port, GOOD, read_timeout=5)
    await wait_for(reactor, lambda: up.requests)
    clock.advance(1.5)
    await deferLater(reactor, 0.05, lambda: None)
    assert not pending.called
    clock.advance(0.6)
    (r,) = parse_responses(await pending)
    assert_envelope(r, 504, "GATEWAY_TIMEOUT")


@pytest_twisted.ensureDeferred
async def test_client_disconnect_cancels_the_upstream_request(reactor, raw_upstream, gateway):
    closed = []

    def script(server, data):
        server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 100)
        server.connectionLost = lambda reason: closed.append(reason)
    up = await raw_upstream(script)
    gw = await gateway(simple_config(up.url))
    await raw(gw.port, GOOD, read_timeout=0.3)   # reads a little, then hangs up
    await wait_for(reactor, lambda: closed)
    assert gw.log[-1]["status"] == 200
    assert gw.gateway.proxy.groups["users"].pools[0].total == 0
    assert not gw.gateway.factory.connections


SMUGGLED = b"GET /api/users/smuggled HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.mark.parametrize("upgrade, framing, body", [
    (b"h2c", b"Content-Length: %d\r\n" % len(SMUGGLED), SMUGGLED),
    (b"foo", b"Transfer-Encoding: chunked\r\n", b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)),
    (b"h2c", b"", b""),
], ids=["h2c-content-length", "foo-chunked", "h2c-no-body"])
@pytest_twisted.ensureDeferred
async def test_an_upgrade_that_is_not_websocket_is_an_ordinary_request_with_its_body(
        reactor, echo, gateway, upgrade, framing, body):
    """Only WebSocket upgrades are upgrades (issue 18 item 6): llhttp stops at the head of any
    other, leaving its body unparsed. The body must reach the upstream as the body, never be
    parsed as a second request nor dropped; the Upgrade and its Connection token are not forwarded."""
    gw = await gateway(simple_config(echo.url))
    method = b"POST" if body else b"GET"
    request = (b"%s /api/users/up HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: %s\r\n"
               b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n%s\r\n%s" % (method, upgrade, framing, body))
    following = b"GET /api/users/next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    responses = parse_responses(await raw(gw.port, request + following))
    assert [r.status for r in responses] == [200, 200]
    assert [r.json()["path"] for r in responses] == ["/users/up", "/users/next"]
    first = responses[0].json()
    assert first["body_bytes"] == (len(SMUGGLED) if body else 0)
    assert not {"Upgrade", "Http2-Settings", "Connection"} & set(first["headers"]), first["headers"]
    assert [r.path for r in echo.requests] == [b"/users/up", b"/users/next"]     # nothing smuggled
    await still_serves(gw)
