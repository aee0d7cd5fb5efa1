"""Upstream resilience over real sockets (issue 5): the breaker, retries, passive ejection.

Each gateway runs on a `task.Clock`: the breaker's open periods, ejections and the upstream
`timeout` only move when a test advances it, so nothing here sleeps. Real waits (a request
reaching a scripted upstream, a client seeing its connection end) are Deferreds bounded by
`addTimeout`, or `raw()` with its socket read timeout.

Breakers get `random = lambda: 0.5` after start-up: a jitter factor of exactly 1, so open
periods are the plain backoff steps (30 s, then 60 s, ...) and Retry-After is exact.

Round robin is deterministic: the first pick of a fresh balancer is the *second* target, then
they alternate; a retry picks among the targets not tried yet. Tests put the target they want
hit first in second place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.protocols.policies import WrappingFactory

from tests.conftest import (
    TIMEOUT,
    RecordingEcho,
    Response,
    assert_envelope,
    free_port,
    parse_responses,
    quiet_site,
    raw,
    raw_request,
)


def get(path: bytes = b"/api/users/1") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"


def post(path: bytes, body: bytes) -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
            + body)


async def one(port: int, request: bytes) -> Response:
    """Exactly one complete response to `request`."""
    (r,) = parse_responses(await raw(port, request))
    return r


async def good(gw: Any, path: bytes = b"/api/users/ok") -> Response:
    """The gateway still serves a request to a healthy upstream."""
    r = await one(gw.port, get(path))
    assert r.status == 200, r.body
    return r


def assert_unavailable(r: Response, retry_after: int | None = None) -> dict[str, Any]:
    """503 UPSTREAM_UNAVAILABLE with a whole-seconds Retry-After (exactly `retry_after` if given)."""
    err = assert_envelope(r, 503, "UPSTREAM_UNAVAILABLE")
    value = r.header("retry-after")
    assert value is not None and value.isdigit() and int(value) >= 1, value
    if retry_after is not None:
        assert int(value) == retry_after, (value, retry_after)
    return err


def unjittered(gw: Any, name: str = "users") -> Any:
    breaker = gw.gateway.breakers[name]
    breaker.random = lambda: 0.5
    return breaker


def members(gw: Any, name: str = "users") -> list[Any]:
    return gw.gateway.proxy.groups[name].balancer.members


class Signal:
    """Counts events from an upstream; `reached(n)` fires once n have happened (bounded)."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.count = 0
        self._waiting: list[tuple[int, Deferred[None]]] = []

    def fire(self) -> None:
        self.count += 1
        for n, d in list(self._waiting):
            if self.count >= n:
                self._waiting.remove((n, d))
                d.callback(None)

    def reached(self, n: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.count >= n:
            d.callback(None)
        else:
            self._waiting.append((n, d))
        return d.addTimeout(TIMEOUT, self.reactor)


class CountingFactory(WrappingFactory):
    """Wraps a server factory; counts every connection accepted, keeps the live ones."""

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self.accepted = 0

    def buildProtocol(self, addr: Any) -> Any:
        self.accepted += 1
        return super().buildProtocol(addr)

    def kill(self) -> None:
        """Reset every live connection (the process died)."""
        for proto in list(self.protocols):
            proto.transport.abortConnection()


@pytest_twisted.async_yield_fixture()
async def echo_on(reactor: Any) -> Any:
    """Factory fixture: `await echo_on(port=0)` -> (listening port, CountingFactory, requests seen):
    a recording echo upstream (as the `echo` fixture) whose connections are counted and can be
    reset; whatever is still listening or connected is closed at teardown."""
    started: list[tuple[Any, CountingFactory]] = []

    async def start(port: int = 0) -> tuple[Any, CountingFactory, list[Any]]:
        seen: list[Any] = []
        site = quiet_site(RecordingEcho("echo", seen))
        factory = CountingFactory(site)
        listening = await serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1").listen(factory)
        started.append((listening, factory))
        return listening, factory, seen

    yield start
    for listening, factory in started:
        if listening.connected:
            await listening.stopListening()
        factory.kill()


class Client(Protocol):
    """A raw client that can watch a response arrive piece by piece."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.data = b""
        self.head: Deferred[None] = Deferred()
        self.closed: Deferred[Any] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if b"\r\n\r\n" in self.data and not self.head.called:
            self.head.callback(None)

    def connectionLost(self, reason: Any) -> None:
        self.closed.callback(reason.value)               # the value: a Failure would errback


async def client(reactor: Any, port: int, request: bytes) -> Client:
    proto = Client(reactor)
    proto.head.addTimeout(TIMEOUT, reactor)
    proto.closed.addTimeout(TIMEOUT, reactor)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto).addTimeout(TIMEOUT, reactor)
    proto.transport.write(request)
    return proto


def head_then_hold(signal: Signal, servers: list[Any]) -> Any:
    """A raw upstream script: a 200 head and 1000 of 100000 body bytes, then nothing (the
    test resets the connection once the client has the head)."""
    def script(server: Any, data: bytes) -> None:
        if b"\r\n\r\n" in server.buffer and server not in servers:
            servers.append(server)
            server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
            signal.fire()
    return script


def requests_seen(up: Any) -> int:
    """Requests a raw upstream received (each starts with a request line)."""
    data = b"".join(up.requests)
    return data.count(b"GET /") + data.count(b"POST /")


# --- 1. a killed upstream -------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_killed_upstream_opens_the_breaker_and_fails_fast_without_contacting_it(reactor, echo_on, gateway):
    listening, factory, seen = await echo_on()
    port = listening.getHost().port
    clock = Clock()
    gw = await gateway(f"""
    upstreams:
      users:
        targets: ["http://127.0.0.1:{port}"]
        circuit_breaker: {{consecutive_failures: 3, open_for: 30s}}
    routes:
      - {{prefix: /api/users, upstream: users, rewrite_prefix: /users}}
    """, clock=clock)
    breaker = unjittered(gw)
    await good(gw)                                       # alive: a pooled connection exists
    assert breaker.state == "closed" and len(seen) == 1

    await listening.stopListening()                      # the upstream dies: port closed, connections reset
    factory.kill()
    for i in range(3):
        r = await one(gw.port, get(b"/api/users/%d" % i))
        err = assert_envelope(r, 502, "BAD_GATEWAY")
        assert str(port) not in err["message"]
        assert breaker.state == ("open" if i == 2 else "closed")
    assert gw.gateway.breakers["users"].state == "open"
    assert [rec["breaker"] for rec in gw.log[-3:]] == [None, None, None]
    assert "connect failed" in gw.log[-1]["detail"] or "reset" in gw.log[-1]["detail"]

    # The process comes back on the same port; while the breaker is open it sees nothing.
    _, revived_factory, revived_seen = await echo_on(port)
    for i in range(3):
        r = await one(gw.port, get(b"/api/users/open%d" % i))
        assert_unavailable(r, 30)
    clock.advance(10)
    assert_unavailable(await one(gw.port, get()), 20)
    assert revived_factory.accepted == 0 and revived_seen == []
    fast = gw.log[-4:]
    assert all(rec["breaker"] == "open" and rec["status"] == 503 and rec["error"] == "UPSTREAM_UNAVAILABLE"
               and rec["target"] is None and rec["upstream_ms"] is None for rec in fast), fast

    # After open_for: one half-open probe reaches the revived upstream and closes the breaker.
    clock.advance(20)
    assert breaker.state == "half_open"
    r = await good(gw, b"/api/users/probe")
    assert r.json()["path"] == "/users/probe"
    assert breaker.state == "closed" and gw.log[-1]["breaker"] is None
    assert [req.path for req in revived_seen] == [b"/users/probe"]
    await good(gw)
    assert breaker.snapshot()["transitions"] == {"closed->open": 1, "open->half_open": 1, "half_open->closed": 1}


# --- 2. an upstream that accepts and never answers -------------------------------------------

@pytest_twisted.ensureDeferred
async def test_hanging_upstream_gets_504_at_the_timeout_and_counts_toward_the_breaker(reactor, raw_upstream, echo,
                                                                                     gateway):
    arrived = Signal(reactor)
    up = await raw_upstream(lambda server, data: arrived.fire())
    clock = Clock()
    gw = await gateway(f"""
    upstreams:
      users:
        targets: ["{up.url}"]
        timeout: 2s
        circuit_breaker: {{consecutive_failures: 2, open_for: 30s}}
      orders: {{targets: ["{echo.url}"]}}
    routes:
      - {{prefix: /api/users, upstream: users, rewrite_prefix: /users}}
      - {{prefix: /api/orders, upstream: orders}}
    """, clock=clock)
    breaker = unjittered(gw)
    (member,) = members(gw)
    for n in (1, 2):
        pending = deferToThread(raw_request, gw.port, get(), read_timeout=TIMEOUT)
        await arrived.reached(n)
        clock.advance(1.9)
        assert len(gw.log) == n - 1, "answered before the timeout"
        clock.advance(0.2)                               # 2.1 s after the request went out
        assert gw.log[-1]["status"] == 504 and gw.log[-1]["detail"] == "response timeout"
        assert_envelope(parse_responses(await pending)[0], 504, "GATEWAY_TIMEOUT")
        assert member.failures == n and member.last_error == "response timeout"
        if n == 1:
            assert breaker.snapshot()["consecutive_failures"] == 1 and breaker.state == "closed"
    assert breaker.state == "open"
    assert_unavailable(await one(gw.port, get()), 30)
    assert requests_seen(up) == 2 and arrived.count == 2   # the third request never left the gateway
    await good(gw, b"/api/orders/1")


# --- 3. an upstream that resets mid-body -----------------------------------------------------

@dataclass
class MidBody:
    gw: Any
    got: Signal             # reached(1): the upstream has the request
    servers: list[Any]      # the upstream's connections


async def gateway_to_a_mid_body_upstream(reactor: Any, raw_upstream: Any, echo: Any, gateway: Any,
                                         users_extra: str = "") -> MidBody:
    """/api/users to an upstream that sends a head and part of a 100000-byte body, then holds;
    /api/orders to the echo upstream. `users_extra`: more flow-style keys of `users`."""
    got = Signal(reactor)
    servers: list[Any] = []
    up = await raw_upstream(head_then_hold(got, servers))
    gw = await gateway(f"""
    upstreams:
      users: {{targets: ["{up.url}"]{users_extra}}}
      orders: {{targets: ["{echo.url}"]}}
    routes:
      - {{prefix: /api/users, upstream: users, rewrite_prefix: /users}}
      - {{prefix: /api/orders, upstream: orders}}
    """, clock=Clock())
    return MidBody(gw, got, servers)


async def reset_mid_body(reactor: Any, setup: MidBody) -> None:
    """One request; the upstream resets once the client has the head and some body. The client
    gets that head, a truncated body and the close; the access log says why."""
    c = await client(reactor, setup.gw.port, get())
    await setup.got.reached(1)
    await c.head                                         # the client has the head and some body
    setup.servers[0].transport.abortConnection()         # RST mid-body
    await c.closed
    head, _, body = c.data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-length: 100000" in head.lower()
    assert len(body) < 100000                            # a truncated body, never a fake success
    detail = setup.gw.log[-1]["detail"]
    assert detail.startswith("upstream failed mid-response") and "reset" in detail


@pytest_twisted.ensureDeferred
async def test_reset_mid_body_aborts_the_client_connection(reactor, raw_upstream, echo, gateway):
    setup = await gateway_to_a_mid_body_upstream(reactor, raw_upstream, echo, gateway)
    await reset_mid_body(reactor, setup)
    await good(setup.gw, b"/api/orders/1")


# --- 4. 503 storms ----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_503_storm_opens_the_breaker_then_half_open_probes_back_off_and_recover(reactor, raw_upstream, gateway):
    mode = {"status": b"503 Service Unavailable"}
    arrived = Signal(reactor)
    held: list[Any] = []

    def answer(server: Any, status: bytes) -> None:
        server.transport.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nup")
        server.transport.loseConnection()

    def script(server: Any, data: bytes) -> None:
        if b"\r\n\r\n" not in server.buffer or getattr(server, "seen", False):
            return
        server.seen = True
        arrived.fire()
        if mode["status"] == b"hold":
            held.append(server)
        else:
            answer(server, mode["status"])

    up = await raw_upstream(script)
    clock = Clock()
    gw = await gateway(f"""
    upstreams:
      users:
        targets: ["{up.url}"]
        circuit_breaker: {{consecutive_failures: 3, open_for: 10s, max_open_for: 1m, failure_statuses: [503]}}
    routes:
      - {{prefix: /api/users, upstream: users, rewrite_prefix: /users}}
    """, clock=clock)
    breaker = unjittered(gw)

    for _ in range(3):                                   # the upstream's own 503s, relayed as they are
        r = await one(gw.port, get())
        assert r.status == 503 and r.body == b"up"
    assert breaker.state == "open" and breaker.snapshot()["open_for"] == 10.0
    for _ in range(3):
        assert_unavailable(await one(gw.port, get()), 10)
    assert arrived.count == 3

    # The probe after open_for fails: open again, twice as long.
    clock.advance(10)
    r = await one(gw.port, get())
    assert r.status == 503 and r.body == b"up" and arrived.count == 4
    assert breaker.state == "open" and breaker.snapshot()["open_for"] == 20.0
    assert_unavailable(await one(gw.port, get()), 20)
    clock.advance(19)
    assert_unavailable(await one(gw.port, get()), 1)
    assert arrived.count == 4

    # The next probe is held by the upstream: only one goes through, the rest fail fast.
    clock.advance(1)
    mode["status"] = b"hold"
    probe = deferToThread(raw_request, gw.port, get(b"/api/users/probe"), read_timeout=TIMEOUT)
    await arrived.reached(5)
    assert breaker.state == "half_open"
    for _ in range(2):
        assert_unavailable(await one(gw.port, get()), 1)
    assert arrived.count == 5
    mode["status"] = b"200 OK"                           # healthy again
    answer(held[0], mode["status"])
    (r,) = parse_responses(await probe)
    assert r.status == 200 and r.body == b"up"
    assert breaker.state == "closed" and breaker.snapshot()["open_for"] is None
    for _ in range(3):                                   # traffic flows
        assert (await one(gw.port, get())).status == 200
    assert arrived.count == 8
    assert breaker.snapshot()["transitions"] == {"closed->open": 1, "open->half_open": 2, "half_open->open": 1,
                                                 "half_open->closed": 1}
    # Back-off starts over after a recovery.
    mode["status"] = b"503 Service Unavailable"
    for _ in range(3):
        await one(gw.port, get())
    assert breaker.state == "open" and breaker.snapshot()["open_for"] == 10.0


# --- 5. manual trip and reset ------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_manual_trip_fails_fast_and_reset_restores(reactor, echo, gateway):
    gw = await gateway(f"""
    upstreams:
      users:
        targets: ["{echo.url}"]
        circuit_breaker: {{open_for: 30s}}
    routes:
      - {{prefix: /api/users, upstream: users, rewrite_prefix: /users}}
    """, clock=Clock())
    unjittered(gw)
    await good(gw)
    snapshot = gw.gateway.breakers.trip("users")
    assert snapshot["state"] == "open" and snapshot["retry_after"] == 30
    assert_unavailable(await one(gw.port, get(b"/api/users/tripped")), 30)
    assert [req.path for req in echo.requests] == [b"/users/ok"]
    assert gw.log[-1]["breaker"] == "open"
    snapshot = gw.gateway.breakers.reset("users")
    assert snapshot["state"] == "closed"
    r = await good(gw, b"/api/users/again")
    assert r.json()["path"] == "/users/again" and gw.log[-1]["breaker"] is None


# --- 6. retries --------------------------------------------------------------------------------

def pair(first: str, second: str, extra: str = "") -> str:
    """Round robin over [first, second]: the first pick is `second`."""
    return f"""
    upstreams:
      users:
        targets: ["{first}", "{second}"]
        retries: 1{extra}
    routes:
      - {{prefix: /api/users, upstream: users, rewrite_prefix: /users}}
    """


@pytest_twisted.ensureDeferred
async def test_get_after_a_refused_connection_is_retried_on_the_other_target(reactor, echo, gateway):
    refused = f"http://127.0.0.1:{free_port()}"
    gw = await gateway(pair(echo.url, refused, "\n        circuit_breaker: {consecutive_failures: 2}"), clock=Clock())
    breaker = unjittered(gw)
    good_member, bad_member = members(gw)
    for i in range(3):
        r = await one(gw.port, get(b"/api/users/%d" % i))
        assert r.status == 200 and r.json()["path"] == f"/users/{i}"
        assert gw.log[-1]["target"] == echo.url and gw.log[-1]["detail"].startswith("retried after: connect failed")
    assert [req.path for req in echo.requests] == [b"/users/0", b"/users/1", b"/users/2"]
    # Passive health sees every attempt; the breaker sees each request's outcome: three
    # successes, so two consecutive failed attempts do not open it.
    assert bad_member.requests == 3 and bad_member.failures == 3 and "connect failed" in bad_member.last_error
    assert good_member.requests == 3 and good_member.failures == 0
    s = breaker.snapshot()
    assert (s["window_requests"], s["window_failures"], s["state"]) == (3, 0, "closed")


@pytest_twisted.ensureDeferred
async def test_post_is_never_retried(reactor, echo, gateway):
    refused = f"http://127.0.0.1:{free_port()}"
    gw = await gateway(pair(echo.url, refused), clock=Clock())
    good_member, bad_member = members(gw)
    statuses = []
    for i in range(4):                                   # picks alternate: bad, good, bad, good
        r = await one(gw.port, post(b"/api/users/p%d" % i, b"payload-%d" % i))
        statuses.append(r.status)
        if r.status == 502:
            assert_envelope(r, 502, "BAD_GATEWAY")
        else:
            assert r.json()["body_bytes"] == len(b"payload-%d" % i)
    assert statuses == [502, 200, 502, 200]
    assert [req.path for req in echo.requests] == [b"/users/p1", b"/users/p3"]   # failed POSTs never reached it
    assert bad_member.requests == 2 and bad_member.failures == 2
    assert good_member.requests == 2
    await good(gw)


@pytest_twisted.ensureDeferred
async def test_get_is_not_retried_after_the_response_began(reactor, raw_upstream, echo, gateway):
    got = Signal(reactor)
    servers: list[Any] = []
    up = await raw_upstream(head_then_hold(got, servers))
    gw = await gateway(pair(echo.url, up.url), clock=Clock())
    c = await client(reactor, gw.port, get(b"/api/users/big"))
    await got.reached(1)
    await c.head
    servers[0].transport.abortConnection()
    await c.closed
    head, _, body = c.data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and len(body) < 100000
    assert c.data.count(b"HTTP/1.1") == 1                # no second response spliced in
    assert echo.requests == []                           # the other target saw nothing
    assert gw.log[-1]["target"] == up.url and gw.log[-1]["detail"].startswith("upstream failed mid-response")
    await good(gw)


@pytest_twisted.ensureDeferred
async def test_no_retry_once_the_breaker_is_open(reactor, raw_upstream, echo, gateway):
    arrived = Signal(reactor)
    hang = await raw_upstream(lambda server, data: arrived.fire())
    clock = Clock()
    gw = await gateway(pair(echo.url, hang.url, "\n        timeout: 2s\n        circuit_breaker: {open_for: 30s}"),
                       clock=clock)
    breaker = unjittered(gw)
    pending = deferToThread(raw_request, gw.port, get(b"/api/users/slow"), read_timeout=TIMEOUT)
    await arrived.reached(1)                             # admitted while closed, now waiting on the hanging target
    gw.gateway.breakers.trip("users")                    # the upstream is declared failing meanwhile
    clock.advance(2.1)
    (r,) = parse_responses(await pending)
    assert_envelope(r, 504, "GATEWAY_TIMEOUT")          # the retry asked the breaker and was refused
    assert echo.requests == []
    assert gw.log[-1]["target"] == hang.url and gw.log[-1]["detail"] == "response timeout"
    s = breaker.snapshot()
    assert s["state"] == "open" and s["stale_results"] == 1   # its verdict predates the trip
    assert_unavailable(await one(gw.port, get()), 28)
    assert echo.requests == [] and arrived.count == 1
    gw.gateway.breakers.reset("users")
    await good(gw)


# --- 7. passive ejection -------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_failing_target_is_ejected_then_tried_again_with_backoff(reactor, echo, gateway):
    refused = f"http://127.0.0.1:{free_port()}"
    clock = Clock()
    gw = await gateway(f"""
    upstreams:
      users:
        targets: ["{echo.url}", "{refused}"]
        passive_health: {{consecutive_failures: 2, eject_for: 10s}}
    routes:
      - {{prefix: /api/users, upstream: users, rewrite_prefix: /users}}
    """, clock=clock)
    good_member, bad_member = members(gw)
    balancer = gw.gateway.proxy.groups["users"].balancer

    async def statuses(n: int) -> list[int]:
        return [(await one(gw.port, get())).status for _ in range(n)]

    assert await statuses(3) == [502, 200, 502]          # round robin until the second failure
    assert (bad_member.requests, good_member.requests) == (2, 1)
    assert balancer.snapshot()[1]["ejected_for"] == 10.0
    assert await statuses(4) == [200] * 4                # ejected: all traffic to the good target
    assert (bad_member.requests, good_member.requests) == (2, 5)
    clock.advance(9.9)
    assert await statuses(2) == [200, 200]
    assert bad_member.requests == 2

    clock.advance(0.1)                                   # 10 s: back in rotation, tried again
    assert sorted(await statuses(2)) == [200, 502]
    assert bad_member.requests == 3
    assert balancer.snapshot()[1]["ejected_for"] == 20.0  # still bad: ejected twice as long
    clock.advance(10)
    assert await statuses(4) == [200] * 4
    assert bad_member.requests == 3
    clock.advance(10)
    assert sorted(await statuses(2)) == [200, 502]
    assert bad_member.requests == 4
    await good(gw)


# --- 8. no healthy target --------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_all_targets_ejected_gets_503_no_healthy_target_with_retry_after(reactor, echo, gateway):
    bad1, bad2 = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    clock = Clock()
    gw = await gateway(f"""
    upstreams:
      users:
        targets: ["{bad1}", "{bad2}"]
        passive_health: {{consecutive_failures: 1, eject_for: 10s}}
        circuit_breaker: {{consecutive_failures: 100}}
      orders: {{targets: ["{echo.url}"]}}
    routes:
      - {{prefix: /api/users, upstream: users, rewrite_prefix: /users}}
      - {{prefix: /api/orders, upstream: orders}}
    """, clock=clock)
    first, second = members(gw)
    assert_envelope(await one(gw.port, get()), 502, "BAD_GATEWAY")          # second target, ejected until 10
    clock.advance(2)
    assert_envelope(await one(gw.port, get()), 502, "BAD_GATEWAY")          # first target, ejected until 12
    assert first.ejected_until and second.ejected_until

    err = assert_unavailable(await one(gw.port, get()), 8)                 # the earliest return
    assert "no healthy target" in err["message"]
    assert gw.log[-1]["detail"] == "no healthy target" and gw.log[-1]["breaker"] is None
    assert (first.requests, second.requests) == (1, 1)
    assert gw.gateway.breakers["users"].state == "closed"                  # not the breaker's doing
    clock.advance(5)
    assert_unavailable(await one(gw.port, get()), 3)

    clock.advance(3)                                                        # t=10: the second is back
    assert_envelope(await one(gw.port, get()), 502, "BAD_GATEWAY")
    assert (first.requests, second.requests) == (1, 2)
    assert_unavailable(await one(gw.port, get()), 2)                       # first back at 12, second at 30
    await good(gw, b"/api/orders/1")


@pytest_twisted.ensureDeferred
async def test_reset_mid_body_aborts_the_client_and_counts_as_a_failure(reactor, raw_upstream, echo, gateway):
    setup = await gateway_to_a_mid_body_upstream(reactor, raw_upstream, echo, gateway,
                                                 ", circuit_breaker: {consecutive_failures: 5}")
    gw = setup.gw
    breaker = unjittered(gw)
    (member,) = members(gw)
    await reset_mid_body(reactor, setup)
    # A reset is a failure for the breaker and the target, whenever it happens.
    assert member.failures == 1 and "reset" in member.last_error
    assert breaker.snapshot()["consecutive_failures"] == 1
    await good(gw, b"/api/orders/1")
