"""The sampled requests' spans, recorded in compiled code as plain records.

The SDK's `start_span`/`set_attribute`/`end` cost ~470k instructions per recorded request
(interpreted contexts, span objects, attribute cleaning) for what OTLP carries: a name, ids,
two times and a few attributes. Here a span is a `SpanRecord` with exactly those fields, made
with the SDK's semantics (parent-based sampling as decided by ops/sampling.py, the trace id
of the `traceparent` the forwarding filter made, the server span's id the one it drew there,
the client spans' from `random.getrandbits`, never zero, times from `time.time_ns`, a parent's
`tracestate` kept), and an ended span is encoded at once (ops/otlp.py) and waits as bytes in a
`SpanQueue` until ops/tracing.py posts its batch.
No part of the SDK is imported here, so the module compiles (setup.py) and a config without
`tracing:` never loads this.
"""

from __future__ import annotations

from binascii import hexlify, unhexlify
from collections.abc import Callable
from random import getrandbits
from time import time_ns
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from txgateway.core.logtext import printable
from txgateway.core.pipeline import RequestContext

__all__ = ["CLIENT", "ERROR", "SERVER", "RequestSpans", "SpanQueue", "SpanRecord", "SpanRecorder"]

SERVER = 2   # OTLP's Span.SpanKind (opentelemetry-proto's trace.proto)
CLIENT = 3
ERROR = 2    # OTLP's Status.StatusCode; 0 is unset

_log = Logger(namespace="txgateway.ops.tracing")
_NO_SPAN: Final = b"0" * 16      # an all-zero span id, invalid (W3C)
# Request-line words as the same str objects each time: a lookup of the bytes instead of a
# decode, and the encoder (ops/otlp.py) finds their kept encodings by identity, hash cached.
_METHODS: Final = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE",
                                           "CONNECT")}
_TEXTS: Final[dict[bytes, str]] = {}   # _text's answers, at most _TEXTS_KEPT of values of at most _TEXT_KEPT_LENGTH
_TEXTS_KEPT: Final = 512
_TEXT_KEPT_LENGTH: Final = 128
_SCHEMES: Final = {b"http": "http", b"https": "https"}
_VERSIONS: Final = {b"1.0": "1.0", b"1.1": "1.1", b"2": "2"}


class SpanRecord:
    """One span as OTLP has it, its ids as OTLP's bytes (16 for the trace, 8 for a span).
    `parent_id` empty: a root span; `remote_parent`: its parent is the caller's (OTLP's span
    flags say so). `end` is 0 until the span ends."""

    def __init__(self, name: str, kind: int, trace_id: bytes, parent_id: bytes, remote_parent: bool,
                 trace_state: str, attributes: dict[str, Any], span_id: bytes = b"") -> None:
        self.name = name
        self.kind = kind
        self.trace_id = trace_id
        self.span_id = span_id or _new_id()
        self.parent_id = parent_id
        self.remote_parent = remote_parent
        self.trace_state = trace_state
        self.attributes = attributes
        self.start = time_ns()
        self.end = 0
        self.status = 0
        self.message: str | None = None

    def fail(self, error_type: str, message: str | None) -> None:
        self.attributes["error.type"] = error_type
        self.status = ERROR
        self.message = message


class SpanQueue:
    """Ended spans waiting for their export, encoded as they end (`encode`: ops/otlp.py's
    Encoder.span) so that no record waits, in batches of `batch`, at most `limit` of them (more
    are dropped and counted). `ready` hears the count when the first span arrives in an empty
    queue (an export is due in a while) and when `batch` are waiting (one is due now)."""

    def __init__(self, limit: int, batch: int, encode: Callable[[SpanRecord], bytes],
                 ready: Callable[[int], None]) -> None:
        self.limit = limit
        self.batch = batch
        self.encode = encode
        self.ready = ready
        self.batches: list[list[bytes]] = [[]]   # oldest first; all but the last hold `batch` spans
        self.waiting = 0                         # spans in all
        self.dropped = 0

    def add(self, record: SpanRecord) -> None:
        waiting = self.waiting
        if waiting >= self.limit:
            self.dropped += 1
            return
        record.end = time_ns()
        try:
            encoded = self.encode(record)
        except Exception:
            _log.failure("tracing: a span could not be encoded; dropped")
            self.dropped += 1
            return
        filling = self.batches[-1]
        filling.append(encoded)
        if len(filling) == self.batch:
            self.batches.append([])
        self.waiting = waiting + 1
        if waiting == 0 or waiting + 1 == self.batch:
            self.ready(waiting + 1)

    def take(self) -> list[bytes]:
        """The oldest batch's encoded spans, out of the queue."""
        batches = self.batches
        spans = batches.pop(0)
        if not batches:
            batches.append([])
        self.waiting -= len(spans)
        return spans


