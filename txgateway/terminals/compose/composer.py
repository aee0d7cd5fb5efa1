"""The `compose:` terminal at work: one request, several upstream calls, one JSON answer.

Each call is an ordinary proxied request on a context of its own, run by a `Proxy` over the
request path's upstream groups: it gets its upstream's pool, balancer, breaker, passive
health, retries and timeouts exactly as a proxied route does. What the proxy would send a
client goes to a `_CallSink` instead, which keeps at most `max_body_size` bytes of a JSON
answer. Calls start as soon as the calls they wait for (`after:`) have answered; a deadline
bounds the whole composition; a client that leaves cancels every call still running.
"""

from __future__ import annotations

import os
from typing import Any, Final, cast
from urllib.parse import parse_qsl

from twisted.logger import Logger

from txgateway.config.contract import Resources
from txgateway.core.jsonbody import BadJSON, dumps, is_json, loads
from txgateway.core.pipeline import Chain, LocalResponse, Pipeline, RequestContext, ResponseHead, error_response
from txgateway.core.route import Route
from txgateway.filters.reshape import get_path, identity_value
from txgateway.ops.stats import Stats
from txgateway.terminals.compose.config import Call, ComposeSettings
from txgateway.terminals.compose.template import BadValue, Token, Values
from txgateway.upstream.pool import TargetPool
from txgateway.upstream.proxy import Proxy

__all__ = ["ComposeTerminal", "Composer", "Composition"]

_log = Logger(namespace="txgateway.terminals.compose")
_SPAN_ID_BLOCK: Final = 2048      # random bytes read at once for calls' span ids (256 ids)
_WAITING: Final = 0
_RUNNING: Final = 1
_OK: Final = 2
_FAILED: Final = 3


class Composer:
    """What all composed routes of one request path share: a proxy for their calls over the
    request path's upstream groups, whose answers go to call sinks, not to a client."""

    def __init__(self, proxy: Proxy, resources: Resources) -> None:
        config = resources.config
        self.clock = resources.clock
        self.deadlines = resources.deadlines
        self.stats: Stats | None = resources.parts.get("stats")   # typed: a native call per settled call
        self.calls = _CallProxy(resources.reactor, resources.clock, config.upstreams, resources.deadlines,
                                config.limits, proxy.groups)
        self.calls.pipeline = Pipeline(Chain("(composed calls)", (), (), None), (), None, resources.clock)
        self.call_chain = self.calls.pipeline.edge
        self.pipeline: Pipeline        # the request path's, set when it is built
        self._span_ids = b""           # hex digits, 16 a call (filled in the process that uses them)
        self._used = 0

    def span_id(self) -> bytes:
        """A new span id (16 hex digits): a getrandom call, .hex() and .encode() per call cost
        ~1k instructions each; taken from a pooled block instead, as ForwardingHeaders does."""
        used = self._used
        if used >= len(self._span_ids):
            self._span_ids = os.urandom(_SPAN_ID_BLOCK).hex().encode()
            used = 0
        self._used = used + 16
        return self._span_ids[used:used + 16]

    def terminal(self, settings: ComposeSettings, route: Route) -> ComposeTerminal:
        return ComposeTerminal(self, settings, route)


class _CallProxy(Proxy):
    """The proxy of composed calls. A call's request head is made of blocks rendered once: the
    client's forwarded headers once per composition, the call's fixed ones at config load;
    `Proxy.request_head` would join four pieces per header, per call. A traced call (its
    attempt rewrote the `traceparent` in its headers) or one whose own headers replace
    forwarded ones gets the generic head."""

    def request_head(self, ctx: RequestContext, pool: TargetPool) -> bytes:
        run = cast(_CallRun, ctx.downstream)
        plan = run.plan
        if ctx.traceparent is not None or plan.own:
            return super().request_head(ctx, pool)
        host = ctx.host if pool.preserve_host and ctx.host else pool.netloc
        trace = run.trace
        return b"".join((ctx.method, b" ", ctx.upstream_path, ctx.query, b" HTTP/1.1\r\nhost: ", host, b"\r\n",
                         run.composition.block, b"" if trace is None else b"traceparent: " + trace + b"\r\n",
                         plan.tail))


def _rendered(headers: list[tuple[bytes, bytes]]) -> bytes:
    """Header lines as a request head holds them."""
    parts: list[bytes] = []
    for name, value in headers:
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")
    return b"".join(parts)


