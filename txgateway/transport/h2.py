"""HTTP/2 on TLS listeners that list `h2` in `alpn`: twisted.web's HTTP/2, our pipeline.

After the handshake `ProtocolByALPN` looks at what ALPN chose: `http/1.1` goes to our own
HTTP/1.1 transport (http1.py), `h2` to twisted.web's HTTP/2 implementation (it needs the `h2`
package). Every HTTP/2 request is turned into a `RequestContext` whose `H2Downstream` answers
through the twisted.web request, so auth, limits, breakers, header rules, metrics and the access
log apply to HTTP/2 exactly as to HTTP/1.1; upstreams are still spoken to in HTTP/1.1.
twisted.web buffers an HTTP/2 request body before the request is handed over (bounded by
max_body_size); responses stream, with HTTP/2 flow control pausing the upstream.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from txgateway.core.hopbyhop import consumed_by_transport
from txgateway.core.pipeline import RequestContext, ResponseHead
from txgateway.transport.tls import tls_description

__all__ = ["ALPNFactory", "H2Downstream", "ProtocolByALPN", "close_h2", "h2_site"]


class H2Downstream:
    """`pipeline.Downstream` over one twisted.web HTTP/2 request."""

    __slots__ = ("request", "pipeline", "http", "gone", "tls")

    def __init__(self, request: Any, pipeline: Any, http: Any, tls: str | None) -> None:
        self.request = request
        self.pipeline = pipeline
        self.http = http                  # the listener's HTTP/1.1 factory: its settings
        self.gone = False
        self.tls = tls

    @property
    def hsts(self) -> bytes | None:
        return self.http.hsts  # type: ignore[no-any-return]

    def send_head(self, ctx: RequestContext, head: ResponseHead) -> None:
        request = self.request
        request.setResponseCode(head.status, head.reason)
        headers = request.responseHeaders
        # twisted.web's defaults (text/html, its own Server and Date) give way to the response's.
        headers.removeHeader(b"content-type")
        for name in {name for name, _ in head.headers} & {b"server", b"date"}:
            headers.removeHeader(name)
        for name, value in head.headers:
            headers.addRawHeader(name, value)
        if head.length is not None:
            request.setHeader(b"content-length", b"%d" % head.length)

    def send_body(self, ctx: RequestContext, data: bytes) -> None:
        if not self.gone:
            ctx.bytes_out += len(data)
            self.request.write(data)

    def flush(self, ctx: RequestContext) -> None:
        pass

    def finish(self, ctx: RequestContext) -> None:
        if not self.gone:
            self.request.finish()
        self.pipeline.finished(ctx)

    def abort(self, ctx: RequestContext) -> None:
        """A response that cannot be completed: reset the stream, never fake its end."""
        if not self.gone:
            self.gone = True
            self.request.channel.abortConnection()      # RST_STREAM (loseConnection would END_STREAM)
        self.pipeline.finished(ctx)

    def read_body(self, ctx: RequestContext, sink: Any) -> None:
        body = self.request.content.read()
        if body:
            ctx.bytes_in += len(body)
            sink.body_chunk(body)
        sink.body_end()

    def pause_body(self, ctx: RequestContext) -> None:
        pass            # the body is already buffered

    def resume_body(self, ctx: RequestContext) -> None:
        pass

    def register_producer(self, ctx: RequestContext, producer: Any) -> None:
        self.request.registerProducer(producer, True)

    def unregister_producer(self, ctx: RequestContext) -> None:
        if not self.gone:
            self.request.unregisterProducer()

    def start_tunnel(self, ctx: RequestContext, upstream: Any) -> Any:
        raise RuntimeError("WebSocket over HTTP/2 (RFC 8441) is not supported")

    def lost(self, reason: Any, ctx: RequestContext) -> None:
        """The client reset the stream or went away before the response ended."""
        if ctx.done:
            return
        self.gone = True
        if not ctx.response_started:
            ctx.status = 499
        self.pipeline.cancel(ctx)
        self.pipeline.finished(ctx)


class _PipelineResource(Resource):
    """Hands every HTTP/2 request to the pipeline of an HTTP/1.1 factory (shared settings)."""

    isLeaf = True

    def __init__(self, http: Any) -> None:
        super().__init__()
        self.http = http

    def render(self, request: Any) -> Any:
        http = self.http
        pipeline = http.pipeline
        target = request.uri
        path, _, query = target.partition(b"?")
        # As over HTTP/1.1: HTTP/2 has no hop-by-hop headers, but a client may still send them
        # (and twisted.web adds Host from :authority).
        headers = [(name.lower(), value) for name, values in request.requestHeaders.getAllRawHeaders()
                   for value in values if not consumed_by_transport(name.lower())]
        peer = request.getClientAddress()
        downstream = H2Downstream(request, pipeline, http, _tls_of(request))
        ctx = RequestContext(request.method, target, path, b"?" + query if query else b"", b"2", headers,
                             request.getHeader(b"host"), http.scheme, getattr(peer, "host", ""), downstream,
                             http.clock.seconds())
        request.content.seek(0, 2)
        size = request.content.tell()
        request.content.seek(0)
        ctx.content_length = size or None
        ctx.keep_alive = True
        if http.client_certs is not None:
            http.client_certs.apply(ctx, _connection_transport(request))
        request.notifyFinish().addErrback(downstream.lost, ctx)
        if getattr(request, "too_large", False) or size > http.limits.largest_body:
            pipeline.reject(ctx, 413, "PAYLOAD_TOO_LARGE", "request body is larger than max_body_size")
        else:
            pipeline.handle(ctx)
        return NOT_DONE_YET


def _connection_transport(request: Any) -> Any:
    """The TLS transport of the connection a stream belongs to (H2Stream keeps its
    H2Connection as `_conn`; if that changes, this is None)."""
    return getattr(getattr(request.channel, "_conn", None), "transport", None)


def _tls_of(request: Any) -> str | None:
    """The TLS version and ALPN of the connection (None: the access log loses the detail)."""
    transport = _connection_transport(request)
    return tls_description(transport, "h2") if transport is not None else None


class _BoundedRequest(Request):
    """twisted.web buffers a request body before the resource sees it. This one keeps nothing
    past max_body_size (declared or counted) and the request is answered 413 when the client
    ends it; a client that goes on sending more than 1 MiB beyond gets its stream reset."""

    http: Any = None               # set per site (h2_site)
    too_large = False
    _received = 0
    _reset = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.http.limits.largest_body:
            self.too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        limit = self.http.limits.largest_body
        if self.too_large or self._received > limit:
            self.too_large = True
            if self._received > limit + (1 << 20) and not self._reset:
                self._reset = True
                stream: Any = self.channel          # an H2Stream: reset just this stream, after this frame
                self.http.clock.callLater(0, stream.abortConnection)
            return
        super().handleContentChunk(data)


def h2_site(http: Any, idle: float) -> Site:
    """`idle`: how long a connection may stay silent; twisted.web counts a stream waiting for
    its upstream as silence, so this must outlast the longest upstream wait."""
    site = Site(_PipelineResource(http), timeout=idle)
    bounded: Any = type("BoundedRequest", (_BoundedRequest,), {"http": http})
    site.requestFactory = bounded
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    return site


class ProtocolByALPN(Protocol):
    """The protocol of a TLS connection whose ALPN may pick h2: chosen on the first bytes
    after the handshake, then put in its place, so it gets the data directly from then on."""

    transport: Any   # the TLSMemoryBIOProtocol

    def __init__(self, http: Any, site: Site, addr: Any) -> None:
        self.http = http
        self.site = site
        self.addr = addr
        self._timer: Any = None

    def connectionMade(self) -> None:
        # A client that never finishes the handshake is dropped like one that never sends headers.
        self._timer = self.http.clock.callLater(self.http.limits.header_timeout, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        h2 = self.transport.negotiatedProtocol == b"h2"
        chosen: Any = (self.site if h2 else self.http).buildProtocol(self.addr)
        if h2:
            self.http.others.add(self.transport)     # closed with the listener's connections at stop
        self.transport.wrappedProtocol = chosen
        chosen.makeConnection(self.transport)
        chosen.dataReceived(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()


def close_h2(transport: Any) -> None:
    """End an HTTP/2 connection (its TLS transport) at stop: GOAWAY, its streams, then the connection.

    Streams still open are cut: they end (499 in the access log) now, as twisted.web ends them
    when a client sends GOAWAY, rather than fail later writing to a closed h2 connection.
    twisted.web's H2Connection is the transport's registered producer, and a TLS transport
    with a producer does not close on `loseConnection` until the producer goes: it is
    unregistered first. The TLS close still waits for the client's close_notify (a client need
    not send it); Gateway._stop aborts what is still open when requests are still in flight."""
    from h2.exceptions import ProtocolError
    channel: Any = getattr(transport.wrappedProtocol, "_channel", None)  # twisted.web's H2Connection
    connection = getattr(channel, "conn", None)                     # its h2 state machine
    if connection is not None:
        try:
            connection.close_connection()           # GOAWAY (NO_ERROR, the last stream it took)
            transport.write(connection.data_to_send())
        except ProtocolError:                       # closed already (the client sent GOAWAY)
            pass
        channel.connectionLost(Failure(ConnectionDone("the gateway is stopping")))
    transport.unregisterProducer()
    transport.loseConnection()


class ALPNFactory:
    """The wrapped factory of a TLS listener with h2 in its alpn."""

    noisy = False

    def __init__(self, http: Any, idle: float) -> None:
        self.http = http
        self.site = h2_site(http, idle)

    def doStart(self) -> None:
        self.http.doStart()

    def doStop(self) -> None:
        self.http.doStop()

    def buildProtocol(self, addr: Any) -> ProtocolByALPN:
        return ProtocolByALPN(self.http, self.site, addr)
