"""The proxy over real sockets: routing, rewriting, framing, keep-alive, headers."""

from __future__ import annotations

import pytest
import pytest_twisted
import treq
from twisted.web.client import HTTPConnectionPool

from tests.conftest import TIMEOUT, get_closing, parse_responses, raw, simple_config


@pytest_twisted.ensureDeferred
async def test_get_is_rewritten_and_query_kept(reactor, echo, gateway):
    gw = await gateway(simple_config(echo.url))
    resp = await raw(gw.port, b"GET /api/users/7?x=1&y=%20 HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n")
    (r,) = parse_responses(resp)
    assert r.status == 200
    body = r.json()
    assert body["path"] == "/users/7" and body["query"] == "x=1&y=%20"
    assert body["headers"]["X-Forwarded-Host"] == "api.test"
    assert body["headers"]["X-Forwarded-Proto"] == "http"
    assert body["headers"]["X-Forwarded-For"] == "127.0.0.1"
    assert body["headers"]["Host"] == f"127.0.0.1:{echo.port}"


@pytest_twisted.ensureDeferred
async def test_prefix_matches_only_on_segment_boundary(reactor, echo, gateway):
    gw = await gateway(simple_config(echo.url))
    r = await get_closing(gw.port, b"/api/usersx")
    assert r.status == 404
    assert echo.requests == []


