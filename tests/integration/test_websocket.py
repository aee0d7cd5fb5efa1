"""WebSocket through the gateway, over real sockets, with twisted.web.websocket at both ends.

The upstream is a twisted.web Site with a WebSocketResource; the client is Twisted's
WebSocketClientEndpoint, or a raw TCP client where the exact bytes of a handshake matter.
Both ends are tapped (a ProtocolWrapper that records the bytes each way), because
twisted.web.websocket tells neither side which close code the peer sent: the taps' bytes
are decoded with wsproto's frame parser instead. Every wait is bounded (addTimeout).
"""

from __future__ import annotations

import os
import struct
import textwrap
from collections.abc import Sequence
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import tcp
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.static import Data
from twisted.web.websocket import ConnectionRejected, WebSocketClientEndpoint, WebSocketResource
from wsproto.frame_protocol import FrameProtocol, Opcode

from tests.conftest import ISSUER, assert_envelope, listen, mint_token, parse_responses, quiet_site, raw

TIMEOUT = 10.0
MiB = 1 << 20


# --- taps: the bytes each way on one TCP connection --------------------------------------

class Tap(ProtocolWrapper):
    """Records every byte received and sent; `lost` fires when the connection closes."""

    def __init__(self, factory: WrappingFactory, wrapped: Any) -> None:
        super().__init__(factory, wrapped)
        self.received = bytearray()
        self.sent = bytearray()
        self.lost: Deferred[None] = Deferred()

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(transport)
        if self.factory.hold:
            transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        super().dataReceived(data)

    def write(self, data: bytes) -> None:
        self.sent += data
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        for piece in data:
            self.write(piece)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.lost.callback(None)


class TapFactory(WrappingFactory):
    protocol = Tap

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self.taps: list[Tap] = []
        self.hold = False          # new connections start paused (a server that is slow to read)

    def buildProtocol(self, addr: Any) -> Tap:
        tap = super().buildProtocol(addr)
        self.taps.append(tap)
        return tap


def after_head(data: bytes) -> bytes:
    """What followed the HTTP head (the handshake) on a tapped connection."""
    _, sep, rest = bytes(data).partition(b"\r\n\r\n")
    assert sep, data[:200]
    return rest


def frames(data: bytes, from_client: bool) -> list[tuple[Opcode, Any]]:
    """The WebSocket frames in `data` (bytes after the handshake), as (opcode, payload)."""
    parser = FrameProtocol(client=not from_client, extensions=[])
    parser.receive_bytes(bytes(data))
    return [(f.opcode, f.payload) for f in parser.received_frames()]


def close_frames(data: bytes, from_client: bool) -> list[tuple[int, str]]:
    return [payload for opcode, payload in frames(data, from_client) if opcode == Opcode.CLOSE]


# --- one WebSocket peer (either end): messages, pongs and the end, as queues and Deferreds --

class Peer:
    def __init__(self, request: Any = None) -> None:
        self.request = request             # the upstream's handshake request (server side)
        self.messages: DeferredQueue[Any] = DeferredQueue()
        self.pongs: DeferredQueue[bytes] = DeferredQueue()
        self.opened: Deferred[Peer] = Deferred()
        self.closed: Deferred[float] = Deferred()
        self.ws: Any = None
        self.echo = False                  # send every message back (many-sessions test)

    # WebSocketProtocol
    def negotiationStarted(self, transport: Any) -> None:
        self.ws = transport

    def negotiationFinished(self) -> None:
        self.opened.callback(self)

    def textMessageReceived(self, message: str) -> None:
        self.messages.put(message)
        if self.echo:
            self.ws.sendTextMessage(message)

    def bytesMessageReceived(self, data: bytes) -> None:
        self.messages.put(bytes(data))
        if self.echo:
            self.ws.sendBytesMessage(data)

    def pongReceived(self, payload: bytes) -> None:
        self.pongs.put(payload)

    def connectionLost(self, reason: Any) -> None:
        from twisted.internet import reactor
        self.closed.callback(reactor.seconds())

    # helpers
    @property
    def tap(self) -> Tap:
        return self.ws.transport           # the wire protocol's transport: our Tap

    async def next(self, reactor: Any) -> Any:
        return await self.messages.get().addTimeout(TIMEOUT, reactor)

    async def pong(self, reactor: Any) -> bytes:
        return await self.pongs.get().addTimeout(TIMEOUT, reactor)

    async def ended(self, reactor: Any, within: float = TIMEOUT) -> float:
        return await self.closed.addTimeout(within, reactor)


class Root(Resource):
    def getChild(self, path: bytes, request: Any) -> Resource:
        return notFound()


