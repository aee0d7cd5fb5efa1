"""The request pipeline: the one place that shows the path of a request.

    transport adapter (http1.py, later HTTP/2) parses a request into a RequestContext
      -> Pipeline.handle(ctx)
           request hooks, in order:  sanitize -> route -> (identify -> limit) -> transform
           each may return None (go on), a LocalResponse (answer now, stop), or a Deferred
           firing with either (only these "access" hooks may wait on I/O)
      -> terminal: Proxy.forward(ctx)    balance -> connect -> stream request/response
      -> Pipeline.respond(ctx, head)     response hooks in reverse order, synchronous
      -> Pipeline.finished(ctx)          the counters (stats.py) and the access log line

Nothing here knows which transport carried the request: adapters implement `Downstream`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from txgateway.headers import correlation_id

if TYPE_CHECKING:
    from txgateway.config import Route
    from txgateway.stats import Stats

__all__ = ["Downstream", "Filter", "LocalResponse", "Pipeline", "RequestContext", "ResponseHead", "error_response"]

_log = Logger(namespace="txgateway.pipeline")

REASONS = {
    200: b"OK", 308: b"Permanent Redirect", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden",
    404: b"Not Found", 408: b"Request Timeout", 413: b"Content Too Large", 429: b"Too Many Requests",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout",
}


class ResponseHead:
    """Status line and end-to-end headers of a response on its way to the client.

    Header names are lower case (as in HTTP/2), whatever the upstream sent. Response hooks
    replace or edit `headers`; framing headers are the transport's business.
    """

    __slots__ = ("status", "reason", "headers", "length")

    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], length: int | None) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.length = length  # body length when known, else None (streamed)


class LocalResponse:
    """An answer produced by the gateway itself (errors, short-circuits)."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


def error_response(ctx: RequestContext, status: int, code: str, message: str,
                   headers: list[tuple[bytes, bytes]] | None = None) -> LocalResponse:
    """The SPEC's JSON envelope: one shape for every error the gateway produces."""
    body = json.dumps({"error": {"code": code, "message": message, "status": status,
                                 "correlation_id": ctx.correlation_id}}).encode()
    out = [(b"content-type", b"application/json")]
    if headers:
        out.extend(headers)
    ctx.error_code = code
    return LocalResponse(status, out, body)


