"""The terminal filter: break -> balance -> forward to a target, and stream the answer back.

`Proxy.forward` asks the upstream's circuit breaker (open: 503 at once, the upstream is not
touched), then its balancer for a target in rotation (none: 503), and runs an `Exchange`,
which ties the client side (`ctx.downstream`) to one pooled upstream connection. Bodies are
relayed chunk by chunk; each side's transport is the other's producer, so a slow reader
pauses the fast writer instead of growing memory.

Each attempt's verdict (a status in `failure_statuses`; a connect error, reset, garbage or
timeout, before or during the body; else success once the body is complete) goes to its
target's passive health; the request's final verdict
goes once to the upstream's breaker. A failed attempt is retried (`retries`) only for
idempotent methods, only on another target, only before any byte of a response exists,
only while the request body is still unread or absent, and never while the breaker is open.
So one dead target among several is ejected without opening the breaker (its requests are
retried elsewhere), while an upstream whose requests fail after their retries trips it.

A client's pace is never held against the upstream: a body of up to `buffer_request_body`
bytes (with a Content-Length) is read whole before a connection is taken (`BufferedBody`),
so slow uploaders do not fill the pool; a body must keep up `min_body_rate` after
`body_timeout` (a trickle cannot push its deadline on), and a request that found every
connection busy until its deadline gets a 503 with no verdict on the upstream.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure

from txgateway.config.schema import Limits, Upstream
from txgateway.core.logtext import printable
from txgateway.core.pipeline import RequestContext, ResponseHead, error_response
from txgateway.core.timeouts import Deadlines
from txgateway.ops.sampling import TraceGate
from txgateway.upstream.balance import Balancer, Member
from txgateway.upstream.breaker import OPEN, CircuitBreaker
from txgateway.upstream.pool import TargetPool, UpstreamConnection

if TYPE_CHECKING:
    from txgateway.core.pipeline import Pipeline
    from txgateway.upstream.health import HealthChecker

__all__ = ["Proxy", "RouteTimeouts", "UpstreamGroup"]

_log: Final = Logger(namespace="txgateway.upstream.proxy")
_IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

# Exchange phases
_CONNECTING: Final = 0
_WAITING: Final = 1
_STREAMING: Final = 2
_DONE: Final = 3


_DEFAULT_FAILURE_STATUSES: Final = frozenset({502, 503, 504})


class UpstreamGroup:
    """One upstream: its targets' pools, the balancer over them, its breaker, its checks."""

    def __init__(self, reactor: Any, clock: Any, upstream: Upstream) -> None:
        self.config = upstream
        self.pools = [TargetPool(reactor, t, upstream) for t in upstream.targets]
        self.balancer = Balancer(upstream.name, self.pools, upstream.balance, upstream.passive_health, clock)
        settings = upstream.circuit_breaker
        self.breaker = CircuitBreaker(upstream.name, settings, clock) if settings is not None else None
        self.failure_statuses = settings.failure_statuses if settings is not None else _DEFAULT_FAILURE_STATUSES
        self.health: HealthChecker | None = None
        if upstream.health_check is not None:
            from txgateway.upstream.health import HealthChecker  # twisted.web, treq: only upstreams with checks
            self.health = HealthChecker(self.balancer, upstream.health_check, reactor, clock)

    def start(self) -> None:
        if self.health is not None:
            self.health.start()

    def retire(self) -> None:
        """Dropped by a reload: checks stop, idle connections close, requests in flight finish."""
        if self.health is not None:
            self.health.stop()
        for pool in self.pools:
            pool.retire()

    def close(self) -> None:
        if self.health is not None:
            self.health.stop()
        for pool in self.pools:
            pool.close()


class _RequestBodyProducer:
    """Lets the upstream transport pause and resume reading of the client's body."""

    __slots__ = ("ctx", "paused")

    def __init__(self, ctx: RequestContext) -> None:
        self.ctx = ctx
        self.paused = False        # the upstream is not taking the body in (its fault if it lasts)

    def pauseProducing(self) -> None:
        self.paused = True
        self.ctx.downstream.pause_body(self.ctx)

    def resumeProducing(self) -> None:
        self.paused = False
        self.ctx.downstream.resume_body(self.ctx)

    def stopProducing(self) -> None:
        pass


