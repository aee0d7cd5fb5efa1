"""The HTTP/1.1 client-facing transport: a raw Twisted protocol parsing with httptools.

Why not twisted.web: it buffers whole request bodies, answers `100 Continue` before any
check, and costs 5-10x the CPU per request (docs/architecture.md). This adapter only does
HTTP/1.1 framing: it turns bytes into a RequestContext for the pipeline and implements
`Downstream` so the pipeline and proxy can answer. Requests are answered strictly in
order; pipelined requests wait in `_queue` with their bodies buffered (bounded): once
`_MAX_PIPELINED` bytes arrived behind a request that is waiting for its answer, the
connection stops reading until that answer is out, so a client cannot make the gateway hold
more than that while its upstream is slow.
"""

from __future__ import annotations

import sys
from collections import deque
from typing import Any, Final, cast
from weakref import WeakSet

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpRequestParser
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from txgateway.config.schema import Limits
from txgateway.core.fastwrite import writer_for
from txgateway.core.hopbyhop import NO_FIELDS, NO_FRAMING, NO_TOKENS, REQUEST_CONSUMED, FieldNames
from txgateway.core.pipeline import Pipeline, RequestContext, ResponseHead, Switch
from txgateway.core.timeouts import Deadlines
from txgateway.transport.clientcert import ClientCerts
from txgateway.transport.peerlimit import PeerLimit
from txgateway.transport.tls import tls_description
from txgateway.transport.tunnel import Tunnel, handshake_problem

__all__ = ["HTTP1Connection", "HTTP1Factory"]

_log: Final = Logger(namespace="txgateway.transport.http1")

_MAX_QUEUED: Final = 16             # pipelined requests waiting behind the active one
_MAX_BUFFERED: Final = 256 * 1024   # request body bytes held while waiting; reading pauses above
_MAX_PIPELINED: Final = 64 * 1024   # bytes read behind a request waiting for its answer; reading pauses above
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# Every client connection's field names in one table: one per connection was cold at 256 connections
# (two list reads a field, ~17 simulated L2 misses a request; docs/performance.md, "foot").
_NAMES: Final = FieldNames()
# A closed connection's parser: llhttp's callbacks are the connection's bound methods, so the
# pair is a reference cycle, and with the daemon's collector thresholds (service/tap.py) the
# memory of every connection closed since the last collection stays taken. Swapping this one in
# on close lets reference counting free the connection at once (docs/performance.md, "cycles").
_CLOSED_PARSER: Final = HttpRequestParser(object())
_VERSIONS: Final = {"1.1": b"1.1", "1.0": b"1.0", "0.9": b"0.9", "2.0": b"2.0"}   # all llhttp accepts, as bytes


