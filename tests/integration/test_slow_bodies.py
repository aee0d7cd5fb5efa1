"""Slow request bodies cannot exhaust an upstream's pool nor get a healthy upstream ejected.

Small bodies (up to `buffer_request_body`) are read whole before a pooled connection is
taken; a body that falls behind `body_timeout` + `min_body_rate` gets 408 however often it
sends a byte; a request that waits for a free connection until `connect_timeout` gets 503;
none of these is a verdict on the upstream. Time is a `task.Clock`; the clients are real sockets.
"""

from __future__ import annotations

import socket

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from tests.conftest import assert_envelope, parse_responses, raw, read_to_end, until

CONFIG = """
limits: {{body_timeout: 10s, min_body_rate: 1KiB, idle_timeout: 30s, buffer_request_body: {buffer}}}
upstreams:
  users:
    targets: ["{url}"]
    max_connections: {conns}
    connect_timeout: 1s
    circuit_breaker: {{consecutive_failures: 2}}
    passive_health: {{consecutive_failures: 2}}
routes:
  - {{prefix: /api/users, upstream: users}}
"""
GET = b"GET /api/users/ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"


def slow_client(port: int, length: int) -> socket.socket:
    """A client that sent its head and one byte of a `length`-byte body."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"POST /api/users/up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\nx" % length)
    return s


def active_contexts(gw):
    return [conn._queue[0].ctx for conn in list(gw.gateway.factory.connections) if conn._queue]


def upstream_untouched(gw) -> None:
    group = gw.gateway.proxy.groups["users"]
    (member,) = group.balancer.members
    assert member.failures == 0 and member.ejected_until == 0.0
    assert group.breaker.state == "closed"


@pytest_twisted.ensureDeferred
async def test_many_slow_small_bodies_take_no_pooled_connection(reactor, echo, gateway):
    clock = Clock()
    gw = await gateway(CONFIG.format(url=echo.url, buffer="64KiB", conns=2), clock=clock)
    slow = [slow_client(gw.port, 1000) for _ in range(20)]
    await until(reactor, lambda: len(active_contexts(gw)) == 20 and all(c.bytes_in == 1 for c in active_contexts(gw)))
    for _ in range(5):            # the pool (2 connections) is free for them
        (resp,) = parse_responses(await raw(gw.port, GET))
        assert resp.status == 200
    clock.advance(10.5)           # past body_timeout: 1 byte of 1000 is far behind 1KiB/s
    for s in slow:
        (resp,) = parse_responses(await deferToThread(read_to_end, s))
        assert_envelope(resp, 408, "REQUEST_TIMEOUT")
    assert gw.log[-1]["detail"] == "client request body too slow" and not echo.requests[5:]
    upstream_untouched(gw)
    (resp,) = parse_responses(await raw(gw.port, GET))
    assert resp.status == 200


@pytest_twisted.ensureDeferred
async def test_a_trickle_cannot_extend_its_body_deadline_nor_blame_the_upstream(reactor, echo, gateway):
    clock = Clock()
    gw = await gateway(CONFIG.format(url=echo.url, buffer="0", conns=1), clock=clock)
    s = slow_client(gw.port, 100000)                 # streamed: it holds the only pooled connection
    pool = gw.gateway.proxy.groups["users"].pools[0]
    await until(reactor, lambda: pool.total == 1 and active_contexts(gw))
    waiting = Deferred.fromCoroutine(raw(gw.port, GET))
    await until(reactor, lambda: pool.waiting)
    clock.advance(1.2)                               # connect_timeout: the slot never freed
    (resp,) = parse_responses(await waiting)
    assert_envelope(resp, 503, "UPSTREAM_UNAVAILABLE")
    assert resp.header("retry-after") == "1"
    upstream_untouched(gw)
    (ctx,) = active_contexts(gw)
    sent = 1
    while clock.seconds() < 30 and not ctx.done:     # a byte every 2 s: well within idle_timeout (30 s)
        s.sendall(b"x")
        sent += 1
        await until(reactor, lambda: ctx.bytes_in == sent)
        clock.advance(2)
    assert ctx.done and clock.seconds() <= 12        # body_timeout + 1 s per 1KiB, not idle_timeout per byte
    (resp,) = parse_responses(await deferToThread(read_to_end, s))
    assert_envelope(resp, 408, "REQUEST_TIMEOUT")
    upstream_untouched(gw)
    (resp,) = parse_responses(await raw(gw.port, GET))
    assert resp.status == 200


@pytest_twisted.ensureDeferred
async def test_a_buffered_body_is_resent_when_a_pooled_connection_turns_out_closed(reactor, raw_upstream, gateway):
    def script(server, data):
        if not server.buffer.endswith(b"hello"):
            return
        server.buffer = b""
        server.answered = getattr(server, "answered", 0) + 1
        if server.answered == 2:       # the upstream closed its idle keep-alive just as it was reused
            server.transport.loseConnection()
        else:
            server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    up = await raw_upstream(script)
    gw = await gateway(f"""
        upstreams:
          users: {{targets: ["{up.url}"]}}
        routes:
          - {{prefix: /api/users, upstream: users}}
        """)
    put = b"PUT /api/users/1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    for _ in range(2):
        (resp,) = parse_responses(await raw(gw.port, put))
        assert (resp.status, resp.body) == (200, b"ok")
    assert b"".join(up.requests).count(b"hello") == 3          # the second PUT went out twice, whole
    (member,) = gw.gateway.proxy.groups["users"].balancer.members
    assert member.failures == 0


@pytest_twisted.ensureDeferred
async def test_an_upstream_silent_after_a_buffered_body_is_a_504_not_the_clients_408(reactor, raw_upstream, gateway):
    up = await raw_upstream(lambda server, data: None)        # reads everything, never answers
    clock = Clock()
    config = CONFIG.format(url=up.url, buffer="64KiB", conns=1).replace("connect_timeout: 1s", "timeout: 2s")
    gw = await gateway(config, clock=clock)
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    s.sendall(b"POST /api/users/up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
    await until(reactor, lambda: b"".join(up.requests).endswith(b"hello"))
    clock.advance(2.5)
    (resp,) = parse_responses(await deferToThread(read_to_end, s))
    assert_envelope(resp, 504, "GATEWAY_TIMEOUT")
    (member,) = gw.gateway.proxy.groups["users"].balancer.members
    assert member.failures == 1 and gw.log[-1]["detail"] == "response timeout"
