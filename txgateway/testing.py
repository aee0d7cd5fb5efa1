"""A test kit for filters and terminals: contexts, a recording downstream, filters as routes get them.

    from txgateway.testing import make_ctx, route_filters, run_filter

    filters = route_filters(config, "rate_limit", clock=clock, limiter=LocalStore(clock))
    ctx = make_ctx(config, "/api/users", client_ip="10.0.0.7")
    assert run_filter(filters.get(ctx), ctx) is None

Nothing here opens a socket: the integration tests (tests/integration) do that through
real listeners; this is for driving one piece at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from txgateway import registry
from txgateway.config import Config, Route
from txgateway.contract import Resources
from txgateway.pipeline import Chain, LocalResponse, Pipeline, RequestContext, ResponseHead

__all__ = ["RecordingDownstream", "RouteFilters", "make_ctx", "respond", "route_filters", "run_filter", "with_filter"]


class RecordingDownstream:
    """A `pipeline.Downstream` that keeps what the pipeline sent: the head, the body, the end."""

    tls: str | None = None
    hsts: bytes | None = None

    def __init__(self) -> None:
        self.head: ResponseHead | None = None
        self.body = b""
        self.finished = False
        self.aborted = False
        self.request_body: list[bytes] = []      # what read_body hands a sink

    def send_head(self, ctx: RequestContext, head: ResponseHead) -> None:
        self.head = head

    def send_body(self, ctx: RequestContext, data: bytes) -> None:
        ctx.bytes_out += len(data)
        self.body += data

    def flush(self, ctx: RequestContext) -> None:
        pass

    def finish(self, ctx: RequestContext) -> None:
        self.finished = True

    def abort(self, ctx: RequestContext) -> None:
        self.aborted = True

    def read_body(self, ctx: RequestContext, sink: Any) -> None:
        for chunk in self.request_body:
            sink.body_chunk(chunk)
        sink.body_end()

    def pause_body(self, ctx: RequestContext) -> None:
        pass

    def resume_body(self, ctx: RequestContext) -> None:
        pass

    def register_producer(self, ctx: RequestContext, producer: Any) -> None:
        pass

    def unregister_producer(self, ctx: RequestContext) -> None:
        pass

    def start_tunnel(self, ctx: RequestContext, upstream: Any) -> Any:
        raise NotImplementedError("no tunnels in memory")

    @property
    def status(self) -> int | None:
        return self.head.status if self.head is not None else None

    def headers(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.head.headers} if self.head is not None else {}


def make_ctx(config: Config | None = None, path: str = "/", method: bytes = b"GET",
             headers: Iterable[tuple[bytes, bytes]] = (), client_ip: str = "127.0.0.1", identity: Any = None,
             host: bytes | None = b"gateway.test", scheme: bytes = b"http", downstream: Any = None,
             correlation_id: str = "cid-1", start: float = 0.0) -> RequestContext:
    """A request as the transport and the edge leave it: with `config`, on the route whose
    prefix is `path`'s longest match, with its upstream path."""
    raw = path.encode()
    target, _, query = raw.partition(b"?")
    ctx = RequestContext(method, raw, target, b"?" + query if query else b"", b"1.1", list(headers), host, scheme,
                         client_ip, downstream if downstream is not None else RecordingDownstream(), start)
    ctx.correlation_id = correlation_id
    ctx.identity = identity
    if config is not None:
        from txgateway.routing import RouteTable
        match = RouteTable(config.routes).match(method, target, host)
        if match is not None:
            ctx.route = match.route
            ctx.upstream = match.route.upstream
            ctx.upstream_path = match.upstream_path
    return ctx


def run_filter(filter: Any, ctx: RequestContext) -> LocalResponse | None:
    """A filter's request hook, its Deferred driven to the end (it must have fired: drive any
    clock first); a filter absent on the route (None) lets the request through."""
    if filter is None or filter.on_request is None:
        return None
    result = filter.on_request(ctx)
    if not isinstance(result, Deferred):
        return result       # type: ignore[no-any-return]
    out: list[Any] = []
    result.addBoth(out.append)
    if not out:
        raise AssertionError(f"filter {filter.name}: its Deferred has not fired")
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]       # type: ignore[no-any-return]


def respond(filter: Any, ctx: RequestContext, status: int = 200,
            headers: Iterable[tuple[bytes, bytes]] = ()) -> dict[str, str]:
    """The response head a filter's head hook leaves, as a dict of text headers."""
    head = ResponseHead(status, b"OK", list(headers), 0)
    if filter is not None and filter.on_response_head is not None:
        filter.on_response_head(ctx, head)
    return {k.decode(): v.decode() for k, v in head.headers}


class RouteFilters:
    """One filter kind as every route of a config gets it (built once per route, as the
    gateway builds chains), looked up by a context's route."""

    def __init__(self, config: Config, name: str, resources: Resources) -> None:
        self.kind = next(kind for kind in registry.FILTERS if kind.name == name)
        self.config = config
        self.resources = resources
        self._built: dict[int, Any] = {}

    def for_route(self, route: Route) -> Any:
        if route.index not in self._built:
            policy = route.policies.get(self.kind.name)
            self._built[route.index] = (self.kind.build(self.resources, policy, route)
                                        if policy is not None else None)
        return self._built[route.index]

    def get(self, ctx: RequestContext) -> Any:
        assert ctx.route is not None, "the context has no route (make_ctx(config, path) sets it)"
        return self.for_route(ctx.route)

    # As one filter over all routes: each call goes to the context's route's filter, if any.

    def on_request(self, ctx: RequestContext) -> Any:
        f = self.get(ctx)
        return None if f is None or f.on_request is None else f.on_request(ctx)

    def on_response_head(self, ctx: RequestContext, head: ResponseHead) -> None:
        f = self.get(ctx)
        if f is not None and f.on_response_head is not None:
            f.on_response_head(ctx, head)


def route_filters(config: Config, name: str, clock: Any = None, **parts: Any) -> RouteFilters:
    """Filter `name` (a registry name: "auth", "rate_limit", "header_rules") for each route
    of `config`; `parts` lend what the gateway would (limiter=, local_buckets=, jwks=)."""
    defaults: dict[str, Any] = {"jwks": None, "limiter": None, "local_buckets": None}
    return RouteFilters(config, name, Resources(config, clock, **{**defaults, **parts}))


def with_filter(pipeline: Pipeline, extra: Any) -> Pipeline:
    """`pipeline` with `extra` last in every route's chain (its request hook runs last, its
    response hooks first), as the registry would place a new filter: for probing a running
    gateway with a filter of the test's own (`gateway.switch.pipeline = with_filter(...)`)."""
    chains = [Chain(c.name, [*c.request_filters, extra], [*c.response_filters, extra], c.terminal)
              for c in pipeline.chains]
    from txgateway.routing import RoutingFilter
    edge = pipeline.edge
    edge = Chain(edge.name, [*edge.request_filters[:-1], RoutingFilter(pipeline.table, chains)],  # type: ignore[arg-type]
                 edge.response_filters, None)
    out = Pipeline(edge, chains, pipeline.table, pipeline.clock, pipeline.stats, pipeline.limits,
                   dict(pipeline.terminals))
    proxy = out.terminals.get("proxy")
    if proxy is not None:
        proxy.pipeline = out
    return out