class _Plan:
    """One call as the composer runs it, prepared once at config load: what `Call` says, with
    its `after:` calls as positions and its fixed headers (its own, then `accept`) ready."""

    __slots__ = ("name", "upstream", "template", "method", "after", "group", "required", "fallback",
                 "has_fallback", "transform", "own", "fixed", "empty_body", "tail")

    def __init__(self, call: Call, position: dict[str, int]) -> None:
        self.name = call.name
        self.upstream = call.upstream
        self.template = call.template
        self.method = call.method
        self.after = tuple(position[name] for name in call.after)
        self.group = call.group
        self.required = call.required
        self.fallback = call.fallback
        self.has_fallback = call.has_fallback
        self.transform = call.transform
        self.own = frozenset(name for name, _ in call.headers)
        self.fixed: list[tuple[bytes, bytes]] = [*call.headers, (b"accept", b"application/json")]
        self.empty_body = call.method not in (b"GET", b"HEAD", b"DELETE", b"OPTIONS")   # sent with length 0
        # The end of its request head (_CallProxy): its fixed headers, its framing, the blank line.
        self.tail = _rendered(self.fixed) + (b"content-length: 0\r\n\r\n" if self.empty_body else b"\r\n")


class ComposeTerminal:
    """One composed route's terminal."""

    def __init__(self, composer: Composer, settings: ComposeSettings, route: Route) -> None:
        self.composer = composer
        self.settings = settings
        self.prefix = route.prefix.rstrip("/").encode()
        self.uses_query = any(t.source == "query" for c in settings.calls for t in c.template.tokens)
        self.position = {call.name: i for i, call in enumerate(settings.calls)}
        self.plans = [_Plan(call, self.position) for call in settings.calls]
        self.deadline = settings.deadline
        self.max_body_size = settings.max_body_size

    def forward(self, ctx: RequestContext) -> LocalResponse | None:
        params: dict[str, str] = {}
        pattern = self.settings.pattern
        if pattern is not None:
            matched = pattern.match(ctx.path[len(self.prefix):])
            if matched is None:
                return error_response(ctx, 404, "NO_ROUTE", "no route matches this request")
            params = matched
        query: dict[str, str] = {}
        if self.uses_query and len(ctx.query) > 1:
            try:
                for key, value in parse_qsl(ctx.query[1:].decode("latin-1"), keep_blank_values=True,
                                            errors="strict"):
                    query.setdefault(key, value)
            except UnicodeDecodeError:
                return error_response(ctx, 400, "BAD_REQUEST", "the query is not valid UTF-8")
        composition = Composition(self.composer, self, ctx, params, query)
        ctx.forwarding = composition
        return composition.start()

    def cancel(self, ctx: RequestContext) -> None:
        composition = ctx.forwarding
        if composition is not None:
            ctx.forwarding = None
            composition.cancel()


