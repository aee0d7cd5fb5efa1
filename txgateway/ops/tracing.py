"""OpenTelemetry spans for the requests the gateway serves, exported to an OTLP/HTTP collector.

One server span per request, continuing the caller's `traceparent` (parent-based sampling: a
caller's sampled flag decides; a trace the gateway starts is kept at `sample_ratio`), and a
client span per upstream attempt, so retries show; a composed route's calls (terminals/compose/)
are client spans of the same server span, one per attempt of each call. The `traceparent` sent upstream carries the
attempt's own span id, and `ctx.traceparent` (metrics' exemplars) its trace id.

Ended spans go to the SDK's BatchSpanProcessor, which exports from its own thread: the reactor
only appends to a queue, so a slow or absent collector costs requests nothing. Spans a
collector did not take are counted (`dropped`) for /metrics. Imported only when the config
has `tracing:` (the SDK is several MiB of code a gateway without it never needs).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import Span, SpanKind, StatusCode, Tracer, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from txgateway import __version__
from txgateway.core.logtext import printable
from txgateway.ops.sampling import TraceGate

if TYPE_CHECKING:
    from txgateway.core.pipeline import RequestContext
    from txgateway.ops.tracingconfig import TracingConfig

__all__ = ["Tracing"]

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})
_EXPORT_TIMEOUT = 10.0   # seconds one export may take (the batch thread's, never the reactor's)
_SCHEDULE_DELAY = 5.0    # seconds between exports (sooner when 512 spans are queued)
_STOP_WAIT = 3.0         # seconds a stopping gateway waits for the last export


class _CountingExporter(SpanExporter):
    """The OTLP exporter, counting the spans each batch delivered or lost (for /metrics)."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self.exported = 0
        self.dropped = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.exported += len(spans)
        else:
            self.dropped += len(spans)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def _method(ctx: RequestContext) -> str:
    method = ctx.method.decode("latin-1")
    return method if method in _METHODS else "_OTHER"


class RequestSpans:
    """One request's spans, kept in its state under "tracing". Filters that wait on a call of
    their own (a Redis script, a JWKS fetch) find it there and time that call with `around`."""

    __slots__ = ("tracer", "server", "client", "status_before")

    def __init__(self, tracer: Tracer, server: Span) -> None:
        self.tracer = tracer
        self.server = server
        self.client: Span | None = None   # the upstream attempt under way
        self.status_before = 0             # ctx.upstream_status when that attempt began

    def call(self) -> RequestSpans:
        """The spans of one composed call (terminals/compose/): its attempts are children of the
        request's server span, with an attempt slot of their own (calls run side by side)."""
        return RequestSpans(self.tracer, self.server)

    def end_call(self, ctx: RequestContext, cancelled: str | None) -> None:
        """A composed call settled (`ctx` its own context), or was `cancelled` for this reason."""
        if self.client is not None:
            _end_attempt(ctx, self, retried=False, cancelled=cancelled)

    def child(self, name: str, kind: SpanKind, attributes: dict[str, Any] | None = None) -> Span:
        return self.tracer.start_span(name, context=set_span_in_context(self.server), kind=kind, attributes=attributes)

    def around(self, d: Deferred[Any], name: str, attributes: dict[str, Any]) -> None:
        """A client span, child of the server span, from now until `d` settles (its result untouched)."""
        span = self.child(name, SpanKind.CLIENT, attributes)

        def settled(result: Any) -> Any:
            if isinstance(result, Failure):
                span.set_attribute("error.type", result.type.__name__)
                span.set_status(StatusCode.ERROR, result.getErrorMessage())
            span.end()
            return result

        d.addBoth(settled)