class Upstream:
    """A twisted.web Site: WebSocket on /ws/..., plain HTTP on /plain, 404 elsewhere."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.sessions: DeferredQueue[Peer] = DeferredQueue()
        self.peers: list[Peer] = []
        self.echo = False
        ws = WebSocketResource(self)
        ws.isLeaf = True                   # every /ws/... path is the WebSocket endpoint
        root = Root()
        root.putChild(b"ws", ws)
        root.putChild(b"plain", Data(b"plain ok", "text/plain"))
        site = quiet_site(root)
        self.taps = TapFactory(site)

    def buildProtocol(self, request: Any) -> Peer:
        peer = Peer(request)
        peer.echo = self.echo
        self.peers.append(peer)
        peer.opened.addCallback(self.sessions.put)
        return peer

    async def start(self) -> None:
        self.port = await listen(self.reactor, self.taps)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    async def session(self) -> Peer:
        return await self.sessions.get().addTimeout(TIMEOUT, self.reactor)


@pytest_twisted.async_yield_fixture()
async def ws_upstream(reactor: Any) -> Any:
    up = Upstream(reactor)
    await up.start()
    yield up
    for tap in up.taps.taps:
        if tap.transport is not None and tap.transport.connected:
            tap.transport.abortConnection()
    if up.port.connected:
        await up.port.stopListening()


def config(upstream_url: str, secret_file: str) -> str:
    return f"""
    auth:
      jwt:
        algorithms: [HS256]
        secret_file: {secret_file}
        issuer: {ISSUER}
        audience: api
    upstreams:
      ws: {{targets: ["{upstream_url}"], connect_timeout: 1s, timeout: 2s}}
    routes:
      - {{prefix: /ws/secure, upstream: ws, auth: required}}
      - {{prefix: /ws/maybe, upstream: ws, auth: optional}}
      - {{prefix: /ws/limited, upstream: ws, rate_limit: {{key: ip, rate: 1/minute}}}}
      - {{prefix: /ws, upstream: ws}}
      - {{prefix: /plain, upstream: ws}}
      - {{prefix: /missing, upstream: ws}}
    """


class TapEndpoints:
    """An IAgentEndpointFactory for WebSocketClientEndpoint whose connections are tapped."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def endpointForURI(self, uri: Any) -> Any:
        reactor = self.reactor

        class Endpoint:
            def connect(self, factory: Any) -> Deferred[Any]:
                d = TCP4ClientEndpoint(reactor, uri.host.decode(), uri.port).connect(TapFactory(factory))
                # WebSocketClientEndpoint wants its own protocol back, not the wrapper
                return d.addCallback(lambda tap: tap.wrappedProtocol)
        return Endpoint()


class ClientFactory:
    def buildProtocol(self, url: str) -> Peer:
        return Peer()


async def ws_connect(reactor: Any, gw: Any, path: str = "/ws/chat") -> Peer:
    endpoint = WebSocketClientEndpoint(TapEndpoints(reactor), f"ws://127.0.0.1:{gw.port}{path}")
    return await Deferred.fromCoroutine(endpoint.connect(ClientFactory())).addTimeout(TIMEOUT, reactor)


async def connect_pair(reactor: Any, gw: Any, up: Upstream, path: str = "/ws/chat") -> tuple[Peer, Peer]:
    client = await ws_connect(reactor, gw, path)
    server = await up.session()
    return client, server


