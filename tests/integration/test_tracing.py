"""OpenTelemetry spans exported to a real OTLP/HTTP receiver (issue 17, part 2).

The receiver is a stdlib HTTP server on 127.0.0.1 in its own thread (the gateway posts to it
from the reactor the test runs on), decoding each POST /v1/traces with opentelemetry-proto.
Exports are forced with `flush` rather than waited for, or timed with an injected clock.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import pytest_twisted
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from tests.conftest import free_port, js
from tests.integration.test_admin import admin_port, call, labels, named, scrape
from tests.integration.test_auth import jwks_config, jwks_server, now_clock, rs, rsa_keys, wait_for  # noqa: F401
from tests.integration.test_compose import Held, composed, held_closed

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


class Receiver:
    """An OTLP/HTTP collector: keeps every exported span with its resource's attributes, and
    the headers of each export; answers `status` (200, or 400 to refuse every batch)."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.spans: list[tuple[dict[str, Any], Span]] = []
        self.headers: list[dict[str, str]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                if self.path == "/v1/traces" and receiver.status == 200:
                    request = ExportTraceServiceRequest.FromString(body)
                    for resource_spans in request.resource_spans:
                        resource = attributes(resource_spans.resource.attributes)
                        receiver.spans += [(resource, span) for scope in resource_spans.scope_spans
                                           for span in scope.spans]
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(receiver.status if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def attributes(kvs: Any) -> dict[str, Any]:
    out = {}
    for kv in kvs:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value"))
    return out


def config(echo_url: str, dead_url: str, endpoint: str, ratio: float = 1.0) -> str:
    return f"""
    admin: {{endpoint: "tcp:0:interface=127.0.0.1"}}
    tracing:
      otlp_endpoint: "{endpoint}"
      service_name: edge-test
      sample_ratio: {ratio}
      headers: {{x-api-key: s3cret}}
    upstreams:
      users: {{targets: ["{dead_url}", "{echo_url}"], balance: round_robin, retries: 1, connect_timeout: 1s}}
      live: {{targets: ["{echo_url}"]}}
    routes:
      - {{prefix: /api/users, upstream: users}}
      - {{prefix: /api/live, upstream: live}}
    """


async def flush(gw: Any) -> None:
    """Export every ended span now (what the export timer would do later)."""
    await gw.gateway.tracing.flush()


def sampled(traceparent: str) -> bool:
    return bool(int(traceparent[-2:], 16) & 1)


def by_trace(spans: list[tuple[dict[str, Any], Span]], trace: str) -> list[Span]:
    return [span for _, span in spans if span.trace_id.hex() == trace]


@pytest_twisted.ensureDeferred
async def test_server_and_client_spans_with_their_parents_reach_the_collector(reactor, echo, receiver, gateway):
    gw = await gateway(config(echo.url, f"http://127.0.0.1:{free_port()}", receiver.url))
    traces = [f"{i:032x}" for i in range(1, 3)]
    for trace in traces:      # round robin: one of the two tries the dead target first
        r = await call(gw.port, "/api/users/7?q=1", headers=[("traceparent", f"00-{trace}-{CALLER_SPAN}-01"),
                                                               ("User-Agent", "tracing-test/1.0")])
        assert r.status == 200
    sent = [request.getHeader("traceparent") for request in echo.requests]
    await flush(gw)

    assert {resource["service.name"] for resource, _ in receiver.spans} == {"edge-test"}
    assert receiver.headers[0]["x-api-key"] == "s3cret"
    retried = 0
    for trace, upstream_saw in zip(traces, sent, strict=True):
        spans = by_trace(receiver.spans, trace)
        (server,) = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]
        clients = sorted((s for s in spans if s.kind == Span.SPAN_KIND_CLIENT), key=lambda s: s.start_time_unix_nano)
        assert server.parent_span_id.hex() == CALLER_SPAN                 # continues the caller's trace
        assert server.name == "GET /api/users"
        assert attributes(server.attributes) == {
            "http.request.method": "GET", "url.path": "/api/users/7", "url.query": "q=1", "url.scheme": "http",
            "network.protocol.version": "1.1", "network.peer.address": "127.0.0.1", "server.address": "127.0.0.1",
            "user_agent.original": "tracing-test/1.0", "http.route": "/api/users", "client.address": "127.0.0.1",
            "http.response.status_code": 200}
        assert all(c.parent_span_id == server.span_id for c in clients)   # attempts are the server span's children
        last = clients[-1]
        # the upstream got the real id of the attempt that reached it
        assert upstream_saw == f"00-{trace}-{last.span_id.hex()}-01"
        assert attributes(last.attributes)["http.response.status_code"] == 200
        assert attributes(last.attributes)["url.full"] == f"{echo.url}/api/users/7"
        assert attributes(last.attributes)["server.port"] == echo.port
        if len(clients) == 2:                                               # a retry shows as its own span
            retried += 1
            failed = clients[0]
            assert failed.status.code == Status.STATUS_CODE_ERROR
            assert attributes(failed.attributes)["error.type"].startswith("retried after: connect failed")
            assert attributes(last.attributes)["http.request.resend_count"] == 1
            assert failed.end_time_unix_nano <= last.start_time_unix_nano
        else:
            assert len(clients) == 1
    assert retried == 1

    m = await scrape(admin_port(gw))
    assert named(m, "txgateway_tracing_spans_total") == {labels(result="exported"): len(receiver.spans),
                                                         labels(result="dropped"): 0.0}


@pytest_twisted.ensureDeferred
async def test_unsampled_callers_and_ratio_zero_export_nothing_but_still_propagate(reactor, echo, receiver, gateway):
    gw = await gateway(config(echo.url, f"http://127.0.0.1:{free_port()}", receiver.url, ratio=0.0))
    gate, started = gw.gateway.tracing.gate, []

    class Recorder:             # the gate's recorder, noting which requests reach it
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def start(self, ctx: Any, continued: bool) -> None:
            started.append(continued)
            self.inner.start(ctx, continued)

        def attempt(self, ctx: Any, spans: Any) -> None:
            self.inner.attempt(ctx, spans)

        def finish(self, ctx: Any, spans: Any) -> None:
            self.inner.finish(ctx, spans)

    gate.recorder = Recorder(gate.recorder)
    assert (await call(gw.port, "/api/live/1", headers=[("traceparent", f"00-{TRACE}-{CALLER_SPAN}-00")])).status == 200
    assert (await call(gw.port, "/api/live/2")).status == 200                # a trace the gateway starts: ratio 0
    assert (await call(gw.port, "/api/live/3", headers=[("traceparent", f"00-{TRACE}-{CALLER_SPAN}-01")])).status == 200
    assert (await call(gw.port, "/api/live/4", headers=[("traceparent", f"00-{TRACE}-{'0' * 16}-01")])).status == 200
    first, second, third, fourth = (request.getHeader("traceparent") for request in echo.requests)
    assert first.startswith(f"00-{TRACE}-") and not sampled(first) and CALLER_SPAN not in first
    assert TRACE not in second and not sampled(second)
    assert TRACE not in fourth and not sampled(fourth)                     # malformed (zero span id): a new trace
    assert third.startswith(f"00-{TRACE}-") and sampled(third)             # the caller sampled it: parent-based
    assert started == [True]      # the recorder heard of the third request only (ops/sampling.py decides)
    await flush(gw)
    spans = [span for _, span in receiver.spans]
    assert {s.trace_id.hex() for s in spans} == {TRACE} and len(spans) == 2   # only the third: server + client
    client = next(s for s in spans if s.kind == Span.SPAN_KIND_CLIENT)
    assert third == f"00-{TRACE}-{client.span_id.hex()}-01"


@pytest_twisted.ensureDeferred
async def test_a_collector_that_is_down_costs_requests_nothing(reactor, echo, gateway):
    gw = await gateway(config(echo.url, f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}/v1/traces"))
    began = time.monotonic()
    statuses = [(await call(gw.port, f"/api/live/{i}")).status for i in range(20)]
    assert statuses == [200] * 20
    assert time.monotonic() - began < 5.0           # nothing waited for the collector (its export timeout is 10 s)
    assert gw.gateway.tracing.counts == [0, 0]      # the spans are queued for a later export, not sent inline


@pytest_twisted.ensureDeferred
async def test_spans_a_collector_refuses_are_counted_as_dropped(reactor, echo, gateway):
    refusing = Receiver(status=400)
    try:
        gw = await gateway(config(echo.url, f"http://127.0.0.1:{free_port()}", refusing.url))
        assert (await call(gw.port, "/api/live/1")).status == 200
        await flush(gw)
        assert len(refusing.headers) == 1
        m = await scrape(admin_port(gw))
        assert named(m, "txgateway_tracing_spans_total") == {labels(result="exported"): 0.0,
                                                             labels(result="dropped"): 2.0}
        assert (await call(gw.port, "/api/live/2")).status == 200          # still serving
    finally:
        refusing.close()


def tracing_section(endpoint: str) -> str:
    return f'\n    tracing: {{otlp_endpoint: "{endpoint}"}}'


def only_trace(receiver: Receiver) -> tuple[Span, list[Span]]:
    """The one server span exported and the other spans of its trace, in start order."""
    (server,) = [span for _, span in receiver.spans if span.kind == Span.SPAN_KIND_SERVER]
    others = sorted((span for _, span in receiver.spans if span is not server), key=lambda s: s.start_time_unix_nano)
    assert all(span.trace_id == server.trace_id and span.parent_span_id == server.span_id for span in others)
    return server, others


@pytest_twisted.ensureDeferred
async def test_a_redis_rate_limit_decision_is_a_span_of_the_request(reactor, echo, receiver, gateway, redis_server):
    gw = await gateway(tracing_section(receiver.url) + f"""
    redis: {{url: "{redis_server.url}", timeout: 5s}}
    rate_limits: {{backend: redis, on_redis_error: deny, tiers: {{free: {{rate: 100/hour}}}}}}
    upstreams:
      u: {{targets: ["{echo.url}"]}}
    routes:
      - {{prefix: /api, upstream: u, rate_limit: {{rate: 100/hour}}}}
    """)
    assert (await call(gw.port, "/api/1")).status == 200
    await flush(gw)
    server, (decision, attempt) = only_trace(receiver)
    assert (decision.name, decision.kind) == ("EVALSHA", Span.SPAN_KIND_CLIENT)
    assert attributes(decision.attributes) == {"db.system.name": "redis", "db.operation.name": "EVALSHA"}
    assert decision.end_time_unix_nano <= attempt.start_time_unix_nano    # decided before it went upstream
    assert attempt.name == "GET" and server.name == "GET /api"


@pytest_twisted.ensureDeferred
async def test_a_jwks_refetch_for_an_unknown_kid_is_a_span_of_the_request(
        reactor, echo, receiver, gateway, secret_file, rsa_keys, jwks_server):  # noqa: F811
    server_jwks, _, url = await jwks_server("k1")
    clock = now_clock()
    gw = await gateway(tracing_section(receiver.url) + jwks_config(echo.url, url, secret_file), clock=clock)
    await wait_for(reactor, lambda: gw.gateway.jwks.fetched_at is not None)
    clock.advance(31)                                   # past the refetch cooldown
    server_jwks.serve("k1", "k2")                       # the provider rotated; the gateway has not seen it
    r = await call(gw.port, "/api/users/1", token=rs(rsa_keys, "k2", clock))
    assert r.status == 200
    await flush(gw)
    server, (fetch, attempt) = only_trace(receiver)
    assert (fetch.name, fetch.kind) == ("GET", Span.SPAN_KIND_CLIENT)
    assert attributes(fetch.attributes) == {"http.request.method": "GET", "url.full": url,
                                            "txgateway.jwks": "refetch for an unknown kid"}
    assert fetch.end_time_unix_nano <= attempt.start_time_unix_nano
    assert attributes(server.attributes)["http.response.status_code"] == 200


def composed_section(endpoint: str, up: Any, ratio: float = 1.0) -> str:
    """/api/c/{id}: a user call, then an orders call using its answer, traced at `ratio`."""
    return f'\n    tracing: {{otlp_endpoint: "{endpoint}", sample_ratio: {ratio}}}' + composed(
        up, {"user": 'path: "/users/{id}"', "orders": 'path: "/orders/{user.customer_id}", after: user, group: orders'})


@pytest_twisted.ensureDeferred
async def test_each_composed_call_is_a_client_span_of_the_request_and_sends_its_id(reactor, receiver, gateway, upstreams):
    up = await upstreams({"/users/7": js({"id": 7, "customer_id": "c-9"}), "/orders/c-9": js([{"id": 1}])})
    gw = await gateway(composed_section(receiver.url, up))
    r = await call(gw.port, "/api/c/7", headers=[("traceparent", f"00-{TRACE}-{CALLER_SPAN}-01")])
    assert r.status == 200
    await flush(gw)
    server, (user, orders) = only_trace(receiver)
    assert server.parent_span_id.hex() == CALLER_SPAN and server.name == "GET /api/c"
    assert attributes(server.attributes)["http.response.status_code"] == 200
    for span, request, path in ((user, up.requests[0], "/users/7"), (orders, up.requests[1], "/orders/c-9")):
        assert (span.name, span.kind, span.status.code) == ("GET", Span.SPAN_KIND_CLIENT, Status.STATUS_CODE_UNSET)
        assert attributes(span.attributes) == {
            "http.request.method": "GET", "url.full": f"{up.url}{path}", "txgateway.upstream": "a",
            "server.address": "127.0.0.1", "server.port": up.port, "http.response.status_code": 200}
        # the upstream got the call's own span id
        assert request.getHeader("traceparent") == f"00-{TRACE}-{span.span_id.hex()}-01"
    assert user.end_time_unix_nano <= orders.start_time_unix_nano        # orders waited for user


@pytest_twisted.ensureDeferred
async def test_composed_calls_of_an_unsampled_request_make_no_spans_but_carry_its_trace(
        reactor, receiver, gateway, upstreams):
    up = await upstreams({"/users/7": js({"id": 7, "customer_id": "c-9"}), "/orders/c-9": js([])})
    gw = await gateway(composed_section(receiver.url, up, ratio=0.0))
    assert (await call(gw.port, "/api/c/7", headers=[("traceparent", f"00-{TRACE}-{CALLER_SPAN}-00")])).status == 200
    await flush(gw)
    assert receiver.spans == []
    sent = [request.getHeader("traceparent") for request in up.requests]
    assert all(t.startswith(f"00-{TRACE}-") and t.endswith("-00") and CALLER_SPAN not in t for t in sent)
    assert len(set(sent)) == 2


@pytest_twisted.ensureDeferred
async def test_a_failed_composed_call_and_the_one_it_cancels_end_as_error_spans(reactor, receiver, gateway, upstreams):
    held = Held()
    up = await upstreams({"/slow/1": held, "/broken/1": (503, b"text/plain", b"down")})
    gw = await gateway(tracing_section(receiver.url) + composed(
        up, {"slow": 'path: "/slow/{id}", group: slow', "broken": 'path: "/broken/{id}", group: broken'}, timeout="30s"))
    assert (await call(gw.port, "/api/c/1")).status == 502
    await held_closed(held, 1)
    await flush(gw)
    server, calls = only_trace(receiver)
    slow, broken = sorted(calls, key=lambda s: attributes(s.attributes)["url.full"], reverse=True)
    assert attributes(broken.attributes)["http.response.status_code"] == 503
    assert (attributes(broken.attributes)["error.type"], broken.status.code) == ("503", Status.STATUS_CODE_ERROR)
    assert (attributes(slow.attributes)["error.type"], slow.status.code) == ("cancelled: broken failed",
                                                                              Status.STATUS_CODE_ERROR)
    assert "http.response.status_code" not in attributes(slow.attributes)
    assert server.status.code == Status.STATUS_CODE_ERROR


def test_a_trace_the_gateway_starts_is_sampled_as_the_sdks_trace_id_ratio_sampler_decides():
    """The gate decides a new trace on the trace id the forwarding filter made, as the SDK's
    TraceIdRatioBased does (the id's low 64 bits below ratio * 2**64), bounds included."""
    from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased

    from txgateway.core.pipeline import RequestContext
    from txgateway.ops.sampling import TraceGate

    class Noting:               # the gate's recorder, noting the requests it hears of
        def __init__(self) -> None:
            self.started: list[Any] = []

        def start(self, ctx: Any, continued: bool) -> None:
            self.started.append(ctx)

    edges = ["7fffffffffffffff", "8000000000000000", "1999999999999999", "199999999999999a",
             "0000000000000000", "ffffffffffffffff"]   # either side of the bounds of 0.5 and 0.1
    ids = [os.urandom(16).hex() for _ in range(2000)] + [os.urandom(8).hex() + low for low in edges]
    for ratio in (0.0, 0.1, 0.5, 0.9, 1.0):
        recorder, sampler, expected = Noting(), TraceIdRatioBased(ratio), []
        gate = TraceGate(recorder, ratio)   # type: ignore[arg-type]
        for trace_id in ids:
            ctx = RequestContext(b"GET", b"/", b"/", b"", b"1.1", [], None, b"http", "127.0.0.1", object(), 0.0)  # type: ignore[arg-type]
            trace = f"00-{trace_id}-{CALLER_SPAN}-00".encode()
            assert gate.decide(ctx, trace, None) == trace
            if sampler.should_sample(None, int(trace_id, 16), "GET").decision is Decision.RECORD_AND_SAMPLE:
                expected.append(ctx)
        assert recorder.started == expected, ratio
