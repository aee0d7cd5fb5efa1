"""Which requests are traced, decided in compiled code before any span is made.

With `tracing:` on, the forwarding filter (filters/headers.py) asks the gate about every
request once it has made the request's `traceparent`: no scan of the headers of its own and
no random draw. A request not sampled costs that call and a comparison of bytes, its upstream
attempts and its end a state lookup each: no span record, no attribute. Kept apart from
ops/tracing.py so that it compiles (mypyc, setup.py) and imports no part of the SDK.
"""

from __future__ import annotations

from typing import Any, Final, Protocol

from txgateway.core.ids import trace_flags
from txgateway.core.pipeline import RequestContext

__all__ = ["Recorder", "TraceGate"]

_ID_SPACE: Final = 1 << 64


class Recorder(Protocol):
    """What records the sampled requests' spans (ops/spans.py's SpanRecorder); `spans` is what
    `start` put in the request's state under the gate's name."""

    def start(self, ctx: RequestContext, continued: bool) -> None: ...
    def attempt(self, ctx: RequestContext, spans: Any) -> None: ...
    def finish(self, ctx: RequestContext, spans: Any) -> None: ...


class TraceGate:
    """The forwarding filter's sampler, a finish hook, and the proxies' `tracing` (each attempt).

    Parent-based, as the SDK's default sampler: a caller's well-formed `traceparent` decides
    by its sampled flag; a trace the gateway starts is decided by its trace id as the SDK's
    TraceIdRatioBased does (sampled when the id's low 64 bits are below `ratio` * 2**64: with
    random ids, probability `ratio`)."""

    name = "tracing"
    on_request = None
    on_response_head = None
    on_response_body = None

    def __init__(self, recorder: Recorder, ratio: float) -> None:
        self.recorder = recorder
        bound = round(ratio * _ID_SPACE)
        # The bound as 16 lower-case hex digits, as a traceparent writes ids (digit by digit,
        # their byte order is their numeric order); "g" sorts after every hex digit: ratio 1, all.
        self.bound = b"%016x" % bound if bound < _ID_SPACE else b"g" * 16

    def decide(self, ctx: RequestContext, trace: bytes, incoming: bytes | None) -> bytes:
        """The `traceparent` to send upstream for a request whose forwarding made `trace` (the
        caller's trace continued, or a new one flagged not sampled) from the client's
        `incoming` one; a sampled request's is its server span's (the recorder's, which reads
        `ctx.headers` as the client sent them and `ctx.traceparent`)."""
        ctx.traceparent = trace
        if incoming is not None:
            flags = trace_flags(incoming)
            if flags is not None:
                if not flags & 1:
                    return trace
                self.recorder.start(ctx, True)
                return ctx.traceparent or trace
        if _below(trace, self.bound):
            self.recorder.start(ctx, False)
            return ctx.traceparent or trace
        return trace

    def attempt(self, ctx: RequestContext) -> None:
        """An upstream attempt starts (a proxy's, a composed call's too)."""
        spans = ctx.get_state(self.name)
        if spans is not None:
            self.recorder.attempt(ctx, spans)

    def on_finished(self, ctx: RequestContext) -> None:
        spans = ctx.get_state(self.name)
        if spans is not None:
            self.recorder.finish(ctx, spans)


def _below(trace: bytes, bound: bytes) -> bool:
    """Whether the low 64 bits of the trace id in `trace` ("00-<32 hex trace id>-...", its hex
    digits 19 to 34) are below the 16 hex digits of `bound`: compared a byte at a time, which
    makes no slice and settles at the first digit 15 times in 16."""
    for i in range(16):
        digit = trace[19 + i]
        limit = bound[i]
        if digit != limit:
            return digit < limit
    return False