class RequestSpans:
    """One request's spans, kept in its state under "tracing". Filters that wait on a call of
    their own (a Redis script, a JWKS fetch) find it there and time that call with `around`."""

    def __init__(self, queue: SpanQueue, server: SpanRecord, prefix: bytes) -> None:
        self.queue = queue
        self.server = server
        self.prefix = prefix                    # "00-<32 hex trace id>-", its spans' traceparents' start
        self.client: SpanRecord | None = None   # the upstream attempt under way
        self.status_before = 0                  # ctx.upstream_status when that attempt began

    def call(self) -> RequestSpans:
        """The spans of one composed call (terminals/compose/): its attempts are children of the
        request's server span, with an attempt slot of their own (calls run side by side)."""
        return RequestSpans(self.queue, self.server, self.prefix)

    def end_call(self, ctx: RequestContext, cancelled: str | None) -> None:
        """A composed call settled (`ctx` its own context), or was `cancelled` for this reason."""
        if self.client is not None:
            self.end_attempt(ctx, False, cancelled)

    def child(self, name: str, attributes: dict[str, Any]) -> SpanRecord:
        """A client span, child of the server span."""
        server = self.server
        return SpanRecord(name, CLIENT, server.trace_id, server.span_id, False, server.trace_state, attributes)

    def around(self, d: Deferred[Any], name: str, attributes: dict[str, Any]) -> None:
        """A client span from now until `d` settles (its result untouched)."""
        span = self.child(name, dict(attributes))
        queue = self.queue

        def settled(result: Any) -> Any:
            if isinstance(result, Failure):
                span.fail(result.type.__name__, result.getErrorMessage())
            queue.add(span)
            return result

        d.addBoth(settled)

    def end_attempt(self, ctx: RequestContext, retried: bool, cancelled: str | None = None) -> None:
        """End the attempt under way: its target, its answer, and why it failed (a retry followed,
        the proxy gave up, or its composition `cancelled` it)."""
        span = self.client
        if span is None:
            return
        self.client = None
        attributes = span.attributes
        if ctx.upstream_addr:
            address, _, port = ctx.upstream_addr.rpartition(":")
            attributes["server.address"] = address
            if port.isdigit():
                attributes["server.port"] = int(port)
        status = ctx.upstream_status
        if status and (status != self.status_before or not retried):   # this attempt's own answer
            attributes["http.response.status_code"] = status
        notes = ctx.notes or {}
        failure = cancelled or (notes.get("upstream_error") if retried or ctx.error_code else None)
        if failure is not None or status >= 500:
            span.fail(str(failure or status), failure)
        self.queue.add(span)


