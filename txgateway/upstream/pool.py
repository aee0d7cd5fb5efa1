"""Persistent connections to upstream targets, parsing responses with httptools.

A `TargetPool` per target keeps idle keep-alive connections (LIFO, so the warmest is
reused) and caps the total; requests beyond the cap wait in FIFO order. A connection goes
back to the pool only after its response ended cleanly and both sides allow reuse.
The pool knows nothing of clients: it talks to an `UpstreamUser` (the proxy's exchange).

A response is handed over as complete only once the read that ended it is parsed: bytes after
it in that read (a second response, a body on a 204/304 or HEAD answer) mean the upstream and
the gateway disagree on framing, so the connection is closed instead of answering the next
request, perhaps another client's, with them.
"""

from __future__ import annotations

import re
from collections import deque
from http import HTTPStatus
from typing import Any, Final, Protocol

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpResponseParser
from OpenSSL.SSL import Error as SSLError
from service_identity import VerificationError
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ClientFactory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from txgateway.config.schema import Target, Upstream
from txgateway.core.fastwrite import writer_for
from txgateway.core.hopbyhop import NO_FIELDS, NO_FRAMING, NO_TOKENS, RESPONSE_CONSUMED, FieldNames
from txgateway.transport.tls import client_creator

__all__ = ["TargetPool", "UpstreamConnection", "UpstreamUser"]

_log: Final = Logger(namespace="txgateway.upstream.pool")
_DONE: Final = Failure(ConnectionDone())
# Every upstream connection's field names in one table: one per connection was cold at 256 connections
# (docs/performance.md, "foot"); upstreams answer with the same names in the same order.
_NAMES: Final = FieldNames()
# A closed connection's parser, swapped in so that the connection and its parser (whose
# callbacks are its bound methods) are not a reference cycle (see http1._CLOSED_PARSER).
_CLOSED_PARSER: Final = HttpResponseParser(object())
_CONTROL: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")   # no business in a reason phrase sent to a client


class _Leftover(Exception):
    """Raised in a parser callback: a message began after the response was complete."""


class UpstreamUser(Protocol):
    """The side of an exchange that the pool and the connection report to."""

    connect_timeout: float          # the upstream's, or the route's own (its connect attempts' backstop)

    def connected(self, conn: UpstreamConnection) -> None: ...
    def connecting(self) -> None:
        """It waited for a free slot; a connection is being made for it from now on."""
    def connect_failed(self, reason: Failure) -> None: ...
    def response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                      length: int | None) -> None: ...
    def response_body(self, data: bytes) -> None: ...
    def response_complete(self, reusable: bool) -> None: ...
    def read_done(self) -> None:
        """Everything from one read was delivered: a good moment to flush to the client."""
    def upstream_failed(self, reason: str, response_started: bool) -> None: ...
    def switched(self, conn: UpstreamConnection, rest: bytes) -> None:
        """The upstream answered 101 to an upgrade: from here on `conn` carries a tunnel."""


