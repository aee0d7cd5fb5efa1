"""The request pipeline: the one place that shows the path of a request.

    a transport (transport/http1.py, transport/h2.py) parses a request into a RequestContext
      -> Pipeline.handle(ctx)
           the edge chain's request hooks: sanitise -> route (picks the route's chain)
           the route's chain's request hooks, in order: (cors, identify, limit, ...) -> transform
           each may return None (go on), a LocalResponse (answer now, stop), or a Deferred
           firing with either (only these request hooks may wait on I/O)
      -> the route's terminal: the proxy (breaker -> balance -> stream), or a local answer
      -> Pipeline.respond(ctx, head)   response-head hooks in reverse order, synchronous
      -> Pipeline.body(ctx, chunk)     response-body hooks in reverse order, streaming
      -> Pipeline.finished(ctx)        finish hooks, once per request (counters, access log)

Every phase runs its hooks under one guard (`_contain`): a filter that raises is logged with
its name and route, the client gets a 500 envelope (or a cut connection once the response has
started), the upstream gets no verdict from it, and the connection's next request is served.
Nothing here knows which transport carried the request: transports implement `Downstream`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from txgateway.core.ids import correlation_id
from txgateway.core.logtext import printable

if TYPE_CHECKING:
    from txgateway.core.route import Route

__all__ = [
    "Chain", "Downstream", "Filter", "LocalResponse", "Pipeline", "PreparedFields", "RequestContext", "ResponseHead",
    "Switch", "Terminal", "error_response",
]

_log: Final = Logger(namespace="txgateway.core.pipeline")
REASONS: Final = {
    200: b"OK", 201: b"Created", 202: b"Accepted", 204: b"No Content", 301: b"Moved Permanently", 302: b"Found",
    303: b"See Other", 304: b"Not Modified", 307: b"Temporary Redirect", 308: b"Permanent Redirect",
    400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed",
    408: b"Request Timeout", 410: b"Gone", 413: b"Content Too Large", 429: b"Too Many Requests",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout",
}


class PreparedFields:
    """Response fields made once and sent as they are after `ResponseHead.headers`: a filter's
    own fields that no later head hook edits (the cache's Cache-Status and X-Cache on a miss,
    when the route's header rules do not name them; a hit's stored fields). Each of them in
    `headers` would cost a pass of every later hook and of the transport; these cost one piece
    of the head. `wire`: the pairs as HTTP/1.1 writes them, when the caller has them already."""

    __slots__ = ("pairs", "wire")

    def __init__(self, pairs: tuple[tuple[bytes, bytes], ...], wire: bytes | None = None) -> None:
        self.pairs = pairs            # lower-case names, for HTTP/2
        # as HTTP/1.1 writes them
        self.wire = wire if wire is not None else b"".join(b"%s: %s\r\n" % pair for pair in pairs)


class ResponseHead:
    """Status line and end-to-end headers of a response on its way to the client.

    Header names are lower case (as in HTTP/2), whatever the upstream sent. Response-head
    hooks replace or edit `headers`; framing headers are the transport's business. A body
    hook that changes the body's length sets `length` to None (the transport then streams it).
    A head hook whose body hook holds the whole body and passes it on at its end (transform:)
    puts the head in `ctx.held_head`: it then leaves with the first bytes the body hooks pass
    on, with a `Content-Length` when those are the whole body (no chunked framing).
    `prepared`: fields the transport sends after `headers` (PreparedFields), None mostly.
    """

    __slots__ = ("status", "reason", "headers", "length", "prepared")

    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], length: int | None) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.length = length  # body length when known, else None (streamed)
        self.prepared: PreparedFields | None = None


class LocalResponse:
    """An answer produced by the gateway itself (errors, short-circuits, local routes).
    `prepared`: fields sent after `headers`, which the head hooks do not see (a cache hit's
    stored fields, when its route's head hooks would leave them as they are)."""

    __slots__ = ("status", "headers", "body", "prepared")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
                 prepared: PreparedFields | None = None) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.prepared = prepared