class SpanRecorder:
    """Records the requests ops/sampling.py's gate samples: `start` opens the server span,
    `attempt` a client span per upstream attempt, `finish` ends them (the gate's Recorder)."""

    def __init__(self, queue: SpanQueue) -> None:
        self.queue = queue

    def start(self, ctx: RequestContext, continued: bool) -> None:
        """A sampled request: its server span in the trace of `ctx.traceparent` (the one the
        forwarding filter made), child of the caller's span when `continued` (the gate found
        a well-formed, sampled `traceparent` among `ctx.headers`, still the client's)."""
        parent: bytes | None = None
        state: bytes | None = None
        agent: bytes | None = None
        for name, value in ctx.headers:
            if name == b"traceparent":
                parent = value           # the last one, as the forwarding filter reads it
            elif name == b"tracestate":
                state = value
            elif name == b"user-agent" and agent is None:
                agent = value
        method = _method(ctx)
        attributes: dict[str, Any] = {
            "http.request.method": method, "url.path": _text(ctx.path),
            "url.scheme": _SCHEMES.get(ctx.scheme) or ctx.scheme.decode(),
            "network.protocol.version": _VERSIONS.get(ctx.version) or ctx.version.decode("latin-1"),
            "network.peer.address": ctx.peer_ip,
        }
        if ctx.query:
            attributes["url.query"] = _text(ctx.query[1:] if ctx.query[:1] == b"?" else ctx.query)
        if ctx.host:
            attributes["server.address"] = _text(ctx.host)
        if agent is not None:
            attributes["user_agent.original"] = _text(agent)
        trace = ctx.traceparent or b""   # "00-<32 hex trace id>-<16 hex span id>-<flags>"
        # The span id the forwarding filter drew for this request (random, from its pooled
        # entropy) is the server span's: no id of its own to draw and write out.
        own = trace[36:52]
        span_id = unhexlify(own) if own != _NO_SPAN else b""   # b"": SpanRecord draws one
        if continued and parent is not None:
            trace_state = state.decode("latin-1") if state is not None else ""
            span = SpanRecord(method, SERVER, unhexlify(trace[3:35]), unhexlify(parent.strip()[36:52]), True,
                              trace_state, attributes, span_id)
        else:
            span = SpanRecord(method, SERVER, unhexlify(trace[3:35]), b"", False, "", attributes, span_id)
        prefix = trace[:36]
        # The forwarding filter sends this: the server span is the upstream's parent (the
        # client's `tracestate` goes on as it came).
        ctx.traceparent = trace[:53] + b"01" if span_id else _traceparent(prefix, span.span_id)
        ctx.set_state("tracing", RequestSpans(self.queue, span, prefix))

    def attempt(self, ctx: RequestContext, spans: RequestSpans) -> None:
        """An upstream attempt starts: end the one before (it failed: a retry follows), open
        its client span, and send its id in the `traceparent`."""
        if spans.client is not None:
            spans.end_attempt(ctx, True)
        method = _method(ctx)
        attributes: dict[str, Any] = {"http.request.method": method,
                                      "url.full": f"{ctx.target_url}{_text(ctx.upstream_path)}",
                                      "txgateway.upstream": ctx.upstream or ""}
        if ctx.retries:
            attributes["http.request.resend_count"] = ctx.retries
        span = spans.client = spans.child(method, attributes)
        spans.status_before = ctx.upstream_status
        trace = ctx.traceparent = _traceparent(spans.prefix, span.span_id)
        headers = ctx.headers
        for i, (name, _) in enumerate(headers):
            if name == b"traceparent":
                headers[i] = (name, trace)

    def finish(self, ctx: RequestContext, spans: RequestSpans) -> None:
        if spans.client is not None:
            spans.end_attempt(ctx, False)
        span = spans.server
        attributes = span.attributes
        route = ctx.route.prefix if ctx.route is not None else None
        if route is not None:
            attributes["http.route"] = route
            span.name = f"{_method(ctx)} {route}"
        attributes["client.address"] = ctx.client_ip
        if ctx.status:
            attributes["http.response.status_code"] = ctx.status
        if ctx.status >= 500 or not ctx.status:
            span.fail(ctx.error_code or str(ctx.status or "aborted"), ctx.error_detail)
        elif ctx.error_code is not None:
            attributes["txgateway.error"] = ctx.error_code
        self.queue.add(span)


def _method(ctx: RequestContext) -> str:
    return _METHODS.get(ctx.method, "_OTHER")


def _text(value: bytes) -> str:
    """`printable(value)`, kept for the short values that recur (a host, a user agent, a
    route's paths): a lookup instead of four calls (~1.1k instructions), and the same str
    object each time, whose kept encoding ops/otlp.py then finds by identity."""
    text = _TEXTS.get(value)
    if text is None:
        text = _printable(value)
        if len(value) <= _TEXT_KEPT_LENGTH:
            if len(_TEXTS) >= _TEXTS_KEPT:
                _TEXTS.clear()
            _TEXTS[value] = text
    return text


def _printable(value: bytes) -> str:
    """`printable(value)`, without its regex for the usual value: ASCII with no control
    character and no backslash, which it would return unchanged (a third of `start`'s cost)."""
    if value.isascii():
        text = value.decode("ascii")
        if text.isprintable() and "\\" not in text:
            return text
    return printable(value)


def _traceparent(prefix: bytes, span_id: bytes) -> bytes:
    """The W3C `traceparent` naming a span (always sampled: only sampled spans are recorded)."""
    return b"".join((prefix, hexlify(span_id), b"-01"))


def _new_id() -> bytes:
    """A random span id, never 0 (the SDK's RandomIdGenerator)."""
    value = getrandbits(64)
    while not value:
        value = getrandbits(64)
    return value.to_bytes(8, "big")