class BufferedBody:
    """Reads a small request body whole before the request goes upstream (the `BodySink`)."""

    __slots__ = ("proxy", "ctx", "timeouts", "chunks", "received", "started", "deadline", "done")

    def __init__(self, proxy: Proxy, ctx: RequestContext, timeouts: tuple[float, float] | None) -> None:
        self.proxy = proxy
        self.ctx = ctx
        self.timeouts = timeouts     # the route's own, passed on to `forward`
        self.chunks: list[bytes] = []
        self.received = 0
        self.started = proxy.deadlines.now
        self.deadline = 0.0
        self.done = False

    def start(self) -> None:
        self.deadline = self.proxy.body_deadline(self.started, 0)
        self.proxy.deadlines.add(self)
        self.ctx.downstream.read_body(self.ctx, self)

    def body_chunk(self, data: bytes) -> None:
        if self.done:
            return
        self.chunks.append(data)
        self.received += len(data)
        self.deadline = self.proxy.body_deadline(self.started, self.received)

    def body_end(self) -> None:
        if self.done:
            return
        self.done = True
        self.proxy.deadlines.discard(self)
        ctx = self.ctx
        ctx.forwarding = None
        self.proxy.forward(ctx, self.timeouts, b"".join(self.chunks))

    def expired(self) -> None:
        self.done = True
        ctx = self.ctx
        ctx.forwarding = None
        ctx.note("upstream_error", self.proxy.body_late(self.started, self.received))
        self.proxy.pipeline.respond_local(ctx, error_response(
            ctx, 408, "REQUEST_TIMEOUT", "the request body did not arrive in time"))

    def cancel(self) -> None:
        self.done = True
        self.proxy.deadlines.discard(self)