class RawClient(Protocol):
    """Sends exact bytes, collects the answer; `head` fires with the response head, `closed` at the end."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.received = bytearray()
        self.head: Deferred[bytes] = Deferred()
        self.closed: Deferred[float] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.head.called and b"\r\n\r\n" in self.received:
            self.head.callback(bytes(self.received).partition(b"\r\n\r\n")[0])

    def connectionLost(self, reason: Any) -> None:
        from twisted.internet import reactor
        self.closed.callback(reactor.seconds())


def handshake(path: str, headers: Sequence[tuple[str, str]] = (), version: str = "13") -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: api.test", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", f"Sec-WebSocket-Version: {version}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def raw_handshake(reactor: Any, gw: Any, data: bytes) -> RawClient:
    client = RawClient(data)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", gw.port), client).addTimeout(TIMEOUT, reactor)
    await client.head.addTimeout(TIMEOUT, reactor)
    return client


def header(head: bytes, name: str) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.decode("latin-1").partition(":")
        if k.strip().lower() == name.lower():
            return v.strip()
    return None


async def still_serves(gw: Any) -> None:
    (r,) = parse_responses(await raw(gw.port, b"GET /plain HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"))
    assert (r.status, r.body) == (200, b"plain ok")


async def eventually(reactor: Any, check: Any, within: float = TIMEOUT) -> None:
    deadline = reactor.seconds() + within
    while not check():
        assert reactor.seconds() < deadline, "condition not met in time"
        await deferLater(reactor, 0.01, lambda: None)


def ws_records(gw: Any) -> list[dict[str, Any]]:
    return [r for r in gw.log if r["status"] == 101]


# --- 1. messages both ways, 1 MiB each way, ping/pong both ways ---------------------------

@pytest_twisted.ensureDeferred
async def test_text_binary_large_messages_and_pings_both_ways(reactor, gateway, ws_upstream, secret_file):
    gw = await gateway(config(ws_upstream.url, secret_file))
    client, server = await connect_pair(reactor, gw, ws_upstream)

    client.ws.sendTextMessage("hello upstream ✓")
    assert await server.next(reactor) == "hello upstream ✓"
    server.ws.sendTextMessage("hello client ✓")
    assert await client.next(reactor) == "hello client ✓"
    client.ws.sendBytesMessage(b"\x00\x01\xfe\xff")
    assert await server.next(reactor) == b"\x00\x01\xfe\xff"
    server.ws.sendBytesMessage(b"\xff\x00")
    assert await client.next(reactor) == b"\xff\x00"

    up_payload, down_payload = os.urandom(MiB), os.urandom(MiB)
    client.ws.sendBytesMessage(up_payload)
    server.ws.sendBytesMessage(down_payload)
    assert await server.next(reactor) == up_payload
    assert await client.next(reactor) == down_payload

    client.ws.ping(b"from-client")               # answered by the upstream's WebSocket stack
    assert await client.pong(reactor) == b"from-client"
    server.ws.ping(b"from-upstream")             # answered by the client's
    assert await server.pong(reactor) == b"from-upstream"

    # and after the big ones, small messages still flow in order
    for i in range(20):
        client.ws.sendTextMessage(f"m{i}")
    assert [await server.next(reactor) for _ in range(20)] == [f"m{i}" for i in range(20)]

    client.ws.loseConnection()
    await server.ended(reactor)
    await client.ended(reactor)
    await still_serves(gw)


@pytest_twisted.ensureDeferred
async def test_many_sessions_at_once_keep_their_own_messages(reactor, gateway, ws_upstream, secret_file):
    gw = await gateway(config(ws_upstream.url, secret_file))
    ws_upstream.echo = True
    clients = [await ws_connect(reactor, gw, f"/ws/room/{i}") for i in range(20)]
    for i, client in enumerate(clients):
        client.ws.sendTextMessage(f"client {i}")
        client.ws.sendBytesMessage(bytes([i]) * (1000 * i + 1))
    for i, client in enumerate(clients):
        assert await client.next(reactor) == f"client {i}"
        assert await client.next(reactor) == bytes([i]) * (1000 * i + 1)
    assert sorted(p.request.path for p in ws_upstream.peers) == sorted(f"/ws/room/{i}".encode() for i in range(20))
    await still_serves(gw)                               # plain requests meanwhile
    for client in clients:
        client.ws.loseConnection()
    for peer in ws_upstream.peers:
        await peer.ended(reactor)
    await eventually(reactor, lambda: len(ws_records(gw)) == 20)


# --- 2. close codes pass through ------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_upstream_close_code_and_reason_reach_the_client(reactor, gateway, ws_upstream, secret_file):
    gw = await gateway(config(ws_upstream.url, secret_file))
    client, server = await connect_pair(reactor, gw, ws_upstream)
    server.ws.loseConnection(4001, "session expired")
    await client.ended(reactor)
    await server.ended(reactor)
    assert close_frames(after_head(client.tap.received), from_client=False) == [(4001, "session expired")]
    # the client's answer to the close may or may not make it before the gateway closes
    # that side; what did is exactly what the client sent
    assert close_frames(after_head(client.tap.sent), from_client=True) == [(4001, "session expired")]
    await still_serves(gw)


@pytest_twisted.ensureDeferred
async def test_client_close_code_reaches_the_upstream(reactor, gateway, ws_upstream, secret_file):
    gw = await gateway(config(ws_upstream.url, secret_file))
    client, server = await connect_pair(reactor, gw, ws_upstream)
    client.ws.sendTextMessage("last words")
    assert await server.next(reactor) == "last words"
    client.ws.loseConnection(1000)
    await server.ended(reactor)
    await client.ended(reactor)
    received = frames(after_head(server.tap.received), from_client=True)
    assert received[-1] == (Opcode.CLOSE, (1000, ""))
    assert received[0] == (Opcode.TEXT, "last words")
    await still_serves(gw)


# --- 3. what the upstream's handshake carries -------------------------------------------------

def seen(peer: Peer, name: str) -> list[str]:
    return [v.decode("latin-1") for v in peer.request.requestHeaders.getRawHeaders(name.encode(), [])]


@pytest_twisted.ensureDeferred
async def test_upstream_handshake_gets_forwarding_correlation_and_identity_headers(
        reactor, gateway, ws_upstream, secret_file):
    gw = await gateway(config(ws_upstream.url, secret_file))
    forged = [("X-User-Id", "root"), ("X-User-Role", "superuser")]
    app = [("Origin", "https://app.test"), ("Sec-WebSocket-Protocol", "chat.v2, chat.v1")]
    for path, sub in (("/ws/secure/room", "alice"), ("/ws/maybe/room", "bob")):
        client = await raw_handshake(reactor, gw, handshake(
            path, forged + app + [("X-Correlation-ID", f"ws-{sub}"), ("Authorization", f"Bearer {mint_token(sub=sub)}")]))
        head = client.head.result
        assert head.startswith(b"HTTP/1.1 101 "), head
        # the upstream's Sec-WebSocket-Accept passes unchanged (RFC 6455's example key)
        assert header(head, "sec-websocket-accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        assert (header(head, "upgrade") or "").lower() == "websocket"
        assert (header(head, "connection") or "").lower() == "upgrade"
        assert header(head, "x-correlation-id") == f"ws-{sub}"
        server = await ws_upstream.session()
        assert server.request.path == path.encode()
        assert seen(server, "x-forwarded-for") == ["127.0.0.1"]
        assert seen(server, "x-forwarded-proto") == ["http"]
        assert seen(server, "x-correlation-id") == [f"ws-{sub}"]
        assert seen(server, "x-user-id") == [sub]              # the forged "root" is gone
        assert seen(server, "x-user-role") == ["admin"]
        # what the upstream needs for its own handshake arrives unchanged
        assert seen(server, "sec-websocket-key") == ["dGhlIHNhbXBsZSBub25jZQ=="]
        assert seen(server, "sec-websocket-version") == ["13"]
        assert seen(server, "sec-websocket-protocol") == ["chat.v2, chat.v1"]
        assert seen(server, "origin") == ["https://app.test"]
        assert [v.lower() for v in seen(server, "upgrade")] == ["websocket"]
        client.transport.loseConnection()
        await server.ended(reactor)

    # an optional-auth route without a token: no identity at all, the forged headers stripped;
    # the correlation id the gateway made up is the same for the upstream, the client and the log
    client = await raw_handshake(reactor, gw, handshake("/ws/maybe/anon", forged))
    assert client.head.result.startswith(b"HTTP/1.1 101 ")
    server = await ws_upstream.session()
    assert seen(server, "x-user-id") == [] and seen(server, "x-user-role") == []
    assert seen(server, "x-forwarded-for") == ["127.0.0.1"]
    made_up = header(client.head.result, "x-correlation-id")
    assert made_up and seen(server, "x-correlation-id") == [made_up]
    client.transport.loseConnection()
    await server.ended(reactor)

    await eventually(reactor, lambda: len(ws_records(gw)) == 3)
    records = ws_records(gw)
    assert [r["user_id"] for r in records] == ["alice", "bob", None]
    assert [r["correlation_id"] for r in records] == ["ws-alice", "ws-bob", made_up]
    await still_serves(gw)


# --- 4. refused upgrades: the gateway's (401, 429) and the upstream's own (400, 404) --------

async def refused(reactor: Any, gw: Any, data: bytes, within: float = 2.0) -> Any:
    """A handshake that must be answered with a plain HTTP response and a closed connection."""
    client = await raw_handshake(reactor, gw, data)
    start = reactor.seconds()
    await client.closed.addTimeout(within, reactor)       # closed by the gateway, not a hang
    assert reactor.seconds() - start < within
    (resp,) = parse_responses(bytes(client.received))
    return resp


@pytest_twisted.ensureDeferred
async def test_auth_required_refuses_the_upgrade_with_401_and_the_upstream_sees_nothing(
        reactor, gateway, ws_upstream, secret_file):
    gw = await gateway(config(ws_upstream.url, secret_file))
    resp = await refused(reactor, gw, handshake("/ws/secure/room"))
    assert_envelope(resp, 401, "UNAUTHORIZED")
    assert (resp.header("www-authenticate") or "").startswith("Bearer ")
    resp = await refused(reactor, gw, handshake("/ws/secure/room", [("Authorization", "Bearer not.a.token")]))
    assert_envelope(resp, 401, "UNAUTHORIZED")
    # Twisted's client gets the same refusal
    try:
        await ws_connect(reactor, gw, "/ws/secure/room")
    except ConnectionRejected as e:
        assert e.response.code == 401
    else:
        raise AssertionError("the upgrade was accepted without credentials")
    assert ws_upstream.taps.taps == []                    # not even a TCP connection
    assert [r["status"] for r in gw.log] == [401, 401, 401]
    await still_serves(gw)


@pytest_twisted.ensureDeferred
async def test_rate_limited_route_refuses_the_handshake_with_429_once_the_bucket_is_empty(
        reactor, gateway, ws_upstream, secret_file):
    gw = await gateway(config(ws_upstream.url, secret_file))
    client, server = await connect_pair(reactor, gw, ws_upstream, "/ws/limited/feed")
    resp = await refused(reactor, gw, handshake("/ws/limited/feed"))
    err = assert_envelope(resp, 429, "RATE_LIMITED")
    assert err["message"] == "rate limit exceeded; retry later"
    assert resp.header("retry-after") is not None
    assert len(ws_upstream.taps.taps) == 1                 # only the first session got through
    # the open session is not affected by the refusal of the next one
    client.ws.sendTextMessage("still here")
    assert await server.next(reactor) == "still here"
    client.ws.loseConnection()
    await server.ended(reactor)
    await still_serves(gw)


@pytest_twisted.ensureDeferred
async def test_an_upstream_refusing_the_upgrade_gives_the_client_its_status_and_a_closed_connection(
        reactor, gateway, ws_upstream, secret_file):
    gw = await gateway(config(ws_upstream.url, secret_file))
    # twisted.web's WebSocketResource refuses a subprotocol-less handshake to /ws/plain... : a
    # path the upstream has no resource for gets its 404
    resp = await refused(reactor, gw, handshake("/missing/chat"))
    assert resp.status == 404
    resp = await refused(reactor, gw, handshake("/plain"))
    assert (resp.status, resp.body) == (200, b"plain ok")   # a 200 is no 101: no tunnel either
    assert ws_upstream.peers == []                        # no WebSocket session was opened
    assert [r["status"] for r in gw.log] == [404, 200]
    await still_serves(gw)


# --- 5. either side vanishing closes the other, promptly -------------------------------------

@pytest_twisted.ensureDeferred
async def test_upstream_gone_mid_session_closes_the_client_promptly(reactor, gateway, ws_upstream, secret_file):
    gw = await gateway(config(ws_upstream.url, secret_file))
    client, server = await connect_pair(reactor, gw, ws_upstream)
    client.ws.sendBytesMessage(b"x" * 1000)
    assert await server.next(reactor) == b"x" * 1000
    gone = reactor.seconds()
    server.tap.transport.abortConnection()               # a crashed upstream: RST, no close frame
    closed_at = await client.ended(reactor, within=2.0)
    assert closed_at - gone < 2.0
    assert close_frames(after_head(client.tap.received), from_client=False) == []
    await eventually(reactor, lambda: len(ws_records(gw)) == 1)

    # a listener that went away altogether: the session still ends, the next handshake is a 502
    client, server = await connect_pair(reactor, gw, ws_upstream)
    await ws_upstream.port.stopListening()
    gone = reactor.seconds()
    server.tap.transport.abortConnection()
    closed_at = await client.ended(reactor, within=2.0)
    assert closed_at - gone < 2.0
    resp = await refused(reactor, gw, handshake("/ws/chat"))
    assert resp.status == 502
    await eventually(reactor, lambda: len(ws_records(gw)) == 2)


@pytest_twisted.ensureDeferred
async def test_client_gone_mid_session_closes_the_upstream_connection(reactor, gateway, ws_upstream, secret_file):
    gw = await gateway(config(ws_upstream.url, secret_file))
    client, server = await connect_pair(reactor, gw, ws_upstream)
    server.ws.sendTextMessage("hi")
    assert await client.next(reactor) == "hi"
    gone = reactor.seconds()
    client.tap.transport.abortConnection()
    closed_at = await server.ended(reactor, within=2.0)
    assert closed_at - gone < 2.0
    await server.tap.lost.addTimeout(TIMEOUT, reactor)
    await eventually(reactor, lambda: len(ws_records(gw)) == 1)

    # and a client that closes its socket cleanly without a close frame
    client, server = await connect_pair(reactor, gw, ws_upstream)
    gone = reactor.seconds()
    client.tap.transport.loseConnection()
    closed_at = await server.ended(reactor, within=2.0)
    assert closed_at - gone < 2.0
    await eventually(reactor, lambda: len(ws_records(gw)) == 2)
    await still_serves(gw)


def gateway_upstream_sockets(reactor: Any, up: Upstream) -> list[Any]:
    descriptors = set(reactor.getReaders()) | set(reactor.getWriters())
    return [d for d in descriptors if isinstance(d, tcp.Client) and d.getPeer().port == up.port.getHost().port]


@pytest_twisted.ensureDeferred
async def test_client_gone_during_the_handshake_drops_the_upstream_connection(
        reactor, gateway, ws_upstream, secret_file):
    gw = await gateway(config(ws_upstream.url, secret_file))
    ws_upstream.taps.hold = True                         # an upstream slow to read the handshake
    client = RawClient(handshake("/ws/chat"))
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", gw.port), client).addTimeout(TIMEOUT, reactor)
    await eventually(reactor, lambda: len(ws_upstream.taps.taps) == 1)
    ws_upstream.taps.hold = False
    (tap,) = ws_upstream.taps.taps
    await eventually(reactor, lambda: len(gateway_upstream_sockets(reactor, ws_upstream)) == 1)
    client.transport.abortConnection()
    await eventually(reactor, lambda: len(gw.log) == 1)
    assert gw.log[0]["status"] == 499                    # gone before the response started
    await eventually(reactor, lambda: gateway_upstream_sockets(reactor, ws_upstream) == [], within=2.0)
    # The upstream reads the handshake late and answers into a closed connection: no tunnel,
    # no second log line, and its connection ends (it was reset by the gateway).
    tap.transport.resumeProducing()
    await tap.lost.addTimeout(2.0, reactor)
    await deferLater(reactor, 0.1, lambda: None)
    assert [r["status"] for r in gw.log] == [499]
    await still_serves(gw)


# --- 6. one access-log line per session, when it ends ----------------------------------------

@pytest_twisted.ensureDeferred
async def test_access_log_line_has_101_and_the_tunneled_bytes_and_is_written_at_the_end(
        reactor, gateway, ws_upstream, secret_file):
    gw = await gateway(config(ws_upstream.url, secret_file))
    started = reactor.seconds()
    client, server = await connect_pair(reactor, gw, ws_upstream, "/ws/maybe/log")
    for i in range(5):
        client.ws.sendTextMessage("up" * (i + 1))
        server.ws.sendBytesMessage(b"down" * (100 * i + 1))
        assert await server.next(reactor) == "up" * (i + 1)
        assert await client.next(reactor) == b"down" * (100 * i + 1)
    client.ws.ping(b"p")
    assert await client.pong(reactor) == b"p"
    await deferLater(reactor, 0.3, lambda: None)
    assert ws_records(gw) == []                          # not while the session is open
    # End it without close frames, so that every byte either side sent has arrived.
    client.tap.transport.abortConnection()
    await server.ended(reactor)
    await eventually(reactor, lambda: len(ws_records(gw)) == 1)
    (record,) = ws_records(gw)
    assert len(gw.log) == 1
    up_bytes = len(after_head(client.tap.sent))
    down_bytes = len(after_head(server.tap.sent))
    assert up_bytes == len(after_head(server.tap.received)) > 5 * 3
    assert down_bytes == len(after_head(client.tap.received)) > 5 * 4
    assert (record["bytes_in"], record["bytes_out"]) == (up_bytes, down_bytes)
    assert (record["status"], record["method"], record["path"]) == (101, "GET", "/ws/maybe/log")
    assert record["upstream"] == "ws" and record["error"] is None
    assert 300 <= record["duration_ms"] <= (reactor.seconds() - started) * 1000   # the whole session
    await still_serves(gw)


@pytest_twisted.ensureDeferred
async def test_bytes_sent_before_the_101_are_a_400_and_never_reach_the_upstream(reactor, gateway, ws_upstream, secret_file):
    """RFC 6455 4.1: a client waits for the 101. What it sends before is never relayed: a frame
    in the handshake's packet, or one sent while the upstream thinks."""
    gw = await gateway(config(ws_upstream.url, secret_file))
    frame = FrameProtocol(client=True, extensions=[]).send_data("sent with the handshake", fin=True)
    err = assert_envelope(await refused(reactor, gw, handshake("/ws/chat") + frame), 400, "BAD_REQUEST")
    assert err["message"] == "data sent before the WebSocket handshake completed"
    assert all(b"sent with the handshake" not in tap.received for tap in ws_upstream.taps.taps)
    assert ws_upstream.peers == [] or all(not p.opened.called for p in ws_upstream.peers)
    assert [r["status"] for r in gw.log] == [400]
    await still_serves(gw)