class RequestContext:
    """Everything one request carries through the pipeline; filters read and annotate it.

    `headers` holds the end-to-end request headers with lower-case names; the transport
    has already taken out framing and hop-by-hop headers.
    """

    __slots__ = (
        "method", "target", "path", "query", "version", "headers", "host", "scheme", "peer_ip",
        "client_ip", "content_length", "chunked", "keep_alive", "expect_continue", "start",
        "correlation_id", "route", "upstream_path", "downstream", "pending", "status", "error_code",
        "upstream", "target_url", "upstream_start", "upstream_ms", "bytes_in", "bytes_out",
        "response_started", "done", "identity", "notes", "forwarding", "rate_limit", "upgrade",
    )

    def __init__(self, method: bytes, target: bytes, path: bytes, query: bytes, version: bytes,
                 headers: list[tuple[bytes, bytes]], host: bytes | None, scheme: bytes, peer_ip: str,
                 downstream: Downstream, start: float) -> None:
        self.method = method
        self.target = target
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.host = host
        self.scheme = scheme
        self.peer_ip = peer_ip
        self.client_ip = peer_ip
        self.downstream = downstream
        self.start = start
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.expect_continue = False
        self.correlation_id = ""
        self.route: Route | None = None
        self.upstream_path = path
        self.pending: Deferred[Any] | None = None
        self.status = 0
        self.error_code: str | None = None
        self.upstream: str | None = None
        self.target_url: str | None = None
        self.upstream_start = 0.0
        self.upstream_ms: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.response_started = False
        self.done = False
        self.identity: Any = None
        self.notes: dict[str, Any] | None = None
        self.forwarding: Any = None  # the terminal's per-request state (the proxy's Exchange)
        self.rate_limit: Any = None  # the limit step's decision, for headers and the log
        self.upgrade: bytes | None = None  # b"websocket" for a WebSocket handshake (tunnel.py)

    def header(self, name: bytes) -> bytes | None:
        """The first value of a request header (name in lower case)."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


class Filter(Protocol):
    """One stage of the pipeline (Envoy filter / Kong plugin phase).

    `on_request(ctx)` is the access phase: it may wait on I/O (return a Deferred) or answer
    locally (a LocalResponse); None means go on. `on_response(ctx, head)` is the header
    phase: synchronous edits of the response head, upstream or local. A filter without one
    of the phases sets that attribute to None, and nothing is called for it.
    """

    @property
    def on_request(self) -> Callable[[RequestContext], LocalResponse | Deferred[Any] | None] | None: ...

    @property
    def on_response(self) -> Callable[[RequestContext, ResponseHead], None] | None: ...


class Downstream(Protocol):
    """What a transport adapter offers the pipeline and the proxy for one request."""

    def send_head(self, ctx: RequestContext, head: ResponseHead) -> None: ...
    def send_body(self, ctx: RequestContext, data: bytes) -> None: ...
    def flush(self, ctx: RequestContext) -> None: ...
    def finish(self, ctx: RequestContext) -> None: ...
    def abort(self, ctx: RequestContext) -> None: ...
    def read_body(self, ctx: RequestContext, sink: BodySink) -> None: ...
    def pause_body(self, ctx: RequestContext) -> None: ...
    def resume_body(self, ctx: RequestContext) -> None: ...
    def register_producer(self, ctx: RequestContext, producer: Any) -> None: ...
    def unregister_producer(self, ctx: RequestContext) -> None: ...
    tls: str | None        # "TLSv1.3 h2" on TLS connections (for the access log), else None

    @property
    def hsts(self) -> bytes | None:
        """The Strict-Transport-Security value of its TLS listener, else None."""

    def start_tunnel(self, ctx: RequestContext, upstream: Any) -> Any:
        """The upstream accepted an upgrade (101): join the two connections (a tunnel.Tunnel)."""


class BodySink(Protocol):
    """Receives a request body as it streams in (the proxy's upstream side)."""

    def body_chunk(self, data: bytes) -> None: ...
    def body_end(self) -> None: ...


class Terminal(Protocol):
    def forward(self, ctx: RequestContext) -> None: ...
    def cancel(self, ctx: RequestContext) -> None: ...


class AccessLog(Protocol):
    def record(self, ctx: RequestContext, now: float) -> None: ...


class Pipeline:
    """Runs filters in order, then the terminal; runs response hooks in reverse."""

    def __init__(self, filters: list[Filter], terminal: Terminal, access_log: AccessLog, clock: Any,
                 stats: Stats | None = None) -> None:
        self.filters = tuple(filters)
        # Filters without a phase set that hook to None: nothing is called for them.
        self._request_hooks = tuple(f.on_request for f in self.filters if f.on_request is not None)
        self._response_hooks = tuple(f.on_response for f in reversed(self.filters) if f.on_response is not None)
        self.terminal = terminal
        self.access_log = access_log
        self.clock = clock
        self.stats = stats

    def handle(self, ctx: RequestContext) -> None:
        if self.stats is not None:
            self.stats.started += 1
        self._run(ctx, 0)

    def reject(self, ctx: RequestContext, status: int, code: str, message: str) -> None:
        """An error found by the transport itself (malformed, too large, too slow), before the
        request reached the filters or while its body was being relayed."""
        if not ctx.correlation_id:
            # Not handled yet (the first filter sets the correlation id): count it started here.
            if self.stats is not None:
                self.stats.started += 1
            ctx.correlation_id = correlation_id(ctx.header(b"x-correlation-id"))
        self.respond_local(ctx, error_response(ctx, status, code, message))

    def _run(self, ctx: RequestContext, index: int) -> None:
        hooks = self._request_hooks
        count = len(hooks)
        while index < count:
            result = hooks[index](ctx)
            index += 1
            if result is None:
                continue
            if isinstance(result, Deferred):
                ctx.pending = result
                result.addCallbacks(self._resume, self._failed, callbackArgs=(ctx, index), errbackArgs=(ctx,))
                return
            self.respond_local(ctx, result)
            return
        self.terminal.forward(ctx)

    def _resume(self, result: LocalResponse | None, ctx: RequestContext, index: int) -> None:
        ctx.pending = None
        if ctx.done:
            return
        if result is None:
            self._run(ctx, index)
        else:
            self.respond_local(ctx, result)

    def _failed(self, failure: Failure, ctx: RequestContext) -> None:
        ctx.pending = None
        if failure.check(CancelledError) or ctx.done:
            return
        _log.failure("request filter failed for {method} {path}", failure,
                     method=ctx.method.decode("latin-1"), path=ctx.path.decode("latin-1"))
        self.respond_local(ctx, error_response(ctx, 500, "INTERNAL_ERROR", "the gateway failed to handle the request"))

    def respond(self, ctx: RequestContext, head: ResponseHead) -> None:
        """Run response hooks (reverse order) and hand the head to the transport."""
        for hook in self._response_hooks:
            hook(ctx, head)
        ctx.status = head.status
        ctx.response_started = True
        ctx.downstream.send_head(ctx, head)

    def respond_local(self, ctx: RequestContext, local: LocalResponse) -> None:
        if ctx.response_started or ctx.done:
            ctx.downstream.abort(ctx)
            return
        body = b"" if ctx.method == b"HEAD" else local.body
        self.respond(ctx, ResponseHead(local.status, REASONS.get(local.status, b"Unknown"), list(local.headers), len(local.body)))
        if body:
            ctx.downstream.send_body(ctx, body)
        ctx.downstream.finish(ctx)

    def cancel(self, ctx: RequestContext) -> None:
        """The client went away: stop whatever is still working for it."""
        if ctx.pending is not None:
            ctx.pending.cancel()
        else:
            self.terminal.cancel(ctx)

    def finished(self, ctx: RequestContext) -> None:
        """Called once per request by the transport when the exchange is over."""
        if ctx.done:
            return
        ctx.done = True
        now = self.clock.seconds()
        if self.stats is not None:
            self.stats.record(ctx, now)
        self.access_log.record(ctx, now)