class Exchange:
    """One request forwarded to one upstream connection (the pool's `UpstreamUser`)."""

    __slots__ = ("proxy", "ctx", "group", "member", "pool", "ticket", "judged", "settled", "tried", "conn", "phase",
                 "deadline", "body_sent", "body_read", "body_producer", "retried", "producing", "connect_timeout",
                 "timeout", "body", "body_started", "body_received")

    def __init__(self, proxy: Proxy, ctx: RequestContext, group: UpstreamGroup, member: Member, ticket: int,
                 body: bytes | None = None) -> None:
        self.proxy = proxy
        self.ctx = ctx
        self.group = group
        self.member = member
        self.pool = member.pool
        self.connect_timeout = member.pool.connect_timeout   # the upstream's, unless the route has its own
        self.timeout = member.pool.timeout
        self.ticket = ticket           # the breaker's, for the request's verdict (0: no breaker)
        self.judged = False            # this attempt's verdict is given (passive health)
        self.settled = False           # the request's verdict is given (breaker)
        # targets of earlier attempts (retries go elsewhere); made at the first retry: a list a
        # request, freed cold at 256 connections, for the few that retry (docs/performance.md, "foot")
        self.tried: list[Member] | None = None
        self.conn: UpstreamConnection | None = None
        self.phase = _CONNECTING
        self.deadline = 0.0
        self.body_sent = not ctx.has_body
        self.body_read = False         # reading of the client's body has begun: no retry after that
        self.body_producer: _RequestBodyProducer | None = None
        self.retried = False
        self.producing = False  # upstream transport registered as the client's producer
        self.body = body        # read whole beforehand (BufferedBody): sent with the head
        self.body_started = 0.0
        self.body_received = 0

    def start(self) -> None:
        ctx = self.ctx
        self.member.in_flight += 1
        self.member.requests += 1
        ctx.target_url = self.pool.target.url
        ctx.upstream_start = self.proxy.seconds()
        tracing = self.proxy.tracing
        if tracing is not None:
            tracing.attempt(ctx)
        self.phase = _CONNECTING
        self.deadline = self.proxy.deadlines.now + self.connect_timeout
        self.proxy.deadlines.add(self)
        self.pool.acquire(self)

    # -- pool callbacks ----------------------------------------------------------------

    def connected(self, conn: UpstreamConnection) -> None:
        if self.phase != _CONNECTING:
            self.pool.release(conn, True)
            return
        self.conn = conn
        ctx = self.ctx
        ctx.upstream_addr = conn.peer
        self.phase = _WAITING
        # `timeout` (until the response head) starts once the request is sent; while a body
        # streams in, the client's pace is bounded by idle_timeout instead.
        body = self.body
        has_body = ctx.has_body and body is None
        now = self.proxy.deadlines.now
        self.deadline = self.proxy.body_deadline(now, 0) if has_body else now + self.timeout
        head = self.proxy.request_head(ctx, self.pool)
        accept = ctx.get_state("websocket_accept") if ctx.upgrade is not None else b""
        if body is None:
            conn.send(self, head, ctx.method == b"HEAD", accept)
        else:
            conn.send(self, head + body, ctx.method == b"HEAD", accept)
            self.body_sent = True
        if has_body:
            self.body_read = True
            self.body_started = now
            self.body_producer = _RequestBodyProducer(ctx)
            conn.transport.registerProducer(self.body_producer, True)
            ctx.downstream.read_body(ctx, self)

    def connecting(self) -> None:
        """Its wait for a free slot is over: the connect gets the whole `connect_timeout`."""
        self.deadline = self.proxy.deadlines.now + self.connect_timeout

    def connect_failed(self, reason: Failure) -> None:
        if self.phase != _CONNECTING:
            return
        if reason.check(ConnectTimeoutError):
            self._fail_before_response(504, "GATEWAY_TIMEOUT", "the upstream did not accept the connection in time",
                                       "connect timeout")
        else:
            self._fail_before_response(502, "BAD_GATEWAY", "the upstream refused the connection",
                                       f"connect failed: {reason.getErrorMessage()}")

    # -- request body (BodySink) ---------------------------------------------------------

    def body_chunk(self, data: bytes) -> None:
        conn = self.conn
        if conn is None or self.phase == _DONE:
            return
        if self.phase == _WAITING:
            self.body_received += len(data)
            self.deadline = self.proxy.body_deadline(self.body_started, self.body_received)
        if self.ctx.chunked:
            conn.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            conn.write(data)

    def body_end(self) -> None:
        conn = self.conn
        if conn is None or self.phase == _DONE:
            return
        if self.ctx.chunked:
            conn.write(b"0\r\n\r\n")
        self.body_sent = True
        if self.phase == _WAITING:
            self.deadline = self.proxy.deadlines.now + self.timeout
        self._stop_body_producer(conn)

    def _stop_body_producer(self, conn: UpstreamConnection | None) -> None:
        if self.body_producer is not None and conn is not None and conn.open:
            conn.transport.unregisterProducer()
        self.body_producer = None

    # -- response (UpstreamUser) ---------------------------------------------------------

    def response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                      length: int | None) -> None:
        if self.phase != _WAITING:
            return
        ctx = self.ctx
        now = self.proxy.seconds()
        ctx.upstream_ms = (now - ctx.upstream_start) * 1000.0
        ctx.upstream_status = status
        if status in self.group.failure_statuses:
            self._judge(f"status {status}")
        elif status == 101:
            self._judge(None)                     # the handshake is the whole exchange
        # Otherwise the verdict waits for the end of the body: a reset mid-body is a failure.
        self.phase = _STREAMING
        self.deadline = self.proxy.deadlines.now + self.proxy.idle_timeout
        self.proxy.pipeline.respond(ctx, ResponseHead(status, reason, headers, length))

    def response_body(self, data: bytes) -> None:
        if self.phase != _STREAMING:
            return
        self.deadline = self.proxy.deadlines.now + self.proxy.idle_timeout
        ctx = self.ctx
        if ctx.chain.body is None:      # type: ignore[union-attr]  # no body hooks: straight out
            ctx.downstream.send_body(ctx, data)
        else:
            self.proxy.pipeline.body(ctx, data, False)

    def switched(self, conn: UpstreamConnection, rest: bytes) -> None:
        """The upstream accepted the WebSocket handshake: hand both connections to a tunnel."""
        if self.phase != _STREAMING:
            conn.close()
            return
        self.phase = _DONE
        self.member.in_flight -= 1
        self.proxy.deadlines.discard(self)
        ctx = self.ctx
        ctx.forwarding = None
        self.conn = None
        conn.flush_writes()         # the tunnel writes to the transport directly from here on
        tunnel = ctx.downstream.start_tunnel(ctx, conn.transport)
        conn.tunnel = tunnel
        if rest:
            tunnel.from_upstream(rest)

    def read_done(self) -> None:
        """The response spans several reads: flush the head, and from now on let a slow
        client pause the upstream (single-read responses skip the producer dance)."""
        if self.phase == _STREAMING:
            ctx = self.ctx
            ctx.downstream.flush(ctx)
            if not self.producing and self.conn is not None:
                self.producing = True
                ctx.downstream.register_producer(ctx, self.conn)

    def response_complete(self, reusable: bool) -> None:
        if self.phase != _STREAMING:
            return
        self.phase = _DONE
        self.member.in_flight -= 1
        self._judge(None)
        self.proxy.deadlines.discard(self)
        ctx = self.ctx
        ctx.forwarding = None
        producing = self.producing
        if producing:
            self.producing = False
            ctx.downstream.unregister_producer(ctx)
        conn, self.conn = self.conn, None
        if not self.body_sent:
            # The upstream answered before reading the whole body: the connection is dirty.
            reusable = False
            self._stop_body_producer(conn)
        if conn is not None:
            self.pool.release(conn, reusable, may_be_paused=producing)
        if ctx.chain.body is None:      # type: ignore[union-attr]
            ctx.downstream.finish(ctx)
        else:
            self.proxy.pipeline.body(ctx, b"", True)

    def upstream_failed(self, reason: str, response_started: bool) -> None:
        if self.phase in (_DONE, _CONNECTING):
            return
        ctx = self.ctx
        conn = self.conn
        if (not response_started and conn is not None and conn.reused and not self.retried
                and ctx.method in _IDEMPOTENT and (not ctx.has_body or self.body is not None)):
            # A pooled connection the upstream had already closed: try once on a fresh one.
            self.retried = True
            self.conn = None
            self.phase = _CONNECTING
            self.deadline = self.proxy.deadlines.now + self.connect_timeout
            self.pool.connect_new(self)
            return
        if response_started:
            self._abort(f"upstream failed mid-response: {reason}")
        else:
            self._fail_before_response(502, "BAD_GATEWAY", "the upstream failed to answer", reason)

    # -- timeouts and cancellation -------------------------------------------------------

    def expired(self) -> None:
        if self.phase == _CONNECTING:
            if self.pool.forget(self):
                # Every connection was busy the whole time: the gateway's limit, not the upstream's failure.
                self._no_verdict()
                ctx = self._failed("no connection to the upstream became free")
                self.proxy.pipeline.respond_local(ctx, error_response(
                    ctx, 503, "UPSTREAM_UNAVAILABLE", "all connections to the upstream are busy",
                    [(b"retry-after", b"1")]))
                return
            self._fail_before_response(504, "GATEWAY_TIMEOUT", "the upstream did not accept the connection in time",
                                       "connect timeout")
        elif self.phase == _WAITING and not self.body_sent and not (self.body_producer and self.body_producer.paused):
            # The client stopped sending its body, or sends it too slowly: not the upstream's failure.
            self._no_verdict()
            ctx = self._failed(self.proxy.body_late(self.body_started, self.body_received))
            self.proxy.pipeline.respond_local(ctx, error_response(
                ctx, 408, "REQUEST_TIMEOUT", "the request body did not arrive in time"))
        elif self.phase == _WAITING:
            self._fail_before_response(504, "GATEWAY_TIMEOUT", "the upstream did not answer in time",
                                       "response timeout")
        elif self.phase == _STREAMING:
            self._abort("upstream body idle timeout")

    def hand_over(self, ctx: RequestContext) -> None:
        """The client is gone and `ctx` (the cache's own, with no client) takes the rest of
        the response: same connection, same deadlines, same verdicts."""
        self.ctx.forwarding = None
        ctx.forwarding = self
        self.ctx = ctx
        if self.producing and self.conn is not None:
            self.conn.transport.resumeProducing()     # the gone client may have paused it

    def cancel(self) -> None:
        """The client is gone: drop the upstream side without answering anyone."""
        if self.phase == _DONE:
            return
        if self.phase == _CONNECTING:
            self.pool.forget(self)
        self._no_verdict()
        self._close_upstream()

    def _no_verdict(self) -> None:
        """This request says nothing about the upstream: neither passive health nor the breaker hear of it."""
        if not self.settled and self.group.breaker is not None:
            self.group.breaker.release(self.ticket)
        self.judged = self.settled = True

    # -- verdicts and retries ----------------------------------------------------------

    def _judge(self, failure: str | None, final: bool = True) -> None:
        """This attempt's verdict to its target's passive health; unless a retry follows, the
        request's verdict to the breaker (each once)."""
        if not self.judged:
            self.judged = True
            if failure is None:
                self.group.balancer.succeeded(self.member)
            else:
                self.group.balancer.failed(self.member, failure)
        breaker = self.group.breaker
        if final and not self.settled:
            self.settled = True
            if breaker is None:
                return
            if failure is None:
                breaker.record_success(self.ticket)
            else:
                breaker.record_failure(self.ticket, failure)

    def _retry(self, reason: str) -> bool:
        """Start another attempt on another target if this request may be retried."""
        ctx = self.ctx
        tried = self.tried
        if ((0 if tried is None else len(tried)) >= self.group.config.retries or self.body_read
                or ctx.method not in _IDEMPOTENT or ctx.response_started or ctx.done):
            return False
        breaker = self.group.breaker
        if breaker is not None and breaker.state == OPEN:
            return False
        if tried is None:
            tried = self.tried = []
        tried.append(self.member)
        member = self.group.balancer.pick(tried)
        if member is None:
            return False
        _log.info("retrying {method} {path} for {correlation_id} on {target} after: {reason}",
                  method=printable(ctx.method), path=printable(ctx.path),
                  correlation_id=ctx.correlation_id, target=member.url, reason=reason)
        ctx.note("upstream_error", f"retried after: {reason}")
        ctx.retries += 1
        ctx.forwarding = self
        self.member, self.pool, self.judged = member, member.pool, False
        self.retried = False
        self.start()
        return True

    def _close_upstream(self) -> None:
        if self.phase != _DONE:
            self.member.in_flight -= 1
        self.phase = _DONE
        self.ctx.forwarding = None
        self.proxy.deadlines.discard(self)
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    def _failed(self, reason: str) -> RequestContext:
        """Drop the upstream side and record why (log line and access-log detail)."""
        ctx = self.ctx
        self._close_upstream()
        ctx.note("upstream_error", reason)
        _log.warn("upstream {upstream} ({target}) failed for {correlation_id}: {reason}",
                  upstream=ctx.upstream, target=ctx.target_url, correlation_id=ctx.correlation_id, reason=reason)
        return ctx

    def _fail_before_response(self, status: int, code: str, message: str, reason: str) -> None:
        self._judge(reason, final=False)
        ctx = self._failed(reason)
        if self._retry(reason):
            return
        self._judge(reason)
        self.proxy.pipeline.respond_local(ctx, error_response(ctx, status, code, message))

    def _abort(self, reason: str) -> None:
        self._judge(reason)
        ctx = self._failed(reason)
        ctx.downstream.abort(ctx)