class _Reject(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _Incoming:
    """Transport-side state of one request: its body while nobody consumes it yet."""

    __slots__ = ("ctx", "chunks", "buffered", "complete", "sink", "received")

    def __init__(self, ctx: RequestContext) -> None:
        self.ctx = ctx
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.received = 0
        self.complete = False
        self.sink: Any = None


class HTTP1Connection(Protocol):
    """One client connection. Implements `Downstream` for its active request."""

    # Slots: past 30 attributes CPython 3.11 stops sharing instance-dict keys, and every
    # attribute access on the hot path gets slower (+2.5k instructions per request).
    __slots__ = ("factory", "transport", "connected", "pipeline", "limits", "_deadlines", "_scheme", "_seconds",
                 "tls", "parser", "deadline", "_queue", "_parsing", "_url", "_headers", "_header_bytes",
                 "_raw_header_bytes", "_framing", "_connection_tokens", "_tunnel", "_upgrading", "_upgrade_body", "_broken",
                 "_close_after", "_chunked_out", "_no_body_out", "_cork", "_paused", "_gone", "_peer_ip", "_write",
                 "_flush_writes", "_client_certs", "_pipelined", "_header_limit")

    transport: Any  # a TCP (or TLS) transport: producer/consumer, setTcpNoDelay, abortConnection

    def __init__(self, factory: HTTP1Factory) -> None:
        self.factory = factory
        self.pipeline: Pipeline = factory.pipeline   # refreshed between requests (config reloads)
        self.limits: Limits = factory.limits
        self._deadlines = factory.deadlines
        self._scheme = factory.scheme
        self._seconds = factory.clock.seconds
        self.tls: str | None = None          # "TLSv1.3 http/1.1" on TLS listeners, for the access log
        self._client_certs = factory.client_certs   # mTLS listeners: the certificate onto each request
        self.parser = HttpRequestParser(self)
        self.deadline = 0.0
        self._queue: deque[_Incoming] = deque()   # [0] is the active request
        self._parsing: _Incoming | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._raw_header_bytes = 0
        self._framing: dict[bytes, bytes] = {}
        self._connection_tokens: list[bytes] = []
        self._tunnel: Tunnel | None = None     # joined to an upstream after a WebSocket 101
        self._upgrading = False                # a handshake is out: nothing more may come before the 101
        self._upgrade_body = False             # llhttp took a non-WebSocket upgrade's body for the new protocol
        self._broken = False          # no more requests will be read from this connection
        self._close_after = False
        self._chunked_out = False
        self._no_body_out = False
        # A response head's pieces, joined with the first body bytes (or alone at flush/finish):
        # one join, no head bytes object made and then copied again with the body (docs/performance.md, "foot").
        self._cork: list[bytes] | None = None
        self._paused = False
        self._gone = False
        self._peer_ip = ""
        self._write: Any = None       # fastwrite: held until the end of the reactor turn
        self._flush_writes: Any = None
        self._pipelined = 0           # bytes received since the active request was read whole
        self._header_limit: int = self.limits.max_header_bytes   # the parsed request's (read once per request)

    # -- connection lifecycle ---------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        # One string object per address, whichever connection: a connection's own was cold by
        # its next request at 256 connections, and each lookup by it (trusted proxies, the
        # X-Forwarded-For made per peer, the access log) read it (docs/performance.md, "foot").
        self._peer_ip = sys.intern(getattr(peer, "host", "") or "")
        self._write, self._flush_writes = writer_for(self.transport)
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        self.factory.connections.add(self)
        self._wait(self.limits.header_timeout)

    def connectionLost(self, reason: Any = None) -> None:
        self._gone = True
        self.factory.connections.discard(self)
        if self.factory.peers is not None:
            self.factory.peers.release(self._peer_ip)
        self._deadlines.discard(self)
        if self._tunnel is not None:
            self._tunnel.client_lost()
            self._tunnel = None       # its request context points back here
        elif self._queue:
            active = self._queue[0]
            ctx = active.ctx
            if not ctx.done:
                if not ctx.response_started:
                    ctx.status = 499
                self.pipeline.cancel(ctx)
                self.pipeline.finished(ctx)
        self._queue.clear()
        self.parser = _CLOSED_PARSER

    @property
    def hsts(self) -> bytes | None:
        """The listener's Strict-Transport-Security value (a reload may change it)."""
        return self.factory.hsts

    def _early(self, data: bytes) -> None:
        """Bytes sent after a WebSocket handshake, before the upstream's 101: a client must
        wait (RFC 6455 4.1), and these are never relayed: 400 if nothing was answered yet."""
        if not data:
            return
        self._upgrading = False
        self._broken = True
        handshake = self._queue[-1] if self._queue else None
        if handshake is not None and handshake.ctx.upgrade is not None and not handshake.ctx.response_started:
            self._fail_request(handshake, 400, "BAD_REQUEST", "data sent before the WebSocket handshake completed")

    def start_tunnel(self, ctx: RequestContext, upstream: Any) -> Tunnel:
        self.factory.deadlines.discard(self)
        cork, self._cork = self._cork, None
        if cork is not None:
            self._write(b"".join(cork))                 # the 101 head
        self._flush_writes()        # out before the tunnel writes to the transport directly
        tunnel = self._tunnel = Tunnel(ctx, self.pipeline, self.transport, upstream, self.factory.deadlines,
                                       self.limits.idle_timeout)
        return tunnel

    def _wait(self, seconds: float) -> None:
        deadlines = self._deadlines
        self.deadline = deadlines.now + seconds
        deadlines.add(self)

    def expired(self) -> None:
        """Header timeout (408 once a request started) or idle keep-alive timeout."""
        if self._queue:
            # A pipelined request is slow behind an active one: finish the active one only.
            self._broken = True
            self.pause_body(self._queue[0].ctx)
        elif self._parsing is not None:
            self._reject(_Reject(408, "REQUEST_TIMEOUT", "request headers not received in time"))
        else:
            self.close()

    def close(self) -> None:
        """Close once what was written has left (held writes first: see fastwrite)."""
        self._flush_writes()
        self.transport.loseConnection()

    # -- parsing ----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.from_client(data)
            return
        if self._broken:
            return
        if self._upgrading:
            self._early(data)
            return
        queue = self._queue
        if queue and queue[0].complete:
            # The active request is read and waits for its answer: this is the client running ahead.
            self._pipelined += len(data)
            if self._pipelined > _MAX_PIPELINED and not self._paused:
                self._paused = True
                self.transport.pauseProducing()
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            if self._broken:
                return
            rest = data[upgrade.args[0]:]
            if self._queue and self._queue[-1].ctx.upgrade is not None:
                # A WebSocket handshake: nothing may follow until the upstream's 101 (then the
                # tunnel carries the bytes; else the connection closes after the answer).
                self._upgrading = True
                self._early(rest)
                return
            # Another kind of upgrade (h2c, ...) is a plain request (Upgrade is hop-by-hop):
            # its body, which llhttp left unparsed, is read as a body, then the next request.
            incoming = self._parsing
            if self._upgrade_body and incoming is not None and incoming is not _placeholder:
                self._upgrade_body = False
                ctx = incoming.ctx
                framing = (b"transfer-encoding: chunked" if ctx.chunked
                           else b"content-length: %d" % (ctx.content_length or 0))
                self.parser = HttpRequestParser(_BodyAfterUpgrade(self))
                self.parser.feed_data(b"POST / HTTP/1.1\r\n%s\r\n\r\n" % framing)
            else:
                self.parser = HttpRequestParser(self)
            if rest:
                self.dataReceived(rest)
            return
        except _Reject as reject:
            self._reject(reject)
            return
        except HttpParserCallbackError as e:
            cause = e.__context__
            if not isinstance(cause, _Reject):
                _log.failure("bug while handling a request", Failure(cause))
                cause = _Reject(500, "INTERNAL_ERROR", "the gateway failed to handle the request")
            self._reject(cause)
            return
        except HttpParserError as e:
            self._reject(_Reject(400, "BAD_REQUEST", f"malformed HTTP request: {e}"))
            return
        if self._parsing is not None and self._header_bytes >= 0:
            self._raw_header_bytes += len(data)
            if self._raw_header_bytes > self._header_limit:
                self._reject(_Reject(431, "HEADERS_TOO_LARGE", "request headers are too large"))

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._raw_header_bytes = 0
        self._framing = {}
        self._connection_tokens = []
        limits = self.limits
        self._header_limit = limits.max_header_bytes
        self._wait(limits.header_timeout)
        self._parsing = _placeholder

    def on_url(self, url: bytes) -> None:
        # Most requests' target comes in one piece: kept as it is (a `+=` on b"" is a generic add).
        self._url = self._url + url if self._url else url
        self._header_bytes += len(url)
        if self._header_bytes > self._header_limit:
            raise _Reject(431, "HEADERS_TOO_LARGE", "request headers are too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._header_bytes < 0:
            # A chunked body's trailer: never a header (it would arrive after the checks and
            # could carry credentials). Counted against max_header_bytes, then dropped.
            self._raw_header_bytes += len(name) + len(value) + 4
            if self._raw_header_bytes > self._header_limit:
                raise _Reject(431, "HEADERS_TOO_LARGE", "request trailers are too large")
            return
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._header_limit:
            raise _Reject(431, "HEADERS_TOO_LARGE", "request headers are too large")
        name = _NAMES.lower(name, len(self._headers) + len(self._framing))
        # 0x70: "p", so that most names skip the (generic) startswith call
        if name in REQUEST_CONSUMED or (name[0] == 0x70 and name.startswith(b"proxy-")):
            if name == b"connection":
                if value == b"keep-alive" or value == b"close":     # most clients' one token: no split
                    self._connection_tokens.append(value)
                else:
                    self._connection_tokens.extend(t.strip().lower() for t in value.split(b","))
            elif name == b"host" and b"host" in self._framing:
                raise _Reject(400, "BAD_REQUEST", "more than one Host header")
            elif name == b"transfer-encoding" and name in self._framing:
                value = self._framing[name] + b"," + value     # one list, checked whole below
            self._framing[name] = value
            return
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._deadlines.discard(self)
        self._header_bytes = -1
        parser = self.parser
        framing = self._framing
        target = self._url
        path, _, query = target.partition(b"?")
        host = framing.get(b"host")
        method = parser.get_method()
        if path[:1] != b"/" and method != b"CONNECT":
            path, host = _absolute_form(path, host)
        keep_alive = parser.should_keep_alive()
        # llhttp keeps an HTTP/1.1 connection alive unless `close`, any other version only on a
        # `keep-alive` token (of Connection or Proxy-Connection): kept alive without one is 1.1,
        # known without the version string httptools formats per call (~2.3k instructions).
        if keep_alive and b"keep-alive" not in self._connection_tokens and b"proxy-connection" not in framing:
            version = b"1.1"
        else:
            version = _VERSIONS[parser.get_http_version()]
        if self.tls is None and self._scheme == b"https":
            self.tls = tls_description(self.transport, "http/1.1")
        ctx = RequestContext(method, target, path, b"?" + query if query else b"", version,
                             self._headers, host, self._scheme, self._peer_ip, self, self._seconds())
        incoming = _Incoming(ctx)
        self._parsing = incoming
        # `Connection: keep-alive` or `close` names headers taken out already: no filtering pass.
        if self._connection_tokens and not REQUEST_CONSUMED.issuperset(self._connection_tokens):
            tokens = frozenset(self._connection_tokens)
            ctx.headers = [(n, v) for n, v in ctx.headers if n not in tokens]
        ctx.keep_alive = keep_alive
        if method == b"CONNECT":
            # What follows is a tunnel's bytes, never a request: answered (405), then closed.
            self._broken = True
            ctx.keep_alive = False
        coding = framing.get(b"transfer-encoding")
        if coding is not None:
            if coding.strip().lower() != b"chunked":
                # gzip, chunked under another coding...: the upstream would get bytes framed anew without them.
                raise _Reject(400, "BAD_REQUEST", "unsupported transfer-coding")
            ctx.chunked = True
        length = framing.get(b"content-length")
        if length is not None:
            ctx.content_length = int(length)
        handshake: str | None = None
        if b"upgrade" in self._connection_tokens and b"upgrade" in framing:
            if framing[b"upgrade"].lower() == b"websocket":
                ctx.upgrade = b"websocket"
                ctx.keep_alive = False           # after the answer: a tunnel, or a closed connection
                handshake = handshake_problem(ctx)
            else:
                self._upgrade_body = ctx.has_body   # see dataReceived: llhttp skips this body
        if b"expect" in framing:
            ctx.expect_continue = framing[b"expect"].lower() == b"100-continue"
        if self._client_certs is not None:       # after hop-by-hop removal: a client cannot name ours
            self._client_certs.apply(ctx, self.transport)
        if len(self._queue) >= _MAX_QUEUED:
            raise _Reject(503, "UPSTREAM_UNAVAILABLE", "too many pipelined requests")
        self._queue.append(incoming)
        if host is None and version == b"1.1":
            self._fail_request(incoming, 400, "BAD_REQUEST", "HTTP/1.1 request without a Host header")
        elif handshake is not None:
            self._fail_request(incoming, 400, "BAD_REQUEST", handshake)
        elif ctx.content_length is not None and ctx.content_length > self.limits.largest_body:
            self._fail_request(incoming, 413, "PAYLOAD_TOO_LARGE", "request body is larger than max_body_size")
        elif len(self._queue) == 1:
            # Nothing else in flight: take a reloaded one. Read from the Switch (native reads):
            # the factory's properties are generic calls.
            pipeline = self.pipeline = self.factory.switch.pipeline
            self.limits = pipeline.limits
            pipeline.handle(ctx)
        # The head's parse is done with: what only it used goes now (see NO_FIELDS).
        self._framing, self._connection_tokens, self._headers = NO_FRAMING, NO_TOKENS, NO_FIELDS

    def on_body(self, data: bytes) -> None:
        incoming = self._parsing
        if incoming is None or incoming is _placeholder:
            return
        incoming.received += len(data)
        incoming.ctx.bytes_in += len(data)
        route = incoming.ctx.route
        limit = route.max_body_size if route is not None else None
        if incoming.received > (self.limits.largest_body if limit is None else limit):
            raise _Reject(413, "PAYLOAD_TOO_LARGE", "request body is larger than max_body_size")
        if incoming.sink is not None:
            incoming.sink.body_chunk(data)
            return
        incoming.chunks.append(data)
        incoming.buffered += len(data)
        if incoming.buffered > _MAX_BUFFERED and not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def on_message_complete(self) -> None:
        if self._upgrade_body:
            return                   # not the end: the body follows (see dataReceived)
        incoming = self._parsing
        self._parsing = None
        if incoming is None or incoming is _placeholder:
            return
        incoming.complete = True
        if incoming.sink is not None:
            incoming.sink.body_end()

    def _reject(self, reject: _Reject) -> None:
        """A request the parser refused: answer it in turn, then close the connection."""
        self._broken = True
        self._deadlines.discard(self)
        incoming = self._parsing
        if incoming is None or incoming is _placeholder or incoming not in self._queue:
            # A copy: between messages `_headers` is the shared NO_FIELDS, which nothing may add to.
            ctx = RequestContext(b"GET", self._url, b"", b"", b"1.1", list(self._headers), None,
                                 self._scheme, self._peer_ip, self, self._seconds())
            incoming = _Incoming(ctx)
            self._queue.append(incoming)
        self._parsing = None
        self._fail_request(incoming, reject.status, reject.code, reject.message)

    def _fail_request(self, incoming: _Incoming, status: int, code: str, message: str) -> None:
        """Answer with an error once earlier requests are done; the connection then closes."""
        self._broken = True
        incoming.complete = False
        incoming.ctx.keep_alive = False
        incoming.ctx.error_code = code
        incoming.ctx.set_state("reject", (status, code, message))
        if incoming is self._queue[0]:
            self.pipeline.cancel(incoming.ctx)
            self.pipeline.reject(incoming.ctx, status, code, message)
        else:
            # Nothing after a broken request can be trusted; drop what queued behind it.
            while self._queue[-1] is not incoming:
                self._queue.pop()

    # -- Downstream: answering the active request --------------------------------------

    def send_head(self, ctx: RequestContext, head: ResponseHead) -> None:
        if self._gone or not self._queue or self._queue[0].ctx is not ctx:
            return
        status = head.status
        parts = [_status_line(status, head.reason)]
        for name, value in head.headers:      # pieces joined once: no %-format per header
            parts.append(name)
            parts.append(b": ")
            parts.append(value)
            parts.append(b"\r\n")
        prepared = head.prepared
        if prepared is not None:
            parts.append(prepared.wire)
        if status == 101 and ctx.upgrade is not None:
            # Switching protocols: no framing; start_tunnel sends it.
            parts.append(b"connection: upgrade\r\nupgrade: %s\r\n\r\n" % ctx.upgrade)
            self._cork = parts
            return
        # An answer before the request body was read (401, 413, an early upstream reply)
        # leaves unread bytes behind: the connection cannot carry another request.
        close = (not ctx.keep_alive or (self._broken and len(self._queue) == 1)
                 or (not self._queue[0].complete and ctx.has_body))
        self._chunked_out = False
        self._no_body_out = ctx.method == b"HEAD" or status in (204, 304) or status < 200
        if status in (204, 304) or status < 200:
            pass
        elif head.length is not None:
            parts.append(_length_field(head.length))
        elif ctx.method == b"HEAD":
            pass
        elif ctx.version == b"1.1":
            parts.append(b"transfer-encoding: chunked\r\n")
            self._chunked_out = True
        else:
            close = True
        if close:
            parts.append(b"connection: close\r\n")
        elif ctx.version == b"1.0":
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        self._close_after = close
        # Corked: the head leaves with the first body bytes, or at flush/finish.
        self._cork = parts

    def send_body(self, ctx: RequestContext, data: bytes) -> None:
        if self._no_body_out or self._gone or self._queue[0].ctx is not ctx:
            return
        ctx.bytes_out += len(data)
        if self._chunked_out:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        cork = self._cork
        if cork is not None:
            self._cork = None
            cork.append(data)
            data = b"".join(cork)
        self._write(data)

    def flush(self, ctx: RequestContext) -> None:
        """Send a corked response head now (the body may take a while)."""
        cork = self._cork
        if cork is not None and not self._gone:
            self._cork = None
            self._write(b"".join(cork))

    def finish(self, ctx: RequestContext) -> None:
        if self._gone or not self._queue or self._queue[0].ctx is not ctx:
            return
        tail = b"0\r\n\r\n" if self._chunked_out and not self._no_body_out else b""
        cork = self._cork
        if cork is not None:
            self._cork = None
            if tail:
                cork.append(tail)
            self._write(b"".join(cork))
        elif tail:
            self._write(tail)
        incoming = self._queue.popleft()
        self.pipeline.finished(ctx)
        if self._close_after or (not incoming.complete and ctx.has_body) or (self._broken and not self._queue):
            # An unread request body makes the connection unusable for the next request.
            self._queue.clear()
            self._broken = True
            self.close()
            return
        self._pipelined = 0
        if self._paused:             # a method call of this (non-native) class is a generic one
            self._resume()
        if self._queue:
            nxt = self._queue[0]
            reject = nxt.ctx.get_state("reject")
            pipeline = self.pipeline = self.factory.switch.pipeline    # the previous request is done: see above
            self.limits = pipeline.limits
            if reject:
                pipeline.reject(nxt.ctx, *reject)
            else:
                pipeline.handle(nxt.ctx)
        elif self._parsing is None:
            self._wait(self.limits.idle_timeout)

    def abort(self, ctx: RequestContext) -> None:
        """The response cannot be completed: the client must see a broken connection."""
        if self._gone:
            return
        self.pipeline.finished(ctx)
        self._queue.clear()
        self._broken = True
        self.transport.abortConnection()

    def read_body(self, ctx: RequestContext, sink: Any) -> None:
        incoming = self._queue[0]
        if incoming.ctx is not ctx:
            return
        if ctx.expect_continue and not incoming.received and not incoming.complete:
            self._write(_CONTINUE)
        incoming.sink = sink
        chunks, incoming.chunks, incoming.buffered = incoming.chunks, [], 0
        for chunk in chunks:
            sink.body_chunk(chunk)
        if incoming.complete:
            sink.body_end()
        self._resume()

    def pause_body(self, ctx: RequestContext) -> None:
        if not self._paused and not self._gone:
            self._paused = True
            self.transport.pauseProducing()

    def resume_body(self, ctx: RequestContext) -> None:
        self._resume()

    def _resume(self) -> None:
        if self._paused and not self._gone and self._pipelined <= _MAX_PIPELINED:
            self._paused = False
            self.transport.resumeProducing()

    def register_producer(self, ctx: RequestContext, producer: Any) -> None:
        if not self._gone:
            self.transport.registerProducer(producer, True)

    def unregister_producer(self, ctx: RequestContext) -> None:
        if not self._gone:
            self.transport.unregisterProducer()


class _BodyAfterUpgrade:
    """Parser callbacks for the body of a non-WebSocket `Upgrade` request: llhttp is fed a
    made-up head with the request's framing, then its body bytes; from the body on, every
    callback is the connection's (later requests are parsed as usual by this parser)."""

    def __init__(self, conn: HTTP1Connection) -> None:
        self.conn = conn
        self.head = True           # the made-up head: not a request

    def on_message_begin(self) -> None:
        if not self.head:
            self.conn.on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self.head:
            self.conn.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head:
            self.conn.on_header(name, value)

    def on_headers_complete(self) -> None:
        if not self.head:
            self.conn.on_headers_complete()

    def on_body(self, data: bytes) -> None:
        self.conn.on_body(data)

    def on_message_complete(self) -> None:
        self.head = False
        self.conn.on_message_complete()


# What `_parsing` points to between requests: bytes parsed with no request in progress land here.
_placeholder: Final = _Incoming(RequestContext(b"", b"", b"", b"", b"", [], None, b"", "", cast(Any, None), 0.0))


_STATUS_LINES: Final[dict[int, tuple[bytes, bytes]]] = {}   # status -> (reason, its status line): most answers reuse one


def _status_line(status: int, reason: bytes) -> bytes:
    """`HTTP/1.1 <status> <reason>\\r\\n`, made once per status and reason phrase."""
    known = _STATUS_LINES.get(status)
    if known is not None and known[0] == reason:
        return known[1]
    line = b"HTTP/1.1 " + str(status).encode() + b" " + reason + b"\r\n"
    if len(_STATUS_LINES) < 1000:     # statuses are 100-999: bounded whatever upstreams send
        _STATUS_LINES[status] = (reason, line)
    return line


_LENGTH_FIELDS: Final[dict[int, bytes]] = {}    # length -> its Content-Length field: many answers repeat a few


def _length_field(length: int) -> bytes:
    """`content-length: <length>\\r\\n`, the first 1,024 lengths seen remembered (a str() and an
    encode a response otherwise)."""
    known = _LENGTH_FIELDS.get(length)
    if known is not None:
        return known
    field = b"content-length: %d\r\n" % length
    if len(_LENGTH_FIELDS) < 1024:
        _LENGTH_FIELDS[length] = field
    return field


def _absolute_form(target: bytes, host: bytes | None) -> tuple[bytes, bytes | None]:
    """`GET http://host/path` (absolute-form): the path and authority, else a 400."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise _Reject(400, "BAD_REQUEST", "request target must be an absolute path")
    authority, _, path = rest.partition(b"/")
    return b"/" + path, authority or host


class HTTP1Factory(Factory):
    """Builds client connections; holds what they share (the request path, clock)."""

    noisy = False

    def __init__(self, switch: Switch, clock: Any, deadlines: Deadlines,
                 scheme: bytes = b"http", hsts: bytes | None = None, client_certs: ClientCerts | None = None,
                 peers: PeerLimit | None = None) -> None:
        self.switch = switch      # the current request path (a reload replaces it)
        self.client_certs = client_certs   # a listener verifying client certificates (mTLS)
        self.peers = peers        # plain listeners: connections per address (TLS ones count outside)
        self.clock = clock
        self.deadlines = deadlines
        self.scheme = scheme
        self.hsts = hsts          # Strict-Transport-Security value for https listeners
        self.connections: set[HTTP1Connection] = set()
        self.others: WeakSet[Any] = WeakSet()   # this listener's HTTP/2 connections (h2.py)

    @property
    def pipeline(self) -> Pipeline:
        return self.switch.pipeline

    @property
    def limits(self) -> Limits:
        return self.switch.pipeline.limits  # type: ignore[no-any-return]

    def buildProtocol(self, addr: Any) -> HTTP1Connection | None:
        if self.peers is not None and self.peers.admit(addr) is None:
            return None           # over limits.max_connections_per_ip: Twisted closes the socket
        return HTTP1Connection(self)