class UpstreamConnection(TwistedProtocol):
    """One keep-alive connection to a target, serving one exchange at a time."""

    __slots__ = ("pool", "user", "factory", "transport", "connected", "write", "flush_writes", "parser", "reused",
                 "open", "upgrade", "tunnel", "no_body", "_reason", "_headers", "_framing", "_tokens", "_interim",
                 "_started", "_until_close", "_ended", "_extra", "_alive")  # attribute access on the hot path (see http1.HTTP1Connection)

    transport: Any

    def __init__(self, pool: TargetPool, user: UpstreamUser | None, factory: Any = None) -> None:
        self.pool = pool
        self.user = user
        self.factory = factory
        self.write: Any = None  # set on connect: fastwrite.writer_for(transport)
        self.flush_writes: Any = None
        self.parser = HttpResponseParser(self)
        self.reused = False
        self.open = False
        self.peer: str | None = None  # "ip:port" the connection reached (the access log's upstream_addr)
        self.upgrade = b""         # a WebSocket handshake in flight: the Sec-WebSocket-Accept it needs
        self.tunnel: Any = None    # after its 101: the tunnel.Tunnel that owns the bytes
        self.no_body = False       # set per request: HEAD responses carry no body
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._framing: dict[bytes, bytes] = {}
        self._tokens: list[bytes] = []
        self._interim = False
        self._started = False      # response head delivered for the current exchange
        self._until_close = False  # body delimited by the connection closing
        self._ended = False        # the response completed in the read being parsed
        self._extra = False        # bytes the response's framing does not account for
        self._alive = False        # llhttp's keep-alive verdict on the head (its flags are gone once complete)

    def connectionMade(self) -> None:
        self.open = True
        peer = self.transport.getPeer()
        if hasattr(peer, "port"):
            self.peer = f"[{peer.host}]:{peer.port}" if ":" in peer.host else f"{peer.host}:{peer.port}"
        self.write, self.flush_writes = writer_for(self.transport)
        self.transport.setTcpNoDelay(True)
        user, self.user = self.user, None
        self.pool.connection_made(self, user, self.factory)
        self.factory = None

    # The producer a slow client pauses (proxy.Exchange.read_done registers it).
    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """The client's connection was lost: not this connection's end. Pipeline.cancel, which
        follows, closes it through the exchange, or lets the response cache read it to the end."""

    def send(self, user: UpstreamUser, head: bytes, no_body: bool, upgrade: bytes = b"") -> None:
        self.user = user
        self.no_body = no_body
        self._extra = False
        self.upgrade = upgrade
        self._started = False
        self.write(head)

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_upstream(data)
            return
        if self.user is None:
            # Bytes nobody asked for on an idle connection: it cannot be trusted any more.
            self.transport.abortConnection()
            return
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            if self.upgrade and self._started and self.user is not None:
                user, self.user = self.user, None
                user.switched(self, data[upgrade.args[0]:])
            else:
                self._fail("upstream switched protocols unexpectedly")
            return
        except HttpParserCallbackError as e:
            if isinstance(e.__context__, _Leftover):
                self._end(False)
                return
            # Our own code raised inside a parser callback: a bug, not a bad upstream.
            _log.failure("bug while relaying a response", Failure(e.__context__))
            self._fail("gateway error while relaying the response")
            return
        except HttpParserError as e:
            if self._ended:        # garbage after a complete response: it stands, the connection goes
                self._end(False)
            else:
                self._fail(f"invalid response from upstream: {e}")
            return
        if self._ended:
            self._end(self._reusable())
            return
        user = self.user
        if user is not None and self._started:
            if self.no_body:
                # llhttp cannot be told that a HEAD response has no body: finish it here.
                reusable = self._reusable()
                self.parser = HttpResponseParser(self)
                self._complete(reusable)
            else:
                user.read_done()

    def on_message_begin(self) -> None:
        if self._ended:
            raise _Leftover()
        self._headers = []
        self._framing = {}
        self._tokens = []
        self._reason = b""

    def on_status(self, status: bytes) -> None:
        self._reason = self._reason + status if self._reason else status   # one piece mostly: no generic add

    def on_header(self, name: bytes, value: bytes) -> None:
        low = _NAMES.lower(name, len(self._headers) + len(self._framing))
        # 0x70: "p", so that most names skip the (generic) startswith call
        if low in RESPONSE_CONSUMED or (low[0] == 0x70 and low.startswith(b"proxy-")):
            if low == b"connection":
                if value == b"keep-alive" or value == b"close":     # nginx's every answer: one token, no split
                    self._tokens.append(value)
                else:
                    self._tokens.extend(t.strip().lower() for t in value.split(b","))
            self._framing[low] = value
            return
        self._headers.append((low, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status == 101 and self.upgrade:
            if self._framing.get(b"upgrade", b"").lower() != b"websocket":
                self._fail("upstream answered 101 without Upgrade: websocket")
                return
            if [v for n, v in self._headers if n == b"sec-websocket-accept"] != [self.upgrade]:
                self._fail("upstream answered 101 without the Sec-WebSocket-Accept of the handshake")
                return
        if 100 <= status < 200 and not (status == 101 and self.upgrade):
            self._interim = True   # 100 Continue and friends: the real response follows
            return
        headers = self._headers
        # `Connection: keep-alive` or `close` names headers taken out already: no filtering pass.
        if self._tokens and not RESPONSE_CONSUMED.issuperset(self._tokens):
            tokens = frozenset(self._tokens)
            headers = [(n, v) for n, v in headers if n not in tokens]
        framing = self._framing
        length: int | None = None
        if b"transfer-encoding" not in framing and b"content-length" in framing:
            length = int(framing[b"content-length"])
        if status in (204, 304):
            self.no_body = True
        # RFC 9112 §6.3: without Content-Length, and unless chunked is the final coding, a
        # response's body ends when the upstream closes the connection.
        coding = framing.get(b"transfer-encoding")
        self._until_close = (length is None and not self.no_body
                             and (coding is None or not coding.rstrip().lower().endswith(b"chunked")))
        self._alive = self.parser.should_keep_alive()
        reason = self._reason
        if reason != b"OK" and _CONTROL.search(reason) is not None:    # "OK": most answers, no search
            reason = _standard_reason(status)
        self._started = True
        user = self.user
        if user is not None:
            user.response_head(status, reason, headers, length)

    def on_body(self, data: bytes) -> None:
        if self.no_body:
            self._extra = True     # a body on a HEAD answer: framing the upstream got wrong
        elif self.user is not None:
            self.user.response_body(data)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self.upgrade and self.parser.get_status_code() == 101:
            return                 # the handshake's end: HttpParserUpgrade follows (tunnel)
        if self.user is not None:
            self._ended = True     # handed over once the rest of this read is known (dataReceived)

    def _end(self, reusable: bool) -> None:
        self._ended = False
        self._complete(reusable)
        if not reusable:
            self.close()           # whatever the parser holds of the extra bytes goes with it

    def _reusable(self) -> bool:
        if self._until_close or self._extra or b"close" in self._tokens:
            return False
        # llhttp said keep-alive (HTTP/1.1, or 1.0 with keep-alive): no version string to make.
        return self._alive or self.parser.get_http_version() == "1.1" or b"keep-alive" in self._tokens

    def _complete(self, reusable: bool) -> None:
        # The response's parse is done with: what only it used goes now (see NO_FIELDS).
        self._headers, self._framing, self._tokens, self._reason = NO_FIELDS, NO_FRAMING, NO_TOKENS, b""
        user, self.user = self.user, None
        self._started = False
        if user is not None:
            user.response_complete(reusable and self.open)

    def _fail(self, reason: str) -> None:
        user, self.user = self.user, None
        self.transport.abortConnection()
        if user is not None:
            user.upstream_failed(reason, self._started)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self.open = False
        self.parser = _CLOSED_PARSER
        self.pool.connection_lost(self)
        if self.tunnel is not None:
            self.tunnel.upstream_lost()
            self.tunnel = None
            return
        if self.user is None:
            return
        if self._started and self._until_close and reason.check(ConnectionDone):
            self._complete(False)
        else:
            user, self.user = self.user, None
            if reason.check(ConnectionDone):
                why = "upstream closed the connection"
            elif reason.check(SSLError):
                why = f"upstream TLS failed: {_tls_reason(reason.value)}"
            elif reason.check(VerificationError):
                why = f"upstream TLS failed: certificate is not for {self.pool.target.host}"
            else:
                why = "upstream connection reset"
            user.upstream_failed(why, self._started)

    def close(self) -> None:
        self.user = None
        if self.open:
            self.transport.abortConnection()


def _standard_reason(status: int) -> bytes:
    """The RFC reason phrase for `status` (an upstream's own one had control bytes)."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _tls_reason(error: Exception) -> str:
    """OpenSSL's reason ("certificate verify failed", ...) without the library noise."""
    reasons = [part[2] for part in (error.args[0] if error.args and isinstance(error.args[0], list) else [])
               if isinstance(part, tuple) and len(part) == 3]
    return ", ".join(reasons) or str(error)


def _inert() -> None:
    """A failed connection attempt's `doRead`/`doWrite`."""


class _ConnectFactory(ClientFactory):
    noisy = False

    def __init__(self, pool: TargetPool, user: UpstreamUser) -> None:
        self.pool = pool
        self.user: UpstreamUser | None = user
        self._connecting: Any = None   # Twisted's transport until it connects or fails

    def startedConnecting(self, connector: Any) -> None:
        self._connecting = getattr(connector, "transport", None)   # None: a test reactor's connector

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        user, self.user = self.user, None
        self._connecting = None
        return UpstreamConnection(self.pool, user, self)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        # While connecting, Twisted's transport reads and writes through its own bound
        # `doConnect`, set as instance attributes and left there when the attempt fails
        # (refused, timed out, cancelled): a cycle of its own (see _CLOSED_PARSER). Replaced
        # with a function that does nothing, as Twisted's abortConnection does: the reactor
        # may still deliver the same poll's other event to it.
        transport, self._connecting = self._connecting, None
        if transport is not None:
            transport.doRead = transport.doWrite = _inert
        self.pool.connect_failed(self, reason)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        # Twisted's connector and transport point at each other: a reference cycle that would
        # keep the closed connection's memory until the cyclic collector runs (see _CLOSED_PARSER).
        connector.transport = None


class TargetPool:
    """Connections to one target: idle ones kept, total bounded, waiters queued."""

    def __init__(self, reactor: Any, target: Target, upstream: Upstream) -> None:
        self.reactor = reactor
        self.target = target
        self.max_connections = upstream.max_connections
        self.connect_timeout = upstream.connect_timeout
        self.timeout = upstream.timeout
        self.preserve_host = upstream.preserve_host
        self.netloc = target.netloc   # the Host sent upstream: made once, not per request
        self.line_end = b" HTTP/1.1\r\nhost: " + self.netloc + b"\r\n"   # the request line's end and that Host
        self.tls = client_creator(target, upstream.tls) if target.https else None
        self.idle: list[UpstreamConnection] = []
        self.total = 0
        self.waiting: deque[UpstreamUser] = deque()
        self._pending: dict[_ConnectFactory, Any] = {}
        self.retired = False          # dropped by a reload: no connection goes back to idle

    def acquire(self, user: UpstreamUser) -> None:
        """Hand `user` a connection now or later (`connected` / `connect_failed`)."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.open:
                conn.reused = True
                user.connected(conn)
                return
        if self.total < self.max_connections:
            self._connect(user)
        else:
            self.waiting.append(user)

    def forget(self, user: UpstreamUser) -> bool:
        """`user` no longer wants a connection (cancelled or timed out). True: it was still
        waiting for a free slot (no connection was being made for it)."""
        try:
            self.waiting.remove(user)
            return True
        except ValueError:
            pass
        for factory, connector in list(self._pending.items()):
            if factory.user is user:
                factory.user = None
                del self._pending[factory]
                self.total -= 1
                connector.disconnect()
        return False

    def connect_new(self, user: UpstreamUser) -> None:
        """A fresh connection for `user`, bypassing idle ones (retry after a stale one)."""
        if self.total < self.max_connections:
            self._connect(user)
        else:
            self.waiting.appendleft(user)

    def _connect(self, user: UpstreamUser) -> None:
        self.total += 1
        factory = _ConnectFactory(self, user)
        # The gateway's own sweep enforces connect_timeout (the route's, when it has its own);
        # this is only a backstop.
        backstop = user.connect_timeout + 30
        if self.tls is not None:
            self._pending[factory] = self.reactor.connectSSL(self.target.host, self.target.port, factory, self.tls,
                                                             timeout=backstop)
        else:
            self._pending[factory] = self.reactor.connectTCP(self.target.host, self.target.port, factory,
                                                             timeout=backstop)

    def connection_made(self, conn: UpstreamConnection, user: UpstreamUser | None, factory: Any) -> None:
        self._pending.pop(factory, None)
        if user is None:
            self.release(conn, True)
        else:
            user.connected(conn)

    def connect_failed(self, factory: _ConnectFactory, reason: Failure) -> None:
        if self._pending.pop(factory, None) is None:
            return
        self.total -= 1
        user, factory.user = factory.user, None
        if user is not None:
            user.connect_failed(reason)
        self._serve_waiting()

    def release(self, conn: UpstreamConnection, reusable: bool, may_be_paused: bool = False) -> None:
        """The exchange is over: keep the connection for the next request, or drop it.

        `may_be_paused`: the connection was a slow client's producer, which may have paused it.
        """
        if not (reusable and conn.open) or self.retired:
            conn.close()
            return
        conn.user = None
        if may_be_paused:
            conn.transport.resumeProducing()
        if self.waiting:
            conn.reused = True
            self.waiting.popleft().connected(conn)
        else:
            self.idle.append(conn)

    def connection_lost(self, conn: UpstreamConnection) -> None:
        self.total -= 1
        if conn in self.idle:
            self.idle.remove(conn)
        self._serve_waiting()

    def _serve_waiting(self) -> None:
        while self.waiting and self.total < self.max_connections:
            user = self.waiting.popleft()
            user.connecting()
            self._connect(user)

    def retire(self) -> None:
        """A reload dropped this target: close idle connections now; connects in progress and
        busy exchanges finish, and their connections close when released."""
        self.retired = True
        for conn in list(self.idle):
            conn.close()
        self.idle.clear()

    def close(self) -> None:
        self.retire()
        pending, self._pending = self._pending, {}
        for factory, connector in pending.items():
            factory.user = None
            self.total -= 1
            connector.disconnect()