class _CallRun:
    """One call of one composition: its state, its context, its access-log record; and the
    `Downstream` its proxied exchange answers to, keeping its JSON answer, bounded."""

    __slots__ = ("composition", "plan", "state", "ctx", "status", "reason", "code", "value", "started", "chunks",
                 "size", "problem", "tls", "hsts", "trace")

    def __init__(self, composition: Composition, plan: _Plan) -> None:
        self.composition = composition
        self.plan = plan
        self.state = _WAITING
        self.ctx: RequestContext | None = None
        self.status: int | None = None
        self.reason: str | None = None
        self.code: str | None = None       # the proxy's error code when it answered for the upstream
        self.value: Any = None
        self.started = 0.0
        self.chunks: list[bytes] = []
        self.size = 0
        self.problem: str | None = None     # set: the call has failed, whatever follows
        self.tls: str | None = None
        self.hsts: bytes | None = None
        self.trace: bytes | None = None    # the traceparent its request carries (a child span id)

    # -- its state -------------------------------------------------------------------

    def answered(self, value: Any) -> None:
        if self.state == _RUNNING:
            self.state = _OK
            self.value = value
            self.composition.settled(self)

    def failed(self, reason: str) -> None:
        if self.state == _WAITING or self.state == _RUNNING:
            ctx = self.ctx
            if ctx is not None and ctx.error_code is not None:
                self.code = ctx.error_code
            self.state = _FAILED
            self.reason = reason
            self.composition.settled(self)

    def record(self, now: float) -> dict[str, Any]:
        ms = _milliseconds(now - self.started) if self.ctx is not None else None
        out: dict[str, Any] = {"call": self.plan.name, "upstream": self.plan.upstream, "status": self.status,
                               "ms": ms}
        if self.reason is not None:
            out["error"] = self.reason
        return out

    # -- the Downstream of its exchange ----------------------------------------------

    def send_head(self, ctx: RequestContext, head: ResponseHead) -> None:
        self.status = head.status
        if ctx.error_code is not None:       # the proxy's own error (breaker, timeout, refused)
            notes = ctx.notes or {}
            self.problem = notes.get("upstream_error") or ("breaker open" if "breaker" in notes else ctx.error_code)
        elif not 200 <= head.status < 300:
            self.problem = f"answered {head.status}"
        elif not is_json(_header(head.headers, b"content-type")):
            self.problem = "answer is not application/json"
        if head.length is not None and head.length > self.composition.terminal.max_body_size:
            self._too_large()

    def send_body(self, ctx: RequestContext, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.composition.terminal.max_body_size:
            self._too_large()
        elif self.problem is None:
            self.chunks.append(data)

    def _too_large(self) -> None:
        self.chunks = []
        if self.ctx is not None:
            self.composition.composer.calls.cancel(self.ctx)
        self.failed("answer larger than max_body_size")

    def finish(self, ctx: RequestContext) -> None:
        if self.problem is not None:
            self.failed(self.problem)
            return
        chunks = self.chunks
        self.chunks = []
        try:
            value = loads(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            reshape = self.plan.transform
            if reshape is not None:
                value = reshape.apply(value)
        except BadJSON as e:
            self.failed(str(e))
            return
        self.answered(value)

    def abort(self, ctx: RequestContext) -> None:
        self.failed("upstream failed mid-answer")

    def flush(self, ctx: RequestContext) -> None:
        pass

    def register_producer(self, ctx: RequestContext, producer: Any) -> None:
        pass                    # nothing to pause for: the sink never waits

    def unregister_producer(self, ctx: RequestContext) -> None:
        pass

    def read_body(self, ctx: RequestContext, sink: Any) -> None:
        sink.body_end()         # calls carry no body

    def pause_body(self, ctx: RequestContext) -> None:
        pass

    def resume_body(self, ctx: RequestContext) -> None:
        pass

    def start_tunnel(self, ctx: RequestContext, upstream: Any) -> Any:
        raise RuntimeError("a composed call never upgrades")


def _milliseconds(seconds: float) -> float:
    """`round(seconds * 1000, 3)`, without the generic call `round` is when compiled."""
    scaled = seconds * 1e6
    return (int(scaled + 0.5) if scaled >= 0.0 else -int(0.5 - scaled)) / 1000.0


def _end_span(sub: RequestContext, cancelled: str | None) -> None:
    """A call's client span ends with the call (ops/tracing.py), if its request is traced."""
    spans = sub.get_state("tracing")
    if spans is not None:
        spans.end_call(sub, cancelled)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


class Composition(Values):
    """One request's calls, from the first start to the one answer (or the cancel); the
    values its calls' templates take."""

    def __init__(self, composer: Composer, terminal: ComposeTerminal, ctx: RequestContext,
                 params: dict[str, str], query: dict[str, str]) -> None:
        self.composer = composer
        self.terminal = terminal
        self.ctx = ctx
        self.params = params
        self.query = query
        self.runs = [_CallRun(self, plan) for plan in terminal.plans]
        self.deadline = 0.0
        self.done = False
        self.advancing = False
        self.again = False
        self.refused: LocalResponse | None = None     # a client value no path may hold (400)
        self.failure: _CallRun | None = None           # the required call whose failure is the answer
        self.forwarded: list[tuple[bytes, bytes]] | None = None   # the headers every call carries
        self.block = b""                   # ... as a request head holds them (_CallProxy)
        self.trace: bytes | None = None

    def start(self) -> LocalResponse | None:
        """Start the calls that wait for nothing; a LocalResponse if the request cannot be
        composed at all (an answer given before any call, without going through `settled`)."""
        self.deadline = self.composer.deadlines.now + self.terminal.deadline
        self.composer.deadlines.add(self)
        self.advance()
        if self.refused is not None:
            return self.refused
        return None

    def advance(self) -> None:
        """Start every call whose `after:` calls have answered; answer once all have settled.
        Re-entrant: a call can settle while it is being started (an open breaker)."""
        if self.advancing:
            self.again = True
            return
        self.advancing = True
        try:
            self.again = True
            while self.again and not self.done:
                self.again = False
                for run in self.runs:
                    if run.state == _WAITING and not self.done:
                        self._maybe_start(run)
        finally:
            self.advancing = False
        if not self.done and self._all_settled():
            self._answer()

    def _all_settled(self) -> bool:
        """Every call answered or failed (a loop: compiled, `all()` of a generator builds one)."""
        for run in self.runs:
            if run.state == _WAITING or run.state == _RUNNING:
                return False
        return True

    def _maybe_start(self, run: _CallRun) -> None:
        runs = self.runs
        for i in run.plan.after:
            state = runs[i].state
            if state == _FAILED:
                run.failed("a call it waits for failed")
                return
            if state != _OK:
                return
        try:
            target = run.plan.template.render(self)
        except BadValue as e:
            if e.from_request:
                self._refuse(str(e))
            else:
                run.failed(str(e))
            return
        self._launch(run, target)

    def value(self, token: Token) -> object:
        source = token.source
        if source == "param":
            return self.params.get(token.name)
        if source == "query":
            return self.query.get(token.name)
        if source == "identity":
            return identity_value(self.ctx.identity, token.name)
        return get_path(self.runs[self.terminal.position[token.name]].value, token.path)

    def _launch(self, run: _CallRun, target: bytes) -> None:
        ctx = self.ctx
        plan = run.plan
        path, mark, query = target.partition(b"?")
        sub = RequestContext(plan.method, target, path, mark + query if query else b"", b"HTTP/1.1",
                             self._headers(run), ctx.host, ctx.scheme, ctx.peer_ip, run,
                             self.composer.clock.seconds())
        if plan.empty_body:
            sub.content_length = 0
        sub.correlation_id = ctx.correlation_id
        sub.identity = ctx.identity
        sub.upstream = plan.upstream
        sub.chain = self.composer.call_chain
        spans = ctx.get_state("tracing")
        if spans is not None:       # a traced request (ops/tracing.py): the call's attempts are its client spans
            sub.set_state("tracing", spans.call())
        run.ctx = sub
        run.state = _RUNNING
        run.started = sub.start
        self.composer.calls.forward(sub)

    def _headers(self, run: _CallRun) -> list[tuple[bytes, bytes]]:
        """Identity and forwarding headers of the request, a child span of its trace (the
        edge set a well-formed `traceparent`: only its span id changes), and the call's own."""
        shared = self.forwarded
        if shared is None:
            shared = self.forwarded = []
            for header in self.ctx.headers:
                name = header[0]
                if name and name[0] == 0x78:   # "x": one byte read before any slice is made
                    if name[:7] == b"x-user-" or name[:12] == b"x-forwarded-" or name == b"x-correlation-id":
                        shared.append(header)
                elif name == b"tracestate" or name == b"forwarded":
                    shared.append(header)
            self.block = _rendered(shared)
            self.trace = self.ctx.header(b"traceparent")
        out = list(shared)
        trace = self.trace
        if trace is not None:
            run.trace = trace[:36] + self.composer.span_id() + trace[52:]
            out.append((b"traceparent", run.trace))
        plan = run.plan
        own = plan.own
        if own:
            out = [h for h in out if h[0] not in own]
        out.extend(plan.fixed)
        return out

    def settled(self, run: _CallRun) -> None:
        if self.done:
            return
        sub = run.ctx
        stats = self.composer.stats
        if stats is not None and sub is not None and sub.upstream is not None and sub.target_url is not None:
            stats.observe_upstream(sub)
        if sub is not None:
            _end_span(sub, None)
        if run.state == _FAILED:
            _log.warn("composed call {call} to {upstream} failed for {correlation_id}: {reason}",
                      call=run.plan.name, upstream=run.plan.upstream, correlation_id=self.ctx.correlation_id,
                      reason=run.reason)
            if run.plan.required and self.failure is None:
                self._give_up(run, f"cancelled: {run.plan.name} failed")
        self.advance()

    def _give_up(self, failure: _CallRun, reason: str) -> None:
        """A required call failed (or the deadline passed): the answer is the envelope now, so
        every call still running is cancelled and none still waiting starts."""
        self.failure = failure
        for run in self.runs:
            if run.state == _RUNNING:
                self.composer.calls.cancel(run.ctx)      # type: ignore[arg-type]
                _end_span(run.ctx, reason)               # type: ignore[arg-type]
            if run.state in (_RUNNING, _WAITING):
                run.state = _FAILED
                run.reason = reason

    def expired(self) -> None:
        """The whole-route deadline passed: every call still running or waiting fails; the
        first required one among them decides the answer (504)."""
        if self.done:
            return
        late = [run for run in self.runs if run.state in (_RUNNING, _WAITING)]
        if not late:
            return
        for run in late:
            run.code = "GATEWAY_TIMEOUT"
        required = [run for run in late if run.plan.required]
        self._give_up(required[0] if required else late[0], "composition deadline")
        if not required:
            self.failure = None         # only optional calls were late: a partial answer
        self.advance()

    def cancel(self) -> None:
        """The client left (or a filter failed): stop every call, answer nobody."""
        if self.done:
            return
        self.done = True
        self.composer.deadlines.discard(self)
        for run in self.runs:
            if run.state == _RUNNING:
                self.composer.calls.cancel(run.ctx)      # type: ignore[arg-type]
                _end_span(run.ctx, "cancelled")          # type: ignore[arg-type]
                run.state = _FAILED
                run.reason = "cancelled"
        self._close()

    def _refuse(self, message: str) -> None:
        """A value from the request cannot be put in a call's path: 400, no call goes on."""
        launched = any(run.ctx is not None for run in self.runs)
        self.cancel()
        self.ctx.forwarding = None
        self.refused = error_response(self.ctx, 400, "BAD_REQUEST", message)
        if launched:      # calls ran: the answer is not at hand
            self.composer.pipeline.respond_local(self.ctx, self.refused)
            self.refused = None

    def _close(self) -> list[_CallRun]:
        """The calls' access-log record; then the references back to the composition (its
        runs) and to each run (its call's context) are let go, and the runs returned: so
        reference counting frees a finished composition at once, where the cycles left it
        to the cyclic GC (about 7% of a composed request's instructions)."""
        now = self.composer.clock.seconds()
        runs = self.runs
        self.ctx.note("calls", [run.record(now) for run in runs])
        self.runs = []
        self.failure = None
        for run in runs:
            run.ctx = None
        return runs

    def _answer(self) -> None:
        self.done = True
        self.composer.deadlines.discard(self)
        ctx = self.ctx
        ctx.forwarding = None
        failure = self.failure
        runs = self._close()
        if failure is not None:
            self._fail(failure)
            return
        result: dict[str, Any] = {}
        complete = True
        for run in runs:
            plan = run.plan
            if run.state == _FAILED:
                complete = False
                if not plan.has_fallback:
                    continue
                value = plan.fallback
            else:
                value = run.value
            if plan.group is not None:
                result[plan.group] = value
            elif isinstance(value, dict):
                result.update(value)
            else:
                if plan.required:
                    run.reason = "answer is not an object (give the call a group)"
                    self._fail(run)
                    return
                complete = False
        try:
            body = dumps(result)
        except BadJSON:
            self.composer.pipeline.respond_local(ctx, error_response(
                ctx, 502, "BAD_GATEWAY", "the composed answer could not be written"))
            return
        if not complete:
            ctx.note("completed", False)      # only then: a note costs the access log a JSON encoding
        headers = [(b"content-type", b"application/json"),
                   (b"x-gateway-completed", b"true" if complete else b"false")]
        self.composer.pipeline.respond_local(ctx, LocalResponse(200, headers, body))

    def _fail(self, run: _CallRun) -> None:
        """A required call failed: the envelope a proxied request would have got."""
        ctx = self.ctx
        ctx.note("completed", False)
        code = run.code
        if code == "GATEWAY_TIMEOUT":
            status, message = 504, f"the {run.plan.name} call did not answer in time"
        elif code == "UPSTREAM_UNAVAILABLE":
            status, message = 503, f"the {run.plan.name} call's upstream is unavailable"
        else:
            status, code, message = 502, "BAD_GATEWAY", f"the {run.plan.name} call failed"
        ctx.note("upstream_error", f"{run.plan.name}: {run.reason}")
        self.composer.pipeline.respond_local(ctx, error_response(ctx, status, code, message))
