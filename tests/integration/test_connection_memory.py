"""What a closed HTTP/1.1 connection leaves: nothing, freed by reference counting alone.

The daemon collects reference cycles rarely (service/tap.py raises the collector's thresholds
and freezes what exists at start), so anything a closed connection left in a cycle kept its
memory until the next collection: under a benchmark that opens and closes hundreds of
connections the RSS rose with every batch (docs/performance.md, "cycles"). Here the collector
is off, and every object of a closed client or upstream connection must be gone anyway: client
connections closed by the client and by the gateway, upstream connections closed by the
upstream and aborted by the gateway (a client that left while its answer was pending),
refused connection attempts and ones the gateway gave up, and WebSocket tunnels.
"""

from __future__ import annotations

import contextlib
import gc
import socket

import pytest_twisted
from httptools import HttpRequestParser, HttpResponseParser
from twisted.internet import tcp
from twisted.internet.threads import deferToThread

from tests.conftest import free_port, get_closing, parse_responses, raw, until
from txgateway.transport.http1 import HTTP1Connection
from txgateway.transport.tunnel import Tunnel
from txgateway.upstream.pool import UpstreamConnection

CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
KEEP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
HANDSHAKE = (b"GET /api/users/ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
SWITCH = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")   # RFC 6455's example key and accept
KINDS = (HTTP1Connection, UpstreamConnection, HttpRequestParser, HttpResponseParser,
         Tunnel, tcp.Server, tcp.Client, tcp.Connector)


def live() -> dict[str, int]:
    """Instances of KINDS the collector tracks (unreachable cycles included), by type name."""
    counts = {kind.__name__: 0 for kind in KINDS}
    for o in gc.get_objects():
        if type(o) in KINDS:
            counts[type(o).__name__] += 1
    return counts


def more_than(before: dict[str, int]) -> dict[str, int]:
    """The kinds with more live instances than `before` (fewer is fine: an earlier test's
    connection may finish closing meanwhile)."""
    return {kind: n - before[kind] for kind, n in live().items() if n > before[kind]}


def keep_alive_get(port: int, path: bytes, count: int) -> list[int]:
    """`count` keep-alive requests on one connection, then the client closes it: the statuses."""
    statuses = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        for _ in range(count):
            s.sendall(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path)
            data = b""
            while not parse_responses(data) or not data.endswith(b"ok"):
                data += s.recv(65536)
            statuses += [r.status for r in parse_responses(data)]
    return statuses


def websocket_echo(port: int) -> bytes:
    """A WebSocket tunnel through the gateway: the handshake, bytes there and back, then the
    client closes. What came back after the 101."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(HANDSHAKE)
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        assert data.startswith(b"HTTP/1.1 101 "), data
        s.sendall(b"ping")
        echoed = data.partition(b"\r\n\r\n")[2]
        while len(echoed) < 4:
            echoed += s.recv(65536)
        return echoed


def send_pending(port: int) -> socket.socket:
    """A connection with a request the upstream will never answer."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /api/users/hang HTTP/1.1\r\nHost: a\r\n\r\n")
    return s


@pytest_twisted.ensureDeferred
async def test_closed_connections_are_freed_without_the_cyclic_collector(reactor, raw_upstream, gateway):
    hung: list[object] = []

    def upstream(server, data: bytes) -> None:
        if getattr(server, "switched", False):
            server.transport.write(server.buffer)     # a WebSocket echo
            server.buffer = b""
            return
        if not server.buffer.endswith(b"\r\n\r\n"):
            return
        first_line = server.buffer.split(b"\r\n", 1)[0]
        server.buffer = b""
        if b"/users/close" in first_line:
            server.transport.write(CLOSE)
            server.transport.loseConnection()
        elif b"/users/ws" in first_line:
            server.switched = True
            server.transport.write(SWITCH)
        elif b"/users/hang" in first_line:
            hung.append(server)
        else:
            server.transport.write(KEEP)

    up = await raw_upstream(upstream)
    gw = await gateway(f"""
        upstreams:
          users: {{targets: ["http://127.0.0.1:{up.port}"], connect_timeout: 1s, timeout: 2s}}
          down: {{targets: ["http://127.0.0.1:{free_port()}"], connect_timeout: 1s}}
        routes:
          - {{prefix: /api/users, upstream: users, rewrite_prefix: /users}}
          - {{prefix: /api/down, upstream: down}}
        """)
    pool = gw.gateway.proxy.groups["users"].pools[0]
    assert await deferToThread(keep_alive_get, gw.port, b"/api/users/1", 1) == [200]   # one-time state made
    await until(reactor, lambda: not gw.gateway.factory.connections and len(pool.idle) == 1)
    gc.collect()
    gc.disable()
    try:
        before = live()
        for _ in range(5):
            assert await deferToThread(keep_alive_get, gw.port, b"/api/users/1", 3) == [200] * 3
        for _ in range(3):     # the upstream closes; the gateway closes the client's connection
            (resp,) = parse_responses(await raw(gw.port, b"GET /api/users/close HTTP/1.1\r\nHost: a\r\n"
                                                b"Connection: close\r\n\r\n"))
            assert resp.status == 200
        for _ in range(2):     # a WebSocket tunnel the client closes: the gateway closes the upstream's side
            assert await deferToThread(websocket_echo, gw.port) == b"ping"
        for i in range(3):     # the gateway aborts the upstream connection the client no longer needs
            pending = await deferToThread(send_pending, gw.port)
            await until(reactor, lambda: len(hung) == i + 1)
            pending.close()
        for _ in range(3):     # a refused connection attempt: 502
            resp = await get_closing(gw.port, b"/api/down/1")
            assert resp.status == 502, resp
        for _ in range(3):     # the client leaves at once: the upstream connection may still be being made
            (await deferToThread(send_pending, gw.port)).close()
        await until(reactor, lambda: all(not server.transport.connected for server in hung))
        hung.clear()           # the upstream's side of those connections (this process's too)
        # And the gateway goes on serving: one upstream connection again, idle in the pool.
        assert await deferToThread(keep_alive_get, gw.port, b"/api/users/2", 2) == [200, 200]
        with contextlib.suppress(AssertionError):   # waited for; the assert says what stayed
            await until(reactor, lambda: not more_than(before))
        assert not more_than(before)
    finally:
        gc.enable()