def error_response(ctx: RequestContext, status: int, code: str, message: str,
                   headers: list[tuple[bytes, bytes]] | None = None) -> LocalResponse:
    """The JSON error envelope: one shape for every error the gateway produces."""
    body = json.dumps({"error": {"code": code, "message": message, "status": status,
                                 "correlation_id": ctx.correlation_id}}).encode()
    out = [(b"content-type", b"application/json")]
    if headers:
        out.extend(headers)
    ctx.error_code = code
    ctx.error_detail = message
    return LocalResponse(status, out, body)


class RequestContext:
    """Everything one request carries through the pipeline; filters read and annotate it.

    `headers` holds the end-to-end request headers with lower-case names; the transport
    has already taken out framing and hop-by-hop headers. A filter keeps its own per-request
    state under its name (`set_state`, like Kong's `kong.ctx.plugin`) and adds access-log fields
    with `note` (never replacing another filter's).
    """

    __slots__ = (
        "method", "target", "path", "query", "version", "headers", "host", "scheme", "peer_ip",
        "client_ip", "content_length", "chunked", "keep_alive", "expect_continue", "start",
        "correlation_id", "route", "upstream_path", "downstream", "pending", "status", "error_code",
        "upstream", "target_url", "upstream_start", "upstream_ms", "bytes_in", "bytes_out",
        "response_started", "done", "identity", "rate_limit", "notes", "log_field", "log_value", "forwarding", "state_name", "state_first", "state", "upgrade",
        "chain", "end",
        "error_detail", "upstream_status", "upstream_addr", "retries", "traceparent", "held_head",
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
        self.end = 0.0                 # set when the request is finished
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.expect_continue = False
        self.correlation_id = ""
        self.route: Route | None = None
        self.chain: Chain | None = None   # the chain the request runs on (set by Pipeline.handle)
        self.upstream_path = path
        self.pending: Deferred[Any] | None = None
        self.status = 0
        self.error_code: str | None = None
        self.error_detail: str | None = None   # the message of the gateway's own error answer
        self.upstream: str | None = None
        self.target_url: str | None = None
        self.upstream_start = 0.0
        self.upstream_ms: float | None = None
        self.upstream_status = 0               # the upstream's status, once its head arrived
        self.upstream_addr: str | None = None  # "ip:port" of the upstream connection last used
        self.retries = 0                       # attempts after the first (upstream/proxy.py)
        self.traceparent: bytes | None = None  # the one sent upstream: metrics' exemplars name its trace
        self.bytes_in = 0
        self.bytes_out = 0
        self.response_started = False
        self.done = False
        self.identity: Any = None
        # The limit step's outcome (allowed, rejected, local:...): the access log's `rate_limit`
        # field and stats' per-route counts read it. A slot, not a note: a limited route's
        # every request would otherwise make a notes dict.
        self.rate_limit: str | None = None
        self.notes: dict[str, Any] | None = None   # access-log fields added by filters (`note`)
        # A field for the log alone (`log_note`), when it came before any note: no dict for it.
        self.log_field = ""
        self.log_value: Any = None
        # Per-filter state, by filter name: the first filter's in two slots (most requests have
        # one stateful filter at most: no dict to make, search and free), the others' in `state`.
        self.state_name = ""
        self.state_first: Any = None
        self.state: dict[str, Any] | None = None
        self.forwarding: Any = None  # the terminal's per-request state (the proxy's Exchange)
        self.upgrade: bytes | None = None  # b"websocket" for a WebSocket handshake (transport/tunnel.py)
        self.held_head: ResponseHead | None = None   # a head waiting for its body (ResponseHead)

    def header(self, name: bytes) -> bytes | None:
        """The first value of a request header (name in lower case)."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def note(self, field: str, value: Any) -> None:
        """Add an access-log field (`breaker`, `upstream_error`, a filter's own)."""
        self.notes = _put(self.notes, field, value)

    def log_note(self, field: str, value: Any) -> None:
        """An access-log field that only the log reads (the cache's verdict, on every request
        of a cached route): the first note of a request goes in two slots, not a dict. The
        log writes it before `notes`, the order `note` keeps."""
        if field == self.log_field:
            self.log_value = value
        elif self.notes is None and not self.log_field:
            self.log_field, self.log_value = field, value
        else:
            self.note(field, value)

    def get_state(self, name: str) -> Any:
        if name == self.state_name:
            return self.state_first
        state = self.state
        return None if state is None else state.get(name)

    def set_state(self, name: str, value: Any) -> None:
        if name == self.state_name or not self.state_name:
            self.state_name, self.state_first = name, value
        else:
            self.state = _put(self.state, name, value)


def _kept(ctx: RequestContext) -> bool:
    """Whether a filter's state takes over the response of a request whose client left."""
    if not ctx.state_name:
        return False
    for state in (ctx.state_first, *(ctx.state or {}).values()):
        keep = getattr(state, "keep", None)
        if keep is not None and keep(ctx):
            return True
    return False


def _put(mapping: dict[str, Any] | None, key: str, value: Any) -> dict[str, Any]:
    """`mapping` with `key` set; a new one if there was none (most requests need none)."""
    if mapping is None:
        return {key: value}
    mapping[key] = value
    return mapping


RequestHook = Callable[[RequestContext], "LocalResponse | Deferred[Any] | None"]
HeadHook = Callable[[RequestContext, ResponseHead], None]
BodyHook = Callable[[RequestContext, bytes, bool], bytes]
FinishedHook = Callable[[RequestContext], None]


class Filter(Protocol):
    """One stage of the pipeline (an Envoy filter, a Kong plugin's phases).

    Every phase is optional: a filter that lacks one sets that attribute to None and costs
    nothing there.
    - `on_request(ctx)`: may answer locally (a LocalResponse), wait on I/O (a Deferred firing
      with None or a LocalResponse), or go on (None). Runs in chain order.
    - `on_response_head(ctx, head)`: synchronous edits of the head, upstream or local answer.
      Runs in reverse order.
    - `on_response_body(ctx, chunk, end)`: each body chunk (end False), then once with end
      True; returns the bytes to pass on: the chunk to observe it, b"" to hold it, more at the
      end to release what it held. Runs in reverse order. A filter that holds bounds what it
      holds (the upstream is paused only by what reaches the client).
    - `on_finished(ctx)`: once per request, whatever happened (ctx.end is set).
    """

    name: str

    @property
    def on_request(self) -> RequestHook | None: ...

    @property
    def on_response_head(self) -> HeadHook | None: ...

    @property
    def on_response_body(self) -> BodyHook | None: ...

    @property
    def on_finished(self) -> FinishedHook | None: ...


class Downstream(Protocol):
    """What a transport offers the pipeline and the terminals for one request."""

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
    """What answers a request once its chain let it through: the proxy (which answers through
    `Pipeline.respond`/`body` as the upstream does), or a local answer (returned at once)."""

    def forward(self, ctx: RequestContext) -> LocalResponse | None: ...
    def cancel(self, ctx: RequestContext) -> None: ...


def _phase(filters: Sequence[Filter], hook: str) -> tuple[tuple[Any, ...], tuple[str, ...]]:
    """The hooks of one phase and, in the same order, the names of their filters."""
    pairs = [(getattr(f, hook), f.name) for f in filters if getattr(f, hook, None) is not None]
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


class Chain:
    """The filters one route's requests run through, built once per route at load.

    `request` filters run their request hooks in order; `response` filters (the edge's and
    the route's) run their head and body hooks in reverse and their finish hooks in order.
    """

    __slots__ = ("name", "request_filters", "response_filters", "request", "request_names", "head", "head_names",
                 "body", "body_names", "finished", "finished_names", "terminal")

    def __init__(self, name: str, request: Sequence[Filter], response: Sequence[Filter], terminal: Terminal | None) -> None:
        self.name = name               # the route's prefix, for logs
        self.request_filters = tuple(request)
        self.response_filters = tuple(response)
        self.request, self.request_names = _phase(request, "on_request")
        reverse = list(reversed(response))
        self.head, self.head_names = _phase(reverse, "on_response_head")
        body, self.body_names = _phase(reverse, "on_response_body")
        self.body: tuple[BodyHook, ...] | None = body or None   # None: chunks go straight out
        self.finished, self.finished_names = _phase(response, "on_finished")
        self.terminal = terminal


class Switch:
    """Where listeners find the current request path: a reload assigns `pipeline` once."""

    __slots__ = ("pipeline",)

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline


class Pipeline:
    """One frozen request path: the edge chain, a chain per route, the route table, the
    terminals' shared parts (the proxy and its upstream groups), the limits transports apply.

    Built from a config as a whole (service/requestpath.py) and swapped as a whole on reload (one
    assignment to `Switch.pipeline`); a request keeps the chain it started on (`ctx.chain`)."""

    def __init__(self, edge: Chain, chains: Sequence[Chain], table: Any, clock: Any,
                 stats: Any = None, limits: Any = None, terminals: dict[str, Any] | None = None) -> None:
        self.edge = edge
        self.chains = tuple(chains)            # by route index
        self.table = table                     # the route table (filters/routing.py's RouteTable), or None
        self.clock = clock
        self._seconds: Callable[[], float] = clock.seconds   # called bound: a method call on Any is generic
        self.stats = stats                     # counts requests started (finish hooks count the end)
        self.limits = limits                   # config/schema.py's Limits: body and header sizes, timeouts
        self.terminals = terminals or {}       # by terminal name: what its routes share (the proxy)

    # -- request phase -------------------------------------------------------------------

    def handle(self, ctx: RequestContext) -> None:
        if self.stats is not None:
            self.stats.started += 1
        ctx.chain = self.edge
        self._run(ctx, self.edge, 0)

    def reject(self, ctx: RequestContext, status: int, code: str, message: str) -> None:
        """An error found by the transport itself (malformed, too large, too slow), before the
        request reached the filters or while its body was being relayed."""
        if not ctx.correlation_id:
            # Not handled yet (the first filter sets the correlation id): count it started here.
            if self.stats is not None:
                self.stats.started += 1
            ctx.correlation_id = correlation_id(ctx.header(b"x-correlation-id"))
        if ctx.chain is None:
            ctx.chain = self.edge
        self.respond_local(ctx, error_response(ctx, status, code, message))

    def _run(self, ctx: RequestContext, chain: Chain, index: int) -> None:
        hooks = chain.request
        i = index
        try:
            while i < len(hooks):
                result = hooks[i](ctx)
                i += 1
                if result is None:
                    if ctx.chain is not chain:     # routing picked the route: go on with its chain
                        chain = ctx.chain  # type: ignore[assignment]
                        hooks = chain.request
                        i = 0
                    continue
                # LocalResponse's check is a native type test; Deferred's goes through ABCMeta's
                # __instancecheck__ (~1.6k a local answer, e.g. each cache hit).
                if isinstance(result, LocalResponse):
                    self.respond_local(ctx, result)
                    return
                ctx.pending = result
                result.addCallbacks(self._resume, self._failed, callbackArgs=(ctx, chain, i),
                                    errbackArgs=(ctx, chain, i - 1))
                return
        except Exception:
            self._contain(ctx, chain.request_names[i], "request")
            return
        terminal = chain.terminal
        try:
            answer = terminal.forward(ctx)  # type: ignore[union-attr]
        except Exception:
            self._contain(ctx, "terminal " + type(terminal).__name__, "request")
            return
        if answer is not None:
            self.respond_local(ctx, answer)

    def _resume(self, result: LocalResponse | None, ctx: RequestContext, chain: Chain, index: int) -> None:
        ctx.pending = None
        if ctx.done:
            return
        if result is None:
            self._run(ctx, chain, index)
        else:
            self.respond_local(ctx, result)

    def _failed(self, failure: Failure, ctx: RequestContext, chain: Chain, index: int) -> None:
        ctx.pending = None
        if failure.check(CancelledError) or ctx.done:
            return
        self._contain(ctx, chain.request_names[index], "request", failure)

    # -- the guard -----------------------------------------------------------------------

    def _contain(self, ctx: RequestContext, name: str, phase: str, failure: Failure | None = None) -> None:
        """A filter (or terminal) raised: log it by name, leave the upstream out of it, and
        answer the client a 500 if nothing was sent yet, else cut its connection."""
        route = ctx.route.prefix if ctx.route is not None else None
        _log.failure("filter {filter} failed in its {phase} phase on route {route} for {method} {path} "
                     "({correlation_id})", failure, filter=name, phase=phase, route=route,
                     method=printable(ctx.method), path=printable(ctx.path), correlation_id=ctx.correlation_id)
        ctx.note("filter_error", f"{name} ({phase})")
        chain = ctx.chain
        if chain is not None and chain.terminal is not None and ctx.forwarding is not None:
            chain.terminal.cancel(ctx)         # no verdict on the upstream: it did nothing wrong
        if ctx.response_started or ctx.done:
            ctx.downstream.abort(ctx)
            return
        local = error_response(ctx, 500, "INTERNAL", "the gateway failed to handle the request")
        self._send_local(ctx, local, hooks=phase not in ("response head", "response body"))

    # -- response phases -----------------------------------------------------------------

    def respond(self, ctx: RequestContext, head: ResponseHead) -> None:
        """Run the response-head hooks (reverse order) and hand the head to the transport."""
        chain = ctx.chain
        hooks = chain.head  # type: ignore[union-attr]
        i = 0
        try:
            while i < len(hooks):
                hooks[i](ctx, head)
                i += 1
        except Exception:
            self._contain(ctx, chain.head_names[i], "response head")  # type: ignore[union-attr]
            return
        ctx.status = head.status
        ctx.response_started = True
        if ctx.held_head is None:
            ctx.downstream.send_head(ctx, head)

    def body(self, ctx: RequestContext, data: bytes, end: bool) -> None:
        """A chunk of the response body (end: the last, possibly empty) through the body
        hooks; what they pass on goes to the client. The transport's finish follows `end`."""
        chain = ctx.chain
        hooks = chain.body  # type: ignore[union-attr]
        if hooks is not None:
            i = 0
            try:
                while i < len(hooks):
                    data = hooks[i](ctx, data, end)
                    i += 1
            except Exception:
                self._contain(ctx, chain.body_names[i], "response body")  # type: ignore[union-attr]
                return
            held = ctx.held_head
            if held is not None and (data or end):
                ctx.held_head = None
                if end:
                    held.length = len(data)
                ctx.downstream.send_head(ctx, held)
        if data:
            ctx.downstream.send_body(ctx, data)
        if end:
            ctx.downstream.finish(ctx)

    def respond_local(self, ctx: RequestContext, local: LocalResponse) -> None:
        if ctx.response_started or ctx.done:
            ctx.downstream.abort(ctx)
            return
        self._send_local(ctx, local, hooks=True)

    def _send_local(self, ctx: RequestContext, local: LocalResponse, hooks: bool) -> None:
        """A local answer through the response phases; without `hooks` (a response hook
        failed) the envelope goes out as it is."""
        body = b"" if ctx.method == b"HEAD" else local.body
        head = ResponseHead(local.status, REASONS.get(local.status, b"Unknown"), list(local.headers), len(local.body))
        head.prepared = local.prepared
        if not hooks:
            head.headers.append((b"x-correlation-id", ctx.correlation_id.encode()))
            ctx.status = head.status
            ctx.response_started = True
            ctx.downstream.send_head(ctx, head)
            if body:
                ctx.downstream.send_body(ctx, body)
            ctx.downstream.finish(ctx)
            return
        self.respond(ctx, head)
        if ctx.response_started and not ctx.done:
            self.body(ctx, body, True)

    # -- end -----------------------------------------------------------------------------

    def cancel(self, ctx: RequestContext) -> None:
        """The client went away: stop whatever is still working for it, unless a filter's
        state for the request takes the rest of the response over: one with `keep(ctx)` that
        returns True (the response cache finishing an entry other clients wait for)."""
        if ctx.pending is not None:
            ctx.pending.cancel()
        elif ctx.chain is not None and ctx.chain.terminal is not None and not _kept(ctx):
            ctx.chain.terminal.cancel(ctx)

    def finished(self, ctx: RequestContext) -> None:
        """Called once per request by the transport when the exchange is over: the finish
        hooks, each run even if an earlier one raised."""
        if ctx.done:
            return
        ctx.done = True
        ctx.end = self._seconds()
        chain = ctx.chain or self.edge
        hooks = chain.finished
        i = 0
        while i < len(hooks):
            try:
                while i < len(hooks):
                    hooks[i](ctx)
                    i += 1
            except Exception:
                _log.failure("filter {filter} failed in its finish phase on route {route} ({correlation_id})",
                             filter=chain.finished_names[i], route=chain.name, correlation_id=ctx.correlation_id)
                i += 1
