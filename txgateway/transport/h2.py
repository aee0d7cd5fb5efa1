"""HTTP/2 on TLS listeners that list `h2` in `alpn`: our frame layer driven by our pipeline.

After the handshake `ProtocolByALPN` looks at what ALPN chose: `http/1.1` goes to our own
HTTP/1.1 transport (http1.py), `h2` to `H2Server`, which drives one `h2frames.H2Frames`
(the frame and stream states, compiled) and hands every stream to the pipeline as a `RequestContext` whose
`H2Stream` is its `Downstream`: auth, limits, breakers, header rules, metrics and the access log
apply to HTTP/2 as to HTTP/1.1; upstreams are spoken to in HTTP/1.1.

Why not twisted.web's HTTP/2: it runs a request only once its body has ended (after spooling it
to a temporary file), so auth and limits came after the upload; it keeps reading a connection it
gave up on, and nothing in it bounds a header block before it is stored. Here:
- the request filters run on HEADERS; the body streams to the upstream as it arrives, under
  HTTP/2 flow control (a window is opened only for what the upstream took), and `max_body_size`
  is enforced per stream as DATA arrives;
- a header block (HEADERS + CONTINUATION) larger than `max_header_bytes` or split into more
  than `MAX_BLOCK_FRAMES` frames ends the connection before it is stored (h2frames.py; the
  CONTINUATION flood, CVE-2024-27316), and a block left half-sent is cut after `header_timeout`;
- a protocol error sends GOAWAY, stops reading and closes the TCP connection (no waiting for
  the peer's TLS close_notify); a client that does not read what it is sent is not read either;
- stream resets by the client are budgeted per client address across its connections
  (`ResetBudget`, the "rapid reset" flood with reconnects);
- `:method` and `:path` are checked before anything is forwarded (400), CONNECT is a 405;
- a closed connection drops its references, so it is freed at once even with `gc.freeze` and
  raised GC thresholds.

Request blocks are decoded by hpackdecode.py and checked in one pass (h2headers.py); responses
are encoded without HPACK's dynamic table. The `h2` library (interpreted) was most of the
instructions of an HTTP/2 request; it is now only the tests' client. A response is corked
until the upstream read ends (`flush`) or the response does (`finish`), so one read at once
leaves as HEADERS + DATA with END_STREAM. Compiled with mypyc like http1.py (setup.py).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote_from_bytes

from twisted.internet.protocol import Protocol

from txgateway.core.hopbyhop import HOP_BY_HOP, consumed_by_transport
from txgateway.core.pipeline import RequestContext, ResponseHead
from txgateway.filters.ratelimit.filter import take
from txgateway.transport.h2frames import (
    ABORTED,
    CANCEL,
    DATA,
    ENDED,
    ENHANCE_YOUR_CALM,
    GOAWAY,
    INTERNAL_ERROR,
    NO_ERROR,
    PROTOCOL_ERROR,
    REQUEST,
    RESET,
    WINDOW,
    Event,
    H2Error,
    H2Frames,
)
from txgateway.transport.h2headers import ResponseEncoder, request_block_problem
from txgateway.transport.tls import tls_description

__all__ = ["ALPNFactory", "H2Server", "H2Stream", "ProtocolByALPN", "ResetBudget", "close_h2"]

_MAX_STREAMS = 100            # concurrent streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS)
_HIGH_WATER = 64 * 1024       # response bytes queued on a stream before its upstream is paused
# The connection's receive window: 16 streams' worth (each has the default 64 KiB), so a stream
# whose upstream is slow to take its body holds up its own window, not the others' uploads.
_CONNECTION_WINDOW = 16 * 65535
_CLOSE_GRACE = 1.0            # seconds a closing connection may take to flush before it is aborted
# Response headers HTTP/2 forbids (RFC 9113 8.2.2); the upstream side takes most out already.
_NOT_IN_H2 = HOP_BY_HOP | {b"content-length"}
# Bytes allowed in a :path (visible ASCII) and a :method (RFC 9110 token characters).
_PATH_BYTES = bytes(range(0x21, 0x7F))
_TOKEN_BYTES = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def request_problem(method: bytes, path: bytes) -> str | None:
    """Why `:method`/`:path` cannot become an HTTP/1.1 request line, else None."""
    if not method or method.translate(None, _TOKEN_BYTES):
        return "invalid :method"
    if path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
        return ":path must be an absolute path"
    if path.translate(None, _PATH_BYTES):
        return ":path holds spaces, control characters or non-ASCII bytes"
    return None


class ResetBudget:
    """Stream resets allowed per client address, shared by all of its connections.

    A token bucket per address (`per_second`, up to `burst`): each RST_STREAM a client sends
    takes a token. An address that overdraws has the connection it did it on closed and its
    new connections refused for `penalty` seconds, so reconnecting does not buy a new budget.
    Both tables are bounded by `max_addresses` (refilled buckets and past bans go first)."""

    def __init__(self, clock: Any, per_second: float = 100.0, burst: int = 200, penalty: float = 10.0,
                 max_addresses: int = 10000) -> None:
        self.clock = clock
        self.per_second = per_second
        self.burst = burst
        self.penalty = penalty
        self.max_addresses = max_addresses
        self.buckets: dict[str, tuple[float, float]] = {}   # address -> (tokens, updated)
        self.banned: dict[str, float] = {}                  # address -> refused until

    def admits(self, address: str) -> bool:
        """Whether a new connection from `address` may be served."""
        until = self.banned.get(address)
        if until is None:
            return True
        if self.clock.seconds() < until:
            return False
        del self.banned[address]
        return True

    def spend(self, address: str) -> bool:
        """One reset from `address`: False when its budget is exhausted (it is then banned)."""
        now = self.clock.seconds()
        tokens, updated = self.buckets.get(address, (float(self.burst), now))
        allowed, tokens = take(tokens, updated, now, self.per_second, self.burst)
        if not allowed:
            self.buckets.pop(address, None)
            if len(self.banned) >= self.max_addresses:
                self.banned = {a: t for a, t in self.banned.items() if t > now}
                if len(self.banned) >= self.max_addresses:
                    del self.banned[next(iter(self.banned))]     # the oldest ban
            self.banned[address] = now + self.penalty
            return False
        if address not in self.buckets and len(self.buckets) >= self.max_addresses:
            self._forget(now)
        self.buckets[address] = (tokens, now)
        return True

    def _forget(self, now: float) -> None:
        """Drop addresses whose bucket has refilled (they owe nothing), else the oldest."""
        full = self.burst / self.per_second
        self.buckets = {a: v for a, v in self.buckets.items() if now - v[1] < full}
        if len(self.buckets) >= self.max_addresses:
            del self.buckets[next(iter(self.buckets))]


class H2Stream:
    """`pipeline.Downstream` for one HTTP/2 stream."""

    __slots__ = ("server", "stream_id", "ctx", "tls", "sink", "chunks", "unacked", "received", "complete",
                 "body_paused", "head", "out", "out_bytes", "out_end", "producer", "producer_paused", "gone")

    def __init__(self, server: H2Server, stream_id: int, tls: str | None) -> None:
        self.server = server
        self.stream_id = stream_id
        self.ctx: RequestContext | None = None
        self.tls = tls
        self.sink: Any = None             # the proxy, once it reads the body
        self.chunks: list[bytes] = []     # body received before the sink came (within the window)
        self.unacked = 0                  # flow-controlled bytes received and not yet given back
        self.received = 0
        self.complete = False             # the client ended its side
        self.body_paused = False          # the upstream is not taking the body: windows stay shut
        self.head: list[tuple[bytes, bytes]] | None = None    # response headers corked until flush/finish
        self.out: list[bytes] = []        # response bytes waiting for the peer's window
        self.out_bytes = 0
        self.out_end = False              # END_STREAM once `out` is sent
        self.producer: Any = None         # the upstream transport, paused while `out` is large
        self.producer_paused = False
        self.gone = False                 # reset, answered or the connection is lost

    @property
    def hsts(self) -> bytes | None:
        return self.server.http.hsts  # type: ignore[no-any-return]

    # -- response ---------------------------------------------------------------------
    # Corked like HTTP/1.1's head: the head and the body wait for `flush` (the end of an upstream
    # read that did not end the response) or `finish`, so a response read at once leaves as
    # HEADERS + one DATA with END_STREAM (or a HEADERS with END_STREAM), in one write.

    def send_head(self, ctx: RequestContext, head: ResponseHead) -> None:
        if self.gone:
            return
        headers = [(b":status", b"%d" % head.status)]
        headers += [(name, value) for name, value in head.headers if name not in _NOT_IN_H2]
        if head.prepared is not None:
            headers += head.prepared.pairs
        if head.length is not None and head.status not in (204, 304) and head.status >= 200:
            headers.append((b"content-length", b"%d" % head.length))
        self.head = headers

    def send_body(self, ctx: RequestContext, data: bytes) -> None:
        if self.gone or ctx.method == b"HEAD":
            return
        ctx.bytes_out += len(data)
        self.out.append(data)
        self.out_bytes += len(data)

    def flush(self, ctx: RequestContext) -> None:
        self.server.send_queued(self)

    def finish(self, ctx: RequestContext) -> None:
        if not self.gone:
            self.out_end = True
            self.server.send_queued(self)
        self.server.pipeline.finished(ctx)

    def abort(self, ctx: RequestContext) -> None:
        """A response that cannot be completed: reset the stream, never fake its end."""
        self.server.reset(self, INTERNAL_ERROR)
        self.server.pipeline.finished(ctx)

    # -- request body -----------------------------------------------------------------

    def read_body(self, ctx: RequestContext, sink: Any) -> None:
        if ctx.expect_continue and not self.received and not self.complete:
            self.server.send_headers(self, [(b":status", b"100")])
        self.sink = sink
        chunks, self.chunks = self.chunks, []
        for chunk in chunks:
            sink.body_chunk(chunk)
        if self.complete:
            sink.body_end()
        self.server.acknowledge(self)

    def pause_body(self, ctx: RequestContext) -> None:
        self.body_paused = True

    def resume_body(self, ctx: RequestContext) -> None:
        self.body_paused = False
        self.server.acknowledge(self)

    def register_producer(self, ctx: RequestContext, producer: Any) -> None:
        self.producer = producer
        self.server.update_producer(self)

    def unregister_producer(self, ctx: RequestContext) -> None:
        self.producer = None
        self.producer_paused = False       # the pool resumes what it takes back

    def start_tunnel(self, ctx: RequestContext, upstream: Any) -> Any:
        raise RuntimeError("WebSocket over HTTP/2 (RFC 8441) is not supported")


class H2Server(Protocol):
    """One HTTP/2 connection: its frame layer, our streams, the connection's deadline."""

    transport: Any    # the TLSMemoryBIOProtocol

    def __init__(self, factory: ALPNFactory, peer_ip: str) -> None:
        self.factory = factory
        self.http = factory.http            # the listener's HTTP/1.1 factory: its settings
        self.pipeline = factory.http.pipeline
        self.peer_ip = peer_ip
        self.conn: H2Frames | None = None   # None once closed
        self.streams: dict[int, H2Stream] = {}
        self.tls: str | None = None
        self.deadline = 0.0
        self.closing = False
        self.goaway = False                 # the client said it opens no more streams
        self.write_paused = False
        self._block = False                 # a header block is open: header_timeout runs

    # -- connection lifecycle ---------------------------------------------------------

    def connectionMade(self) -> None:
        limits = self.http.limits
        conn = self.conn = H2Frames(ResponseEncoder(), _MAX_STREAMS, limits.max_header_bytes, _CONNECTION_WINDOW)
        conn.initiate()
        self.tls = tls_description(self.transport, "h2")
        if hasattr(self.transport, "setTcpNoDelay"):       # small frames (WINDOW_UPDATE...) go at once
            self.transport.setTcpNoDelay(True)
        self.transport.registerProducer(self, True)
        self._wait(limits.header_timeout)
        self._send()

    def dataReceived(self, data: bytes) -> None:
        conn = self.conn
        if conn is None or self.closing:
            return
        try:
            events = conn.receive(data)
        except H2Error as e:
            self.fail(None, str(e))         # the frame layer queued its GOAWAY
            return
        for event in events:
            if self.conn is None or self.closing:
                return
            kind = event.kind
            if kind == DATA:
                self._data(event)
            elif kind == REQUEST:
                self._request(event)
            elif kind == ENDED:
                self._ended(event.stream_id)
            elif kind == WINDOW:
                self._window(event.stream_id)
            elif kind == RESET:
                self._reset_by_client(event.stream_id)
            elif kind == ABORTED:
                self._aborted(event.stream_id)
            elif kind == GOAWAY:
                self._terminated(event)
        if self.conn is not None:
            if conn.block_open != self._block and not self.closing:
                self._block = not self._block
                if self._block:             # CONTINUATION frames do not extend it
                    self._wait(self.http.limits.header_timeout)
            self._arm()
            self._send()

    def connectionLost(self, reason: Any = None) -> None:
        self.http.deadlines.discard(self)
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            self._lost(stream)
            stream.ctx = None
        # Drop what points back at us: the TLS transport holds us as its wrapped protocol.
        self.conn = None
        self.transport = None

    def stop(self) -> None:
        """The gateway is stopping: GOAWAY, open streams cut (499), then the connection closes."""
        if self.conn is None or self.closing:
            return
        self.conn.close()
        for stream in list(self.streams.values()):
            self._drop(stream, CANCEL)
            self._lost(stream)
            self._forget(stream)
        self._send()
        self._close()

    def expired(self) -> None:
        """Header timeout (a block left half-sent, or no request yet), idle timeout, or a
        closing connection that did not go in time."""
        if self.conn is None:
            return
        if self.closing:
            self.transport.abortConnection()
        elif self._block or not self.streams:
            if self._block:
                self.fail(PROTOCOL_ERROR, "header block not completed within header_timeout")
            else:
                self.conn.close()
                self._send()
                self._close()

    def fail(self, code: int | None, why: str) -> None:
        """A protocol error or abuse: GOAWAY, read nothing more, and close the TCP connection
        once the GOAWAY left, without waiting for the peer's TLS close_notify as a TLS close
        does (reading on meanwhile); aborted if even that takes longer than _CLOSE_GRACE."""
        if self.conn is None or self.closing:
            return
        if code is not None:
            self.conn.close(code, why.encode()[:128])
        self._send()
        tls = self.transport
        tls.pauseProducing()
        self._close()
        tls.transport.loseConnection()

    def _close(self) -> None:
        self.closing = True
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        self._wait(_CLOSE_GRACE)

    def _wait(self, seconds: float) -> None:
        deadlines = self.http.deadlines
        self.deadline = deadlines.now + seconds
        deadlines.add(self)

    def _arm(self) -> None:
        """The deadline after a read: none while streams are open, header_timeout for a block
        left open (set when it opened: CONTINUATION frames do not extend it), else idle."""
        if self._block:
            return
        if self.streams:
            self.http.deadlines.discard(self)
        else:
            self._wait(self.http.limits.idle_timeout)

    # -- incoming events ----------------------------------------------------------------

    def _request(self, event: Event) -> None:
        problem = request_block_problem(event.headers)
        if problem is not None:
            self.fail(PROTOCOL_ERROR, problem)
            return
        stream_id = event.stream_id
        stream = H2Stream(self, stream_id, self.tls)
        self.streams[stream_id] = stream
        pseudo: dict[bytes, bytes] = {}
        headers: list[tuple[bytes, bytes]] = []
        cookies: list[bytes] = []
        host = None
        length = None
        expect = False
        for name, value in event.headers:
            if name[:1] == b":":
                pseudo[name] = value
            elif name == b"cookie":
                cookies.append(value)       # split per crumb in HTTP/2, one header in HTTP/1.1
            elif name == b"host":
                host = value
            elif name == b"content-length":
                length = value
            elif name == b"expect":
                expect = value.lower() == b"100-continue"
            elif not consumed_by_transport(name):
                headers.append((name, value))
        if cookies:
            headers.append((b"cookie", b"; ".join(cookies)))
        method = pseudo.get(b":method", b"")
        target = pseudo.get(b":path", b"")
        host = pseudo.get(b":authority", host)
        path, _, query = target.partition(b"?")
        self.pipeline = pipeline = self.http.pipeline      # a reload applies to the next streams
        ctx = stream.ctx = RequestContext(method, target, path, b"?" + query if query else b"", b"2", headers, host,
                                          self.http.scheme, self.peer_ip, stream, self.http.clock.seconds())
        if self.http.client_certs is not None:    # after hop-by-hop removal: a client cannot name ours
            self.http.client_certs.apply(ctx, self.transport)
        ended = event.ended
        stream.complete = ended
        ctx.expect_continue = expect and not ended
        if not ended:
            if length is not None and length.isdigit():
                ctx.content_length = int(length)
            else:
                ctx.chunked = True          # length unknown: chunked to the upstream
        problem = None if method == b"CONNECT" else request_problem(method, target)
        if method == b"CONNECT":
            pipeline.reject(ctx, 405, "METHOD_NOT_ALLOWED", "CONNECT is not supported")
        elif problem is not None:
            ctx.method = quote_from_bytes(method, safe="").encode()    # the access log writes it as is
            pipeline.reject(ctx, 400, "BAD_REQUEST", problem)
        elif ctx.content_length is not None and ctx.content_length > self.http.limits.largest_body:
            pipeline.reject(ctx, 413, "PAYLOAD_TOO_LARGE", "request body is larger than max_body_size")
        else:
            pipeline.handle(ctx)            # filters run now, before any of the body arrives

    def _data(self, event: Event) -> None:
        stream = self.streams.get(event.stream_id)
        size = event.size
        conn = self.conn
        assert conn is not None
        if stream is None or stream.ctx is None or stream.ctx.done:
            conn.acknowledge(size, event.stream_id)   # answered: only the window matters
            return
        ctx = stream.ctx
        data = event.data
        stream.received += len(data)
        ctx.bytes_in += len(data)
        stream.unacked += size
        route = ctx.route
        limit = route.max_body_size if route is not None else None
        if stream.received > (self.http.limits.largest_body if limit is None else limit):
            self._refuse(stream, 413, "PAYLOAD_TOO_LARGE", "request body is larger than max_body_size")
            return
        if stream.sink is not None:
            stream.sink.body_chunk(data)
            self.acknowledge(stream)
        else:
            stream.chunks.append(data)      # bounded by the stream's window: nothing acknowledged yet

    def _ended(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.complete:
            return
        stream.complete = True
        if stream.sink is not None and stream.ctx is not None and not stream.ctx.done:
            stream.sink.body_end()
        self._maybe_done(stream)

    def _reset_by_client(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._lost(stream)
            self._forget(stream)
        if not self.factory.resets.spend(self.peer_ip):
            self.fail(ENHANCE_YOUR_CALM, "too many stream resets")

    def _aborted(self, stream_id: int) -> None:
        """The frame layer reset a stream for a stream error."""
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._lost(stream)
            self._forget(stream)

    def _terminated(self, event: Event) -> None:
        """The client sent GOAWAY: on an error, cut everything; else finish open streams first."""
        self.goaway = True
        if event.error_code != NO_ERROR:
            self.fail(None, "client GOAWAY")
        elif not self.streams:
            self._close()

    def _window(self, stream_id: int) -> None:
        streams = [self.streams.get(stream_id)] if stream_id else list(self.streams.values())
        for stream in streams:
            if stream is not None and (stream.out or stream.out_end):
                self.send_queued(stream)

    # -- what streams ask ---------------------------------------------------------------

    def send_headers(self, stream: H2Stream, headers: list[tuple[bytes, bytes]]) -> None:
        if self.conn is None:
            return
        if not self.conn.send_headers(stream.stream_id, headers):
            self.reset(stream, INTERNAL_ERROR)
            return
        self._send()

    def send_queued(self, stream: H2Stream) -> None:
        """Send a stream's corked head, then what the windows allow of its body; END_STREAM
        with the last of it (on the HEADERS frame when there is no body)."""
        conn = self.conn
        if conn is None or stream.gone:
            return
        stream_id = stream.stream_id
        out = stream.out
        ended = False                     # END_STREAM went with a HEADERS or DATA frame
        if stream.head is not None:
            headers, stream.head = stream.head, None
            ended = stream.out_end and not out
            if not conn.send_headers(stream_id, headers, ended):
                self.reset(stream, INTERNAL_ERROR)
                return
        sent = True                 # False: the stream was closed meanwhile (a reset crossed our data)
        while out:
            room = min(conn.window(stream_id), conn.max_frame_size)
            if room <= 0:
                break
            data = out[0]
            if len(data) > room:
                out[0] = data[room:]
                data = data[:room]
            else:
                out.pop(0)
            stream.out_bytes -= len(data)
            ended = stream.out_end and not out
            sent = conn.send_data(stream_id, data, ended)
            if not sent:
                break
        if not sent:
            stream.gone = True
            self._maybe_done(stream)
        elif stream.out_end and not out:
            if not ended:
                conn.send_data(stream_id, b"", True)
            stream.gone = True
            self._maybe_done(stream)
        self.update_producer(stream)
        self._send()

    def update_producer(self, stream: H2Stream) -> None:
        """Pause a stream's upstream while its response waits on the peer or the socket."""
        producer = stream.producer
        if producer is None:
            return
        blocked = (stream.out_bytes > _HIGH_WATER or self.write_paused) and not stream.gone
        if blocked and not stream.producer_paused:
            stream.producer_paused = True
            producer.pauseProducing()
        elif not blocked and stream.producer_paused:
            stream.producer_paused = False
            producer.resumeProducing()

    def acknowledge(self, stream: H2Stream) -> None:
        """Give back the window of body bytes the upstream took (unless it paused us)."""
        if stream.unacked and not stream.body_paused and self.conn is not None and stream.sink is not None:
            size, stream.unacked = stream.unacked, 0
            self.conn.acknowledge(size, stream.stream_id)
            self._send()

    def reset(self, stream: H2Stream, code: int) -> None:
        if not stream.gone:
            self._drop(stream, code)
            self._send()
        self._forget(stream)

    def _refuse(self, stream: H2Stream, status: int, code: str, message: str) -> None:
        """A request found bad while its body arrives: answer it if nothing was sent yet
        (the rest of its body is then refused), else reset it."""
        ctx = stream.ctx
        assert ctx is not None
        pipeline = self.pipeline
        pipeline.cancel(ctx)
        stream.sink = None
        stream.chunks = []
        if ctx.response_started:
            stream.abort(ctx)
        else:
            pipeline.reject(ctx, status, code, message)

    def _drop(self, stream: H2Stream, code: int) -> None:
        """RST_STREAM if the stream is still open on the wire."""
        stream.gone = True
        if self.conn is not None:
            self.conn.reset_stream(stream.stream_id, code)

    def _forget(self, stream: H2Stream) -> None:
        """The stream is over for us: give back the connection window of the body bytes it
        held, let go of its request (the two point at each other), and wait for the idle timeout
        once no stream is left."""
        if self.streams.pop(stream.stream_id, None) is None:
            return
        stream.ctx = None
        if stream.unacked and self.conn is not None:
            self.conn.acknowledge(stream.unacked, stream.stream_id)
            stream.unacked = 0
        if not self.streams and self.conn is not None and not self.closing:
            if self.goaway:
                self._close()
            elif not self._block:
                self._wait(self.http.limits.idle_timeout)

    def _maybe_done(self, stream: H2Stream) -> None:
        """The response went out: forget the stream; a body still coming is refused
        (RST_STREAM NO_ERROR, RFC 9113 8.1) rather than read for nothing."""
        if not stream.gone or self.streams.get(stream.stream_id) is not stream:
            return
        if not stream.complete and self.conn is not None:
            self.conn.reset_stream(stream.stream_id, NO_ERROR)
        self._forget(stream)

    def _lost(self, stream: H2Stream) -> None:
        """The client reset the stream or went away before the response ended."""
        stream.gone = True
        ctx = stream.ctx
        if ctx is None or ctx.done:
            return
        if not ctx.response_started:
            ctx.status = 499
        self.pipeline.cancel(ctx)
        self.pipeline.finished(ctx)

    def _send(self) -> None:
        conn = self.conn
        if conn is not None:
            out = conn.data_to_send()
            if out and self.transport is not None:
                self.transport.write(out)

    # -- the TLS transport as our consumer ---------------------------------------------

    def pauseProducing(self) -> None:
        """The client does not read what we send: pause the upstreams, and stop reading from
        it too (else frames that call for an answer, PING or SETTINGS, would pile answers up
        in our buffers: the flood of CVE-2019-9512)."""
        if self.write_paused or self.transport is None:
            return
        self.write_paused = True
        self.transport.pauseProducing()
        for stream in list(self.streams.values()):
            self.update_producer(stream)

    def resumeProducing(self) -> None:
        if not self.write_paused or self.transport is None:
            return
        self.write_paused = False
        if not self.closing:
            self.transport.resumeProducing()
        for stream in list(self.streams.values()):
            self.update_producer(stream)

    def stopProducing(self) -> None:
        pass


class ProtocolByALPN(Protocol):
    """The protocol of a TLS connection whose ALPN may pick h2: chosen on the first bytes
    after the handshake, then put in its place, so it gets the data directly from then on."""

    transport: Any   # the TLSMemoryBIOProtocol

    def __init__(self, factory: ALPNFactory, addr: Any) -> None:
        self.factory = factory
        self.addr = addr
        self._timer: Any = None

    def connectionMade(self) -> None:
        http = self.factory.http
        if not self.factory.resets.admits(getattr(self.addr, "host", "")):
            self.transport.abortConnection()        # reset too much lately: no new handshake
            return
        # A client that never finishes the handshake is dropped like one that never sends headers.
        self._timer = http.clock.callLater(http.limits.header_timeout, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        transport = self.transport
        chosen: Any
        if transport.negotiatedProtocol == b"h2":
            chosen = H2Server(self.factory, getattr(self.addr, "host", "") or "")
            self.factory.http.others.add(transport)     # closed with the listener's connections at stop
        else:
            chosen = self.factory.http.buildProtocol(self.addr)
        transport.wrappedProtocol = chosen
        self.transport = None
        chosen.makeConnection(transport)
        chosen.dataReceived(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.transport = None


def close_h2(transport: Any) -> None:
    """End an HTTP/2 connection (its TLS transport) at stop: GOAWAY, its streams (they end now,
    499 in the access log), then the connection. The TLS close waits for the client's
    close_notify (a client need not send it): the connection is aborted after _CLOSE_GRACE,
    and Gateway._stop aborts what is still open when requests are still in flight."""
    server = transport.wrappedProtocol
    if isinstance(server, H2Server):
        server.stop()
    else:
        transport.loseConnection()


class ALPNFactory:
    """The wrapped factory of a TLS listener with h2 in its alpn."""

    noisy = False

    def __init__(self, http: Any) -> None:
        self.http = http
        self.resets = ResetBudget(http.clock)

    def doStart(self) -> None:
        self.http.doStart()

    def doStop(self) -> None:
        self.http.doStop()

    def buildProtocol(self, addr: Any) -> ProtocolByALPN:
        return ProtocolByALPN(self, addr)
