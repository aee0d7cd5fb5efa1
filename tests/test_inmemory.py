"""The pipeline, the proxy's exchange, the HTTP/1.1 transport and the pool, in memory.

`txgateway.testing.MemoryGateway` runs the real Gateway on a MemoryReactorClock with iosim
connections: no sockets, time moved by hand. The same behaviours have real-socket tests in
tests/integration; these pin each piece where a failure is easy to read.
"""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import parse_responses
from txgateway.testing import HANG, MemoryGateway, with_filter

UPSTREAM = "http://users.internal:3001"
CONFIG = f"""
listen: [{{endpoint: "tcp:8080"}}]
access_log: "off"
upstreams:
  users: {{targets: ["{UPSTREAM}"], connect_timeout: 1s, timeout: 2s,
           circuit_breaker: {{consecutive_failures: 2, open_for: 30s}}}}
routes:
  - {{prefix: /api/users, upstream: users, rewrite_prefix: /users}}
"""


def echo(peer: Any, data: bytes) -> None:
    """Answers each complete request head with its request line as the body."""
    while b"\r\n\r\n" in peer.received:
        head, _, peer.received = peer.received.partition(b"\r\n\r\n")
        line = head.split(b"\r\n", 1)[0]
        peer.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(line), line))


def get(*paths: str) -> bytes:
    out = [f"GET {p} HTTP/1.1\r\nHost: a\r\n\r\n".encode() for p in paths[:-1]]
    out.append(f"GET {paths[-1]} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
    return b"".join(out)


def test_pipelined_requests_are_answered_in_order_over_one_pooled_upstream_connection():
    gw = MemoryGateway(CONFIG, {UPSTREAM: echo})
    rs = parse_responses(gw.request(get("/api/users/1", "/api/users/2", "/api/users/3")))
    assert [r.body for r in rs] == [b"GET /users/%d HTTP/1.1" % i for i in (1, 2, 3)]
    assert len(gw.reactor.tcpClients) == 1            # one upstream connection, kept alive and reused
    rs = parse_responses(gw.request(get("/api/users/4")))
    assert rs[0].body == b"GET /users/4 HTTP/1.1" and len(gw.reactor.tcpClients) == 1


def test_garbage_is_a_400_envelope_and_no_route_a_404():
    gw = MemoryGateway(CONFIG, {UPSTREAM: echo})
    (bad,) = parse_responses(gw.request(b"GET /\x00 HTTP/1.1\r\n\r\n"))
    assert bad.status == 400 and json.loads(bad.body)["error"]["code"] == "BAD_REQUEST"
    (none,) = parse_responses(gw.request(get("/nowhere")))
    assert none.status == 404 and json.loads(none.body)["error"]["code"] == "NO_ROUTE"
    assert gw.reactor.tcpClients == []


def test_a_refused_upstream_is_a_502_and_counts_for_the_breaker():
    gw = MemoryGateway(CONFIG, {})                    # no script: connections are refused
    for _ in range(2):
        (r,) = parse_responses(gw.request(get("/api/users/1")))
        assert r.status == 502
    (r,) = parse_responses(gw.request(get("/api/users/1")))
    assert r.status == 503 and 27 <= int(r.header("retry-after")) <= 33   # open_for 30s, +-10%
    assert gw.gateway.breakers["users"].state == "open"


def test_a_connect_timeout_is_a_504_when_the_clock_moves():
    gw = MemoryGateway(CONFIG, {UPSTREAM: HANG})
    client = gw.connect()
    client.transport.write(get("/api/users/1"))
    gw.advance(0.5)
    assert client.received == b""
    gw.advance(0.6)                                   # connect_timeout: 1s, swept by the deadline loop
    (r,) = parse_responses(client.received)
    assert r.status == 504 and json.loads(r.body)["error"]["code"] == "GATEWAY_TIMEOUT"


def test_an_upstream_reset_mid_body_cuts_the_client_and_is_the_upstreams_failure():
    def half(peer: Any, data: bytes) -> None:
        peer.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        peer.transport.loseConnection()

    gw = MemoryGateway(CONFIG, {UPSTREAM: half})
    client = gw.connect()
    client.transport.write(get("/api/users/1"))
    gw.run()
    assert client.received.startswith(b"HTTP/1.1 200 OK") and client.received.endswith(b"partial")
    assert client.lost
    assert gw.gateway.breakers["users"].snapshot()["window_failures"] == 1


class Raises:
    name = "raises"
    on_response_body = on_finished = None

    def __init__(self, phase: str) -> None:
        self.phase = phase

    def on_request(self, ctx: Any) -> None:
        if self.phase == "request" and b"boom" in ctx.path:
            raise ValueError("bug")

    def on_response_head(self, ctx: Any, head: Any) -> None:
        if self.phase == "head" and b"boom" in ctx.path:
            raise ValueError("bug")


def test_a_request_filter_raising_on_a_pipelined_request_is_contained():
    gw = MemoryGateway(CONFIG, {UPSTREAM: echo})
    gw.gateway.switch.pipeline = with_filter(gw.gateway.pipeline, Raises("request"))
    rs = parse_responses(gw.request(get("/api/users/1", "/api/users/boom", "/api/users/3")))
    assert [r.status for r in rs] == [200, 500, 200]
    assert json.loads(rs[1].body)["error"]["code"] == "INTERNAL"


def test_a_response_filter_raising_gives_no_verdict_on_the_upstream():
    gw = MemoryGateway(CONFIG, {UPSTREAM: echo})
    gw.gateway.switch.pipeline = with_filter(gw.gateway.pipeline, Raises("head"))
    for _ in range(3):
        rs = parse_responses(gw.request(get("/api/users/boom", "/api/users/2")))
        assert [r.status for r in rs] == [500, 200]
    snapshot = gw.gateway.breakers["users"].snapshot()
    assert (snapshot["state"], snapshot["window_failures"]) == ("closed", 0)


def test_the_long_lived_parts_are_child_services_started_before_and_stopped_after_the_listeners():
    gw = MemoryGateway(CONFIG, {UPSTREAM: echo})
    children = list(gw.gateway)
    names = [child.name for child in children if child not in gw.gateway.listeners]
    assert names == ["deadlines", "limiter", "upstreams"]
    assert children.index(gw.gateway.listeners[0]) == len(names)         # the listener comes after them
    assert all(child.running for child in children)
    parse_responses(gw.request(get("/api/users/1")))                       # a pooled upstream connection
    stopping = gw.gateway.stopService()
    gw.advance(0.2)
    assert stopping.called and not any(child.running for child in children)
    assert gw.upstream_peers[0].lost                                        # the pool closed it
