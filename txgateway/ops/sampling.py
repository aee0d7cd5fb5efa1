"""Which requests are traced, decided in compiled code before any span is made.

With `tracing:` on, every request passes here; only the sampled ones reach the recorder
(ops/spans.py). A request not sampled costs a scan of its headers and a random draw, its
upstream attempts and its end a state lookup each: no span record, no attribute. Kept apart
from ops/tracing.py so that it compiles (mypyc, setup.py) and imports no part of the SDK.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Protocol

from txgateway.core.ids import trace_flags
from txgateway.core.pipeline import RequestContext

__all__ = ["Recorder", "TraceGate"]


class Recorder(Protocol):
    """What records the sampled requests' spans (ops/spans.py's SpanRecorder); `spans` is what
    `start` put in the request's state under the gate's name."""

    def start(self, ctx: RequestContext, continued: bool) -> None: ...
    def attempt(self, ctx: RequestContext, spans: Any) -> None: ...
    def finish(self, ctx: RequestContext, spans: Any) -> None: ...


class TraceGate:
    """The edge's first filter and a finish hook, and the proxies' `on_attempt`.

    Parent-based: a caller's well-formed `traceparent` decides by its sampled flag; a trace the
    gateway starts is sampled with probability `ratio`. The forwarding filter then continues
    whatever trace the recorder set, or starts one marked not sampled (ops/tracing.py)."""

    name = "tracing"
    on_response_head = None
    on_response_body = None

    def __init__(self, recorder: Recorder, ratio: float, draw: Callable[[], float] = random.random) -> None:
        self.recorder = recorder
        self.ratio = ratio
        self.draw = draw

    def on_request(self, ctx: RequestContext) -> None:
        incoming: bytes | None = None
        for name, value in ctx.headers:
            if name == b"traceparent":
                incoming = value            # the last one, as the forwarding filter reads it
        flags = trace_flags(incoming) if incoming is not None else None
        if flags is not None:
            if flags & 1:
                self.recorder.start(ctx, True)
        elif self.draw() < self.ratio:
            self.recorder.start(ctx, False)
        return None

    def attempt(self, ctx: RequestContext) -> None:
        """An upstream attempt starts (a proxy's `on_attempt`, a composed call's too)."""
        spans = ctx.get_state(self.name)
        if spans is not None:
            self.recorder.attempt(ctx, spans)

    def on_finished(self, ctx: RequestContext) -> None:
        spans = ctx.get_state(self.name)
        if spans is not None:
            self.recorder.finish(ctx, spans)