# --- the handshake, validated both ways ----------------------------------------------------

KEY = "dGhlIHNhbXBsZSBub25jZQ=="       # RFC 6455's example key: its Accept is in ACCEPT_HEAD


@pytest.mark.parametrize("request_head, why", [
    (handshake("/ws/chat", version="1337"), "Sec-WebSocket-Version: 13"),
    (handshake("/ws/chat", version="8"), "Sec-WebSocket-Version: 13"),
    (handshake("/ws/chat").replace(KEY.encode(), b"bm90IGEga2V5"), "Sec-WebSocket-Key"),      # 9 bytes
    (handshake("/ws/chat").replace(KEY.encode(), b"not base64!"), "Sec-WebSocket-Key"),
    (handshake("/ws/chat").replace(b"Sec-WebSocket-Key: " + KEY.encode() + b"\r\n", b""), "Sec-WebSocket-Key"),
    (handshake("/ws/chat").replace(b"GET ", b"POST ", 1), "GET over HTTP/1.1"),
    (handshake("/ws/chat").replace(b"HTTP/1.1", b"HTTP/1.0", 1), "GET over HTTP/1.1"),
])
@pytest_twisted.ensureDeferred
async def test_a_handshake_that_is_not_rfc6455_is_a_400_and_the_upstream_sees_nothing(
        reactor, gateway, ws_upstream, secret_file, request_head, why):
    gw = await gateway(config(ws_upstream.url, secret_file))
    err = assert_envelope(await refused(reactor, gw, request_head), 400, "BAD_REQUEST")
    assert why in err["message"]
    assert ws_upstream.taps.taps == []
    await still_serves(gw)


