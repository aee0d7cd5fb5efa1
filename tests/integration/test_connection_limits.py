"""Connection-level limits: open connections per client address, on all listeners together."""

from __future__ import annotations

import socket
import ssl

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.conftest import parse_responses, raw, read_to_end, until
from tests.test_tls_config import CertAuthority, pair

GET = b"GET /api/users/1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"


def refused(port: int, tls: ssl.SSLContext | None = None) -> bool:
    """Whether the gateway closes a new connection without answering a request on it."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            sock = tls.wrap_socket(s, server_hostname="a.test") if tls is not None else s
            sock.sendall(GET)
            return sock.recv(65536) == b""
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            return True


def tls_get(port: int, tls: ssl.SSLContext) -> bytes:
    sock = tls.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname="a.test")
    sock.sendall(GET)
    return read_to_end(sock)


@pytest_twisted.ensureDeferred
async def test_connections_over_the_per_address_cap_are_closed_on_every_listener(reactor, echo, gateway, tmp_path):
    ca = CertAuthority()
    issued = ca.issue(tmp_path, "a", "a.test", ("a.test",))
    tls = ssl.create_default_context(cafile=ca.write(tmp_path / "ca.pem"))
    gw = await gateway(f"""
        listen:
          - endpoint: "tcp:0:interface=127.0.0.1"
          - endpoint: "tcp:0:interface=127.0.0.1"
            tls: {{certificates: [{pair(issued)}], alpn: [h2, http/1.1]}}
        access_log: "off"
        limits: {{max_connections_per_ip: 3}}
        upstreams:
          users: {{targets: ["{echo.url}"]}}
        routes:
          - {{prefix: /api/users, upstream: users}}
        """)
    plain = gw.port
    secure = (await gw.gateway.listeners[1]._waitingForPort).getHost().port
    peers = gw.gateway.peers
    held = [socket.create_connection(("127.0.0.1", plain)) for _ in range(3)]   # idle keep-alives
    await until(reactor, lambda: peers.open.get("127.0.0.1") == 3)
    assert await deferToThread(refused, plain)
    assert await deferToThread(refused, secure, tls)          # the cap counts all listeners
    held.pop().close()
    await until(reactor, lambda: peers.open.get("127.0.0.1") == 2)
    (resp,) = parse_responses(await deferToThread(tls_get, secure, tls))
    assert resp.status == 200
    held.append(await deferToThread(   # the handshake needs the reactor: not in its thread
        lambda: tls.wrap_socket(socket.create_connection(("127.0.0.1", secure), timeout=5), server_hostname="a.test")))
    await until(reactor, lambda: peers.open.get("127.0.0.1") == 3)
    assert await deferToThread(refused, plain)                 # a TLS connection counts too
    for s in held:
        s.close()
    await until(reactor, lambda: "127.0.0.1" not in peers.open)
    (resp,) = parse_responses(await raw(plain, GET))
    assert resp.status == 200


PIPELINED = 15
BODY = 200 * 1024


def pipeline_behind_a_slow_request(port: int) -> bytes:
    """A request to an upstream that does not answer yet, then 15 more with 200KiB bodies
    sent at once; then every answer, until the gateway closes after the last."""
    requests = [b"GET /api/slow HTTP/1.1\r\nHost: a\r\n\r\n"]
    for i in range(PIPELINED):
        close = b"Connection: close\r\n" if i == PIPELINED - 1 else b""
        requests.append(b"POST /api/users/%d HTTP/1.1\r\nHost: a\r\n%sContent-Length: %d\r\n\r\n" % (i, close, BODY)
                        + b"x" * BODY)
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"".join(requests))
    return read_to_end(s)


@pytest_twisted.ensureDeferred
async def test_bytes_pipelined_behind_a_waiting_request_are_bounded(reactor, echo, raw_upstream, gateway):
    held = []
    slow = await raw_upstream(lambda server, data: held.append(server) if b"\r\n\r\n" in server.buffer else None)
    gw = await gateway(f"""
        upstreams:
          users: {{targets: ["{echo.url}"]}}
          slow: {{targets: ["{slow.url}"]}}
        routes:
          - {{prefix: /api/users, upstream: users}}
          - {{prefix: /api/slow, upstream: slow}}
        """)
    client = deferToThread(pipeline_behind_a_slow_request, gw.port)
    await until(reactor, lambda: held and gw.gateway.factory.connections)
    (conn,) = gw.gateway.factory.connections

    def buffered() -> int:
        return sum(incoming.buffered for incoming in conn._queue)

    # The gateway stops reading (the rest waits in the client's socket), well short of the 3MiB sent.
    await until(reactor, lambda: conn._paused or buffered() > 192 * 1024)
    assert conn._paused and buffered() <= 192 * 1024
    held[0].transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
    responses = parse_responses(await client)
    assert [r.status for r in responses] == [200] * (PIPELINED + 1)
    assert responses[0].body == b"slow" and all(b'"body_bytes": %d' % BODY in r.body for r in responses[1:])