@pytest_twisted.ensureDeferred
async def test_keep_alive_and_pipelined_requests_answered_in_order(reactor, echo, gateway):
    gw = await gateway(simple_config(echo.url))
    reqs = b"".join(b"GET /api/users/%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(5))
    resp = await raw(gw.port, reqs + b"GET /api/users/last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    rs = parse_responses(resp)
    assert [r.json()["path"] for r in rs] == [f"/users/{i}" for i in range(5)] + ["/users/last"]
    assert rs[-1].header("connection") == "close"


@pytest_twisted.ensureDeferred
async def test_upstream_connections_are_reused(reactor, echo, gateway):
    gw = await gateway(simple_config(echo.url))
    pool = HTTPConnectionPool(reactor, persistent=False)
    for i in range(5):
        r = await treq.get(f"{gw.url}/api/users/{i}", pool=pool).addTimeout(TIMEOUT, reactor)
        await r.content()
    ports = {req.transport.getPeer().port for req in echo.requests}
    assert len(ports) == 1
    await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_post_body_streams_to_upstream_with_content_length(reactor, echo, gateway):
    gw = await gateway(simple_config(echo.url))
    body = b"x" * 300_000
    resp = await raw(gw.port, b"POST /api/users HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    (r,) = parse_responses(resp)
    assert r.status == 200 and r.json()["body_bytes"] == len(body)


@pytest_twisted.ensureDeferred
async def test_chunked_request_body_is_rechunked_upstream(reactor, raw_upstream, gateway):
    def script(server, data):
        if server.buffer.endswith(b"0\r\n\r\n"):
            server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    up = await raw_upstream(script)
    gw = await gateway(simple_config(up.url))
    resp = await raw(gw.port, [b"POST /api/users HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
                               b"5\r\nhello\r\n", b"6\r\n world\r\n0\r\n\r\n"], pause=0.05)
    (r,) = parse_responses(resp)
    assert r.status == 200 and r.body == b"ok"
    seen = b"".join(up.requests)
    head, _, body = seen.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert b"content-length" not in head.lower()
    chunks = body.replace(b"\r\n", b"|")
    assert chunks.startswith(b"5|hello|") and chunks.endswith(b"0||")


@pytest_twisted.ensureDeferred
async def test_close_delimited_response_is_rechunked_for_http11_clients(reactor, raw_upstream, gateway):
    def script(server, data):
        server.transport.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nstreamed until close")
        server.transport.loseConnection()
    up = await raw_upstream(script)
    gw = await gateway(simple_config(up.url))
    r = await get_closing(gw.port, b"/api/users")
    assert r.header("transfer-encoding") == "chunked"
    assert r.body == b"streamed until close"


@pytest_twisted.ensureDeferred
async def test_a_response_whose_transfer_coding_is_not_chunked_is_read_until_close(reactor, raw_upstream, gateway):
    """RFC 9112 §6.3: Transfer-Encoding without chunked last delimits the body by the close."""
    def script(server, data):
        server.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: x-unknown\r\n\r\nbody until close")
        server.transport.loseConnection()
    up = await raw_upstream(script)
    gw = await gateway(simple_config(up.url))
    r = await get_closing(gw.port, b"/api/users")
    assert (r.status, r.body) == (200, b"body until close")


@pytest_twisted.ensureDeferred
async def test_http10_client_gets_close_delimited_body(reactor, raw_upstream, gateway):
    def script(server, data):
        server.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    up = await raw_upstream(script)
    gw = await gateway(simple_config(up.url))
    resp = await raw(gw.port, b"GET /api/users HTTP/1.0\r\n\r\n")
    head, _, body = resp.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"connection: close" in head.lower() and b"transfer-encoding" not in head.lower()
    assert body == b"abc"


@pytest.mark.parametrize("header", [b"Connection: keep-alive", b"Proxy-Connection: keep-alive"])
@pytest_twisted.ensureDeferred
async def test_http10_keep_alive_client_is_still_answered_as_http10(reactor, raw_upstream, gateway, header):
    # llhttp keeps this connection alive: the version is read from the request, not guessed as 1.1.
    def script(server, data):
        server.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    up = await raw_upstream(script)
    gw = await gateway(simple_config(up.url))
    resp = await raw(gw.port, b"GET /api/users HTTP/1.0\r\n" + header + b"\r\n\r\n")
    head, _, body = resp.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower() and b"transfer-encoding" not in head.lower()
    assert body == b"abc"


@pytest_twisted.ensureDeferred
async def test_head_and_204_and_304_have_no_body(reactor, raw_upstream, gateway):
    def script(server, data):
        if data.startswith(b"HEAD"):
            server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        elif b"/users/204" in data:
            server.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        else:
            server.transport.write(b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n")
    up = await raw_upstream(script)
    gw = await gateway(simple_config(up.url))
    resp = await raw(gw.port, b"HEAD /api/users/1 HTTP/1.1\r\nHost: a\r\n\r\n"
                              b"GET /api/users/204 HTTP/1.1\r\nHost: a\r\n\r\n"
                              b"GET /api/users/304 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    # Split by status lines: none of the three carries a body.
    heads = [h for h in resp.split(b"\r\n\r\n") if h]
    assert [h.split(b"\r\n")[0] for h in heads] == [b"HTTP/1.1 200 OK", b"HTTP/1.1 204 No Content", b"HTTP/1.1 304 Not Modified"]
    assert b"content-length: 1000" in heads[0].lower()


@pytest_twisted.ensureDeferred
async def test_hop_by_hop_headers_removed_both_ways(reactor, raw_upstream, gateway):
    def script(server, data):
        server.transport.write(b"HTTP/1.1 200 OK\r\nConnection: X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\n"
                               b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n")
    up = await raw_upstream(script)
    gw = await gateway(simple_config(up.url))
    resp = await raw(gw.port, b"GET /api/users HTTP/1.1\r\nHost: a\r\nConnection: close, X-Drop\r\nX-Drop: 1\r\n"
                              b"Keep-Alive: 300\r\nTE: trailers\r\nProxy-Authorization: x\r\nX-Multi: a\r\nX-Multi: b\r\n\r\n")
    (r,) = parse_responses(resp)
    sent = b"".join(up.requests).lower()
    for name in (b"x-drop", b"keep-alive", b"te:", b"proxy-authorization", b"connection"):
        assert name not in sent
    assert sent.count(b"x-multi:") == 2
    names = [k.lower() for k, _ in r.headers]
    assert "x-secret" not in names and "keep-alive" not in names
    assert names.count("set-cookie") == 2


@pytest_twisted.ensureDeferred
async def test_expect_100_continue_is_answered_after_filters(reactor, echo, gateway):
    gw = await gateway(simple_config(echo.url))
    resp = await raw(gw.port, [b"POST /api/users HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
                               b"hello"], pause=0.3)
    assert resp.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200")
    # An unknown route is refused without asking for the body.
    resp = await raw(gw.port, b"POST /nowhere HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 404")


@pytest_twisted.ensureDeferred
async def test_local_error_keeps_alive_unless_a_body_was_left_unread(reactor, echo, gateway):
    gw = await gateway(simple_config(echo.url))
    # A 404 for a GET leaves nothing unread: the connection carries the next request.
    rs = parse_responses(await raw(gw.port, b"GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n"
                                             b"GET /api/users/2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"))
    assert [r.status for r in rs] == [404, 200]
    assert rs[0].header("connection") is None
    # A 404 for a POST whose body was never read says it closes, and does.
    resp = await raw(gw.port, b"POST /nowhere HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)
    (r,) = parse_responses(resp)
    assert r.status == 404 and r.header("connection") == "close"


@pytest_twisted.ensureDeferred
async def test_response_head_split_across_reads_after_an_interim_response(reactor, raw_upstream, gateway):
    # The head comes through llhttp's callbacks (txgateway/upstream/pool.py): it must not
    # matter where reads split it, nor that a 100 Continue comes first in the same read.
    wire = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created Just Now\r\nX-A:   padded value\r\n"
            b"X-Multi: 1\r\nConnection: X-Hop\r\nX-Hop: h\r\nX-Multi: 2\r\nContent-Length: 2\r\n\r\nok")
    cuts = [65, 66, 90, 91, 110, len(wire) - 3, len(wire) - 1]   # the 1st read: 100, status line, "X-A:   pa"

    def script(server, data):
        pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
        for i, piece in enumerate(pieces):
            reactor.callLater(0.01 * i, server.transport.write, piece)
    up = await raw_upstream(script)
    gw = await gateway(simple_config(up.url))
    resp = await raw(gw.port, b"GET /api/users HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    (r,) = parse_responses(resp)
    assert resp.startswith(b"HTTP/1.1 201 Created Just Now\r\n")
    assert r.body == b"ok"
    assert r.header("x-a") == "padded value"
    assert [v for k, v in r.headers if k.lower() == "x-multi"] == ["1", "2"]
    assert r.header("x-hop") is None and r.header("connection") == "close"