class Proxy:
    """The pipeline's terminal: picks a target and runs an Exchange."""

    def __init__(self, reactor: Any, clock: Any, upstreams: Mapping[str, Upstream], deadlines: Deadlines,
                 limits: Limits, keep: Mapping[str, UpstreamGroup] | None = None) -> None:
        self.clock = clock
        self.seconds: Callable[[], float] = clock.seconds   # called bound: a method call on Any is generic
        self.deadlines = deadlines
        self.idle_timeout = limits.idle_timeout
        self.buffer_body = limits.buffer_request_body
        self.body_timeout = limits.body_timeout
        self.body_rate = float(limits.min_body_rate) or 0.0
        keep = keep or {}
        self.groups = {name: keep.get(name) or UpstreamGroup(reactor, clock, u) for name, u in upstreams.items()}
        self.pipeline: Pipeline  # set by the gateway once the pipeline exists
        # With tracing: on, hears of each attempt as it starts, before its request head is made
        # (ops/tracing.py's client spans); called natively, as it is on every attempt
        self.tracing: TraceGate | None = None

    def start(self) -> None:
        for group in self.groups.values():
            group.start()

    def body_deadline(self, started: float, received: int) -> float:
        """When the rest of a request body that began at `started` and delivered `received`
        bytes so far is due: after `idle_timeout` without a byte, or when it falls behind
        `body_timeout` plus a second per `min_body_rate` bytes (bytes a trickle does not send
        buy it no time)."""
        idle = self.deadlines.now + self.idle_timeout
        rate = self.body_rate
        return min(idle, started + self.body_timeout + received / rate) if rate else idle

    def body_late(self, started: float, received: int) -> str:
        """Why a request body's deadline passed (`body_deadline`), for the access log."""
        rate = self.body_rate
        if rate and self.deadlines.now >= started + self.body_timeout + received / rate:
            return "client request body too slow"
        return "client request body idle timeout"

    def forward(self, ctx: RequestContext, timeouts: tuple[float, float] | None = None,
                body: bytes | None = None) -> None:
        """Send `ctx` upstream. `timeouts`: a route's own (connect_timeout, timeout) for this
        upstream; `body`: its body, read whole already."""
        length = ctx.content_length
        if body is None and length and length <= self.buffer_body:
            buffered = BufferedBody(self, ctx, timeouts)
            ctx.forwarding = buffered
            buffered.start()
            return
        group = self.groups[ctx.upstream]  # type: ignore[index]
        breaker = group.breaker
        ticket = 0
        if breaker is not None:
            allowed = breaker.allow()
            if allowed is None:
                ctx.note("breaker", "open")
                self.pipeline.respond_local(ctx, error_response(
                    ctx, 503, "UPSTREAM_UNAVAILABLE", "the upstream is failing; its circuit breaker is open",
                    [(b"retry-after", b"%d" % breaker.retry_after())]))
                return
            ticket = allowed
        member = group.balancer.pick()
        if member is None:
            if breaker is not None:
                breaker.release(ticket)
            ctx.note("upstream_error", "no healthy target")
            self.pipeline.respond_local(ctx, error_response(
                ctx, 503, "UPSTREAM_UNAVAILABLE", "no healthy target for this upstream",
                [(b"retry-after", b"%d" % group.balancer.retry_after())]))
            return
        exchange = Exchange(self, ctx, group, member, ticket, body)
        if timeouts is not None:
            exchange.connect_timeout, exchange.timeout = timeouts
        ctx.forwarding = exchange
        exchange.start()

    def cancel(self, ctx: RequestContext) -> None:
        exchange = ctx.forwarding
        if exchange is not None:
            ctx.forwarding = None
            exchange.cancel()

    def request_head(self, ctx: RequestContext, pool: TargetPool) -> bytes:
        """Request line and headers for the upstream, framing included."""
        if pool.preserve_host and ctx.host:
            parts = [ctx.method, b" ", ctx.upstream_path, ctx.query, b" HTTP/1.1\r\nhost: ", ctx.host, b"\r\n"]
        else:
            parts = [ctx.method, b" ", ctx.upstream_path, ctx.query, pool.line_end]    # two pieces fewer to join
        for name, value in ctx.headers:       # pieces joined once: no %-format per header
            parts.append(name)
            parts.append(b": ")
            parts.append(value)
            parts.append(b"\r\n")
        if ctx.upgrade is not None:
            parts.append(b"connection: upgrade\r\nupgrade: %s\r\n" % ctx.upgrade)
        if ctx.chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        elif ctx.content_length is not None:
            parts.append(b"content-length: %d\r\n" % ctx.content_length)
        parts.append(b"\r\n")
        return b"".join(parts)

    def close(self) -> None:
        for group in self.groups.values():
            group.close()


class RouteTimeouts:
    """The terminal of a route with its own `timeout`/`connect_timeout`: the proxy, with the
    route's values for each upstream it may use (a split route has two). Routes without them
    get the proxy itself."""

    __slots__ = ("proxy", "by_upstream")

    def __init__(self, proxy: Proxy, by_upstream: dict[str, tuple[float, float]]) -> None:
        self.proxy = proxy
        self.by_upstream = by_upstream

    def forward(self, ctx: RequestContext) -> None:
        self.proxy.forward(ctx, self.by_upstream[ctx.upstream])  # type: ignore[index]

    def cancel(self, ctx: RequestContext) -> None:
        self.proxy.cancel(ctx)