class Tracing:
    """The tracer: records the requests its gate (ops/sampling.py) samples. `start` opens the
    server span, `attempt` a client span per upstream attempt, `finish` ends them."""

    def __init__(self, config: TracingConfig) -> None:
        self.exporter = _CountingExporter(OTLPSpanExporter(endpoint=config.otlp_endpoint, headers=dict(config.headers),
                                                           timeout=_EXPORT_TIMEOUT))
        self.processor = BatchSpanProcessor(self.exporter, schedule_delay_millis=_SCHEDULE_DELAY * 1000.0)
        # The decision is the gate's; the SDK records what reaches it (its sampler agrees).
        # Not shut down at exit: the gateway stops it (`stop`) within its drain, off the reactor thread.
        self.provider = TracerProvider(sampler=ParentBased(ALWAYS_ON),
                                       resource=Resource.create({"service.name": config.service_name}),
                                       shutdown_on_exit=False)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("txgateway", __version__)
        self.propagator = TraceContextTextMapPropagator()
        # The edge's filter, finish hook and proxies' attempt hook (service/requestpath.py)
        self.gate = TraceGate(self, config.sample_ratio)

    # -- the sampled requests ------------------------------------------------------------

    def start(self, ctx: RequestContext, continued: bool) -> None:
        """A sampled request: its server span, child of the caller's span when `continued`."""
        carrier = {}
        others = []
        for name, value in ctx.headers:
            if name == b"traceparent" or name == b"tracestate":
                carrier[name.decode()] = value.decode("latin-1")
            else:
                others.append((name, value))
        parent = self.propagator.extract(carrier) if continued else None
        method = _method(ctx)
        span = self.tracer.start_span(method, context=parent, kind=SpanKind.SERVER)
        if span.is_recording():
            span.set_attributes({
                "http.request.method": method, "url.path": printable(ctx.path), "url.scheme": ctx.scheme.decode(),
                "network.protocol.version": ctx.version.decode("latin-1"),
                "network.peer.address": ctx.peer_ip,
            })
            if ctx.query:
                span.set_attribute("url.query", printable(ctx.query[1:] if ctx.query[:1] == b"?" else ctx.query))
            if ctx.host:
                span.set_attribute("server.address", printable(ctx.host))
            agent = ctx.header(b"user-agent")
            if agent is not None:
                span.set_attribute("user_agent.original", printable(agent))
        # The forwarding filter continues this trace: the server span is the upstream's parent.
        others.append((b"traceparent", _traceparent(span)))
        if "tracestate" in carrier:
            others.append((b"tracestate", carrier["tracestate"].encode("latin-1")))
        ctx.headers = others
        ctx.set_state(self.gate.name, RequestSpans(self.tracer, span))

    def attempt(self, ctx: RequestContext, spans: RequestSpans) -> None:
        """An upstream attempt starts: end the one before (it failed: a retry follows), open
        its client span, and send its id in the `traceparent`."""
        if spans.client is not None:
            _end_attempt(ctx, spans, retried=True)
        method = _method(ctx)
        span = spans.child(method, SpanKind.CLIENT)
        if span.is_recording():
            span.set_attributes({"http.request.method": method, "url.full": f"{ctx.target_url}{printable(ctx.upstream_path)}",
                                 "txgateway.upstream": ctx.upstream or ""})
            if ctx.retries:
                span.set_attribute("http.request.resend_count", ctx.retries)
        spans.client = span
        spans.status_before = ctx.upstream_status
        trace = ctx.traceparent = _traceparent(span)
        headers = ctx.headers
        for i, (name, _) in enumerate(headers):
            if name == b"traceparent":
                headers[i] = (name, trace)

    def finish(self, ctx: RequestContext, spans: RequestSpans) -> None:
        if spans.client is not None:
            _end_attempt(ctx, spans, retried=False)
        span = spans.server
        if span.is_recording():
            route = ctx.route.prefix if ctx.route is not None else None
            if route is not None:
                span.set_attribute("http.route", route)
                span.update_name(f"{_method(ctx)} {route}")
            span.set_attribute("client.address", ctx.client_ip)
            if ctx.status:
                span.set_attribute("http.response.status_code", ctx.status)
            if ctx.status >= 500 or not ctx.status:
                span.set_attribute("error.type", ctx.error_code or str(ctx.status or "aborted"))
                span.set_status(StatusCode.ERROR, ctx.error_detail)
            elif ctx.error_code is not None:
                span.set_attribute("txgateway.error", ctx.error_code)
        span.end()

    # -- lifecycle and metrics -----------------------------------------------------------

    def force_flush(self) -> bool:
        """Export what is queued now (blocks: tests, and the batch thread's own work)."""
        return self.processor.force_flush()

    def stop(self, reactor: Any) -> Deferred[None]:
        """Export what is left from a thread of its own, waited for at most `_STOP_WAIT` seconds:
        a collector that is down must not hold up the gateway's exit (the thread is a daemon)."""
        done: Deferred[None] = Deferred()

        def release() -> None:
            if not done.called:
                if timer.active():
                    timer.cancel()
                done.callback(None)

        def shutdown() -> None:
            try:
                self.provider.shutdown()
            finally:
                reactor.callFromThread(release)

        timer = reactor.callLater(_STOP_WAIT, release)
        threading.Thread(target=shutdown, name="txgateway-tracing-stop", daemon=True).start()
        return done

    @property
    def counts(self) -> list[int]:
        """[spans exported, spans dropped], for /metrics."""
        return [self.exporter.exported, self.exporter.dropped]


def _traceparent(span: Span) -> bytes:
    context = span.get_span_context()
    return b"00-%032x-%016x-%02x" % (context.trace_id, context.span_id, context.trace_flags)


def _end_attempt(ctx: RequestContext, spans: RequestSpans, retried: bool, cancelled: str | None = None) -> None:
    """End the attempt under way: its target, its answer, and why it failed (a retry followed,
    the proxy gave up, or its composition `cancelled` it)."""
    span = spans.client
    spans.client = None
    if span is not None and span.is_recording():
        if ctx.upstream_addr:
            address, _, port = ctx.upstream_addr.rpartition(":")
            span.set_attribute("server.address", address)
            if port.isdigit():
                span.set_attribute("server.port", int(port))
        status = ctx.upstream_status
        if status and (status != spans.status_before or not retried):   # this attempt's own answer
            span.set_attribute("http.response.status_code", status)
        notes = ctx.notes or {}
        failure = cancelled or (notes.get("upstream_error") if retried or ctx.error_code else None)
        if failure is not None or status >= 500:
            span.set_attribute("error.type", str(failure or status))
            span.set_status(StatusCode.ERROR, failure)
    if span is not None:
        span.end()