def lying_upstream(accept: bytes, answered: list[bytes], delay: float = 0.0) -> Any:
    """A raw upstream that answers 101 + Upgrade: websocket to anything, with `accept` (after
    `delay`), then answers 200 to every request it can find in the bytes that follow (a plain
    HTTP server that does not speak WebSocket, as the attack had)."""
    from twisted.internet import reactor

    def switch(server: Any) -> None:
        server.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                               b"Connection: Upgrade\r\n" + accept + b"\r\n")

    def script(server: Any, data: bytes) -> None:
        if not getattr(server, "answered", False) and b"\r\n\r\n" in server.buffer:
            server.answered = True
            if b"upgrade: websocket" not in server.buffer.lower():     # still_serves
                server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nplain ok")
                return
            reactor.callLater(delay, switch, server)
            server.buffer = server.buffer.partition(b"\r\n\r\n")[2]
        while b"\r\n\r\n" in server.buffer:
            head, _, server.buffer = server.buffer.partition(b"\r\n\r\n")
            answered.append(head)
            server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret")
    return script


FORGED = (b"GET /secret/admin-only HTTP/1.1\r\nHost: api.test\r\nX-User-Id: forged-admin\r\n"
          b"X-User-Role: admin\r\n\r\n")


@pytest.mark.parametrize("accept", [b"", b"Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n",
                                    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" * 2])
@pytest_twisted.ensureDeferred
async def test_an_upstream_101_without_the_right_accept_is_a_502_and_opens_no_tunnel(
        reactor, gateway, raw_upstream, secret_file, accept):
    answered: list[bytes] = []
    up = await raw_upstream(lying_upstream(accept, answered))
    gw = await gateway(config(up.url, secret_file))
    client = await raw_handshake(reactor, gw, handshake("/ws/chat"))
    await client.closed.addTimeout(TIMEOUT, reactor)
    (resp,) = parse_responses(bytes(client.received))
    err = assert_envelope(resp, 502, "BAD_GATEWAY")
    assert err["message"]
    assert gw.log[-1]["detail"] == "upstream answered 101 without the Sec-WebSocket-Accept of the handshake"
    assert answered == []
    await still_serves(gw)


@pytest_twisted.ensureDeferred
async def test_a_request_pipelined_behind_a_handshake_never_reaches_a_lying_upstream(
        reactor, gateway, raw_upstream, secret_file):
    """The attack: a forged request behind the upgrade, an upstream that says 101 to anything
    (with a valid Accept, even) and serves what follows as HTTP. The gateway answers 400 and
    the upstream never sees the forged request, whether it came in the handshake's packet or
    while the upstream was still deciding."""
    for split in (False, True):
        answered: list[bytes] = []
        up = await raw_upstream(lying_upstream(b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n",
                                               answered, delay=0.5 if split else 0.0))
        gw = await gateway(config(up.url, secret_file))
        client = RawClient(handshake("/ws/chat") + (b"" if split else FORGED))
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", gw.port), client).addTimeout(TIMEOUT, reactor)
        if split:
            await eventually(reactor, lambda up=up: up.requests)    # the handshake reached the upstream
            client.transport.write(FORGED)                        # and its 101 is 0.5 s away
        await client.closed.addTimeout(TIMEOUT, reactor)
        (resp,) = parse_responses(bytes(client.received))
        err = assert_envelope(resp, 400, "BAD_REQUEST")
        assert err["message"] == "data sent before the WebSocket handshake completed"
        assert b"secret" not in b"".join(up.requests), split
        assert answered == [], split
        await still_serves(gw)


@pytest_twisted.ensureDeferred
async def test_a_session_outlives_the_http_timeouts_and_closes_after_idle_timeout(
        reactor, gateway, ws_upstream, secret_file):
    """header_timeout and the upstream timeout are for HTTP; an open session lives as long as
    bytes move, and one with nothing either way for idle_timeout is closed (both sides)."""
    text = textwrap.dedent(config(ws_upstream.url, secret_file)).replace("timeout: 2s", "timeout: 300ms")
    gw = await gateway("limits: {idle_timeout: 1s, header_timeout: 300ms}\n" + text)
    client, server = await connect_pair(reactor, gw, ws_upstream)
    for _ in range(3):                                  # 1.5 s in all: busy, so never idle
        await deferLater(reactor, 0.5, lambda: None)
        client.ws.sendTextMessage("still open")
        assert await server.next(reactor) == "still open"
    assert not client.closed.called and not server.closed.called
    await client.closed.addTimeout(3.0, reactor)        # then idle: closed after ~1 s
    await server.ended(reactor)
    assert gw.log[-1]["status"] == 101 and gw.log[-1]["detail"] == "websocket idle timeout"


# --- the upstream's 101 on the wire: split across reads, or with the first frame behind it ---

ACCEPT_HEAD = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat.v1\r\n\r\n")


@pytest_twisted.ensureDeferred
async def test_an_upstream_101_split_or_followed_by_a_frame_in_the_same_read(reactor, gateway, raw_upstream, secret_file):
    greeting = FrameProtocol(client=False, extensions=[]).send_data("greeting", fin=True)
    answers = {
        "one write": lambda server: server.transport.write(ACCEPT_HEAD + greeting),
        "split head": lambda server: (server.transport.write(ACCEPT_HEAD[:40]),
                                      reactor.callLater(0.05, server.transport.write, ACCEPT_HEAD[40:] + greeting)),
    }
    for name, answer in answers.items():
        def script(server: Any, data: bytes, answer: Any = answer) -> None:
            if b"\r\n\r\n" in server.buffer and not getattr(server, "answered", False):
                server.answered = True
                answer(server)
        up = await raw_upstream(script)
        gw = await gateway(config(up.url, secret_file))
        client = await raw_handshake(reactor, gw, handshake("/ws/chat", [("Sec-WebSocket-Protocol", "chat.v1")]))
        assert client.head.result.startswith(b"HTTP/1.1 101 "), name
        assert header(client.head.result, "sec-websocket-protocol") == "chat.v1", name
        await eventually(reactor, lambda: frames(after_head(client.received), from_client=False) == [
            (Opcode.TEXT, "greeting")])
        client.transport.loseConnection()
        await client.closed.addTimeout(TIMEOUT, reactor)
        await eventually(reactor, lambda gw=gw: len(ws_records(gw)) == 1)
        assert ws_records(gw)[0]["bytes_out"] == len(greeting), name


# --- 7. backpressure: a fast sender, a paused reader, 8 MiB --------------------------------------

def gateway_sockets(reactor: Any, gw: Any, up: Upstream) -> tuple[Any, Any]:
    """The gateway's end of the client connection and of its upstream connection."""
    descriptors = set(reactor.getReaders()) | set(reactor.getWriters())
    client_side = [d for d in descriptors if isinstance(d, tcp.Server) and d.getHost().port == gw.port]
    upstream_side = gateway_upstream_sockets(reactor, up)
    assert len(client_side) == 1 and len(upstream_side) == 1, (client_side, upstream_side)
    return client_side[0], upstream_side[0]


def numbered_messages(total: int = 8 * MiB, size: int = 64 * 1024) -> list[bytes]:
    return [struct.pack("!I", i) + os.urandom(size - 4) for i in range(total // size)]


async def a_paused_reader_pauses_the_fast_sender(reactor: Any, sender: Any, receiver: Any,
                                                 gw_from_sender: Any, gw_to_receiver: Any) -> None:
    """`receiver` stops reading while `sender` sends 8 MiB: the gateway stops reading from the
    sender (socket `gw_from_sender`) instead of buffering, until the receiver reads again; then
    all of it arrives, in order, and the other way round still works."""
    assert gw_from_sender in reactor.getReaders() and not gw_to_receiver.producerPaused
    receiver_tcp = receiver.tap.transport
    receiver_tcp.pauseProducing()                           # the receiver stops reading
    sent = numbered_messages()
    for message in sent:
        sender.ws.sendBytesMessage(message)
    # The gateway stops reading from the sender instead of buffering the 8 MiB.
    await eventually(reactor, lambda: gw_from_sender not in reactor.getReaders(), within=5.0)
    assert gw_to_receiver.producerPaused
    await deferLater(reactor, 0.5, lambda: None)
    assert gw_from_sender not in reactor.getReaders()       # still paused while the receiver is
    receiver_tcp.resumeProducing()
    got = [await receiver.next(reactor) for _ in sent]
    assert got == sent                                      # all of it, in order
    await eventually(reactor, lambda: gw_from_sender in reactor.getReaders())   # reading again
    # and the other way round still works
    receiver.ws.sendTextMessage("done")
    assert await sender.next(reactor) == "done"
    sender.ws.loseConnection()
    await receiver.ended(reactor)


@pytest.mark.parametrize("paused", ["upstream", "client"])
@pytest_twisted.ensureDeferred
async def test_a_paused_reader_pauses_reading_from_the_fast_sender_and_nothing_is_lost(
        reactor, gateway, ws_upstream, secret_file, paused):
    """A paused upstream pauses reading from a fast client; a paused client, from a fast upstream."""
    gw = await gateway(config(ws_upstream.url, secret_file))
    client, server = await connect_pair(reactor, gw, ws_upstream)
    gw_client, gw_upstream = gateway_sockets(reactor, gw, ws_upstream)
    if paused == "upstream":
        await a_paused_reader_pauses_the_fast_sender(reactor, client, server, gw_client, gw_upstream)
    else:
        await a_paused_reader_pauses_the_fast_sender(reactor, server, client, gw_upstream, gw_client)
    await still_serves(gw)


@pytest_twisted.ensureDeferred
async def test_an_upstream_101_without_upgrade_headers_is_a_502_not_a_silent_close(
        reactor, gateway, raw_upstream, secret_file):
    def script(server, data):
        if b"\r\n\r\n" in server.buffer and not getattr(server, "answered", False):
            server.answered = True
            server.transport.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    up = await raw_upstream(script)
    gw = await gateway(config(up.url, secret_file))
    client = RawClient(handshake("/ws/chat"))
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", gw.port), client).addTimeout(TIMEOUT, reactor)
    await client.closed.addTimeout(TIMEOUT, reactor)
    (resp,) = parse_responses(bytes(client.received))
    assert_envelope(resp, 502, "BAD_GATEWAY")
    assert [r["status"] for r in gw.log] == [502]


# --- 8. Origin allowlist; 9. tunnel limits per client and per route ---------------------------

def guarded_config(upstream_url: str) -> str:
    return f"""
    trusted_proxies: [127.0.0.1/32]
    upstreams:
      ws: {{targets: ["{upstream_url}"], connect_timeout: 1s, timeout: 2s}}
    routes:
      - prefix: /ws/app
        upstream: ws
        websocket: {{origins: ["https://app.test", "http://localhost:8080"]}}
      - prefix: /ws/few
        upstream: ws
        websocket: {{max_tunnels_per_client: 2, max_tunnels: 3}}
      - {{prefix: /plain, upstream: ws}}
    """


@pytest_twisted.ensureDeferred
async def test_a_handshake_from_a_foreign_origin_is_refused_with_403(reactor, gateway, ws_upstream):
    """Cross-site WebSocket hijacking: a page on evil.test opens the app's WebSocket with the
    visitor's cookies. Its Origin is not listed: 403, and the upstream never hears of it."""
    gw = await gateway(guarded_config(ws_upstream.url))
    for origin in ("https://evil.test", "https://app.test.evil.test", "http://app.test", "https://app.test:8443",
                   "null"):
        resp = await refused(reactor, gw, handshake("/ws/app/feed", [("Origin", origin), ("Cookie", "session=victim")]))
        err = assert_envelope(resp, 403, "FORBIDDEN")
        assert "Origin" in err["message"], origin
    assert ws_upstream.taps.taps == []
    assert [r.get("websocket") for r in gw.log] == ["origin refused"] * 5
    for origin in ("https://app.test", "HTTPS://APP.TEST", "http://localhost:8080", None):
        headers = [("Origin", origin)] if origin is not None else []
        client = await raw_handshake(reactor, gw, handshake("/ws/app/feed", headers))
        assert client.head.result.startswith(b"HTTP/1.1 101 "), origin
        await ws_upstream.session()
        client.transport.loseConnection()
    await still_serves(gw)


async def open_session(reactor: Any, gw: Any, up: Upstream, client_ip: str) -> RawClient:
    client = await raw_handshake(reactor, gw, handshake("/ws/few/room", [("X-Forwarded-For", client_ip)]))
    assert client.head.result.startswith(b"HTTP/1.1 101 "), (client_ip, client.head.result)
    await up.session()
    return client


@pytest_twisted.ensureDeferred
async def test_tunnels_are_limited_per_client_429_and_per_route_503_and_freed_when_they_end(
        reactor, gateway, ws_upstream):
    gw = await gateway(guarded_config(ws_upstream.url))
    first = [await open_session(reactor, gw, ws_upstream, "10.0.0.1") for _ in range(2)]
    resp = await refused(reactor, gw, handshake("/ws/few/room", [("X-Forwarded-For", "10.0.0.1")]))
    err = assert_envelope(resp, 429, "TOO_MANY_TUNNELS")
    assert "close one" in err["message"]
    third = await open_session(reactor, gw, ws_upstream, "10.0.0.2")     # another client: room on the route
    resp = await refused(reactor, gw, handshake("/ws/few/room", [("X-Forwarded-For", "10.0.0.3")]))
    assert_envelope(resp, 503, "TOO_MANY_TUNNELS")                        # the route is full (3)
    assert len(ws_upstream.peers) == 3
    assert [r.get("websocket") for r in gw.log] == ["client tunnel limit", "route tunnel limit"]
    # a tunnel that ends frees its place, for its client and the route
    first[0].transport.loseConnection()
    await eventually(reactor, lambda: len(ws_records(gw)) == 1)
    again = await open_session(reactor, gw, ws_upstream, "10.0.0.1")
    # refused handshakes hold no place: after them the counts are exactly the open sessions
    for client in (first[1], third, again):
        client.transport.loseConnection()
    await eventually(reactor, lambda: len(ws_records(gw)) == 4)
    fresh = [await open_session(reactor, gw, ws_upstream, "10.0.0.9") for _ in range(2)]
    fresh.append(await open_session(reactor, gw, ws_upstream, "10.0.0.8"))
    for client in fresh:
        client.transport.loseConnection()
    await still_serves(gw)
