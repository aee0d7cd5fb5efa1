"""A test kit for filters and terminals: contexts, a recording downstream, filters as routes get them.

    from txgateway.testing import make_ctx, route_filters, run_filter

    filters = route_filters(config, "rate_limit", clock=clock, limiter=LocalStore(clock))
    ctx = make_ctx(config, "/api/users", client_ip="10.0.0.7")
    assert run_filter(filters.get(ctx), ctx) is None

Nothing here opens a socket: `MemoryGateway` runs a whole gateway on a MemoryReactorClock
with in-memory connections (twisted.test.iosim); the integration tests (tests/integration)
go through real listeners.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim

from txgateway.config import registry
from txgateway.config.contract import Resources
from txgateway.config.schema import Config, Route
from txgateway.core.nowhere import Nowhere
from txgateway.core.pipeline import Chain, LocalResponse, Pipeline, RequestContext, ResponseHead

__all__ = [
    "HANG", "MemoryGateway", "RecordingDownstream", "RouteFilters", "make_ctx", "respond", "route_filters", "run_filter",
    "with_filter",
]


class RecordingDownstream(Nowhere):
    """A `pipeline.Downstream` that keeps what the pipeline sent: the head, the body, the end."""

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

    def finish(self, ctx: RequestContext) -> None:
        self.finished = True

    def abort(self, ctx: RequestContext) -> None:
        self.aborted = True

    def read_body(self, ctx: RequestContext, sink: Any) -> None:
        for chunk in self.request_body:
            sink.body_chunk(chunk)
        sink.body_end()

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
        from txgateway.filters.routing import RouteTable
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
    """The response head a filter's head hook leaves (its prepared fields included), as a dict
    of text headers."""
    head = ResponseHead(status, b"OK", list(headers), 0)
    if filter is not None and filter.on_response_head is not None:
        filter.on_response_head(ctx, head)
    prepared = head.prepared.pairs if head.prepared is not None else ()
    return {k.decode(): v.decode() for k, v in (*head.headers, *prepared)}


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
    from txgateway.filters.routing import RoutingFilter
    edge = pipeline.edge
    edge = Chain(edge.name, [*edge.request_filters[:-1], RoutingFilter(pipeline.table, chains)],  # type: ignore[arg-type]
                 edge.response_filters, None)
    out = Pipeline(edge, chains, pipeline.table, pipeline.clock, pipeline.stats, pipeline.limits,
                   dict(pipeline.terminals))
    for kind in registry.TERMINALS:
        if kind.answers_later and kind.name in out.terminals:
            out.terminals[kind.name].pipeline = out
    return out


class _Peer(Protocol):
    """One end of an in-memory connection: keeps what it receives."""

    def __init__(self, script: Callable[[_Peer, bytes], None] | None = None) -> None:
        self.received = b""
        self.script = script
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.script is not None:
            self.script(self, data)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


def HANG(peer: _Peer, data: bytes) -> None:
    """An upstream script meaning: the connection is never accepted."""


class MemoryGateway:
    """A whole gateway without sockets: a `Gateway` on a `MemoryReactorClock`, its clients and
    upstreams joined to it by `twisted.test.iosim` pumps, time moved by `advance`.

        gw = MemoryGateway(yaml_text, upstreams={"http://u:80": script})
        client = gw.connect()
        client.transport.write(b"GET /api/users/7 HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n")
        gw.run()
        assert client.received.startswith(b"HTTP/1.1 200")

    An upstream `script(peer, data)` answers with `peer.transport.write(...)`; a target with
    no script refuses connections (connection refused); one whose script is `HANG` never
    accepts (for connect timeouts).
    """

    def __init__(self, yaml_text: str, upstreams: dict[str, Callable[[_Peer, bytes], None]] | None = None) -> None:
        from txgateway.config.schema import parse_config
        from txgateway.service.gateway import Gateway
        self.reactor = MemoryReactorClock()
        self.config = parse_config(yaml_text, "memory.yaml")
        self.scripts = {_netloc(url): script for url, script in (upstreams or {}).items()}
        self.gateway = Gateway(self.config, self.reactor)
        self.gateway.startService()
        self.pumps: list[Any] = []
        self.upstream_peers: list[_Peer] = []
        self._connected = 0

    def connect(self) -> _Peer:
        """A new client connection to the first listener."""
        client = _Peer()
        server = self.gateway.factory.buildProtocol(None)
        self.pumps.append(iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client),
                                        greet=False, clock=self.reactor))
        return client

    def request(self, data: bytes) -> bytes:
        """`data` on a new connection, run until quiet: what the client received."""
        client = self.connect()
        client.transport.write(data)  # type: ignore[union-attr,call-arg,misc]  # zope interface stubs
        self.run()
        return client.received

    def run(self) -> None:
        """Move bytes and make pending upstream connections until nothing moves."""
        for _ in range(1000):
            moved = self._connect_upstreams()
            for pump in self.pumps:
                moved = pump.pump(advanceClock=False) or moved
            if not moved:
                return
        raise AssertionError("the in-memory gateway never went quiet")

    def advance(self, seconds: float, step: float = 0.05) -> None:
        """Move time in small steps, as a running reactor would (periodic sweeps see each)."""
        while seconds > 1e-9:
            moved = min(step, seconds)
            self.reactor.advance(moved)
            seconds -= moved
            self.run()

    def _connect_upstreams(self) -> bool:
        pending = self.reactor.tcpClients[self._connected:]
        self._connected = len(self.reactor.tcpClients)
        for host, port, factory, _timeout, _bind in pending:
            script = self.scripts.get(f"{host}:{port}")
            if script is HANG:
                continue
            connector = self.reactor.connectors[self.reactor.tcpClients.index((host, port, factory, _timeout, _bind))]
            if script is None:
                factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError("connection refused")))
                continue
            protocol = factory.buildProtocol(None)
            upstream = _Peer(script)
            self.upstream_peers.append(upstream)
            self.pumps.append(iosim.connect(upstream, iosim.makeFakeServer(upstream), protocol,
                                            iosim.makeFakeClient(protocol), greet=False, clock=self.reactor))
        return bool(pending)


def _netloc(url: str) -> str:
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
