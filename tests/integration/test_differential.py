"""Differential check: what the gateway sends upstream, parsed by an independent parser (h11).

The test upstream parses every byte it receives with h11 (not llhttp, which the gateway uses)
and records each request. For every request it saw, the gateway must have decided on exactly
that request: an access-log record with the same correlation id and method, a path that the
gateway's own route table maps to the logged route and forwards unchanged (the path matched
is the path forwarded), and, once the body ended, as many body bytes as the gateway read from
the client. Nothing may reach the upstream that the gateway did not decide on (no smuggled
request), and h11 must never fail to parse it. Run over a corpus with exact expectations and
over the mutated requests of test_fuzz_requests.py.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Factory, Protocol

from tests.conftest import listen, parse_responses, raw
from tests.integration.test_fuzz_requests import CASES, SEEDS, answers_are_sound, mutate


@dataclass
class Seen:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: int = 0
    ended: bool = False

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]


@dataclass
class H11Upstream:
    port: int
    seen: list[Seen] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class H11Server(Protocol):
    """Parses with h11, records, answers each complete request with 200 "ok"."""

    def __init__(self, record: H11Upstream) -> None:
        self.record = record
        self.conn = h11.Connection(h11.SERVER)
        self.current: Seen | None = None

    def dataReceived(self, data: bytes) -> None:
        try:
            self.conn.receive_data(data)
            self._events()
        except h11.ProtocolError as e:
            self.record.errors.append(f"{type(e).__name__}: {e} in {data[:200]!r}")
            self.transport.abortConnection()

    def _events(self) -> None:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.current = Seen(event.method, event.target, list(event.headers))
                self.record.seen.append(self.current)
            elif isinstance(event, h11.Data) and self.current is not None:
                self.current.body += len(event.data)
            elif isinstance(event, h11.EndOfMessage) and self.current is not None:
                self.current.ended = True
                self.transport.write(self.conn.send(h11.Response(status_code=200, headers=[("content-length", "2")])))
                if self.current.method != b"HEAD":
                    self.transport.write(self.conn.send(h11.Data(data=b"ok")))
                self.transport.write(self.conn.send(h11.EndOfMessage()))
                if self.conn.our_state is h11.MUST_CLOSE:
                    self.transport.loseConnection()
                    return
                self.conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return


async def h11_upstream(reactor: Any) -> tuple[H11Upstream, Any]:
    record = H11Upstream(0)
    port = await listen(reactor, Factory.forProtocol(lambda: H11Server(record)))
    record.port = port.getHost().port
    return record, port


CONFIG = """
limits: {{max_body_size: 256KiB}}
upstreams:
  users: {{targets: ["{url}"], passive_health: {{consecutive_failures: 1000}}}}
routes:
  - {{prefix: /api/users, upstream: users}}
"""


def check_agreement(gw: Any, up: H11Upstream) -> None:
    """Every request the upstream saw is one the gateway decided on (see the module docstring)."""
    assert not up.errors, up.errors
    records = list(gw.log)
    forwarded = [r for r in records if r["upstream_ms"] is not None]
    unclaimed = list(records)
    for seen in up.seen:
        (cid,) = seen.header(b"x-correlation-id")
        path = seen.target.partition(b"?")[0]
        decided = gw.gateway.routes.match(seen.method, path, None)
        assert decided is not None and decided.upstream_path == path, seen      # matched == forwarded
        match = [r for r in unclaimed if r["correlation_id"] == cid.decode() and r["method"] == seen.method.decode()
                 and r["route"] == decided.route.prefix and (not seen.ended or r["bytes_in"] == seen.body)]
        assert match, f"the upstream got a request the gateway did not decide on: {seen}"
        unclaimed.remove(match[0])
        assert len(seen.header(b"host")) == 1
        framing = seen.header(b"content-length") + seen.header(b"transfer-encoding")
        assert len(framing) <= 1, seen
        upgrade = seen.header(b"upgrade") == [b"websocket"]
        assert seen.header(b"connection") == ([b"upgrade"] if upgrade else []), seen
        assert not seen.header(b"x-user-id"), seen
    assert len(up.seen) >= len(forwarded)


@dataclass
class Expect:
    method: bytes
    target: bytes
    body: int
    headers: dict[bytes, bytes] = field(default_factory=dict)   # present with exactly this value
    absent: tuple[bytes, ...] = ()


CORPUS: list[tuple[bytes, list[Expect]]] = [
    (b"GET /api/users/1?x=1&y=%41 HTTP/1.1\r\nHost: a\r\nX-Custom: a b\r\nX-User-Id: forged\r\n\r\n",
     [Expect(b"GET", b"/api/users/1?x=1&y=%41", 0, {b"x-custom": b"a b"}, (b"x-user-id",))]),
    (b"POST /api/users HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
     [Expect(b"POST", b"/api/users", 5, {b"content-length": b"5"}, (b"transfer-encoding",))]),
    (b"POST /api/users HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\n\r\n",
     [Expect(b"POST", b"/api/users", 8, {b"transfer-encoding": b"chunked"}, (b"content-length",))]),
    (b"GET /api/users/1 HTTP/1.1\r\nHost: a\r\n\r\nDELETE /api/users/2 HTTP/1.1\r\nHost: a\r\n\r\n",
     [Expect(b"GET", b"/api/users/1", 0), Expect(b"DELETE", b"/api/users/2", 0)]),
    (b"GET http://a/api/users/7 HTTP/1.1\r\nHost: a\r\n\r\n", [Expect(b"GET", b"/api/users/7", 0)]),
    (b"PUT /api/users/1 HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
     [Expect(b"PUT", b"/api/users/1", 2, {}, (b"expect",))]),
    (b"HEAD /api/users/1 HTTP/1.1\r\nHost: a\r\nConnection: x-drop\r\nX-Drop: 1\r\nKeep-Alive: 5\r\n\r\n",
     [Expect(b"HEAD", b"/api/users/1", 0, {}, (b"x-drop", b"keep-alive"))]),
    (b"POST /api/users/big HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + b"z" * 100000,
     [Expect(b"POST", b"/api/users/big", 100000, {b"content-length": b"100000"})]),
    (b"PATCH /api/users/1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
     + b"".join(b"1\r\n%c\r\n" % c for c in b"abcdefghij") + b"0\r\n\r\n",
     [Expect(b"PATCH", b"/api/users/1", 10, {b"transfer-encoding": b"chunked"})]),
    (b"GET /api/users/../users/./3 HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
     [Expect(b"GET", b"/api/users/3", 0)]),
    # Framing the gateway refuses reaches the upstream as nothing at all.
    (b"POST /api/users HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", []),
    (b"POST /api/users HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", []),
    (b"GET /api/users HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", []),
    (b"POST /api/users HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", []),
    (b"POST /api/users HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3\r\nabc\r\n0\r\n\r\n", []),
]


@pytest_twisted.ensureDeferred
async def test_the_upstream_sees_the_requests_the_gateway_decided_on(reactor, gateway):
    up, port = await h11_upstream(reactor)
    try:
        gw = await gateway(CONFIG.format(url=up.url))
        for request, expected in CORPUS:
            before = len(up.seen)
            answer = await raw(gw.port, request, read_timeout=1.0)
            got = up.seen[before:]
            assert [(s.method, s.target, s.body, s.ended) for s in got] == [
                (e.method, e.target, e.body, True) for e in expected], request[:120]
            for seen, expect in zip(got, expected, strict=True):
                for name, value in expect.headers.items():
                    assert seen.header(name) == [value], (name, seen)
                for name in expect.absent:
                    assert not seen.header(name), (name, seen)
            statuses = [r.status for r in parse_responses(answer)]
            assert statuses == ([200] * len(expected) if expected else [400]), (request[:120], answer[:300])
        check_agreement(gw, up)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_mutated_requests_reach_the_upstream_only_as_the_gateway_decided(reactor, gateway):
    up, port = await h11_upstream(reactor)
    try:
        gw = await gateway(CONFIG.format(url=up.url).replace("256KiB", "1KiB"))
        rng = random.Random(20261129)         # the same cases as test_fuzz_requests.py
        cases = [mutate(rng, rng.choice(SEEDS)) for _ in range(CASES)]
        for start in range(0, CASES, 10):
            batch = cases[start:start + 10]
            answers = await gatherResults([Deferred.fromCoroutine(raw(gw.port, case, read_timeout=0.5))
                                            for case in batch])
            for case, answer in zip(batch, answers, strict=True):
                answers_are_sound(case, answer)
        await settle(reactor, lambda: len(gw.log))
        check_agreement(gw, up)
        assert len(up.seen) >= 30              # about 50 of the 240 mutations still make a request upstream
    finally:
        await port.stopListening()


async def settle(reactor: Any, count: Callable[[], int]) -> None:
    """Until the gateway logged every request whose client went away (bounded)."""
    from twisted.internet.task import deferLater
    last = -1
    for _ in range(50):
        now = count()
        if now == last:
            return
        last = now
        await deferLater(reactor, 0.05)
